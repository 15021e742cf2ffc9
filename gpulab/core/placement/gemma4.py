"""Gemma 4's compute buffers, replayed op by op (ggml_replay): per-layer inputs and norms everywhere.

llama_model_gemma4::graph (src/models/gemma4.cpp) differs from the dense graphs the closed forms cover in ways
that each move ggml-alloc's layout: the per-layer embeddings (per_layer_token_embd's rows on the host, projected
from the scaled embeddings by per_layer_model_proj, normed, added, permuted into one [n_embd_per_layer, T, n_layer]
tensor that stays live until the last layer reads its slice), norms of Q, K and V, norms after attention and after
the FFN, and each layer closing with its gated per-layer input. The replay of the scheduler split and ggml-alloc
follows that without a closed form per phase. Dense layers only (a layer with experts, ffn_gate_inp, is another
graph) and every layer with its own KV (no shared-KV tail).
"""

from __future__ import annotations

from ..config import SplitConfig
from ..devices import HOST_NAME
from ..profile import ModelProfile
from .ggml_replay import Graph, Tensor
from .recurrent import _Attn, _Ctx, replay_compute_bytes

__all__ = ["gemma4_compute_bytes", "gemma4_replayable"]



def gemma4_replayable(profile: ModelProfile) -> bool:
    """A gemma4 profile with per-layer inputs, dense layers only, every layer with its own KV cache."""
    if profile.arch != "gemma4" or "gemma4.embedding_length_per_layer_input" not in profile.metadata:
        return False
    names = {t.name.split(".", 2)[-1] for layer in profile.layers for t in layer.tensors}
    return ("inp_gate.weight" in names and not any("ffn_gate_inp" in n or "_exps" in n for n in names)
            and all(layer.has_kv for layer in profile.layers)
            and any(t.name == "per_layer_token_embd.weight" for t in profile.input_tensors))


def _graph(c: _Ctx, fa: bool, v_trans: bool) -> tuple[Graph, list]:
    p, dev, T, T_out, pin = c.p, c.dev, c.T, c.T_out, c.pin
    g, E, L = c.g, p.n_embd, p.n_layer
    ple = int(p.metadata["gemma4.embedding_length_per_layer_input"])
    attn = _Attn(c, fa, v_trans)        # the full and the sliding-window caches' inputs
    has_v = {i: any(t.name.endswith(".attn_v.weight") for t in layer.tensors) for i, layer in enumerate(p.layers)}

    def norm(x: Tensor, il: int, d: str, pinned: bool = True) -> Tensor:
        """build_norm with a weight: RMS_NORM (named "norm": pinned to the layer's device under full offload or
        small ubatches, llama_context::graph_get_cb) and the weight's MUL, in place."""
        n = g.op(x.size, x, w=d if pin and pinned and il >= 0 else None, inplace=True)
        return g.op(n.size, n, w=d, inplace=True)

    # build_inp_embd scaled by sqrt(n_embd); build_inp_pos; the KV inputs; build_inp_out_ids
    tokens = g.inp(4 * T)
    g.expand(g.inp(4 * E * T))                   # inp_embd: a text batch never reads it, it is allocated
    # (build_inp_embd expands the rows it gathers: they come first)
    inp = g.op(4 * E * T, g.expand(g.op(4 * E * T, tokens, w=HOST_NAME)), inplace=True)
    pos = g.inp(4 * T)
    out_ids = g.inp(4 * T_out)
    # build_inp_per_layer: its own token ids, the rows of per_layer_token_embd (host), scaled; expanded at once
    tokens2 = g.inp(4 * T)
    ple_rows = g.expand(g.op(4 * ple * L * T, g.view(g.op(4 * ple * L * T, tokens2, w=HOST_NAME)), inplace=True))
    # project_per_layer_inputs: per_layer_model_proj (a tensor of layer 0's device) on the scaled embeddings,
    # scaled, normed (per_layer_proj_norm, il -1: pinned nowhere), added, scaled, permuted into a copy
    d0 = dev[0]
    proj = g.op(4 * ple * L * T, g.op(4 * ple * L * T, inp, w=d0), inplace=True)
    proj = norm(g.view(proj), -1, d0)
    per_layer = g.op(4 * ple * L * T, g.view(g.op(proj.size, g.op(proj.size, proj, ple_rows, inplace=True),
                                                  inplace=True)))
    cur = inp
    for il, layer in enumerate(p.layers):
        d = dev[il]
        hd, n_head, n_head_kv = layer.n_embd_head_k, layer.n_head, layer.n_head_kv
        q_size, kv_size = 4 * hd * n_head * T, 4 * hd * n_head_kv * T
        h = norm(cur, il, d)
        q = g.op(q_size, norm(g.view(g.op(q_size, h, w=d)), il, d), pos, inplace=True)       # q_norm, RoPE
        k_mm = g.op(kv_size, h, w=d)
        v_src = g.op(kv_size, h, w=d) if has_v[il] else k_mm            # no attn_v: V is K's product
        k = g.op(kv_size, norm(g.view(k_mm), il, d), pos, inplace=True)                      # k_norm, RoPE
        v = g.op(kv_size, g.view(v_src))                                                     # rms_norm(V)
        out = attn.attend(q, k, v, il)
        attn_out = g.op(4 * E * T, norm(g.op(4 * E * T, out, w=d), il, d), cur, inplace=True)   # wo, post norm, +
        hf = norm(attn_out, il, d)
        f = 4 * p.n_ff * T
        ff = g.op(f, g.op(f, hf, w=d), g.op(f, hf, w=d))                                     # geglu(gate, up)
        cur = g.op(4 * E * T, norm(g.op(4 * E * T, ff, w=d), -1, d), attn_out, inplace=True)  # down, post norm, +
        # the per-layer input: gelu(inp_gate cur) * this layer's slice, projected, normed, added
        gated = g.op(4 * ple * T, g.op(4 * ple * T, g.op(4 * ple * T, cur, w=d), inplace=True),
                     g.view(per_layer, 4 * ple * T), inplace=True)
        cur = g.op(4 * E * T, cur, norm(g.op(4 * E * T, gated, w=d), il, d), inplace=True)
        if any(t.name.endswith(".layer_output_scale.weight") for t in layer.tensors):
            cur = g.op(cur.size, cur, w=d, inplace=True)                                     # out_scale
    out_dev = dev[L]
    h_out = norm(cur, -1, out_dev)
    h_out.out = True                  # t_h_nextn: an output of the graph
    rows = g.op(4 * E * T_out, h_out, out_ids)
    soft_cap = bool(p.metadata.get("gemma4.final_logit_softcapping"))
    logits = g.op(4 * p.n_vocab * T_out, rows, w=out_dev, out=not soft_cap)
    if soft_cap:            # scale, tanh, scale: in place
        logits = g.op(logits.size, g.op(logits.size, g.op(logits.size, logits, inplace=True), inplace=True),
                      inplace=True, out=True)
    g.expand(logits)
    return g, [(n, d) for n, d in attn.fa_nodes if n is not None]


def gemma4_compute_bytes(profile: ModelProfile, config: SplitConfig, layer_devices: list[str], names: list[str], *,
                         T: int, n_seqs: int, T_out: int, n_copies: int, pin_norm: bool) -> dict[str, int]:
    """Compute buffer bytes of every backend in `names` for a `gemma4_replayable` profile."""
    return replay_compute_bytes(_graph, profile, config, layer_devices, names, T=T, n_seqs=n_seqs, T_out=T_out,
                                n_copies=n_copies, pin_norm=pin_norm)
