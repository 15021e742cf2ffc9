"""Compute buffers of the recurrent and hybrid graphs replayed since mamba2/lfm2/qwen3next
(gpulab/core/placement/recurrent.py): Mamba-1 layers (mamba, jamba), Mamba-2 beside or between attention
(falcon-h1, granitehybrid, nemotron_h), lfm2's graph with MoE, qwen3next's graph with qwen35's projections,
RWKV-6/7 time mix (rwkv6qwen2, arwkv7), plamo2's Mamba, minimax-01's lightning attention.

The expected figures are llama.cpp's `compute buffer size` lines (MiB, two decimals) for the architecture
matrix's models (gpulab.sources.arch_models) on CPU RPC devices, as tests/integration/
test_arch_matrix_vs_llama.py loads them (branch recurrent2's run), to the log's rounding."""

from __future__ import annotations

from dataclasses import replace

import pytest

from arch_settings import SETTINGS, logged, rpc
from gpulab import SplitConfig, plan
from gpulab.core.placement.coverage import COMPUTE_EXACT
from gpulab.core.placement.recurrent import replayable
from gpulab.core.profile import TensorInfo

MiB = 1024**2
ARCHS = ("mamba", "jamba", "falcon-h1", "granitehybrid", "nemotron_h", "nemotron_h_moe", "lfm2moe", "qwen35",
         "qwen35moe", "rwkv6qwen2", "arwkv7", "plamo2", "minimax-01")


