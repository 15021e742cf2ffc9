"""Split mode `tensor` against real llama.cpp, per device.

llama.cpp's own log names one device, `Meta()`, whose buffers are as large as its largest member's
(ggml_backend_meta_alloc_ctx_tensors_from_buft), so it cannot say what each device holds. Each
RPC server can: started with GGML_RPC_DEBUG=1 it logs every buffer it allocates
(gpulab.runtime.rpc.server_buffers reads them: weights, then the KV cache it clears, then the
compute buffer). For a dense and a MoE model (and a sliding-window one, whose layers rotate by
kind) and three -ts values on three RPC devices:
  - every layer on the meta device, as llama.cpp's log says;
  - weights and KV per device within 4 KiB of what that server allocated (the issue asks for 1%
    or 1 MiB; the plan is exact to the byte here, and 1 MiB would hide a slice rounded wrongly);
  - the largest member's weights, KV and compute are what llama.cpp logs for Meta().
The refusals are checked against llama.cpp's messages.
"""

from __future__ import annotations

import pytest

from builders import close_to_llama
from gpulab import ConfigError, LoadError, SplitConfig, plan, read_profile
from gpulab.sources.host import host_device
from gpulab.sources.synth import SynthSpec

MiB = 1024**2

MODELS = {
    # dense, GQA (4 query heads per KV head), Q8_0: attention cut in whole query groups, the FFN
    # in lcm(32, 128) steps; n_ff 1408 does not halve or third on such a step
    "llama-q8-dense": SynthSpec(arch="llama", n_layer=5, n_embd=1024, n_ff=1408, n_head=16, n_head_kv=4,
                                n_vocab=4096, weight_type="Q8_0"),
    # SmolLM2's attention: 3 KV heads of 64, 3 query heads each; a cut must hold lcm(192, 128) = 384
    # rows (two KV heads), so with two shares a layer's attention goes whole to one device
    "llama-3-kv-heads": SynthSpec(arch="llama", n_layer=4, n_embd=576, n_ff=1536, n_head=9, n_head_kv=3,
                                  n_vocab=4096, weight_type="Q4_1"),
    # mixture of experts: expert stacks cut like the dense FFN, routers mirrored
    "qwen3moe": SynthSpec(arch="qwen3moe", n_layer=4, n_embd=512, n_ff=512, n_head=8, n_head_kv=4,
                          n_vocab=4096, n_expert=8, n_expert_used=2, n_ff_exp=384),
    # sliding-window layers rotate among themselves (get_il_eff: with 4 layers over 3 devices a
    # rotation by layer index would differ); the tied output is a whole copy
    "gemma2-swa": SynthSpec(arch="gemma2", n_layer=4, n_embd=512, n_ff=1024, n_head=8, n_head_kv=4,
                            n_vocab=8192, sliding_window=256, tied_output=True),
}

SPLITS = {
    "equal": (),               # no -ts: equal shares, not shares by free memory
    "ts-3-1-2": (3, 1, 2),
    "ts-2-0-1": (2, 0, 1),     # a member with no share still holds the mirrored tensors
}


@pytest.fixture(scope="module")
def cluster_and_worker():
    from gpulab.runtime.rpc import start_servers
    from gpulab.runtime.worker import Worker
    with start_servers(3, debug_log=True) as cluster, Worker(cluster.endpoints) as w:
        yield cluster, w


def _same(predicted: int, actual: int) -> bool:
    """A server's own allocation is exact; 4 KiB allows for alignment padding (32 bytes a tensor).
    Tighter than the 1%-or-1-MiB bar on purpose: a slice a head or a 128-row step off is 64 KiB
    here, and the 1 MiB bar would let a wrong rotation pass on models this small."""
    return abs(predicted - actual) <= 4096


@pytest.mark.parametrize("split_name", list(SPLITS))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_tensor_split_matches_each_rpc_server(model_name, split_name, model_paths, cluster_and_worker):
    from gpulab.runtime.rpc import server_buffers
    cluster, worker = cluster_and_worker
    config = SplitConfig(split_mode="tensor", tensor_split=SPLITS[split_name], n_ctx=1024)
    devices = [d for d in worker.devices() if d.kind == "rpc"]
    by_endpoint = {s.endpoint: s for s in cluster}
    predicted = plan(read_profile(model_paths[model_name]), devices, config, host_device())

    marks = {s.endpoint: len(s.output()) for s in cluster}
    report, _ = worker.load(model_paths[model_name], config)

    assert list(report.layer_devices) == list(predicted.layer_devices) == ["Meta()"] * len(report.layer_devices)
    held = {}
    for d in devices:
        server = by_endpoint[d.endpoint]
        held[d.name] = got = server_buffers(server.output()[marks[d.endpoint]:])
        p = predicted.device(d.name)
        assert _same(p.weights_bytes, got.model_bytes), \
            f"{d.name} weights: predicted {p.weights_bytes}, the server allocated {got.model_bytes}"
        assert _same(p.kv_bytes, got.kv_bytes), \
            f"{d.name} KV: predicted {p.kv_bytes}, the server allocated {got.kv_bytes}"
    # llama.cpp's Meta() lines (printed to 0.01 MiB): the largest member's buffers; compute buffers
    # are allocated at the meta buffer's size on every member
    assert close_to_llama(max(h.model_bytes for h in held.values()), report.bytes_on("Meta()", "model"))
    assert close_to_llama(max(h.kv_bytes for h in held.values()), report.bytes_on("Meta()", "kv"))
    for h in held.values():
        assert close_to_llama(h.compute_bytes, report.bytes_on("Meta()", "compute"))


