"""Compute buffers of the graphs replayed op by op (gpulab/core/placement/dense.py) against llama.cpp's.

The expected figures are the `compute buffer size` lines llama.cpp logged (MiB, two decimals) for the models of
gpulab.sources.arch_models on CPU RPC devices, as tests/integration/test_arch_matrix_vs_llama.py loads them
(branch small's matrix run), in the setting where gpulab's closed forms were furthest off before the replay
(2-12 MiB: one or more [n_embd, n_ubatch] row sets of 2 MiB). One row per graph rule of placement.dense.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from gpulab import SplitConfig, plan, read_profile
from gpulab.core.devices import Device
from gpulab.core.placement.dense import DENSE_GRAPHS, dense_replayable
from gpulab.sources.arch_models import write_arch_model

MiB = 1024**2

# the settings of the architecture matrix (tests/integration/test_arch_matrix_vs_llama.py CONFIGS)
TS31_Q8_FA = SplitConfig(tensor_split=(3, 1), n_ctx=2048, devices=("RPC0", "RPC1"), type_k="q8_0", type_v="q8_0",
                         flash_attn="on")
TS11 = SplitConfig(tensor_split=(1, 1), n_ctx=1024, devices=("RPC0", "RPC1"))
NGL4 = SplitConfig(n_gpu_layers=4, tensor_split=(1, 1, 1), n_ctx=1024)
NONE = SplitConfig(split_mode="none", main_gpu=1, n_ctx=1024, flash_attn="off")
TS121_Q8K = SplitConfig(tensor_split=(1, 2, 1), n_ctx=4096, type_k="q8_0", flash_attn="off")
TS111_Q4_FA = SplitConfig(tensor_split=(1, 1, 1), n_ctx=4096, type_k="q4_0", type_v="q4_0", flash_attn="on")

CASES = [
    # LayerNorm not in place, fused QKV roped out of strided views, attention beside the GELU FFN (falcon.cpp)
    ("falcon", NGL4, {"RPC0": 15.01, "RPC1": 15.01, "RPC2": 18.0, "CPU": 15.01}),
    # LayerNorms with biases, fused QKV + bias, output and FFN biases (gptneox.cpp)
    ("gptneox", NGL4, {"RPC0": 13.01, "RPC1": 13.01, "RPC2": 18.0, "CPU": 15.01}),
    # fused QKV 3 n_embd wide whatever n_head_kv says, the FFN n_ff / 2 (qwen.cpp)
    ("qwen", NGL4, {"RPC0": 14.01, "RPC1": 13.01, "RPC2": 18.0, "CPU": 16.01}),
    # one LayerNorm read by attention and the FFN: ffn + residual + attention (command-r.cpp)
    ("command-r", TS11, {"RPC0": 36.04, "RPC1": 38.05, "CPU": 14.05}),
    # ... RMS: ffn + attention + residual (plamo.cpp)
    ("plamo", TS11, {"RPC0": 36.04, "RPC1": 38.05, "CPU": 14.05}),
    # no ffn_norm: the FFN reads the attention's norm (stablelm.cpp)
    ("stablelm", TS11, {"RPC0": 36.04, "RPC1": 38.05, "CPU": 14.05}),
    # norms without weights: never named "norm", never pinned (olmo.cpp)
    ("olmo", TS11, {"RPC0": 36.04, "RPC1": 42.05, "CPU": 14.05}),
    # ALiBi: no RoPE (refact.cpp)
    ("refact", NGL4, {"RPC0": 25.01, "RPC1": 22.0, "RPC2": 18.0, "CPU": 27.01}),
    # Q/K norms of a reshaped fused product, residual + attention (openelm.cpp)
    ("openelm", NONE, {"RPC1": 39.01, "CPU": 7.01}),
    # norms after attention and the FFN, fused SwiGLU (plamo3.cpp)
    ("plamo3", NONE, {"RPC1": 39.01, "CPU": 7.01}),
    # no output rows gathered (cogvlm.cpp)
    ("cogvlm", TS121_Q8K, {"RPC0": 184.09, "RPC1": 184.09, "RPC2": 26.0, "CPU": 46.09}),
    # low-rank Q and KV, V narrower than K, result_norm scaled into a new tensor (minicpm3.cpp)
    ("minicpm3", TS11, {"RPC0": 43.04, "RPC1": 43.05, "CPU": 14.05}),
    # MoE after a leading dense layer, a shared expert added as it is (deepseek.cpp)
    ("deepseek", NGL4, {"RPC0": 13.01, "RPC1": 15.01, "RPC2": 18.0, "CPU": 27.01}),
    # experts without a gate: up and its SiLU in place (ernie4-5-moe.cpp)
    ("ernie4_5-moe", TS121_Q8K, {"RPC0": 178.09, "RPC1": 178.09, "RPC2": 26.0, "CPU": 46.1}),
    # the router reads the layer's input before its norm (smallthinker.cpp)
    ("smallthinker", NGL4, {"RPC0": 11.01, "RPC1": 11.01, "RPC2": 18.0, "CPU": 13.04}),
    # Q/K norms of the products before their reshape: in place (minimax-m2.cpp)
    ("minimax-m2", NONE, {"RPC1": 43.05, "CPU": 7.01}),
    # a dense FFN and its residual, then the experts of the normed layer input (arctic.cpp)
    ("arctic", TS111_Q4_FA, {"RPC0": 66.2, "RPC1": 66.2, "RPC2": 66.2, "CPU": 26.18}),
    # norms after attention and the experts (grok.cpp)
    ("grok", TS121_Q8K, {"RPC0": 178.09, "RPC1": 180.09, "RPC2": 26.0, "CPU": 46.1}),
    # phi3's graph: residual + FFN (phi3.cpp, which phimoe builds)
    ("phimoe", TS11, {"RPC0": 54.04, "RPC1": 54.05, "CPU": 14.05}),
    # the experts, then the chunk experts of their output (grovemoe.cpp)
    ("grovemoe", NGL4, {"RPC0": 13.01, "RPC1": 11.01, "RPC2": 18.0, "CPU": 13.01}),
    # a sliding-window cache beside the full one, RoPE on window layers only (exaone-moe.cpp)
    ("exaone-moe", NGL4, {"RPC0": 16.02, "RPC1": 15.01, "RPC2": 18.0, "CPU": 28.02}),
    # ... attention beside the MoE, rows gathered after the output norm, itself an output (cohere2moe.cpp)
    ("cohere2moe", TS111_Q4_FA, {"RPC0": 52.32, "RPC1": 40.36, "RPC2": 32.17, "CPU": 30.34}),
    # ... embedding norm, gated attention, plain RMS norms after attention and the FFN (muse-glimmer.cpp)
    ("muse-glimmer", NGL4, {"RPC0": 26.02, "RPC1": 22.0, "RPC2": 18.0, "CPU": 26.02}),
    # absorbed MLA over a K-only cache (deepseek2.cpp's graph, which mistral4 builds)
    ("mistral4", TS31_Q8_FA, {"RPC0": 50.07, "RPC1": 26.0, "CPU": 18.04}),
    # branch newarchs (llama.cpp's logged figures from its matrix run; the closed forms' error before in brackets):
    # a head-wise softplus attention gate, sigmoid gating, a shared expert (laguna.cpp; RPC1 +2.96 MiB)
    ("laguna", NGL4, {"RPC0": 13.01, "RPC1": 10.05, "RPC2": 18.0, "CPU": 27.01}),
    # scaled embeddings, no RoPE every 4th layer, an element-wise gate, the post-attention norm before the gather
    # (afmoe.cpp; RPC1 -5.95 MiB)
    ("afmoe", TS111_Q4_FA, {"RPC0": 34.16, "RPC1": 44.32, "RPC2": 38.22, "CPU": 30.34}),
    # the draft's token graph: no inp_embd input (the host's copies of it, pipelined: CPU +8.00 MiB), no rows
    # gathered (dflash.cpp graph<false>)
    ("dflash", TS31_Q8_FA, {"RPC0": 38.16, "RPC1": 26.0, "CPU": 10.17}),
    # MSA past the leading dense layer (minimax-m3.cpp, minimax_msa): the block mask expanded to [n_kv, T, Hd]
    # f32 and f16, the f32 copy of the KQ mask sent to every device with a sparse layer (RPC1 -116.21 MiB)
    ("minimax-m3", TS111_Q4_FA, {"RPC0": 106.38, "RPC1": 150.42, "RPC2": 110.29, "CPU": 28.29}),
    # ... without flash attention every layer's attention is dense (no MSA inputs)
    ("minimax-m3", NONE, {"RPC1": 45.05, "CPU": 7.01}),
    # absorbed MLA over the window cache of llama_kv_cache_dsa_iswa, k_pe RMS-normed, a head-wise sigmoid gate
    # (dots3note.cpp; sized as deepseek2's MLA before: -3.05 MiB on both devices)
    ("dots3note", TS11, {"RPC0": 46.07, "RPC1": 46.08, "CPU": 14.04}),
    # deepseek2.cpp and glm4-moe.cpp with their nextn (MTP) layer left out of the graph: -ngl 4 puts layers 3-6
    # offloaded, the nextn layer 6 and the output on RPC2, which runs the output only (branch fitmla's matrix run)
    ("deepseek2", NGL4, {"RPC0": 31.01, "RPC1": 0.0, "RPC2": 18.0, "CPU": 37.01}),
    ("glm4moe", NGL4, {"RPC0": 19.01, "RPC1": 0.0, "RPC2": 18.0, "CPU": 23.01}),
]

# llama-fit-params' dry runs on 2 CPU RPC devices (bench/fit_arch_sweep.py's budgets): fit moves a layer's experts
# to the host (LAYER_FRACTION_MOE), or all of its FFN but up (UP: the router and the shared expert's gate and
# down go along, "ffn_(gate|gate_up|down).*") or its down products (GATE) to the next device. Expected: the
# compute buffer sizes llama.cpp logged loading each (-fa auto, 2 CPU RPC servers, branch fitmla); the closed
# forms gave RPC0 36.51 / 36.51 / 32.10, RPC1 30.01 / 32.01 for deepseek2, RPC0 22.01 and RPC1 20.00 / 24.01 for
# glm4moe.
MOE5 = r"blk\.5\.ffn_(up|down|gate_up|gate)_(ch|)exps=CPU"
FIT_CASES = [
    ("deepseek2", SplitConfig(n_ctx=4096, n_gpu_layers=3, tensor_split=(0, 3),
                              tensor_overrides=(MOE5, r"blk\.6\.ffn_(up|down|gate_up|gate)_(ch|)exps=CPU")),
     {"RPC0": 0.0, "RPC1": 34.01, "CPU": 40.01}),
    ("deepseek2", SplitConfig(n_ctx=12800, n_gpu_layers=7, tensor_split=(5, 2),
                              tensor_overrides=(r"blk\.4\.ffn_(gate|gate_up|down).*=RPC1",)),
     {"RPC0": 44.6, "RPC1": 18.0, "CPU": 45.51}),
    ("deepseek2", SplitConfig(n_ctx=12800, n_gpu_layers=7, tensor_split=(5, 2),
                              tensor_overrides=(r"blk\.4\.ffn_down.*=RPC1",)),
     {"RPC0": 44.6, "RPC1": 18.0, "CPU": 45.51}),
    ("deepseek2", SplitConfig(n_ctx=4096, n_gpu_layers=7, tensor_split=(4, 3),
                              tensor_overrides=(r"blk\.3\.ffn_(gate|gate_up|down).*=RPC1", MOE5)),
     {"RPC0": 36.1, "RPC1": 35.01, "CPU": 37.01}),
    ("glm4moe", SplitConfig(n_ctx=4096, n_gpu_layers=7, tensor_split=(4, 3),
                            tensor_overrides=(r"blk\.3\.ffn_(gate|gate_up|down).*=RPC1", MOE5)),
     {"RPC0": 20.1, "RPC1": 30.05, "CPU": 26.01}),
    ("glm4moe", SplitConfig(n_ctx=4096, n_gpu_layers=7, tensor_split=(4, 3),
                            tensor_overrides=(r"blk\.3\.ffn_down.*=RPC1",)),
     {"RPC0": 20.1, "RPC1": 30.09, "CPU": 26.01}),
]

# Every RoPE of dflash's graph reads layer 0's rope factors: with layer 0 on the host each RoPE on a device copies
# them and starts a split (ggml_backend_sched_split_graph's need_new_split), which moves where the residual's copy
# lands (llama.cpp's log; before the rule: RPC0 -0.50, RPC1 -1.00 MiB)
WEIGHT_SPLITS = ("dflash", NGL4, {"RPC0": 25.51, "RPC1": 23.0, "RPC2": 18.0, "CPU": 25.01})


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense")
    return {a: read_profile(write_arch_model(root / f"{a}.gguf", a)) for a in {a for a, _, _ in CASES + FIT_CASES}}


def test_a_weight_read_on_another_backend_starts_a_split(models):
    arch, config, expected = WEIGHT_SPLITS
    p = plan(models[arch], rpc(3), config)
    assert {d.name: round(d.compute_bytes / MiB, 2) for d in p.devices} == expected


def rpc(n: int) -> list[Device]:
    return [Device(name=f"RPC{i}", total_bytes=64 << 30, free_bytes=64 << 30, source="rpc", kind="rpc")
            for i in range(n)]


@pytest.mark.parametrize("arch,config,expected", CASES, ids=[f"{a}-{i}" for i, (a, _, _) in enumerate(CASES)])
def test_replayed_compute_buffers_are_llama_cpps(models, arch, config, expected):
    profile = models[arch]
    assert dense_replayable(profile.trunk)      # the graph runs the trunk (MTP off)
    p = plan(profile, rpc(3), config)
    got = {d.name: round(d.compute_bytes / MiB, 2) for d in p.devices}
    assert got == expected


@pytest.mark.parametrize("arch,config,expected", FIT_CASES, ids=[f"{a}-{i}" for i, (a, _, _) in enumerate(FIT_CASES)])
def test_fits_overflow_overrides_are_replayed(models, arch, config, expected):
    # each FFN weight runs its product where the override put it, the router and the shared expert's included
    p = plan(models[arch], rpc(2), config)
    assert {d.name: round(d.compute_bytes / MiB, 2) for d in p.devices} == expected


def test_ffn_weights_an_override_moves_are_listed(models):
    from gpulab.core.placement.tensors import compute_sites

    p = plan(models["deepseek2"], rpc(2), FIT_CASES[1][1])
    trunk = models["deepseek2"].trunk
    _ffn, _stray, _parts, moved = compute_sites(trunk, list(p.layer_devices[:trunk.n_layer]) + [p.layer_devices[-1]],
                                                dict(p.moved_tensors))
    # UP's pattern takes the router and the shared expert's gate and down along, not up
    assert moved is not None
    assert sorted(name for il, name, dev in moved if il == 4 and dev == "RPC1") == [
        "ffn_down_exps", "ffn_down_shexp", "ffn_gate_exps", "ffn_gate_inp", "ffn_gate_shexp"]
    # an attention matrix moved: not an FFN weight, the replay does not place it (the closed forms do)
    _f, _s, _p, moved = compute_sites(trunk, list(p.layer_devices[:trunk.n_layer]) + [p.layer_devices[-1]],
                                      {**p.moved_tensors, "blk.2.attn_q_b.weight": "RPC1"})
    assert moved is None


@pytest.mark.parametrize("config,expected", [
    (TS31_Q8_FA, {"RPC0": 62.18, "RPC1": 26.0, "CPU": 30.13}),
    (TS11, {"RPC0": 54.16, "RPC1": 54.17, "CPU": 22.13}),
    (NGL4, {"RPC0": 33.03, "RPC1": 32.01, "RPC2": 18.0, "CPU": 39.08}),
    (TS111_Q4_FA, {"RPC0": 78.16, "RPC1": 78.17, "RPC2": 41.03, "CPU": 46.13}),
    (NONE, {"RPC1": 71.08, "CPU": 9.03}),
])
def test_dots3note_full_layers_run_the_dsa_indexer(models, config, expected):
    """dots3note with full-attention layers 1 and 4 (sliding_window_pattern 1,0,1,1,0,1 written into the matrix's
    model, bool array): they run deepseek32's lightning indexer (dense._Indexer) and attend over the full cache
    masked by its top-k, the window layers over the SWA cache (llm_graph_input_attn_k_dsa_iswa). The figures are
    llama.cpp's logged compute buffers, that file on CPU RPC devices (branch dsa); not replayed before."""
    d3 = models["dots3note"]
    mixed = replace(d3, layers=tuple(replace(layer, is_swa=il not in (1, 4)) for il, layer in enumerate(d3.layers)))
    assert dense_replayable(mixed)
    p = plan(mixed, rpc(3), config)
    assert {d.name: round(d.compute_bytes / MiB, 2) for d in p.devices} == expected
    assert not p.doubts


def test_every_graph_replayed_has_a_case():
    assert {a for a, _, _ in CASES} <= DENSE_GRAPHS


def test_graphs_not_built_here_stay_with_the_closed_forms(models):
    # an MTP layer (nextn_predict_layers) runs a graph of its own; qwen3vlmoe's deepstack adds widen inp_embd
    ds = models["deepseek"]
    assert not dense_replayable(replace(ds, metadata={**ds.metadata, "deepseek.nextn_predict_layers": 1}))
    # deepseek2's trunk is replayed, its whole layer list (nextn layer included) and its MTP head are not
    ds2 = models["deepseek2"]
    assert ds2.n_nextn == 1 and dense_replayable(ds2.trunk)
    assert not dense_replayable(ds2)
    from gpulab.core.placement.mtp import mtp_head
    assert not dense_replayable(mtp_head(ds2))
    vl = models["exaone-moe"]
    assert not dense_replayable(replace(vl, arch="qwen3vlmoe", metadata={"qwen3vlmoe.n_deepstack_layers": 3}))