LOGGED = {
    # 6 Mamba-1 layers (d_inner 2048, d_state 64, dt_rank 32), n_embd 1024, n_vocab 8192
    "mamba": logged({"RPC0": 32.55, "RPC1": 26.0, "CPU": 10.02}, {"RPC0": 48.55, "RPC1": 64.52, "CPU": 10.02},
                    {"RPC0": 24.55, "RPC1": 24.52, "RPC2": 18.0, "CPU": 26.55}, {"RPC1": 24.55, "CPU": 4.0},
                    {"RPC0": 48.55, "RPC1": 64.52, "RPC2": 26.0, "CPU": 10.02},
                    {"RPC0": 48.55, "RPC1": 80.52, "RPC2": 62.52, "CPU": 10.02}),
    # Mamba-1 with dt/B/C norms, attention (no RoPE) at layers 2 and 5, a dense SwiGLU FFN after each layer
    "jamba": logged({"RPC0": 40.71, "RPC1": 26.0, "CPU": 18.17}, {"RPC0": 52.58, "RPC1": 68.01, "CPU": 14.05},
                    {"RPC0": 37.5, "RPC1": 40.01, "RPC2": 18.0, "CPU": 28.56}, {"RPC1": 41.01, "CPU": 7.01},
                    {"RPC0": 32.55, "RPC1": 180.09, "RPC2": 26.0, "CPU": 46.09},
                    {"RPC0": 56.7, "RPC1": 40.61, "RPC2": 46.16, "CPU": 26.17}),
    # attention and Mamba-2 side by side in every layer, an FFN with biases
    "falcon-h1": logged({"RPC0": 43.53, "RPC1": 26.0, "CPU": 18.18}, {"RPC0": 39.4, "RPC1": 39.41, "CPU": 14.05},
                        {"RPC0": 30.35, "RPC1": 28.35, "RPC2": 18.0, "CPU": 30.38}, {"RPC1": 43.01, "CPU": 7.01},
                        {"RPC0": 178.09, "RPC1": 182.09, "RPC2": 26.0, "CPU": 46.1},
                        {"RPC0": 51.53, "RPC1": 51.53, "RPC2": 49.53, "CPU": 26.18}),
    # Mamba-2 or RoPE attention with the output's bias, an FFN with biases
    "granitehybrid": logged({"RPC0": 41.53, "RPC1": 26.0, "CPU": 18.18}, {"RPC0": 53.4, "RPC1": 69.26, "CPU": 14.05},
                            {"RPC0": 37.5, "RPC1": 42.01, "RPC2": 18.0, "CPU": 30.04}, {"RPC1": 43.01, "CPU": 7.01},
                            {"RPC0": 33.36, "RPC1": 178.09, "RPC2": 26.0, "CPU": 46.1},
                            {"RPC0": 57.53, "RPC1": 41.42, "RPC2": 46.17, "CPU": 26.18}),
    # Mamba-2, a ReLU-squared FFN, attention without RoPE: one block per layer
    "nemotron_h": logged({"RPC0": 41.52, "RPC1": 28.01, "CPU": 18.17}, {"RPC0": 39.39, "RPC1": 34.04, "CPU": 14.05},
                         {"RPC0": 37.5, "RPC1": 40.01, "RPC2": 20.0, "CPU": 29.37}, {"RPC1": 41.01, "CPU": 7.01},
                         {"RPC0": 31.36, "RPC1": 180.08, "RPC2": 28.01, "CPU": 46.09},
                         {"RPC0": 55.52, "RPC1": 39.42, "RPC2": 44.16, "CPU": 26.17}),
    # nemotron_h's graph; the matrix's file has ReLU-squared FFN layers only
    "nemotron_h_moe": logged({"RPC0": 18.0, "RPC1": 28.01, "CPU": 10.02}, {"RPC0": 18.0, "RPC1": 28.01, "CPU": 10.02},
                             {"RPC0": 10.0, "RPC1": 10.0, "RPC2": 20.0, "CPU": 12.0}, {"RPC1": 20.0, "CPU": 4.0},
                             {"RPC0": 18.0, "RPC1": 18.0, "RPC2": 28.01, "CPU": 10.02},
                             {"RPC0": 18.0, "RPC1": 18.0, "RPC2": 28.01, "CPU": 10.02}),
    # lfm2's graph, MoE (8 experts of 512, 2 used, a selection bias) past one leading dense layer
    "lfm2moe": logged({"RPC0": 38.18, "RPC1": 26.0, "CPU": 18.18}, {"RPC0": 34.05, "RPC1": 42.05, "CPU": 14.05},
                      {"RPC0": 14.01, "RPC1": 9.01, "RPC2": 18.0, "CPU": 25.02}, {"RPC1": 43.01, "CPU": 7.01},
                      {"RPC0": 30.01, "RPC1": 178.09, "RPC2": 26.0, "CPU": 46.1},
                      {"RPC0": 46.17, "RPC1": 28.02, "RPC2": 44.17, "CPU": 26.18}),
    # gated delta nets (1 key head, 32 value heads: the fused delta net reads them unrepeated) and gated attention
    # on a fused QKV at layer 3, a dense FFN
    "qwen35": logged({"RPC0": 40.19, "RPC1": 28.01, "CPU": 18.2}, {"RPC0": 36.06, "RPC1": 30.01, "CPU": 14.08},
                     {"RPC0": 25.02, "RPC1": 22.0, "RPC2": 20.0, "CPU": 25.02}, {"RPC1": 48.01, "CPU": 7.02},
                     {"RPC0": 30.0, "RPC1": 187.11, "RPC2": 28.01, "CPU": 46.13},
                     {"RPC0": 30.0, "RPC1": 46.19, "RPC2": 30.01, "CPU": 26.2}),
    # qwen35's layers with qwen3next's MoE and gated shared expert
    "qwen35moe": logged({"RPC0": 34.22, "RPC1": 28.01, "CPU": 18.2}, {"RPC0": 30.09, "RPC1": 32.04, "CPU": 14.08},
                        {"RPC0": 16.02, "RPC1": 17.44, "RPC2": 20.0, "CPU": 21.05}, {"RPC1": 49.04, "CPU": 7.02},
                        {"RPC0": 26.03, "RPC1": 188.14, "RPC2": 28.01, "CPU": 46.13},
                        {"RPC0": 26.03, "RPC1": 42.22, "RPC2": 34.04, "CPU": 26.2}),
    # RWKV-6 time mix (gated linear attention, K and V repeated to 16 heads), a SwiGLU FFN
    "rwkv6qwen2": logged({"RPC0": 32.82, "RPC1": 26.0, "CPU": 10.02}, {"RPC0": 32.82, "RPC1": 32.82, "CPU": 10.02},
                         {"RPC0": 24.82, "RPC1": 24.82, "RPC2": 18.0, "CPU": 26.82}, {"RPC1": 24.82, "CPU": 4.0},
                         {"RPC0": 32.82, "RPC1": 32.82, "RPC2": 26.0, "CPU": 10.02},
                         {"RPC0": 32.82, "RPC1": 32.82, "RPC2": 30.82, "CPU": 10.02}),
    # RWKV-7 time mix, the first layer's V read by every later layer (across devices), a SwiGLU FFN
    "arwkv7": logged({"RPC0": 40.39, "RPC1": 26.0, "CPU": 10.02}, {"RPC0": 48.38, "RPC1": 76.53, "CPU": 10.02},
                     {"RPC0": 30.38, "RPC1": 28.38, "RPC2": 18.0, "CPU": 34.38}, {"RPC1": 32.38, "CPU": 4.0},
                     {"RPC0": 48.38, "RPC1": 76.79, "RPC2": 26.0, "CPU": 10.02},
                     {"RPC0": 48.38, "RPC1": 84.52, "RPC2": 74.4, "CPU": 10.02}),
    # plamo2's Mamba with heads, attention on a fused QKV read through views, post-mixer and post-FFN norms
    "plamo2": logged({"RPC0": 42.2, "RPC1": 26.0, "CPU": 18.18}, {"RPC0": 54.04, "RPC1": 100.05, "CPU": 14.05},
                     {"RPC0": 37.5, "RPC1": 38.51, "RPC2": 18.0, "CPU": 30.04}, {"RPC1": 39.01, "CPU": 7.01},
                     {"RPC0": 32.52, "RPC1": 181.09, "RPC2": 26.0, "CPU": 46.1},
                     {"RPC0": 56.69, "RPC1": 40.59, "RPC2": 46.17, "CPU": 26.18}),
    # lightning attention in every layer (a 16 MiB diagonal-decay input copied to each device), gate-less MoE
    "minimax-01": logged({"RPC0": 116.54, "RPC1": 26.0, "CPU": 74.27}, {"RPC0": 116.53, "RPC1": 124.54, "CPU": 74.27},
                         {"RPC0": 62.07, "RPC1": 44.31, "RPC2": 18.0, "CPU": 62.35}, {"RPC1": 60.35, "CPU": 20.07},
                         {"RPC0": 116.53, "RPC1": 124.54, "RPC2": 26.0, "CPU": 74.27},
                         {"RPC0": 116.53, "RPC1": 124.53, "RPC2": 124.54, "CPU": 74.27}),
}


