"""Compute buffers of the graphs that attend without a KV cache (gpulab/core/placement/compute_encoder.py:
embedding and diffusion models, T5) against the buffers llama.cpp logged for the architecture matrix's models
(gpulab.sources.arch_models; CPU RPC devices, tests/integration/test_arch_matrix_vs_llama.py). The figures are
llama.cpp's `compute buffer size` lines, in MiB as it prints them (test-artifacts/arch_matrix.json)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from arch_settings import SETTINGS, rpc, servers
from gpulab import plan
from gpulab.core.placement.compute_encoder import ENCODER_GRAPHS, encoder_replayable
from gpulab.core.placement.coverage import COMPUTE_EXACT

MiB = 1024**2

# All models: n_embd 1024, 6 layers, 16 heads of 64 (4 KV heads; T5 16), n_ff 3072, n_vocab 8192, n_ubatch 512.
LOGGED = [
    # the no-cache attention: KQ [512, 512, 16] f32 (16 MiB) and a [512, 512] mask whatever n_ctx, K and V cast
    # to f16 for flash attention; no KV row indices, no rotations however the (unused) cache is quantized
    ("dream", "ts-1-2-1-q8k-fa-off", {"RPC0": 36.01, "RPC1": 36.02, "RPC2": 26.0, "CPU": 14.02}),
    ("dream", "ts-1-1-1-q4-fa", {"RPC0": 34.01, "RPC1": 34.01, "RPC2": 32.02, "CPU": 12.02}),
    # no lm_head: the output device runs the output norm only
    ("llama-embed", "ts-3-1-q8-fa", {"RPC0": 34.02, "RPC1": 10.0, "CPU": 12.02}),
    ("eurobert", "ts-1-1", {"RPC0": 34.01, "RPC1": 32.02, "CPU": 12.02}),
    # sandwich norms, scaled input and Q, a second [T, T] mask for sliding-window layers
    ("gemma-embedding", "ts-1-2-1-q8k-fa-off", {"RPC0": 36.01, "RPC1": 40.02, "RPC2": 10.0, "CPU": 18.02}),
    # MoE (8 experts, 2 used) with Q/K norms; rnd1 normalizes the expert weights, llada-moe does not
    ("rnd1", "ngl4-ts-1-1-1", {"RPC0": 10.51, "RPC1": 8.5, "RPC2": 18.0, "CPU": 12.51}),
    ("llada-moe", "ts-1-1", {"RPC0": 20.01, "RPC1": 28.02, "CPU": 12.02}),
    # bert: LayerNorms after attention and the FFN (ggml_norm not in place), token_embd_norm on layer 0's device
    # with the position add pulled there (pipelined: 4 copies of embd and the positions' rows on RPC0)
    ("bert", "ts-1-1", {"RPC0": 28.0, "RPC1": 20.01, "CPU": 14.02}),
    ("bert", "ngl4-ts-1-1-1", {"RPC0": 10.5, "RPC1": 10.0, "RPC2": 0.0, "CPU": 12.51}),
    ("nomic-bert", "ts-1-2-1-q8k-fa-off", {"RPC0": 34.01, "RPC1": 34.02, "RPC2": 0.0, "CPU": 14.02}),
    ("jina-bert-v3", "ts-1-1-1-q4-fa", {"RPC0": 20.01, "RPC1": 20.01, "RPC2": 20.02, "CPU": 12.02}),
    # jina-bert-v2: ALiBi (no positions), GEGLU on a fused up; the token-type row's add runs on layer 0's device
    # (a weight's view has no buffer when the scheduler runs): 4 copies of the embeddings and of the row there
    ("jina-bert-v2", "ts-1-1", {"RPC0": 32.02, "RPC1": 32.01, "CPU": 12.02}),
    ("jina-bert-v2", "ngl4-ts-1-1-1", {"RPC0": 20.5, "RPC1": 20.0, "RPC2": 0.0, "CPU": 24.5}),
    # fused QKV, gate and up in one product
    ("neo-bert", "ts-1-1", {"RPC0": 32.01, "RPC1": 34.02, "CPU": 12.02}),
    ("modern-bert", "ts-1-2-1-q8k-fa-off", {"RPC0": 39.01, "RPC1": 39.02, "RPC2": 10.0, "CPU": 14.02}),
    # T5's encoder: the relative position bias (get_rows and cont, 16 MiB each) on KQ, so never flash attention
    ("t5encoder", "ts-3-1-q8-fa", {"RPC0": 90.01, "RPC1": 10.0, "CPU": 16.02}),
    ("t5encoder", "none-main-1-fa-off", {"RPC1": 63.0, "CPU": 6.0}),
    # T5 reserves its decoder: cross-attention over n_ctx_train (32768) encoder rows, KQ [32768, 512, 16] f32 = 1 GiB
    ("t5", "ts-1-2-1-q8k-fa-off", {"RPC0": 2302.08, "RPC1": 2366.09, "RPC2": 26.0, "CPU": 858.09}),
    ("t5", "ts-1-1-1-q4-fa", {"RPC0": 1152.16, "RPC1": 1120.16, "RPC2": 1086.16, "CPU": 698.17}),
    ("t5", "ngl4-ts-1-1-1", {"RPC0": 489.01, "RPC1": 423.01, "RPC2": 18.0, "CPU": 491.01}),
    # wavtokenizer-dec: every posnet group norm is pinned to layer 0's device (built with il 0), so with the whole
    # model offloaded the later devices receive it (4 copies of 2 MiB per norm); no lm_head, no mask
    ("wavtokenizer-dec", "ts-1-1", {"RPC0": 29.0, "RPC1": 60.0, "CPU": 10.01}),
    ("wavtokenizer-dec", "ts-1-2-1-q8k-fa-off", {"RPC0": 28.0, "RPC1": 85.0, "RPC2": 12.0, "CPU": 10.01}),
    ("wavtokenizer-dec", "ngl4-ts-1-1-1", {"RPC0": 13.0, "RPC1": 12.0, "RPC2": 4.0, "CPU": 15.0}),
]


@pytest.mark.parametrize("arch,setting,expected", LOGGED, ids=[f"{a}-{s}" for a, s, _ in LOGGED])
def test_compute_matches_llama_cpp_log(arch_models, arch, setting, expected):
    config = SETTINGS[setting]
    p = plan(arch_models[arch], rpc(servers(config)), config)
    got = {d.name: d.compute_bytes for d in p.devices}
    assert set(got) == set(expected)
    for name, mib in expected.items():
        # the log prints two decimals: within 0.005 MiB of it
        assert abs(got[name] / MiB - mib) <= 0.005 + 1e-9, (name, got[name] / MiB, mib)
    assert not [x for x in p.doubts if x.term == "compute"]


def test_every_replayed_graph_is_exact_and_replayed(arch_models):
    assert ENCODER_GRAPHS <= COMPUTE_EXACT
    assert all(encoder_replayable(m) for m in (arch_models[a] for a, _, _ in LOGGED))


def test_bert_experts_are_not_replayed(arch_models):
    """nomic-bert-moe's expert layers (moe_every_n_layers) are not built by the replay: the profile falls back."""
    m = arch_models["bert"]
    moe = replace(m, arch="nomic-bert-moe", metadata={**m.metadata, "nomic-bert-moe.moe_every_n_layers": 2})
    assert not encoder_replayable(moe)
