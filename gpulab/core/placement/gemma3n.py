"""Gemma 3n's compute buffers, replayed op by op (ggml_replay): AltUp's n_altup copies of the hidden state.

llama_model_gemma3n::graph (src/models/gemma3n.cpp) carries the hidden state as [n_embd, T, n_altup] between
layers: the scaled embeddings and n_altup - 1 projections of them (altup_proj, an output-layer tensor, so that
product runs on the output device), each layer predicting all of them from a router (altup_predict), running
attention and the FFN on the active one with LAuReL beside attention and a Gaussian top-k on the first
n_layer_sparsity layers' gates, correcting all of them (altup_correct) and adding its per-layer input to the
others; after the last layer the copies are unembedded (altup_unembd_proj) and averaged. Per-layer inputs are
gemma4's (placement.gemma4). The replay of the scheduler split and ggml-alloc follows all of it. Every layer with
its own KV (n_layer_kv_from_start is 20, so models of up to 20 layers).
"""

from __future__ import annotations

from ..config import SplitConfig
from ..devices import HOST_NAME
from ..profile import LayerProfile, ModelProfile
from .ggml_replay import Graph, Tensor
from .recurrent import _Attn, _Ctx, replay_compute_bytes

__all__ = ["gemma3n_compute_bytes", "gemma3n_replayable"]

_N_ALTUP = 4                 # hparams.n_altup (llama-hparams.h default; the loader reads no key for it)
_I_ALTUP_ACT = 0             # hparams.i_altup_act
_N_EMBD_ALTUP = 256          # hparams.n_embd_altup
_N_LAYER_SPARSITY = 10       # llama_model_gemma3n::graph::n_layer_sparsity (src/models/models.h)
_N_LAYER_KV_FROM_START = 20  # set by load_arch_hparams


def gemma3n_replayable(profile: ModelProfile) -> bool:
    """A gemma3n profile whose layers all have their own KV and whose AltUp tensors have the default shapes."""
    if profile.arch != "gemma3n" or profile.n_layer > _N_LAYER_KV_FROM_START:
        return False
    proj = next((t for t in profile.output_tensors if t.name == "altup_proj.weight"), None)
    ple = next((t for t in profile.input_tensors if t.name == "per_layer_token_embd.weight"), None)
    return (proj is not None and len(proj.shape) == 3 and proj.shape[2] == _N_ALTUP - 1 and ple is not None
            and ple.shape[0] == _N_EMBD_ALTUP * profile.n_layer and all(la.has_kv for la in profile.layers))


