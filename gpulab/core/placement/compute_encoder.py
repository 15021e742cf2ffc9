"""Compute buffers of the graphs that attend without a KV cache: their ggml graph, replayed.

Embedding and diffusion models attend over the ubatch itself (llm_graph_context::build_attn_inp_no_cache and
the build_attn that takes llm_graph_input_attn_no_cache, src/llama-graph.cpp): llama_model::create_memory
(src/llama-model.cpp) makes no memory for dream, llada, llada-moe, rnd1, eurobert, gemma-embedding and the
BERTs, and llama-embed builds llama's graph with the no-cache input (src/models/llama.cpp, graph<true>). So
their attention is not the closed forms' of gpulab.core.placement.compute:

  mask       [n_tokens, n_tokens] (f16 with flash attention), not [n_kv, n_tokens]; no K/V row indices, no
             Hadamard rotation inputs (no cache, so -ctk/-ctv change nothing)
  attention  KQ is [n_tokens, n_tokens, n_head] f32, whatever n_ctx; with flash attention K and V are f32
             products cast to f16 first (build_attn_mha: "an embedding model with non-causal attn"), without
             it V is made contiguous and transposed (v_cont)
  output     graph<true> and eurobert have no lm_head: the output layer's device runs the output norm only

The graph is built op by op in llama.cpp's order and handed to gpulab.core.placement.ggml_replay (the
scheduler's split and ggml-alloc), as placement.recurrent does for the recurrent graphs:

  dream, llada      src/models/dream.cpp, llada.cpp (llama's layer, the no-cache attention)
  llama-embed       src/models/llama.cpp graph<true>
  eurobert          src/models/eurobert.cpp (no lm_head)
  rnd1, llada-moe   src/models/rnd1.cpp, llada-moe.cpp (Q/K norms, build_moe_ffn with softmax gating;
                    rnd1 normalizes the expert weights, llada-moe does not)
  gemma-embedding   src/models/gemma-embedding.cpp (scaled input, Q/K norms, Q scaled, norms after attention
                    and the FFN, a second mask for the sliding-window layers, no lm_head)

Checked on the architecture matrix (tests/integration/test_arch_matrix_vs_llama.py, CPU RPC devices).
"""

from __future__ import annotations

import weakref

from ..config import SplitConfig
from ..devices import HOST_NAME
from ..profile import ModelProfile
from .ggml_replay import Graph, Tensor, buffer_peaks, schedule
from .recurrent import _Ctx, _moe

__all__ = ["ENCODER_GRAPHS", "encoder_compute_bytes", "encoder_replayable"]

# arch -> (has an lm_head, Q/K norms, MoE expert weights normalized, gemma's sandwich norms and scaled input)
_LLAMA_LIKE = {
    "dream": (True, False, False, False),
    "llada": (True, False, False, False),
    "llama-embed": (False, False, False, False),
    "eurobert": (False, False, False, False),
    "rnd1": (True, True, True, False),
    "llada-moe": (True, True, False, False),
    "gemma-embedding": (False, True, False, True),
}
ENCODER_GRAPHS = frozenset(_LLAMA_LIKE)
_CACHE: dict[tuple, tuple[weakref.ref, dict[str, int]]] = {}


