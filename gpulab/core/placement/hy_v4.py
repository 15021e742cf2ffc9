"""hy_v4's compute buffers: its graph with hyper-connections, replayed op by op (gpulab.core.placement.ggml_replay).

llama_model_hy_v4::graph (src/models/hy-v4.cpp) keeps hc copies of the hidden state ([n_embd, hc, T]): before
attention and before the FFN, build_hc_pre RMS-normalizes the flattened copies (ggml_rms_norm: no weight, not
named "norm", never pinned), mixes them (hc_*_fn), turns the mixes into pre and post weights (views of the
layer's scale and base: a view of a weight is no weight to the scheduler, so those ops take their neighbours'
device and copy it) and reduces the copies in f32 (hy_v4_hc_reduce: a cast, one product per copy, a cast back);
build_hc_post adds each copy's residual to post * output in f32 and concatenates them. Attention is absorbed MLA
over a K-only cache with attention sinks (placement.dense's _Mla) and an element-wise sigmoid gate; the FFN is
dense or MoE with a shared expert (placement.dense); the output rows are gathered after the last layer, then
build_hc_head reduces the copies once more. The DSA branch (attention.indexer.top_k > 0) is not built here.
"""

from __future__ import annotations

from ..config import SplitConfig
from ..devices import HOST_NAME
from ..profile import ModelProfile
from .dense import _SPECS, _ffn, _ffn_width, _Layer, _Mla, _moe_ffn, _norm
from .ggml_replay import Graph, Tensor
from .recurrent import _Attn, _Ctx, replay_compute_bytes

__all__ = ["hy_v4_compute_bytes", "hy_v4_replayable"]


def _reduce(c: _Ctx, x: Tensor, pre: Tensor, hc: int, rows: int) -> Tensor:
    """hy_v4_hc_reduce: cast to f32, a product per copy with its weight, their sum, cast back."""
    g, E = c.g, c.E
    xf = g.op(x.size, x)                                             # ggml_cast(x, F32): a new tensor
    out = None
    for _ in range(hc):
        # x[:, i] * w[i]: views, so in place only on a copy of x's view sent from another device
        cur = g.op(4 * E * rows, g.view(xf), g.view(pre), inplace=True)
        out = cur if out is None else g.op(cur.size, out, cur, inplace=True)
    assert out is not None
    return g.op(out.size, out)                                       # cast back


def _hc_pre(c: _Ctx, x: Tensor, il: int, kind: str, hc: int) -> tuple[Tensor, Tensor]:
    """build_hc_pre: the reduced input of attention or the FFN, and the post weights."""
    g, T, d = c.g, c.T, c.dev[il]
    flat = g.op(x.size, g.view(x))                                   # ggml_rms_norm(reshape_2d): never pinned
    mixes = g.op(4 * 2 * hc * T, flat, w=d)                          # hc_{kind}_fn
    scale, base = c.reshaped(il, f"hc_{kind}_scale.weight"), c.reshaped(il, f"hc_{kind}_base.weight")
    pre = g.op(4 * hc * T, g.view(mixes), g.view(scale))             # * scale_pre (of a view: new)
    pre = g.op(pre.size, pre, g.view(base), inplace=True)            # + base_pre
    pre = g.op(pre.size, g.op(pre.size, pre, inplace=True), inplace=True)   # sigmoid, scale_bias
    post = g.op(4 * hc * T, g.view(mixes), g.view(scale))
    post = g.op(post.size, post, g.view(base), inplace=True)
    for _ in range(3):                                               # sigmoid, scale, scale_bias
        post = g.op(post.size, post, inplace=True)
    return _reduce(c, x, pre, hc, T), post


def _hc_post(c: _Ctx, x: Tensor, residual: Tensor, post: Tensor, hc: int) -> Tensor:
    """build_hc_post: each copy's residual plus post * x, all in f32, concatenated, cast back."""
    g, T, E = c.g, c.T, c.E
    xf, pf, rf = g.op(x.size, x), g.op(post.size, post), g.op(residual.size, residual)   # casts to f32
    out = None
    for _ in range(hc):
        cur = g.op(4 * E * T, g.view(rf), g.op(4 * E * T, xf, g.view(pf), inplace=True), inplace=True)
        cur = g.view(cur)                                            # reshape_3d
        out = cur if out is None else g.op(out.size + cur.size, out, cur)   # concat
    assert out is not None
    return g.op(residual.size, out)                                  # cast to the residual's type