def _graph(c: _Ctx, fa: bool, v_trans: bool) -> tuple[Graph, list]:
    p, dev, T, T_out, pin = c.p, c.dev, c.T, c.T_out, c.pin
    g, E, L, A = c.g, p.n_embd, p.n_layer, _N_ALTUP
    e, P = 4 * E * T, 4 * _N_EMBD_ALTUP * L * T
    attn = _Attn(c, fa, v_trans)        # the full and the sliding-window caches' inputs
    out_dev = dev[L]

    def norm(x: Tensor, il: int, d: str) -> Tensor:
        """build_norm with a weight: RMS_NORM (pinned to the layer's device under full offload or small ubatches,
        llama_context::graph_get_cb; il -1: nowhere) and the weight's MUL, in place."""
        n = g.op(x.size, x, w=d if pin and il >= 0 else None, inplace=True)
        return g.op(n.size, n, w=d, inplace=True)

    def magnitude(x: Tensor, rows: int) -> Tensor:          # sqrt(sum_rows(sqr(x)))
        return g.op(4 * rows, g.op(4 * rows, g.op(x.size, x, inplace=True)), inplace=True)

    def slice_(x: Tensor, size: int = e) -> Tensor:
        return g.view(x, size)

    def router(x: Tensor, il: int, d: str) -> Tensor:       # altup_compute_router_modalities: tanh(router(norm/n))
        return g.op(4 * A * T, g.op(4 * A * T, g.op(e, norm(x, il, d), inplace=True), w=d), inplace=True)

    # build_inp_embd (its rows expanded first) scaled by sqrt(n_embd); positions; the KV inputs
    tokens = g.inp(4 * T)
    g.expand(g.inp(e))                       # inp_embd: a text batch never reads it, it is allocated
    inp = g.op(e, g.expand(g.op(e, tokens, w=HOST_NAME)), inplace=True)
    pos = g.inp(4 * T)
    # build_inp_per_layer, expanded at once; project_per_layer_inputs (as gemma4's)
    tokens2 = g.inp(4 * T)
    ple_rows = g.expand(g.op(P, g.view(g.op(P, tokens2, w=HOST_NAME)), inplace=True))
    d0 = dev[0]
    proj = norm(g.view(g.op(P, g.op(P, inp, w=d0), inplace=True)), -1, d0)
    per_layer = g.op(P, g.view(g.op(P, g.op(P, proj, ple_rows, inplace=True), inplace=True)))
    # AltUp: the embeddings and their n_altup - 1 projections, rescaled to the embeddings' magnitude
    target = magnitude(inp, T)
    added = g.op(e * (A - 1), g.op(e * (A - 1), inp), w=out_dev)              # altup_proj(repeat(inp))
    added = g.op(added.size, g.op(added.size, added, target, inplace=True), magnitude(added, T * (A - 1)),
                 inplace=True)
    cur = g.op(e * A, inp, added)                                              # concat
    for il, layer in enumerate(p.layers):
        d = dev[il]
        hd, n_head, n_head_kv = layer.n_embd_head_k, layer.n_head, layer.n_head_kv
        q_size, kv_size = 4 * hd * n_head * T, 4 * hd * n_head_kv * T
        # altup_predict
        coefs = g.op(4 * A * A * T, router(slice_(cur), il, d), w=d)
        preds = g.op(e * A, g.view(g.op(e * A, g.op(e * A, g.view(cur)), g.view(coefs))))   # cont(permute(mm))
        preds = g.op(e * A, preds, cur, inplace=True)
        active = slice_(preds)
        h = norm(active, il, d)
        q = g.op(q_size, norm(g.view(g.op(q_size, h, w=d)), il, d), pos, inplace=True)      # q_norm, RoPE
        k = g.op(kv_size, norm(g.view(g.op(kv_size, h, w=d)), il, d), pos, inplace=True)    # k_norm, RoPE
        v = g.op(kv_size, g.view(g.op(kv_size, h, w=d)))                                    # rms_norm(V)
        out = attn.attend(q, k, v, il)
        a = g.op(e, norm(g.op(e, out, w=d), il, d), active, inplace=True)                  # wo, post norm, +
        # LAuReL beside attention on the same norm: laurel_r(laurel_l h), normed, + h
        laurel = g.op(e, norm(g.op(e, g.op(4 * _laurel_rank(layer) * T, h, w=d), w=d), il, d), h, inplace=True)
        attn_laurel = g.op(e, g.op(e, a, laurel, inplace=True), inplace=True)
        hf = norm(attn_laurel, il, d)
        f = 4 * p.n_ff * T
        up = g.op(f, hf, w=d)
        gate = g.op(f, hf, w=d)
        if il < _N_LAYER_SPARSITY:                                                     # gaussian_topk
            mean = g.op(4 * T, gate)
            std = g.op(4 * T, g.op(4 * T, g.op(4 * T, g.op(f, g.op(f, gate, mean), inplace=True)), inplace=True),
                       inplace=True)
            cutoff = g.op(4 * T, mean, g.op(4 * T, std, inplace=True), inplace=True)
            gate = g.op(f, g.op(f, gate, cutoff, inplace=True), inplace=True)           # relu(x - cutoff)
        gate = g.op(f, gate, inplace=True)                                                   # gelu
        down = g.op(e, g.op(f, up, gate, inplace=True), w=d)
        gated = g.op(e, norm(down, -1, d), attn_laurel, inplace=True)
        # altup_correct
        innovation = g.op(e, gated, slice_(preds), inplace=True)
        corr_coefs = g.op(4 * A * T, g.view(g.op(4 * A * T, g.op(4 * A * T, router(gated, il, d), w=d), inplace=True)))
        corrected = g.op(e * A, g.op(e * A, g.op(e * A, innovation), corr_coefs, inplace=True), preds, inplace=True)
        # the first prediction gated by this layer's per-layer input, added to the other copies
        first = g.op(e, slice_(corrected), w=d, inplace=True)                               # * altup_correct_scale
        first = g.op(4 * _N_EMBD_ALTUP * T, g.op(4 * _N_EMBD_ALTUP * T, first, w=d), inplace=True)
        first = g.op(first.size, first, g.view(per_layer, 4 * _N_EMBD_ALTUP * T), inplace=True)
        first = norm(g.op(e, first, w=d), il, d)
        tmp = g.op(e * (A - 1), slice_(corrected, e * (A - 1)), first, inplace=True)
        cur = g.op(e * A, slice_(corrected), tmp)                                            # concat
    # unembed the other copies, rescale them, average
    target = magnitude(slice_(cur), T)
    unembd = g.op(e * (A - 1), slice_(cur, e * (A - 1)), w=out_dev)
    unembd = g.op(unembd.size, g.op(unembd.size, unembd, target, inplace=True), magnitude(unembd, T * (A - 1)),
                  inplace=True)
    h_out = slice_(cur)
    for _ in range(A - 1):
        h_out = g.op(e, h_out, slice_(unembd), inplace=True)
    h_out = g.op(e, h_out, inplace=True)                                                     # / n_altup
    out_ids = g.inp(4 * T_out)
    rows = norm(g.op(4 * E * T_out, h_out, out_ids), -1, out_dev)
    logits = g.op(4 * p.n_vocab * T_out, rows, w=out_dev)
    # final logit softcapping: scale, tanh, scale, in place
    g.expand(g.op(logits.size, g.op(logits.size, g.op(logits.size, logits, inplace=True), inplace=True),
                  inplace=True, out=True))
    return g, [(n, d) for n, d in attn.fa_nodes if n is not None]


def _laurel_rank(layer: LayerProfile) -> int:
    """laurel_l's output width (its ne1)."""
    return next((t.shape[1] for t in layer.tensors if t.name.endswith(".laurel_l.weight") and len(t.shape) >= 2), 64)


def gemma3n_compute_bytes(profile: ModelProfile, config: SplitConfig, layer_devices: list[str], names: list[str], *,
                          T: int, n_seqs: int, T_out: int, n_copies: int, pin_norm: bool) -> dict[str, int]:
    """Compute buffer bytes of every backend in `names` for a `gemma3n_replayable` profile."""
    return replay_compute_bytes(_graph, profile, config, layer_devices, names, T=T, n_seqs=n_seqs, T_out=T_out,
                                n_copies=n_copies, pin_norm=pin_norm)
