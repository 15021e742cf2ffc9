"""MLA attention's compute buffers (gpulab/core/placement/compute_mla.py) against the buffers llama.cpp logged
for the architecture matrix's deepseek2 (gpulab.sources.arch_models: n_embd 1024, 16 heads, q_lora 512,
kv_lora 256, rope 64, 1 dense + 5 MoE layers; CPU RPC devices, tests/integration/test_arch_matrix_vs_llama.py).
The figures are llama.cpp's `compute buffer size` lines, in MiB as it prints them."""

from __future__ import annotations

import pytest

from gpulab import SplitConfig, plan, read_profile
from gpulab.core.devices import Device
from gpulab.core.placement.compute_mla import after_two_moe, mla_geom
from gpulab.sources.arch_models import write_arch_model

MiB = 1024**2


@pytest.fixture(scope="module")
def deepseek2(tmp_path_factory):
    return read_profile(write_arch_model(tmp_path_factory.mktemp("mla") / "ds.gguf", "deepseek2"))


def rpc(n: int) -> list[Device]:
    return [Device(name=f"RPC{i}", total_bytes=64 << 30, free_bytes=64 << 30, source="rpc", kind="rpc")
            for i in range(n)]


def test_geometry_is_read_from_the_absorbed_weights(deepseek2):
    m = mla_geom(deepseek2)
    # q_a 512; q_b 16 x (128 + 64); q_absorbed 16 x 256; q_pe 16 x 64; Qcur 16 x 320; v_mla 16 x 128
    assert (m.q_a, m.q_b, m.q_abs, m.q_pe, m.q_cat, m.v_mla) == (512, 3072, 4096, 1024, 5120, 2048)


def test_layers_after_two_moe_layers_on_one_device(deepseek2):
    trunk = deepseek2.trunk            # the graph's 6 layers (the MTP layer is placed, not run)
    # layer 0 is dense: its device reaches case B only from its fourth layer on
    assert not after_two_moe(trunk, ["RPC0"] * 3 + ["RPC1"] * 3, "RPC0")
    assert after_two_moe(trunk, ["RPC0"] * 4 + ["RPC1"] * 2, "RPC0")
    # a device starting on a MoE layer reaches it at its third
    assert after_two_moe(trunk, ["RPC0"] * 3 + ["RPC1"] * 3, "RPC1")
    assert not after_two_moe(trunk, ["RPC0"] * 4 + ["RPC1"] * 2, "RPC1")


CASES = {
    # setting: (config, devices, {device: MiB llama.cpp logged})
    "ts-3-1-q8-fa": (SplitConfig(tensor_split=(3, 1), n_ctx=2048, devices=("RPC0", "RPC1"), type_k="q8_0",
                                 type_v="q8_0", flash_attn="on"), 3, {"RPC0": 48.12, "RPC1": 26.00, "CPU": 18.04}),
    "ts-1-1": (SplitConfig(tensor_split=(1, 1), n_ctx=1024, devices=("RPC0", "RPC1")), 3,
               {"RPC0": 44.12, "RPC1": 43.03, "CPU": 14.04}),
    "ngl4-ts-1-1-1": (SplitConfig(n_gpu_layers=4, tensor_split=(1, 1, 1), n_ctx=1024), 3,
                      {"RPC0": 31.01, "RPC1": 0.0, "RPC2": 18.00, "CPU": 37.01}),
    "none-main-1-fa-off": (SplitConfig(split_mode="none", main_gpu=1, n_ctx=1024, flash_attn="off"), 3,
                           {"RPC1": 66.10, "CPU": 6.01}),
    "ts-1-1-1-q4-fa": (SplitConfig(tensor_split=(1, 1, 1), n_ctx=4096, type_k="q4_0", type_v="q4_0",
                                   flash_attn="on"), 3, {"RPC0": 55.02, "RPC1": 56.12, "RPC2": 26.00, "CPU": 26.04}),
}


@pytest.mark.parametrize("setting", list(CASES))
def test_compute_buffers_match_llama_cpp_logs(deepseek2, setting):
    config, n, logged = CASES[setting]
    p = plan(deepseek2, rpc(n), config)
    got = {d.name: round(d.compute_bytes / MiB, 2) for d in p.devices if d.name in logged}
    assert got == logged
    # silent but for the doubt every MoE model keeps with layers on the host and on devices (-ngl 4)
    assert [d.text.split(",")[0] for d in p.doubts] == (
        ["compute: MoE layers split between the host and devices"] if config.n_gpu_layers == 4 else [])
