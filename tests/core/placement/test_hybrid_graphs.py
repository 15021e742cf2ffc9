"""Compute buffers of the hybrid and recurrent graphs replayed by branch hybrid3: rwkv7 (gpulab/core/placement/
recurrent.py, src/models/rwkv7.cpp: LayerNorms with biases, the gated time mix with its group norm, two token
shifts stored as one concat, the relu-squared channel mix) and the KDA/MLA hybrids of gpulab/core/placement/kda.py:
kimi-linear (src/models/kimi-linear.cpp), bailingmoe3 (src/models/bailingmoe3.cpp), kimi-k3
(src/models/kimi-k3.cpp: attention residuals, SiTU) and glm5-next (src/models/glm5-next.cpp: hyper-connections,
DSA with a k-pool indexer).

The expected figures are llama.cpp's `compute buffer size` lines (MiB, two decimals) for the architecture
matrix's models (gpulab.sources.arch_models) on CPU RPC devices, as tests/integration/
test_arch_matrix_vs_llama.py loads them (branch hybrid3's run), to the log's rounding."""

from __future__ import annotations

from dataclasses import replace

import pytest

from arch_settings import SETTINGS, logged, rpc
from gpulab import SplitConfig, plan
from gpulab.core.placement.coverage import COMPUTE_EXACT
from gpulab.core.placement.ggml_replay import Graph, buffer_peaks, schedule
from gpulab.core.placement.kda import kda_replayable
from gpulab.core.profile import TensorInfo

MiB = 1024**2


LOGGED = {
    # 6 RWKV-7 layers, n_embd 1024, head 64, gate rank 128, n_ff 3072, n_vocab 8192: the first layer's V copied to
    # every later device, the channel mix's shifted input made on the next device at a boundary
    "rwkv7": logged({"RPC0": 44.64, "RPC1": 26.0, "CPU": 10.02}, {"RPC0": 52.63, "RPC1": 64.65, "CPU": 10.02},
                    {"RPC0": 34.63, "RPC1": 32.63, "RPC2": 18.0, "CPU": 38.64}, {"RPC1": 36.63, "CPU": 4.0},
                    {"RPC0": 52.63, "RPC1": 64.65, "RPC2": 26.0, "CPU": 10.02},
                    {"RPC0": 52.63, "RPC1": 72.64, "RPC2": 62.64, "CPU": 10.02}),
    # 4 KDA layers (16 heads of 64, d_conv 4) and 2 absorbed-MLA layers (kv rank 256, no RoPE) over a K-only
    # cache, a leading dense layer, then 8 experts (2 used) without a shared expert; -ctk q8_0 with an f16 V
    # (the fifth setting) is refused by llama.cpp for MLA, and by gpulab (the matrix records both refusals)
    "kimi-linear": logged({"RPC0": 44.07, "RPC1": 26.0, "CPU": 18.03}, {"RPC0": 40.02, "RPC1": 40.07, "CPU": 14.03},
                          {"RPC0": 18.25, "RPC1": 29.01, "RPC2": 18.0, "CPU": 31.01}, {"RPC1": 62.05, "CPU": 6.01},
                          None, {"RPC0": 52.02, "RPC1": 26.3, "RPC2": 50.07, "CPU": 26.03}),
    # the same layout with one low-rank gate product, a sigmoid decay gate with a lower bound, MLA with RoPE, a
    # low-rank Q and a head-wise output gate before wo, a shared expert, the output rows gathered after the norm
    "bailingmoe3": logged({"RPC0": 50.07, "RPC1": 28.01, "CPU": 18.04}, {"RPC0": 43.02, "RPC1": 46.08, "CPU": 14.04},
                          {"RPC0": 18.3, "RPC1": 32.01, "RPC2": 20.0, "CPU": 37.06}, {"RPC1": 68.05, "CPU": 6.01},
                          None, {"RPC0": 55.02, "RPC1": 26.3, "RPC2": 53.03, "CPU": 26.04}),
    # kimi-linear's layout with attention residuals (the embeddings banked, mixed before every norm), one
    # full-rank KDA output gate, SiTU activations in the dense FFN and the experts (no shared expert)
    "kimi-k3": logged({"RPC0": 54.02, "RPC1": 50.01, "CPU": 18.03}, {"RPC0": 50.02, "RPC1": 64.03, "CPU": 14.03},
                      {"RPC0": 16.57, "RPC1": 33.0, "RPC2": 24.0, "CPU": 35.01}, {"RPC1": 64.01, "CPU": 6.01},
                      None, {"RPC0": 62.02, "RPC1": 50.33, "RPC2": 76.03, "CPU": 26.03}),
    # 4 hyper-connection streams around KDA and DSA (nope-only MLA masked by a k-pool indexer, kpool 2, top-k 64);
    # -ngl 4 puts layer 2 on the host and its fused hc_post on RPC0, so llama.cpp unfuses hc_post everywhere
    "glm5-next": logged({"RPC0": 65.71, "RPC1": 26.0, "CPU": 22.92}, {"RPC0": 50.98, "RPC1": 105.03, "CPU": 16.87},
                        {"RPC0": 134.34, "RPC1": 153.7, "RPC2": 18.0, "CPU": 39.84}, {"RPC1": 65.1, "CPU": 6.72},
                        None, {"RPC0": 69.14, "RPC1": 90.05, "RPC2": 115.03, "CPU": 35.03}),
}