@pytest.mark.parametrize("config", [
    SplitConfig(split_mode="tensor", tensor_split=(1, 2, 1), n_ctx=1024, n_gpu_layers=3),   # 3 on Meta(), 3 on the CPU
    SplitConfig(split_mode="tensor", n_ctx=1024, offload_kqv=False),                         # KV stays on the CPU
], ids=["ngl-3", "no-kv-offload"])
def test_partial_offload_and_host_kv(config, model_paths, cluster_and_worker):
    from gpulab.runtime.rpc import server_buffers
    cluster, worker = cluster_and_worker
    devices = [d for d in worker.devices() if d.kind == "rpc"]
    predicted = plan(read_profile(model_paths["llama-q8-dense"]), devices, config, host_device())
    marks = {s.endpoint: len(s.output()) for s in cluster}
    report, _ = worker.load(model_paths["llama-q8-dense"], config)
    assert list(report.layer_devices) == list(predicted.layer_devices)
    for d, s in zip(devices, cluster):
        got = server_buffers(s.output()[marks[s.endpoint]:])
        assert _same(predicted.device(d.name).weights_bytes, got.model_bytes), (d.name, got)
        assert _same(predicted.device(d.name).kv_bytes, got.kv_bytes), (d.name, got)
    assert close_to_llama(predicted.host.kv_bytes, report.bytes_on("CPU", "kv"))


def test_flash_attention_off_is_refused_by_both(model_paths, tmp_path):
    with pytest.raises(ConfigError, match="SPLIT_MODE_TENSOR requires flash_attn to be enabled"):
        SplitConfig(split_mode="tensor", flash_attn="off")
    # llama.cpp itself, sent a config gpulab would refuse: in a process of its own (SplitConfig
    # refuses to be rebuilt that way in a worker) on a server of its own (one client at a time)
    import subprocess
    import sys

    from gpulab.runtime.rpc import start_servers
    script = tmp_path / "fa_off.py"
    script.write_text(f"""
from gpulab import SplitConfig
from gpulab.runtime.model import open_model
from gpulab.runtime.rpc import register
import sys
register([sys.argv[1]])
config = SplitConfig(flash_attn="off", n_ctx=512)
object.__setattr__(config, "split_mode", "tensor")
try:
    with open_model({str(model_paths["llama-q8-dense"])!r}, config, check_fit=False):
        print("LOADED")
except Exception as e:
    print("REFUSED", e)
""")
    with start_servers(1) as cluster:
        out = subprocess.run([sys.executable, str(script), cluster.endpoints[0]], capture_output=True, text=True,
                             timeout=120).stdout
    assert "REFUSED" in out and "SPLIT_MODE_TENSOR requires flash_attn to be enabled" in out, out


def test_excluded_architecture_is_refused_by_both(tmp_path, cluster_and_worker):
    import gguf

    from builders import make_llama_profile
    from gpulab.core.placement.tensor_parallel import check_tensor_parallel
    _, worker = cluster_and_worker
    config = SplitConfig(split_mode="tensor", n_ctx=512)
    with pytest.raises(ConfigError, match="LLAMA_SPLIT_MODE_TENSOR not implemented for architecture 'olmoe'"):
        check_tensor_parallel(make_llama_profile(arch="olmoe", n_expert=8, n_ff_exp=256), config, [object()])
    # llama_model_create refuses before reading hyperparameters or tensors: a header is enough
    path = tmp_path / "olmoe.gguf"
    w = gguf.GGUFWriter(str(path), "olmoe")
    w.add_tensor("token_embd.weight", __import__("numpy").zeros((4, 32), dtype="float32"))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(LoadError, match="LLAMA_SPLIT_MODE_TENSOR not implemented for architecture 'olmoe'"):
        worker.load(path, config, check_fit=False)


def test_quantized_kv_loads_in_this_version(model_paths, cluster_and_worker):
    """docs/multi-gpu.md names a refusal of quantized KV with -sm tensor; the vendored code has no
    such check, and the load goes through: gpulab plans it (the cache cut in whole heads)."""
    from gpulab.runtime.rpc import server_buffers
    cluster, worker = cluster_and_worker
    config = SplitConfig(split_mode="tensor", n_ctx=1024, type_k="q8_0", type_v="q8_0")
    devices = [d for d in worker.devices() if d.kind == "rpc"]
    predicted = plan(read_profile(model_paths["llama-q8-dense"]), devices, config)
    marks = {s.endpoint: len(s.output()) for s in cluster}
    worker.load(model_paths["llama-q8-dense"], config)
    for d, s in zip(devices, cluster):
        assert d.endpoint == s.endpoint
        assert _same(predicted.device(d.name).kv_bytes, server_buffers(s.output()[marks[s.endpoint]:]).kv_bytes)