@pytest.mark.parametrize("arch,setting", [(a, s) for a in ARCHS for s in SETTINGS])
def test_compute_buffers_match_llama_cpp_logs(arch_models, arch, setting):
    p = plan(arch_models[arch], rpc(3), SETTINGS[setting])
    assert {d.name: d.compute_bytes / MiB for d in p.devices} == \
        {k: pytest.approx(v, abs=0.006) for k, v in LOGGED[arch][setting].items()}
    assert arch in COMPUTE_EXACT and not [d for d in p.doubts if d.term == "compute"]


def test_branches_not_built_fall_back_to_a_doubt(arch_models):
    def with_layer_tensor(arch: str, il: int, name: str):
        m = arch_models[arch]
        layer = m.layers[il]
        extra = TensorInfo(f"blk.{il}.{name}", "F16", (1024, 8), 1)
        return replace(m, layers=(*m.layers[:il], replace(layer, tensors=(*layer.tensors, extra)), *m.layers[il + 1:]))

    assert all(replayable(arch_models[a]) for a in ARCHS)
    # a router (MoE layer) where the graph's MoE branch is not built: jamba's, granitehybrid's, nemotron_h's
    for arch in ("jamba", "granitehybrid", "nemotron_h", "nemotron_h_moe"):
        moe = with_layer_tensor(arch, 1, "ffn_gate_inp.weight")
        assert not replayable(moe)
        assert [d.term for d in plan(moe, rpc(1), SplitConfig(n_ctx=1024)).doubts] == ["compute"]
    # lfm2moe's and qwen35moe's MoE is built
    assert replayable(with_layer_tensor("qwen35", 1, "ffn_gate_inp.weight"))
    # minimax-01's softmax attention layers are not
    mm = arch_models["minimax-01"]
    assert not replayable(replace(mm, layers=(replace(mm.layers[0], has_kv=True), *mm.layers[1:])))
    # nemotron_h's graph builds layers that are none recurrent (nemotron_h_moe's file), not an MTP head
    assert not any(la.is_recurrent for la in arch_models["nemotron_h_moe"].layers)
    assert not replayable(with_layer_tensor("nemotron_h_moe", 0, "nextn.eh_proj.weight"))


# settings outside the matrix where bench/recurrent_sweep.py found a rule missing; llama.cpp's logged buffers, MiB
OUTSIDE = [
    # a quantized V cache turns flash attention 'auto' into 'on' (llama_init_from_model) before the scheduler
    # could turn it off: layer 2's attention runs on RPC2 with the host's cache copied over (was 19.5 MiB high)
    ("granitehybrid", SplitConfig(n_gpu_layers=4, split_mode="none", main_gpu=2, n_ctx=3072, n_ubatch=128,
                                  type_k="q4_0", type_v="q4_0", flash_attn="auto"), {"RPC2": 7.84, "CPU": 8.04}),
    # two sequences: llama.cpp reserves minimax-01's graph last as one sequence, whose diagonal decay is twice as
    # large (was up to 5.75 MiB low)
    ("minimax-01", SplitConfig(n_gpu_layers=2, split_mode="none", main_gpu=1, n_ctx=3072, n_ubatch=128,
                               flash_attn="off", n_seq_max=2), {"RPC1": 5.52, "CPU": 6.77}),
    ("minimax-01", SplitConfig(n_gpu_layers=3, tensor_split=(1, 3), n_ctx=3072, n_ubatch=256, type_k="q8_0",
                               devices=("RPC0", "RPC1"), n_seq_max=2), {"RPC0": 15.03, "RPC1": 14.28, "CPU": 19.30}),
    ("minimax-01", SplitConfig(tensor_split=(2, 1, 1), n_ctx=512, n_ubatch=64, flash_attn="off",
                               devices=("RPC0", "RPC1", "RPC2"), n_seq_max=2),
     {"RPC0": 4.53, "RPC1": 5.78, "RPC2": 3.25, "CPU": 2.28}),
]


@pytest.mark.parametrize("arch,config,logged", OUTSIDE, ids=[a for a, _, _ in OUTSIDE])
def test_compute_buffers_outside_the_matrix(arch_models, arch, config, logged):
    p = plan(arch_models[arch], rpc(3), config)
    assert {d.name: d.compute_bytes / MiB for d in p.devices} == {k: pytest.approx(v, abs=0.006)
                                                                  for k, v in logged.items()}