def _graph(c: _Ctx, fa: bool, v_trans: bool) -> tuple[Graph, list]:
    g, T, E, p = c.g, c.T, c.E, c.p
    spec = _SPECS["dots3note"]           # absorbed MLA and an attention gate: the parts of dense's graph read here
    hc = int(p.metadata[f"{p.arch}.hyper_connection.count"])
    tokens = g.inp(4 * T)
    g.expand(g.inp(4 * E * T))                                       # inp_embd: allocated, never read
    emb = g.op(4 * E * T, tokens, w=HOST_NAME)                       # get_rows(token_embd)
    attn = _Attn(c, fa, v_trans)
    mla = _Mla(c, attn, fa)
    pos = g.inp(4 * T)
    out_ids = g.inp(4 * c.T_out)
    x = g.op(4 * E * hc * T, g.view(emb))                            # repeat_4d of the reshape
    for il in range(p.n_layer):
        lay, d = _Layer(p, il), c.dev[il]
        cur, post = _hc_pre(c, x, il, "attn", hc)
        h = _norm(c, cur, il, rms=True, bias=False)
        y = mla(h, pos, il, lay)
        gate = g.op(4 * lay.width("attn_gate.weight") * T, h, w=d)
        y = g.op(y.size, y, g.op(gate.size, gate, inplace=True), inplace=True)   # * sigmoid(gate)
        y = g.op(4 * E * T, y, w=d)                                  # wo
        x = _hc_post(c, y, x, post, hc)
        cur, post = _hc_pre(c, x, il, "ffn", hc)
        h = _norm(c, cur, il, rms=True, bias=False)
        ff = _moe_ffn(c, h, il, lay, spec) if lay.has("ffn_gate_inp.weight") else _ffn(c, h, il, lay, _ffn_width(p, il))
        x = _hc_post(c, ff, x, post, hc)
    x = g.view(g.op(4 * E * hc * c.T_out, g.view(x), out_ids))       # the output rows of the flattened copies
    dev_out = c.dev[p.n_layer]
    flat = g.op(x.size, g.view(x))                                   # ggml_rms_norm
    mixes = g.op(4 * hc * c.T_out, flat, w=dev_out)                  # output_hc_fn
    pre = g.op(mixes.size, mixes, w=dev_out, inplace=True)           # * output_hc_scale
    pre = g.op(pre.size, pre, w=dev_out, inplace=True)               # + output_hc_base
    pre = g.op(pre.size, g.op(pre.size, pre, inplace=True), inplace=True)   # sigmoid, scale_bias
    h = _norm(c, _reduce(c, x, pre, hc, c.T_out), -1, rms=True, bias=False)    # build_hc_head's reduce
    h.out = True                                                     # result_norm (t_embd)
    g.expand(g.op(4 * p.n_vocab * c.T_out, h, w=dev_out, out=True))
    return g, [(n, dv) for n, dv in attn.fa_nodes if n is not None]


def hy_v4_compute_bytes(profile: ModelProfile, config: SplitConfig, layer_devices: list[str], names: list[str], *,
                        T: int, n_seqs: int, T_out: int, n_copies: int, pin_norm: bool,
                        ffn_devices: list[str] | None = None) -> dict[str, int]:
    """Compute buffer bytes of every backend in `names` for a `hy_v4_replayable` profile."""
    return replay_compute_bytes(_graph, profile, config, layer_devices, names, T=T, n_seqs=n_seqs, T_out=T_out,
                                n_copies=n_copies, pin_norm=pin_norm, ffn_devices=ffn_devices)


def hy_v4_replayable(profile: ModelProfile) -> bool:
    """A hy_v4 file without the DSA indexer (attention.indexer.top_k 0), its layers with absorbed MLA, the gate and
    the hyper-connection tensors this graph reads."""
    md, arch = profile.metadata, profile.arch
    if arch != "hy_v4" or int(md.get(f"{arch}.attention.indexer.top_k", 0)) or \
            f"{arch}.hyper_connection.count" not in md or not profile.layers:
        return False
    need = {"attn_q_a.weight", "attn_kv_a_mqa.weight", "attn_kv_a_norm.weight", "attn_k_b.weight", "attn_v_b.weight",
            "attn_gate.weight", "hc_attn_fn.weight", "hc_ffn_fn.weight"}
    return all(layer.has_kv and {t.name.split(".", 2)[-1] for t in layer.tensors} >= need for layer in profile.layers)
