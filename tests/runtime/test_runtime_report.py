"""LoadReport and parse_load_log on hand-written log text (real logs: test_runtime_rpc/model)."""

from __future__ import annotations

import pytest

from gpulab.core.devices import Device
from gpulab.core.report import BufferReport, LoadReport
from gpulab.runtime.logcapture import parse_load_log

MiB = 1024 * 1024

# Shaped like llama.cpp's log (src/llama.cpp, llama-model.cpp, llama-kv-cache.cpp,
# llama-context.cpp), for a server at :50601 with two devices (RPC0, RPC1) and one at :50602.
LOG = """\
llama_prepare_model_devices: using device RPC0 (10.0.0.5:50601) (unknown id) - 24105 MiB free
llama_prepare_model_devices: using device RPC1 (10.0.0.5:50601) (unknown id) - 24105 MiB free
llama_prepare_model_devices: using device RPC2 (10.0.0.6:50602) (unknown id) - 12000 MiB free
llama_prepare_model_devices: using device CUDA0 (NVIDIA GeForce RTX 4090) (0000:01:00.0) - 23000 MiB free
print_info: no_alloc              = 0
load_tensors: layer   0 assigned to device CPU, is_swa = 0
load_tensors: layer   1 assigned to device RPC0, is_swa = 0
load_tensors: layer   2 assigned to device RPC1, is_swa = 0
load_tensors: layer   3 assigned to device RPC2, is_swa = 1
load_tensors: layer   4 assigned to device CUDA0, is_swa = 0
load_tensors:   CPU_Mapped model buffer size =    28.69 MiB
load_tensors:   CPU_REPACK model buffer size =     1.50 MiB
load_tensors: RPC0[10.0.0.5:50601] model buffer size =    16.91 MiB
load_tensors: RPC1[10.0.0.5:50601] model buffer size =    10.00 MiB
load_tensors: RPC0[10.0.0.6:50602] model buffer size =     5.25 MiB
load_tensors:        CUDA0 model buffer size =    75.19 MiB
llama_context:  CUDA_Host  output buffer size =     0.19 MiB
llama_kv_cache: layer   0: dev = CPU
llama_kv_cache: layer   1: dev = RPC0
llama_kv_cache: layer   2: dev = RPC1
llama_kv_cache: layer   3: dev = RPC2
llama_kv_cache:        CPU KV buffer size =     0.38 MiB
llama_kv_cache: RPC0[10.0.0.5:50601] KV buffer size =     0.38 MiB
llama_kv_cache: RPC1[10.0.0.5:50601] KV buffer size =     0.38 MiB
llama_kv_cache: RPC0[10.0.0.6:50602] KV buffer size =     0.38 MiB
llama_kv_cache: size =    1.50 MiB (   512 cells,   4 layers,  1/1 seqs), K (f16):    0.75 MiB, V (f16):    0.75 MiB
sched_reserve: reserving ...
sched_reserve:      CUDA0 compute buffer size =   999.00 MiB
sched_reserve:        CPU compute buffer size =   999.00 MiB
sched_reserve: reserving ...
sched_reserve: RPC0[10.0.0.5:50601] compute buffer size =    20.91 MiB
sched_reserve:      CUDA0 compute buffer size =   105.67 MiB
sched_reserve:  CUDA_Host compute buffer size =     9.68 MiB
~llama_context:      CUDA0 compute buffer size is 105.6719 MiB, matches expectation of 105.6719 MiB
"""


def test_parses_devices_layers_and_buffers():
    r = parse_load_log(LOG)
    assert r.devices == ("RPC0", "RPC1", "RPC2", "CUDA0")
    assert r.layer_devices == ("CPU", "RPC0", "RPC1", "RPC2", "CUDA0")
    assert r.n_layer == 4 and r.layers_on("RPC1") == [2]
    assert r.kv_layer_devices == ("CPU", "RPC0", "RPC1", "RPC2")
    assert not r.dry_run
    assert r.kv_total_bytes == round(1.50 * MiB)
    assert r.log == LOG


def test_rpc_buffers_map_by_endpoint_and_index_within_server():
    r = parse_load_log(LOG)
    model = {b.buffer_type: b.device for b in r.buffers if b.kind == "model"}
    # 'RPC0[...]' names the server's first device; two servers both have an 'RPC0[...]' buffer
    assert model["RPC0[10.0.0.5:50601]"] == "RPC0"
    assert model["RPC1[10.0.0.5:50601]"] == "RPC1"
    assert model["RPC0[10.0.0.6:50602]"] == "RPC2"
    assert model["CUDA0"] == "CUDA0"


