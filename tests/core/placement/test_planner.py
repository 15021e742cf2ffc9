"""The planner's rules, each as llama.cpp states it (cited in gpulab/core/placement/planner.py).

The claim that these rules agree with llama.cpp itself is tested against real llama.cpp in
tests/integration/test_placement_vs_llama.py; here each rule is pinned down on its own.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from builders import make_profile
from gpulab import ConfigError, SplitConfig, parse_sim_spec, plan
from gpulab.core.config import config_to_dict
from gpulab.core.devices import Device
from gpulab.core.placement.planner import assign_layers, kv_cells, split_points

GiB = 1024**3
MiB = 1024**2


def test_full_offload_splits_layers_in_proportion_to_tensor_split():
    prof = make_profile(n_layer=30)
    p = plan(prof, parse_sim_spec("24GiB,24GiB"), SplitConfig(tensor_split=(1, 3)))
    # 31 layers (30 blocks + output) over split points [0.25, 1]: il/31 < 0.25 -> il <= 7
    assert p.layers_on("SIM0") == list(range(8))
    assert p.layers_on("SIM1") == list(range(8, 31))
    assert p.layer_devices[-1] == "SIM1"
    assert p.device("SIM0").n_layers == 8 and p.device("SIM1").n_layers == 22


def test_output_layer_is_offloaded_first_and_input_stays_on_cpu():
    prof = make_profile(n_layer=10)
    p = plan(prof, parse_sim_spec("24GiB"), SplitConfig(n_gpu_layers=1))
    assert p.layer_devices == ("CPU",) * 10 + ("SIM0",)
    assert p.device("SIM0").weights_bytes == sum(t.n_bytes for t in prof.output_tensors)
    assert p.host.weights_bytes == prof.input_weights_bytes + 10 * prof.layers[0].weights_bytes


def test_partial_offload_keeps_the_first_layers_on_cpu():
    prof = make_profile(n_layer=10)
    p = plan(prof, parse_sim_spec("24GiB,24GiB"), SplitConfig(n_gpu_layers=5, tensor_split=(1, 1)))
    assert p.layer_devices[:6] == ("CPU",) * 6
    # the 5 offloaded (layers 6..9 and the output) split 1:1 by upper_bound of k/5 in [0.5, 1]
    assert p.layer_devices[6:] == ("SIM0", "SIM0", "SIM0", "SIM1", "SIM1")


def test_zero_gpu_layers_and_no_devices_put_everything_on_the_host():
    prof = make_profile(n_layer=6)
    for devs, ngl in ((parse_sim_spec("24GiB"), 0), ([], -1)):
        p = plan(prof, devs, SplitConfig(n_gpu_layers=ngl))
        assert set(p.layer_devices) == {"CPU"}
        assert p.host.weights_bytes == prof.weights_bytes
        assert p.host.kv_bytes > 0


def test_default_split_follows_free_memory_not_total():
    prof = make_profile(n_layer=39)
    devs = parse_sim_spec("24GiB@6GiB,24GiB@18GiB")
    p = plan(prof, devs, SplitConfig())
    assert p.split_points == pytest.approx([0.25, 1.0])
    assert p.layers_on("SIM0") == list(range(10))   # il/40 < 0.25


def test_split_mode_none_uses_only_main_gpu_and_ignores_the_split():
    prof = make_profile(n_layer=12)
    devs = parse_sim_spec("24GiB,24GiB,24GiB")
    p = plan(prof, devs, SplitConfig(split_mode="none", main_gpu=2, tensor_split=(1, 1, 1)))
    assert [d.name for d in p.devices] == ["SIM2", "CPU"]
    assert set(p.layer_devices) == {"SIM2"}


def test_rpc_devices_come_before_gpus():
    gpu = Device("CUDA0", 24 * GiB, 24 * GiB, source="nvml", kind="gpu")
    rpc = Device("RPC0", 24 * GiB, 24 * GiB, source="rpc", kind="rpc", endpoint="10.0.0.2:50052")
    p = plan(make_profile(n_layer=7), [gpu, rpc], SplitConfig(tensor_split=(1, 1)))
    assert [d.name for d in p.offload_devices] == ["RPC0", "CUDA0"]
    assert p.layer_devices[0] == "RPC0" and p.layer_devices[-1] == "CUDA0"


def test_device_selection_restricts_and_orders_like_dash_dash_device():
    devs = parse_sim_spec("4x24GiB")
    p = plan(make_profile(n_layer=7), devs, SplitConfig(devices=("SIM3", "SIM1")))
    assert [d.name for d in p.offload_devices] == ["SIM3", "SIM1"]
    assert set(p.layer_devices) == {"SIM3", "SIM1"}
    with pytest.raises(ConfigError, match="SIM9"):
        plan(make_profile(), devs, SplitConfig(devices=("SIM9",)))


def test_split_points_are_float32_like_llama_cpp():
    # 1/3 accumulated in float32 differs from float64; boundary layers follow float32
    devs = parse_sim_spec("3x24GiB")
    pts = split_points(devs, SplitConfig(tensor_split=(1, 1, 1)))
    assert pts == [float(np.float32(1) / np.float32(3)), float(np.float32(2) / np.float32(3)), 1.0]
    names = assign_layers(n_layer=2, n_gpu_layers=-1, devices=devs, points=pts)
    assert names == ["SIM0", "SIM1", "SIM2"]


def test_kv_cache_lives_on_the_layer_device_and_follows_types():
    prof = make_profile(n_layer=4, n_head_kv=8, head_dim=128)
    devs = parse_sim_spec("24GiB,24GiB")
    base = plan(prof, devs, SplitConfig(n_ctx=1000, tensor_split=(1, 1)))
    assert base.kv_cells == 1024   # n_ctx padded to 256
    per_layer_f16 = 1024 * 2 * (8 * 128 * 2)
    assert base.device("SIM0").kv_bytes == 3 * per_layer_f16   # layers 0,1,2 (5 layers: 0.6 split)
    assert base.device("SIM1").kv_bytes == 1 * per_layer_f16
    q8 = plan(prof, devs, SplitConfig(n_ctx=1000, tensor_split=(1, 1), type_k="q8_0", type_v="q8_0"))
    assert q8.device("SIM0").kv_bytes == 3 * 1024 * 2 * (8 * 128 // 32 * 34)
    nkvo = plan(prof, devs, SplitConfig(n_ctx=1000, tensor_split=(1, 1), offload_kqv=False))
    assert nkvo.device("SIM0").kv_bytes == 0 and nkvo.host.kv_bytes == 4 * per_layer_f16


def test_sliding_window_layers_get_a_smaller_cache():
    prof = make_profile(n_layer=4, swa_layers=(0, 2), n_swa=1024)
    cfg = SplitConfig(n_ctx=32768, n_ubatch=512)
    assert kv_cells(prof, cfg) == (32768, 1536)     # pad(min(32768, 1024 + 512), 256)
    assert kv_cells(prof, cfg.replace(swa_full=True)) == (32768, 32768)
    full = plan(prof, parse_sim_spec("80GiB"), cfg)
    row = 2 * 8 * 128 * 2
    assert full.device("SIM0").kv_bytes == 2 * 32768 * row + 2 * 1536 * row


def test_tied_output_duplicates_token_embd_on_the_output_device():
    tied = make_profile(n_layer=4, tied=True, embd_bytes=300 * MiB)
    p = plan(tied, parse_sim_spec("24GiB"), SplitConfig())
    assert p.device("SIM0").weights_bytes == 4 * tied.layers[0].weights_bytes + 300 * MiB + 4 * tied.n_embd
    assert p.host.weights_bytes == 300 * MiB   # the input copy stays
    cpu_out = plan(tied, parse_sim_spec("24GiB"), SplitConfig(n_gpu_layers=0))
    assert cpu_out.host.weights_bytes == tied.weights_bytes   # same buffer: no second copy


def test_over_full_device_is_reported_with_its_deficit():
    prof = make_profile(n_layer=30, layer_bytes=1 * GiB)
    p = plan(prof, parse_sim_spec("24GiB,8GiB"), SplitConfig(tensor_split=(1, 1)))
    assert not p.fits
    assert p.device("SIM0").fits and not p.device("SIM1").fits
    (line,) = p.deficits()
    assert line.startswith("SIM1: needs ") and "more than its 8.00 GiB free" in line


@pytest.mark.parametrize("ts,match", [((1, 1, 1), "3 entries but there are only 2"),
                                      ((1, float("nan")), "finite"), ((1, -1), "finite")])
def test_bad_tensor_split_is_refused(ts, match):
    with pytest.raises(ConfigError, match=match):
        plan(make_profile(), parse_sim_spec("24GiB,24GiB"), SplitConfig(tensor_split=ts))


def test_main_gpu_out_of_range_is_refused():
    with pytest.raises(ConfigError, match="main_gpu 2 is out of range"):
        plan(make_profile(), parse_sim_spec("24GiB,24GiB"), SplitConfig(split_mode="none", main_gpu=2))


def test_quantized_v_cache_without_flash_attention_is_refused():
    with pytest.raises(ConfigError, match="flash attention"):
        SplitConfig(type_v="q4_0", flash_attn="off")


def test_plan_json_has_the_documented_shape():
    prof = make_profile(n_layer=5)
    d = plan(prof, parse_sim_spec("24GiB,24GiB"), SplitConfig(tensor_split=(1, 1))).to_dict()
    assert set(d) == {"model", "config", "devices", "layers", "rules", "fits", "doubts"}
    assert set(d["model"]) == {"path", "arch", "n_layer", "size_bytes"}
    assert d["config"] == {**config_to_dict(SplitConfig()), "tensor_split": [1.0, 1.0]}     # every field
    assert {"n_gpu_layers", "split_mode", "main_gpu", "tensor_split", "n_ctx", "type_k", "type_v", "n_batch",
            "n_ubatch", "flash_attn", "tensor_overrides", "kv_unified", "n_seq_max"} <= set(d["config"])
    assert [x["name"] for x in d["devices"]] == ["SIM0", "SIM1", "CPU"]
    assert set(d["devices"][0]) == {"name", "total_bytes", "free_bytes", "weights_bytes", "kv_bytes",
                                    "state_bytes", "compute_bytes", "overhead_bytes", "overhead_is_default",
                                    "used_bytes", "fits"}
    assert len(d["layers"]) == 6 and d["layers"][-1] == {"index": 5, "device": "SIM1"}


@settings(max_examples=300, deadline=None)
@given(n_layer=st.integers(1, 130), ngl=st.integers(-1, 140),
       ts=st.lists(st.integers(0, 9), min_size=1, max_size=8).filter(any))
def test_placement_invariants(n_layer, ngl, ts):
    devs = parse_sim_spec(f"{len(ts)}x24GiB")
    names = assign_layers(n_layer, ngl, devs, split_points(devs, SplitConfig(tensor_split=tuple(ts))))
    n_gpu = n_layer + 1 if ngl < 0 else min(ngl, n_layer + 1)
    assert names.count("CPU") == n_layer + 1 - n_gpu
    assert names[: n_layer + 1 - n_gpu] == ["CPU"] * (n_layer + 1 - n_gpu)   # CPU layers come first
    order = [int(n[3:]) for n in names if n != "CPU"]
    assert order == sorted(order)                                    # devices in order, contiguous
    assert all(ts[i] > 0 for i in set(order))                        # a 0 share gets no layer
    if n_gpu:
        counts = [order.count(i) for i in range(len(ts))]
        for i, c in enumerate(counts):                               # within one layer of its share
            assert math.isclose(c, n_gpu * ts[i] / sum(ts), abs_tol=1.0 + 1e-6)


def test_row_split_is_refused_where_llama_cpp_refuses_it():
    # the vendored llama.cpp's CUDA, RPC and CPU backends export no split buffer type
    cuda = [Device(f"CUDA{i}", 24 * GiB, 24 * GiB, source="nvml") for i in range(2)]
    with pytest.raises(ConfigError, match="does not support split buffers"):
        plan(make_profile(), cuda, SplitConfig(split_mode="row", n_gpu_layers=0))
    cpu_only = plan(make_profile(n_layer=3), [], SplitConfig(split_mode="row"))   # no devices: nothing to refuse
    assert set(cpu_only.layer_devices) == {"CPU"}


def test_a_placement_reused_between_plans_follows_the_devices_names():
    # fit's dry runs reuse a layer split's tensor placement (tensors.place_layers); devices built by
    # the RPC code carry a list (repack_types=[]) and must not break that, and other devices of the
    # same sizes must not get the first devices' placement. 4 blocks of 60 MiB + a 400 MiB output on
    # two equal devices (-ts 1,1, -ot of block 0's FFN to the second): the split point 0.5, layer k
    # of 5 goes to the first while k/5 < 0.5: blocks 0-2, then block 3 and the output
    prof = make_profile(n_layer=4)
    cfg = SplitConfig(tensor_split=(1.0, 1.0), tensor_overrides=(r"blk\.0\.ffn_.*=B1",))
    mib = 1 << 20
    for a, b in (("A0", "A1"), ("B0", "B1")):
        devs = [Device(a, 8 << 30, 8 << 30, "rpc", kind="rpc", endpoint="127.0.0.1:1", repack_types=[]),  # type: ignore[arg-type]
                Device(b, 8 << 30, 8 << 30, "rpc", kind="rpc", endpoint="127.0.0.1:2", repack_types=[])]  # type: ignore[arg-type]
        if a == "A0":
            with pytest.raises(ConfigError, match="B1"):     # no device B1 here
                plan(prof, devs, cfg)
            p = plan(prof, devs, SplitConfig(tensor_split=(1.0, 1.0)))
        else:
            p = plan(prof, devs, cfg)
            assert set(p.moved_tensors.values()) == {"B1"}
        assert list(p.layer_devices) == [a, a, a, b, b]
        assert [d.name for d in p.offload_devices] == [a, b]
    assert p.device("B0").weights_bytes < 180 * mib                 # block 0's FFN went to B1
    assert p.device("B1").weights_bytes > (60 + 400) * mib
