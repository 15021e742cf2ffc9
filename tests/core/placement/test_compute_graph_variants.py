"""Compute buffers of graphs that differ from llama's in a shared way (gpulab/core/placement/compute.py):
an FFN without a gate, a LayerNorm output norm, a fused QKV product, learned position embeddings, qwen's
half-width FFN. The expected figures are llama.cpp's logged compute buffers for the architecture-matrix
models (gpulab.sources.arch_models: 6 layers, n_embd 1024, 16/4 heads of 64, n_ff 3072, n_vocab 8192) on
CPU RPC devices (tests/integration/test_arch_matrix_vs_llama.py); before these rules gpulab was 2 to
12 MiB off on each device named here."""

from __future__ import annotations

import re

import pytest

from arch_settings import SETTINGS, off_by_more_than_a_mib, rpc
from gpulab import plan
from gpulab.core.placement import compute
from llama_tools import vendored_src

CASES = [
    # arch, config, RPC devices, {device: llama.cpp's bytes}
    # no gate: one [n_ff, T] tensor in the FFN, not three (was 12 MiB high)
    ("starcoder2", SETTINGS["ts-3-1-q8-fa"], 2, {"RPC0": 29538386, "RPC1": 27262976, "CPU": 19063112}),
    ("arcee", SETTINGS["ngl4-ts-1-1-1"], 3, {"RPC0": 11544822, "RPC1": 13641974, "RPC2": 18874368, "CPU": 15739126}),
    # LayerNorm output: result_norm beside the last layer's output on the pipelined output device (was 2 MiB low)
    ("starcoder2", SETTINGS["ts-1-1"], 2, {"RPC0": 25207767, "RPC1": 33606861, "CPU": 14732493}),
    ("mpt", SETTINGS["ts-1-1"], 2, {"RPC0": 25197281, "RPC1": 33596375, "CPU": 14732493}),
    # fused QKV, flash attention off: the product under Q's K rotation (was 3 MiB low; qwen's 6 MiB product, 6)
    ("bloom", SETTINGS["ts-1-2-1-q8k-fa-off"], 3,
     {"RPC0": 189876142, "RPC1": 189886628, "RPC2": 27262976, "CPU": 48328868}),
    ("qwen", SETTINGS["ts-1-2-1-q8k-fa-off"], 3,
     {"RPC0": 193032356, "RPC1": 193032356, "RPC2": 27262976, "CPU": 48339354}),
    # ... and with an f16 K, RoPE'd Q and K copied out and the product freed below KQ (was 4 MiB high)
    ("gptneox", SETTINGS["none-main-1-fa-off"], 2, {"RPC1": 40904950, "CPU": 7350518}),
    # flash attention reading Q as a view of the product (no RoPE) (was 2 MiB low on RPC0, 3 MiB high on RPC1)
    ("bloom", SETTINGS["ngl4-ts-1-1-1"], 3, {"RPC0": 13641974, "RPC1": 10485760, "RPC2": 18874368, "CPU": 15739126}),
    # qwen's FFN is n_ff / 2 wide (was 12 MiB high on RPC1)
    ("qwen", SETTINGS["ngl4-ts-1-1-1"], 3, {"RPC0": 14690550, "RPC1": 13641974, "RPC2": 18874368}),
    # attention beside the FFN, residual added last (phi2): three host operands, the attention output live
    # through the last layer's FFN, result_norm in its freed range (was 4 MiB low after the host, 2 high at the end)
    ("phi2", SETTINGS["ngl4-ts-1-1-1"], 3, {"RPC0": 15739126, "RPC1": 15739126, "RPC2": 18874368, "CPU": 17836278}),
    ("phi2", SETTINGS["ts-1-1"], 2, {"RPC0": 27304919, "RPC1": 31509709, "CPU": 14732493}),
    # learned positions: the host's two gathered rows, both sent to the first device 4 times (was 8 MiB low)
    ("gpt2", SETTINGS["ts-3-1-q8-fa"], 2, {"RPC0": 37916508, "RPC1": 27262976, "CPU": 21160264}),
    ("gpt2", SETTINGS["none-main-1-fa-off"], 2, {"RPC1": 44050678, "CPU": 9447670}),
]


@pytest.mark.parametrize("arch,config,n_dev,measured", CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_graph_variant_is_within_a_mib_of_llama_cpp(arch_models, arch, config, n_dev, measured):
    assert not off_by_more_than_a_mib(plan(arch_models[arch], rpc(n_dev), config), measured), arch


def test_rules_key_on_the_profiles_tensors(arch_models):
    """The rules follow the tensors llama.cpp's loaders create, not the architecture's name (but where the
    tensors cannot tell: RoPE, a LayerNorm without bias)."""
    assert compute._ungated_ffn(arch_models["starcoder2"])
    assert not compute._ungated_ffn(arch_models["llama"])       # ffn_gate
    assert not compute._ungated_ffn(arch_models["phi3"])        # fused gate+up: ffn_up twice as wide as ffn_down reads
    assert compute._norm_out_of_place(arch_models["bloom"]) and not compute._norm_out_of_place(arch_models["llama"])
    assert compute._dense_ff(arch_models["qwen"]) == 1536 and compute._dense_ff(arch_models["llama"]) == 3072
    assert compute._fused_qkv_width(arch_models["bloom"]) == 1536
    assert compute._fused_qkv_width(arch_models["llama"]) == 0
    assert compute._learned_positions(arch_models["gpt2"]) and not compute._learned_positions(arch_models["bloom"])


SRC = vendored_src()      # GPULAB_LLAMA_CPP_SRC, or the source the suite's llama.cpp tools were built from


@pytest.mark.skipif(SRC is None, reason="the vendored llama.cpp source is not at hand")
def test_name_keyed_sets_match_llama_cpps_graphs():
    """_NO_ROPE's graphs call no ggml_rope and build a fused QKV with build_qkv; _LAYER_NORM_NO_BIAS's output
    norm is an LLM_NORM (src/models/<arch>.cpp of the vendored llama.cpp)."""
    assert SRC is not None
    models = SRC / "src" / "models"
    for arch in compute._NO_ROPE:
        text = (models / f"{arch}.cpp").read_text()
        assert "ggml_rope" not in text and "build_qkv" in text, arch
    for arch in compute._LAYER_NORM_NO_BIAS:
        text = (models / f"{arch}.cpp").read_text()
        assert re.search(r"build_norm\([^;]*output_norm[^;]*LLM_NORM\s*,", text), arch
