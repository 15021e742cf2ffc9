"""Compute buffers of the graphs with their own rules (MLA attention: gpulab/core/placement/compute_mla.py;
MoE with a shared expert and leading dense layers: compute_moe.py; rows gathered after the last layer; norms
after attention and the FFN, or after only; no RoPE; attention beside the FFN) against the buffers llama.cpp
logged for the architecture matrix's models (gpulab.sources.arch_models; CPU RPC devices,
tests/integration/test_arch_matrix_vs_llama.py). The figures are llama.cpp's `compute buffer size` lines, in
MiB as it prints them."""

from __future__ import annotations

import pytest

from arch_settings import SETTINGS, rpc, servers
from gpulab import SplitConfig, plan
from gpulab.core.placement.compute_mla import after_two_moe, mla_geom
from gpulab.core.placement.compute_moe import router_bytes, shared_expert_peaks
from gpulab.core.placement.coverage import COMPUTE_EXACT

MiB = 1024**2


@pytest.fixture(scope="module")
def deepseek2(arch_models):
    return arch_models["deepseek2"]


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


CHECKED = {
    **SETTINGS,
    # not in the matrix: checked once after llama4's rules were written (the q4_0 setting's f16 twin)
    "ts-1-1-1-f16-fa": SplitConfig(tensor_split=(1, 1, 1), n_ctx=4096, flash_attn="on"),
}
LOGGED = {
    # deepseek2: n_embd 1024, 16 heads, q_lora 512, kv_lora 256, rope 64, 1 dense + 5 MoE layers with a shared
    # expert (llama.cpp refuses ts-1-2-1-q8k-fa-off: different K and V types with MLA)
    ("deepseek2", "ts-3-1-q8-fa"): {"RPC0": 48.12, "RPC1": 26.00, "CPU": 18.04},
    ("deepseek2", "ts-1-1"): {"RPC0": 44.12, "RPC1": 43.03, "CPU": 14.04},
    ("deepseek2", "ngl4-ts-1-1-1"): {"RPC0": 31.01, "RPC1": 0.0, "RPC2": 18.00, "CPU": 37.01},
    ("deepseek2", "none-main-1-fa-off"): {"RPC1": 66.10, "CPU": 6.01},
    ("deepseek2", "ts-1-1-1-q4-fa"): {"RPC0": 55.02, "RPC1": 56.12, "RPC2": 26.00, "CPU": 26.04},
    # qwen2moe: 6 MoE layers, 16 experts of 512 (4 used), a gated shared expert of 1024
    ("qwen2moe", "ts-3-1-q8-fa"): {"RPC0": 32.24, "RPC1": 26.00, "CPU": 18.18},
    ("qwen2moe", "ts-1-1"): {"RPC0": 28.11, "RPC1": 42.12, "CPU": 14.05},
    ("qwen2moe", "ngl4-ts-1-1-1"): {"RPC0": 19.01, "RPC1": 19.01, "RPC2": 18.00, "CPU": 21.01},
    ("qwen2moe", "none-main-1-fa-off"): {"RPC1": 49.08, "CPU": 7.01},
    ("qwen2moe", "ts-1-2-1-q8k-fa-off"): {"RPC0": 186.16, "RPC1": 186.16, "RPC2": 26.00, "CPU": 46.10},
    ("qwen2moe", "ts-1-1-1-q4-fa"): {"RPC0": 40.23, "RPC1": 40.23, "RPC2": 54.24, "CPU": 26.18},
    # glm4moe: 1 dense + 5 MoE layers with a shared expert, Q twice n_embd wide (16 heads of 128)
    ("glm4moe", "ts-3-1-q8-fa"): {"RPC0": 40.36, "RPC1": 26.00, "CPU": 18.37},
    ("glm4moe", "ts-1-1"): {"RPC0": 36.04, "RPC1": 32.05, "CPU": 14.05},
    ("glm4moe", "ngl4-ts-1-1-1"): {"RPC0": 19.01, "RPC1": 0.0, "RPC2": 18.00, "CPU": 23.01},
    ("glm4moe", "none-main-1-fa-off"): {"RPC1": 50.10, "CPU": 8.01},
    ("glm4moe", "ts-1-2-1-q8k-fa-off"): {"RPC0": 184.27, "RPC1": 190.38, "RPC2": 26.00, "CPU": 50.29},
    ("glm4moe", "ts-1-1-1-q4-fa"): {"RPC0": 48.35, "RPC1": 42.36, "RPC2": 26.00, "CPU": 26.37},
    # llama4: dense and MoE layers interleaved (16 experts of 512, 1 used, a shared expert), 3 chunked : 1 full
    # attention layers, every 4th without RoPE
    ("llama4", "ts-3-1-q8-fa"): {"RPC0": 46.33, "RPC1": 41.27, "CPU": 26.34},
    ("llama4", "ts-1-1"): {"RPC0": 38.08, "RPC1": 41.18, "CPU": 18.09},
    ("llama4", "ngl4-ts-1-1-1"): {"RPC0": 22.00, "RPC1": 9.01, "RPC2": 18.00, "CPU": 28.02},
    ("llama4", "none-main-1-fa-off"): {"RPC1": 47.11, "CPU": 10.02},
    ("llama4", "ts-1-2-1-q8k-fa-off"): {"RPC0": 178.09, "RPC1": 217.27, "RPC2": 176.09, "CPU": 82.19},
    ("llama4", "ts-1-1-1-q4-fa"): {"RPC0": 46.16, "RPC1": 62.33, "RPC2": 62.34, "CPU": 42.34},
    ("llama4", "ts-1-1-1-f16-fa"): {"RPC0": 46.04, "RPC1": 62.08, "RPC2": 65.18, "CPU": 42.09},
    # gpt-oss: 6 MoE layers with biased experts, SWA every other layer, the output rows gathered after the last
    # layer (src/models/openai-moe.cpp)
    ("gpt-oss", "ts-3-1-q8-fa"): {"RPC0": 35.39, "RPC1": 26.00, "CPU": 21.34},
    ("gpt-oss", "ts-1-1"): {"RPC0": 33.07, "RPC1": 35.08, "CPU": 17.09},
    ("gpt-oss", "ngl4-ts-1-1-1"): {"RPC0": 27.78, "RPC1": 17.01, "RPC2": 18.00, "CPU": 21.77},
    ("gpt-oss", "none-main-1-fa-off"): {"RPC1": 45.51, "CPU": 9.51},
    ("gpt-oss", "ts-1-2-1-q8k-fa-off"): {"RPC0": 188.16, "RPC1": 188.17, "RPC2": 26.00, "CPU": 56.18},
    ("gpt-oss", "ts-1-1-1-q4-fa"): {"RPC0": 43.38, "RPC1": 43.38, "RPC2": 44.17, "CPU": 29.34},
    # gemma2, gemma3: norms before and after attention and the FFN, sliding-window layers (window 512)
    ("gemma2", "ts-3-1-q8-fa"): {"RPC0": 42.70, "RPC1": 38.36, "CPU": 22.71},
    ("gemma2", "ts-1-1"): {"RPC0": 40.07, "RPC1": 40.08, "CPU": 18.09},
    ("gemma2", "ngl4-ts-1-1-1"): {"RPC0": 24.02, "RPC1": 25.01, "RPC2": 18.00, "CPU": 28.02},
    ("gemma2", "none-main-1-fa-off"): {"RPC1": 32.01, "CPU": 12.01},
    ("gemma2", "ts-1-2-1-q8k-fa-off"): {"RPC0": 134.54, "RPC1": 134.54, "RPC2": 116.28, "CPU": 66.55},
    ("gemma2", "ts-1-1-1-q4-fa"): {"RPC0": 50.70, "RPC1": 50.70, "RPC2": 52.70, "CPU": 30.71},
    ("gemma3", "ts-3-1-q8-fa"): {"RPC0": 42.70, "RPC1": 34.36, "CPU": 22.71},
    ("gemma3", "ts-1-1"): {"RPC0": 36.04, "RPC1": 40.08, "CPU": 18.09},
    ("gemma3", "ngl4-ts-1-1-1"): {"RPC0": 24.02, "RPC1": 25.01, "RPC2": 18.00, "CPU": 28.02},
    ("gemma3", "none-main-1-fa-off"): {"RPC1": 32.01, "CPU": 12.01},
    ("gemma3", "ts-1-2-1-q8k-fa-off"): {"RPC0": 46.27, "RPC1": 134.54, "RPC2": 46.28, "CPU": 66.55},
    ("gemma3", "ts-1-1-1-q4-fa"): {"RPC0": 34.35, "RPC1": 50.70, "RPC2": 36.36, "CPU": 30.71},
    # olmo2: norms after attention and the FFN only (none before)
    ("olmo2", "ts-3-1-q8-fa"): {"RPC0": 40.17, "RPC1": 26.00, "CPU": 18.18},
    ("olmo2", "ts-1-1"): {"RPC0": 36.04, "RPC1": 34.05, "CPU": 14.05},
    ("olmo2", "ngl4-ts-1-1-1"): {"RPC0": 25.01, "RPC1": 23.01, "RPC2": 18.00, "CPU": 27.01},
    ("olmo2", "none-main-1-fa-off"): {"RPC1": 41.01, "CPU": 7.01},
    ("olmo2", "ts-1-2-1-q8k-fa-off"): {"RPC0": 176.09, "RPC1": 176.09, "RPC2": 26.00, "CPU": 46.10},
    ("olmo2", "ts-1-1-1-q4-fa"): {"RPC0": 48.16, "RPC1": 48.16, "RPC2": 44.17, "CPU": 26.18},
    # baichuan below 32 layers: llama's blocks, no RoPE at all (src/models/baichuan.cpp)
    ("baichuan", "ts-3-1-q8-fa"): {"RPC0": 40.16, "RPC1": 26.00, "CPU": 18.17},
    ("baichuan", "ts-1-1"): {"RPC0": 36.03, "RPC1": 34.04, "CPU": 14.05},
    ("baichuan", "ngl4-ts-1-1-1"): {"RPC0": 25.01, "RPC1": 22.00, "RPC2": 18.00, "CPU": 27.01},
    ("baichuan", "none-main-1-fa-off"): {"RPC1": 41.01, "CPU": 7.01},
    ("baichuan", "ts-1-2-1-q8k-fa-off"): {"RPC0": 180.08, "RPC1": 180.09, "RPC2": 26.00, "CPU": 46.09},
    ("baichuan", "ts-1-1-1-q4-fa"): {"RPC0": 48.16, "RPC1": 48.16, "RPC2": 46.16, "CPU": 26.17},
    # cohere2: attention and the FFN side by side on one norm, 3 sliding-window layers : 1 global
    ("cohere2", "ts-3-1-q8-fa"): {"RPC0": 46.32, "RPC1": 40.16, "CPU": 22.34},
    ("cohere2", "ts-1-1"): {"RPC0": 42.07, "RPC1": 42.08, "CPU": 18.09},
    ("cohere2", "ngl4-ts-1-1-1"): {"RPC0": 25.01, "RPC1": 27.01, "RPC2": 18.00, "CPU": 30.02},
    ("cohere2", "none-main-1-fa-off"): {"RPC1": 46.01, "CPU": 10.01},
    ("cohere2", "ts-1-2-1-q8k-fa-off"): {"RPC0": 58.09, "RPC1": 190.16, "RPC2": 178.09, "CPU": 58.18},
    ("cohere2", "ts-1-1-1-q4-fa"): {"RPC0": 38.16, "RPC1": 54.32, "RPC2": 54.33, "CPU": 30.34},
}