def test_host_buffers_are_cpu():
    r = parse_load_log(LOG)
    for b in r.buffers:
        if b.buffer_type.startswith("CPU") or b.buffer_type.endswith("_Host"):
            assert b.device == "CPU", b
    assert r.bytes_on("CPU", "model") == round(28.69 * MiB) + round(1.50 * MiB)
    assert r.bytes_on("CPU", "output") == round(0.19 * MiB)


def test_compute_buffers_are_the_last_reservation_only():
    r = parse_load_log(LOG)
    compute = [b for b in r.buffers if b.kind == "compute"]
    assert [(b.device, b.n_bytes) for b in compute] == [
        ("RPC0", round(20.91 * MiB)), ("CUDA0", round(105.67 * MiB)), ("CPU", round(9.68 * MiB))]


def test_repeated_reservation_without_marker_replaces_compute():
    text = ("sched_reserve:        CPU compute buffer size =     1.00 MiB\n"
            "sched_reserve:        CPU compute buffer size =     2.00 MiB\n")
    assert parse_load_log(text).bytes_on("CPU", "compute") == 2 * MiB


def test_devices_argument_maps_rpc_buffers_without_using_lines():
    devs = [Device("RPC0", 10, 10, "rpc", "rpc", "127.0.0.1:1", endpoint="127.0.0.1:1"),
            Device("RPC1", 10, 10, "rpc", "rpc", "127.0.0.1:2", endpoint="127.0.0.1:2")]
    text = "load_tensors: RPC0[127.0.0.1:2] model buffer size =     1.00 MiB\n"
    r = parse_load_log(text, devs)
    assert r.buffers == (BufferReport("RPC1", "RPC0[127.0.0.1:2]", "model", MiB),)
    # unknown endpoint: the raw buffer name is kept rather than guessed
    assert parse_load_log(text).buffers[0].device == "RPC0[127.0.0.1:2]"


def test_dry_run_flag_and_zero_sizes():
    text = ("print_info: no_alloc              = 1\n"
            "load_tensors:          CPU model buffer size =     0.00 MiB\n")
    r = parse_load_log(text)
    assert r.dry_run and r.bytes_on("CPU", "model") == 0
    assert r.buffers[0].kind == "model"


def test_kinds_by_device_order_and_sums():
    r = parse_load_log(LOG)
    k = r.kinds_by_device()
    assert list(k) == ["RPC0", "RPC1", "RPC2", "CUDA0", "CPU"]
    assert k["RPC2"] == {"model": round(5.25 * MiB), "kv": round(0.38 * MiB)}
    assert k["CPU"]["compute"] == round(9.68 * MiB)
    assert sum(sum(v.values()) for v in k.values()) == sum(b.n_bytes for b in r.buffers)


def test_bytes_on():
    r = parse_load_log(LOG)
    assert r.bytes_on("RPC0") == sum(b.n_bytes for b in r.buffers if b.device == "RPC0")
    assert r.bytes_on("nowhere", "kv") == 0
    with pytest.raises(ValueError):
        r.bytes_on("RPC0", "weights")


def test_report_is_frozen_and_log_not_in_repr():
    r = LoadReport(layer_devices=("CPU",), buffers=(), devices=(), log="x" * 10_000)
    assert "xxxx" not in repr(r)
    with pytest.raises(AttributeError):
        r.devices = ("RPC0",)  # type: ignore[misc]


def test_empty_log():
    r = parse_load_log("")
    assert r.layer_devices == () and r.buffers == () and r.devices == () and r.n_layer == 0


def test_parse_load_log_reads_llama_server_lines_with_timestamps():
    from gpulab.runtime.logcapture import parse_load_log
    text = ("0.00.132.131 I llama_prepare_model_devices: using device RPC0 (127.0.0.1:37977) (unknown id) "
            "- 24105 MiB free\n"
            "0.00.398.298 D load_tensors: layer   0 assigned to device RPC0, is_swa = 0\n"
            "0.00.428.543 I load_tensors: RPC0[127.0.0.1:37977] model buffer size =    33.82 MiB\n")
    r = parse_load_log(text)
    assert r.layer_devices == ("RPC0",) and r.bytes_on("RPC0", "model") == round(33.82 * 1024 * 1024)