@pytest.mark.parametrize("arch,setting", [(a, s) for a in LOGGED for s in SETTINGS if LOGGED[a][s] is not None])
def test_compute_buffers_match_llama_cpp_logs(arch_models, arch, setting):
    p = plan(arch_models[arch], rpc(3), SETTINGS[setting])
    logged = LOGGED[arch][setting]
    assert logged is not None
    assert {d.name: d.compute_bytes / MiB for d in p.devices} == \
        {k: pytest.approx(v, abs=0.006) for k, v in logged.items()}
    assert arch in COMPUTE_EXACT and not [d for d in p.doubts if d.term == "compute"]


def test_a_leaf_made_without_an_op_is_allocated_after_the_pipelined_input_copies_once():
    """glm5-next's zero block (ggml_fill of a new tensor): one allocation on its device after the split inputs'
    copies (n_copies of each), not one per copy; it is what made llama.cpp's RPC2 115.03 MiB, not 115.15, at
    ts 1:1:1 with q4_0 (the leaf placed before the copies left a 128 KiB hole under the logits)."""
    g = Graph()
    x = g.inp(1024)                                   # a host input read on RPC0: 4 copies when pipelined
    leaf = g.leaf("RPC0", 4096)
    y = g.op(2048, x, g.view(leaf), w="RPC0")
    g.expand(g.op(6144, g.op(32, y, w="RPC0"), w="RPC0", out=True))
    schedule(g)
    # the copies (4 x 1024), the leaf once, y and the 32 bytes above them; the leaf's and y's ranges, freed and
    # adjacent, then hold the last 6144 bytes (before the copies, the leaf's hole would not touch y's)
    assert buffer_peaks(g, 4)["RPC0"] == 4 * 1024 + 4096 + 2048 + 32
    g = Graph()
    x = g.inp(1024)
    leaf = g.leaf("RPC0", 4096)
    y = g.op(2048, x, g.view(leaf), w="RPC0")
    g.expand(g.op(8192, y, w="RPC0", out=True))
    schedule(g)
    # one copy (not pipelined): the copy and the leaf are freed after y, y after the last op; its 8192 bytes go
    # above the leaf's freed 4096 (best fit finds no block that large)
    assert buffer_peaks(g, 1)["RPC0"] == 1024 + 4096 + 2048 + 8192


def test_glm5_next_unfuses_hc_post_where_the_scheduler_moves_it(arch_models):
    """-ngl 4: layer 2 on the host, its fused hc_post scheduled on RPC0 (llama_context::resolve_fused_ops logs
    "fused DeepSeek V4 HC post not supported, set to disabled"): the unfused loops are what reaches 153.70 MiB on
    RPC1; with them fused it would be some 120 MiB less."""
    p = plan(arch_models["glm5-next"], rpc(3), SETTINGS["ngl4-ts-1-1-1"])
    assert {d.name: d.compute_bytes / MiB for d in p.devices}["RPC1"] == pytest.approx(153.70, abs=0.006)
    assert kda_replayable(arch_models["glm5-next"])


def test_kda_files_whose_graph_is_not_built_here_state_a_compute_doubt(arch_models):
    """A fused QKV product in a KDA layer (kimi-linear's attn_qkv branch) or a loaded MTP layer (bailingmoe3's
    graph_mtp) is not replayed by placement.kda: the plan says its compute is not modelled."""
    def with_layer_tensor(arch: str, il: int, name: str):
        m = arch_models[arch]
        layer = m.layers[il]
        extra = TensorInfo(f"blk.{il}.{name}", "F16", (1024, 3072), 1)
        return replace(m, layers=(*m.layers[:il], replace(layer, tensors=(*layer.tensors, extra)), *m.layers[il + 1:]))

    assert all(kda_replayable(arch_models[a]) for a in ("kimi-linear", "bailingmoe3", "kimi-k3", "glm5-next"))
    fused = with_layer_tensor("kimi-linear", 0, "attn_qkv.weight")
    assert not kda_replayable(fused)
    assert "compute" in [d.term for d in plan(fused, rpc(1), SplitConfig(n_ctx=1024)).doubts]
    m = arch_models["bailingmoe3"]
    mtp = replace(m, layers=(*m.layers[:-1], replace(m.layers[-1], is_nextn=True)))
    assert not kda_replayable(mtp)