@pytest.mark.parametrize("arch,setting", list(LOGGED))
def test_compute_buffers_match_llama_cpp_logs(arch_models, arch, setting):
    config = CHECKED[setting]
    logged = LOGGED[arch, setting]
    p = plan(arch_models[arch], rpc(servers(config)), config)
    for d in p.devices:
        if d.name in logged:
            # the log's two decimals, and the router's [n_expert, T] tensors below the experts that the MoE
            # graph without a shared expert leaves out (64 KiB here)
            assert d.compute_bytes / MiB == pytest.approx(logged[d.name], abs=0.07), d.name
    assert arch in COMPUTE_EXACT
    # silent but for the doubt a MoE model sized by the closed forms keeps with layers on the host and on devices
    # (-ngl 4); deepseek2 and glm4moe are replayed op by op (placement.dense), and a replay states none
    assert [d.text.split(",")[0] for d in p.doubts] == (
        ["compute: MoE layers split between the host and devices"]
        if config.n_gpu_layers == 4 and arch in ("gpt-oss", "llama4", "qwen2moe") else [])


# settings outside the matrix where a random sweep (bench/recurrent_sweep.py --archs deepseek2,qwen2moe,...)
# found a rule missing; llama.cpp's logged buffers, MiB
OUTSIDE = [
    # -ngl 0, shared expert: the logits above the last layer's output on the host (was 12 MiB low)
    ("qwen2moe", SplitConfig(n_gpu_layers=0, split_mode="none", main_gpu=1, n_ctx=1024, type_k="q8_0",
                             flash_attn="on"), {"RPC1": 0.0, "CPU": 33.03}),
    # the output layer alone after host layers (and the MTP layer): only the norm's input comes over (was 6 high)
    ("deepseek2", SplitConfig(n_gpu_layers=2, split_mode="none", main_gpu=1, n_ctx=512), {"RPC1": 18.00, "CPU": 36.51}),
    # one device, wide Q with flash attention: no hole below the MoE output (was 6 low)
    ("glm4moe", SplitConfig(split_mode="none", main_gpu=1, n_ctx=1024, n_ubatch=256, type_k="q8_0", type_v="q8_0"),
     {"RPC1": 15.58, "CPU": 2.58}),
]