class _NoCacheAttn:
    """llm_graph_input_attn_no_cache and build_attn / build_attn_mha without memory (src/llama-graph.cpp)."""

    def __init__(self, c: _Ctx, fa: bool) -> None:
        self.c, self.fa = c, fa
        size = c.T * c.T * (2 if fa else 4)
        self.mask = c.g.inp(size)
        # a sliding-window model gets a second [T, T] mask (hparams.swa_type != LLAMA_SWA_TYPE_NONE)
        self.mask_swa = c.g.inp(size) if any(layer.is_swa for layer in c.p.layers) else self.mask
        self.fa_nodes: list[tuple[Tensor, str]] = []

    def __call__(self, cur: Tensor, pos: Tensor, il: int, qk_norm: bool, q_scale: bool = False) -> Tensor:
        c, g, T = self.c, self.c.g, self.c.T
        d, layer = c.dev[il], c.p.layers[il]
        hd, n_head, n_kv_head = layer.n_embd_head_k, layer.n_head, layer.n_head_kv
        qs, ks = 4 * hd * n_head * T, 4 * hd * n_kv_head * T
        q = g.view(g.op(qs, cur, w=d))                       # wq, reshaped
        k = g.view(g.op(ks, cur, w=d))
        v = g.view(g.op(ks, cur, w=d))
        if qk_norm:
            q, k = c.norm(q, il, qs), c.norm(k, il, ks)
        q = g.op(qs, q, pos, inplace=True)                   # RoPE (in place only on a norm's output)
        k = g.op(ks, k, pos, inplace=True)
        if q_scale:
            q = g.op(qs, q, inplace=True)                    # ggml_scale(Q, f_attention_scale)
        mask = self.mask_swa if layer.is_swa else self.mask
        for t in (q, k, v):                                  # build_attn expands Q, K, V first
            g.expand(t)
        qp, kp, vp = g.view(g.view(q)), g.view(k), g.view(v)
        if self.fa:
            # K and V are f32 products: cast to f16 for flash attention
            out = g.op(qs, qp, g.op(ks // 2, kp), g.op(ks // 2, vp), mask)
            self.fa_nodes.append((out, d))
            out = g.view(out)
        else:
            kq = g.op(4 * T * T * n_head, kp, qp)
            kq = g.op(kq.size, kq, mask, inplace=True)  # soft_max_ext
            vc = g.op(ks, g.view(vp))                        # v_cont: cont(transpose(v))
            out = g.op(qs, g.view(g.op(qs, vc, kq)))         # cont_2d(permute(kqv))
        g.expand(out)
        return g.op(4 * c.E * T, out, w=d)                   # wo


def _llama_like(c: _Ctx, fa: bool) -> tuple[Graph, list]:
    g, T, E, p = c.g, c.T, c.E, c.p
    logits, qk_norm, norm_w, sandwich = _LLAMA_LIKE[p.arch]
    tokens = g.inp(4 * T)
    g.expand(g.inp(4 * E * T))               # inp_embd: a text batch never reads it, it is allocated
    cur = g.expand(g.op(4 * E * T, tokens, w=HOST_NAME))              # get_rows(token_embd)
    if sandwich:
        cur = g.expand(g.op(cur.size, cur, inplace=True))             # ggml_scale(inpL, sqrt(n_embd))
    pos = g.inp(4 * T)
    attn = _NoCacheAttn(c, fa)
    out_ids = g.inp(4 * c.T_out)
    n_layer = p.n_layer
    for il in range(n_layer):
        res = cur
        y = attn(c.norm(cur, il), pos, il, qk_norm, q_scale=sandwich)
        if il == n_layer - 1:
            y, res = g.op(4 * E * c.T_out, y, out_ids), g.op(4 * E * c.T_out, res, out_ids)
        if sandwich:
            y = c.norm(y, il)                                          # attn_post_norm
        ffn_inp = g.op(y.size, y, res, inplace=True)
        h = c.norm(ffn_inp, il)
        if p.n_expert:
            ff = _moe(c, h, il, norm_w=norm_w)
        else:
            rows, fd = ffn_inp.size // (4 * E), c.ffn_dev[il]
            f = 4 * p.n_ff * rows
            ff = g.op(ffn_inp.size, g.op(f, g.op(f, h, w=fd), g.op(f, h, w=fd)), w=fd)   # down(swiglu(gate, up))
        if sandwich:
            # ffn_post_norm is built with il -1: not pinned, its weight's MUL runs on the layer's device
            ff = g.op(ff.size, g.op(ff.size, ff, inplace=True), w=c.dev[il], inplace=True)
        cur = g.op(ffn_inp.size, ff, ffn_inp, inplace=True)
    out_dev = c.dev[n_layer]
    h = c.norm(cur, -1, cur.size) if n_layer else cur
    if logits:
        h = g.op(4 * p.n_vocab * c.T_out, h, w=out_dev)                 # result_output
    h.out = True
    g.expand(h)
    return g, attn.fa_nodes


def encoder_compute_bytes(profile: ModelProfile, config: SplitConfig, layer_devices: list[str],
                          names: list[str], *, T: int, n_seqs: int, T_out: int, n_copies: int,
                          pin_norm: bool, ffn_devices: list[str] | None = None) -> dict[str, int]:
    """Compute buffer bytes of every backend in `names` for an `encoder_replayable` profile, remembered per
    profile and arguments."""
    key = (id(profile), config, tuple(layer_devices), tuple(names), T, n_seqs, T_out, n_copies, pin_norm,
           tuple(ffn_devices) if ffn_devices else None)
    hit = _CACHE.get(key)
    if hit is not None and hit[0]() is profile:
        return dict(hit[1])
    fa = config.flash_attn != "off"
    c = _Ctx(profile, config, layer_devices, T, n_seqs, T_out, pin_norm, ffn_devices)
    g, fa_nodes = _llama_like(c, fa)
    schedule(g)
    if config.flash_attn == "auto" and any(n.be != d for n, d in fa_nodes):
        # llama_context::resolve_fused_ops: flash attention scheduled away from its layer's device is
        # turned off (and the reserve graph built again without it)
        c = _Ctx(profile, config, layer_devices, T, n_seqs, T_out, pin_norm, ffn_devices)
        g, _ = _llama_like(c, False)
        schedule(g)
    tops = buffer_peaks(g, n_copies)
    out = {name: tops.get(name, 0) for name in names}
    if len(_CACHE) > 256:
        _CACHE.clear()
    _CACHE[key] = (weakref.ref(profile), out)
    return dict(out)


def encoder_replayable(profile: ModelProfile) -> bool:
    """Whether `profile`'s compute buffers are replayed here: a graph of ENCODER_GRAPHS with the tensors the
    graph built here reads (separate Q/K/V products; Q/K norms where the graph has them)."""
    if profile.arch not in _LLAMA_LIKE or not profile.layers:
        return False
    names = {t.name.split(".", 2)[-1] for layer in profile.layers for t in layer.tensors}
    if not names:
        return True            # a profile without its tensor list (built in code): the graph as written here
    return "attn_qkv.weight" not in names and "attn_q.weight" in names