@pytest.mark.parametrize("arch,config,logged", OUTSIDE, ids=[a for a, _, _ in OUTSIDE])
def test_compute_buffers_outside_the_matrix(arch_models, arch, config, logged):
    p = plan(arch_models[arch], rpc(3), config)
    assert {d.name: d.compute_bytes / MiB for d in p.devices} == {k: pytest.approx(v, abs=0.07)
                                                                  for k, v in logged.items()}


def test_router_tensors_below_the_experts():
    # 16 experts, 4 used, 512 tokens: logits, biased probabilities, argsort (deepseek2) or logits, argsort and
    # the selected weights (qwen2moe), as the compute buffers' offsets showed
    assert router_bytes(16, 4, 512, rows=3) == 3 * 32 * 1024
    assert router_bytes(16, 4, 512, rows=2) == 2 * 32 * 1024 + 8 * 1024


def test_shared_expert_output_carries_the_next_kq_and_the_logits():
    e, fe, fd = 2 * MiB, 4 * MiB, 8 * MiB
    # the layer output at ffn_base + fd; the next KQ or the logits on top of it
    assert shared_expert_peaks(ffn_base=10 * MiB, fe=fe, fd=fd, e=e, kq=32 * MiB, logits=16 * MiB, next_layer=True,
                               has_out=True) == [52 * MiB, 36 * MiB]
    assert shared_expert_peaks(ffn_base=10 * MiB, fe=fe, fd=fd, e=e, kq=0, logits=16 * MiB, next_layer=True,
                               has_out=False) == []
    # expert outputs wider than up and gate together: not measured, nothing claimed
    assert shared_expert_peaks(ffn_base=0, fe=fe, fd=3 * fe, e=e, kq=1, logits=1, next_layer=True, has_out=True) == []
