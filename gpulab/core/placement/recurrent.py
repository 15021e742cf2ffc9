"""Compute buffers of recurrent graphs (mamba2, lfm2, qwen3next): their ggml graph, replayed.

The closed forms of gpulab.core.placement.compute hold because attention layers leave ggml-alloc's buffer
the same from one layer to the next. Recurrent layers do not: a Mamba-2 layer's ssm_in product, its
convolution's concat and its scan output are of unlike sizes, so the holes they leave move from layer to
layer (a device's peak is at its second layer, not its first); and the scheduler runs a layer's trailing
weightless ops on the next device when that device's state reads come first in the graph (Mamba-2's
cont(z), LFM2's Hadamard rotation of an attention output, a host attention layer's KQ before a device's
short convolution), copying their inputs over and the result back. So the graph of these architectures is
built op by op in llama.cpp's order and handed to gpulab.core.placement.ggml_replay (the scheduler's split
and ggml-alloc):

  mamba2     llm_build_mamba_base::build_mamba2_layer (src/models/mamba-base.cpp), llama_model_mamba::graph
             (src/models/mamba.cpp)
  lfm2       llama_model_lfm2::graph, build_shortconv_block (src/models/lfm2.cpp)
  qwen3next  llama_model_qwen3next::graph (src/models/qwen3next.cpp), build_conv_state and the fused delta
             net (src/models/delta-net-base.cpp), build_moe_ffn
  shared     build_rs / build_inp_s_copy, build_attn / build_attn_mha, build_inp_out_ids (src/llama-graph.cpp),
             llama_kv_cache::cpy_k / cpy_v / get_k / get_v (src/llama-kv-cache.cpp); a norm named "norm" is
             pinned to its layer's device under full offload or small ubatches (llama_context::graph_get_cb);
             flash attention 'auto' is turned off when the scheduler puts a layer's attention on another
             device (llama_context::resolve_fused_ops)

Every device of the architecture matrix within the log's rounding (tests/integration/
test_arch_matrix_vs_llama.py, CPU RPC devices), and tests/core/placement/test_recurrent.py. Not replayed:
sliding-window caches (lfm2's iswa variant) and op offload (CUDA); such a profile falls back to the closed
forms (see `replayable`).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

from ..config import SplitConfig
from ..devices import HOST_NAME
from ..profile import ModelProfile
from .ggml_replay import Graph, Tensor, _a, per_profile, template

__all__ = ["RECURRENT_GRAPHS", "recurrent_compute_bytes", "replayable"]

RECURRENT_GRAPHS = frozenset({"mamba2", "lfm2", "qwen3next"})
# the hyperparameters each graph reads from the GGUF ({arch}.<key>)
_KEYS = {"mamba2": ("ssm.conv_kernel", "ssm.inner_size", "ssm.state_size", "ssm.time_step_rank"),
         "lfm2": ("shortconv.l_cache",),
         "qwen3next": ("ssm.conv_kernel", "ssm.inner_size", "ssm.state_size", "ssm.time_step_rank", "ssm.group_count")}
_QUANT_FREE = ("f32", "f16", "bf16")
_CACHE: dict[tuple, tuple[weakref.ref, dict[str, int]]] = {}
# bytes per element of a cache type, and elements per block (ggml_type_size / ggml_blck_size)
_TYPE = {"f32": (4, 1), "f16": (2, 1), "bf16": (2, 1), "q8_0": (34, 32), "q4_0": (18, 32), "q4_1": (20, 32),
         "q5_0": (22, 32), "q5_1": (24, 32), "iq4_nl": (18, 32)}


def _row(type_name: str, n: int) -> int:
    size, blck = _TYPE.get(type_name, (2, 1))
    return n // blck * size


class _Ctx:
    """What every graph builder needs: the graph, the ubatch, where each layer runs."""

    def __init__(self, profile: ModelProfile, config: SplitConfig, layer_devices: list[str], T: int, ns: int,
                 T_out: int, pin_norm: bool, ffn_devices: list[str] | None = None) -> None:
        self.g = Graph()
        self.p, self.config, self.dev = profile, config, layer_devices
        self.ffn_dev = ffn_devices or layer_devices       # where each layer's FFN weights are (tensor overrides)
        self.T, self.ns, self.T_out, self.pin = T, ns, T_out, pin_norm
        self.E = profile.n_embd

    def norm(self, x: Tensor, il: int, size: int | None = None) -> Tensor:
        """build_norm (RMS, with a weight): the norm named "norm" is pinned to its layer's device
        (llama_context::graph_get_cb) under full offload or small ubatches; the weight's MUL is in place."""
        d = self.dev[il] if il >= 0 else self.dev[self.p.n_layer]
        n = self.g.op(size or x.size, x, w=d if self.pin and il >= 0 else None, inplace=True)
        return self.g.op(n.size, n, w=d, inplace=True)

    def rs(self, il: int, s_main: Tensor, s_extra: Tensor, rows: int,
           scan: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """llm_graph_context::build_rs: clear a state (in place on the cache), this ubatch's rows (or the
        scan that reads them), the other rows copied back."""
        g, d = self.g, self.dev[il]
        cache = g.view(g.ext(d))
        g.expand(g.set(d, g.view(cache)))
        out = scan(cache) if scan else g.op(rows, cache, s_main)
        g.expand(out)
        g.expand(g.set(d, g.op(0, cache, s_extra), g.view(g.ext(d))))
        return out


def _mamba2(c: _Ctx, s_main: Tensor, s_extra: Tensor, cur: Tensor, il: int) -> Tensor:
    """llm_build_mamba_base::build_mamba2_layer (src/models/mamba-base.cpp)."""
    g, d, T, ns = c.g, c.dev[il], c.T, c.ns
    md, arch = c.p.metadata, c.p.arch
    d_conv, d_inner = int(md[f"{arch}.ssm.conv_kernel"]), int(md[f"{arch}.ssm.inner_size"])
    d_state, n_head = int(md[f"{arch}.ssm.state_size"]), int(md[f"{arch}.ssm.time_step_rank"])
    n_group = int(md.get(f"{arch}.ssm.group_count", 1))
    conv_dim = d_inner + 2 * n_group * d_state
    d_in_proj = 2 * d_inner + 2 * n_group * d_state + n_head
    conv = g.view(c.rs(il, s_main, s_extra, 4 * (d_conv - 1) * conv_dim * ns))
    zx = g.view(g.op(4 * d_in_proj * T, cur, w=d))
    z = g.view(zx, 4 * d_inner + 4 * d_in_proj * (T - 1))
    xbc, dt = g.view(zx), g.view(zx)
    conv_x = g.op(4 * (d_conv - 1 + T // ns) * conv_dim * ns, conv, g.view(xbc))
    g.expand(g.set(d, g.view(conv_x), g.view(g.ext(d))))
    xbc = g.op(4 * conv_dim * T, conv_x, w=d)
    xbc = g.op(xbc.size, xbc, w=d, inplace=True)
    xbc = g.op(xbc.size, xbc, inplace=True)                    # silu
    x, B, C = g.view(xbc), g.view(xbc), g.view(xbc)
    dt = g.op(4 * n_head * T, g.op(4 * n_head * T, dt), w=d, inplace=True)
    ys = c.rs(il, s_main, s_extra, 0,
              lambda states: g.op(4 * (d_inner * T + d_state * d_inner * ns), g.view(states), x, dt, B, C, s_main,
                                  w=d))
    g.expand(g.set(d, g.view(ys), g.view(g.ext(d))))
    yd = 4 * d_inner * T
    y = g.op(yd, g.view(ys, yd), g.op(yd, x, w=d, inplace=True), inplace=True)     # y + x * D
    y = g.op(yd, g.op(yd, z), y)                                     # swiglu_split(cont(z), y)
    y = c.norm(g.view(y), il)                                        # grouped RMS norm
    return g.op(4 * c.E * T, g.view(y), w=d)                         # ssm_out


def _shortconv(c: _Ctx, s_main: Tensor, s_extra: Tensor, cur: Tensor, il: int) -> Tensor:
    """llama_model_lfm2::graph, build_shortconv_block (src/models/lfm2.cpp)."""
    g, d, T, ns, E = c.g, c.dev[il], c.T, c.ns, c.E
    l_cache = int(c.p.metadata[f"{c.p.arch}.shortconv.l_cache"])
    bcx = g.op(4 * 3 * E * T, g.view(cur), w=d)                      # in_proj
    b, cc, x = g.view(bcx), g.view(bcx), g.view(bcx)
    bx = g.view(g.op(4 * E * T, b, x, inplace=True))                 # transpose(b * x)
    conv = g.view(c.rs(il, s_main, s_extra, 4 * (l_cache - 1) * E * ns))
    bx = g.op(4 * (l_cache - 1 + T // ns) * E * ns, conv, bx)       # concat
    g.expand(g.set(d, g.view(bx), g.view(g.ext(d))))
    y = g.op(4 * E * T, cc, g.op(4 * E * T, bx, w=d), inplace=True)  # c * ssm_conv(bx)
    return g.view(g.op(4 * E * T, y, w=d))                           # out_proj


def _gated_delta_net(c: _Ctx, s_main: Tensor, s_extra: Tensor, cur: Tensor, il: int) -> Tensor:
    """llama_model_qwen3next::graph::build_layer_attn_linear (src/models/qwen3next.cpp; fused QKV and gate
    projections), build_conv_state and the fused build_delta_net (src/models/delta-net-base.cpp)."""
    g, d, T, ns, E = c.g, c.dev[il], c.T, c.ns, c.E
    md, arch = c.p.metadata, c.p.arch
    d_conv, d_inner = int(md[f"{arch}.ssm.conv_kernel"]), int(md[f"{arch}.ssm.inner_size"])
    hk, nv, nk = int(md[f"{arch}.ssm.state_size"]), int(md[f"{arch}.ssm.time_step_rank"]), \
        int(md[f"{arch}.ssm.group_count"])
    hv = d_inner // nv
    ch = d_inner + 2 * nk * hk
    qkv = g.view(g.op(4 * ch * T, cur, w=d))
    z = g.op(4 * d_inner * T, cur, w=d)
    ba = g.view(g.op(4 * 2 * nv * T, cur, w=d))
    beta = g.view(g.op(4 * nv * T, g.op(4 * nv * T, g.view(ba)), inplace=True))      # sigmoid(cont(b))
    alpha = g.op(4 * nv * T, g.op(4 * nv * T, g.view(ba)), w=d, inplace=True)         # cont(a) + dt bias
    gate = g.view(g.op(alpha.size, g.op(alpha.size, alpha, inplace=True), w=d, inplace=True))   # softplus * A
    conv = g.view(c.rs(il, s_main, s_extra, 4 * (d_conv - 1) * ch * ns))
    ci = g.op(4 * (d_conv - 1 + T // ns) * ch * ns, conv, g.view(qkv))               # concat(states, qkv^T)
    g.expand(g.set(d, g.view(ci), g.view(g.ext(d))))
    state = g.view(c.rs(il, s_main, s_extra, 4 * hv * hv * nv * ns))
    co = g.op(4 * ch * T, g.op(4 * ch * T, ci, w=d), inplace=True)                    # silu(ssm_conv)
    q, k = (g.op(4 * hk * nk * T, g.op(4 * hk * nk * T, g.view(co)), inplace=True) for _ in range(2))  # l2 norms
    if nk != nv:                                                                      # repeat to the V heads
        q, k = g.view(g.op(4 * hk * nv * T, g.view(q))), g.view(g.op(4 * hk * nv * T, g.view(k)))
    out = g.op(4 * hv * nv * (T + hv * ns), q, k, g.view(co), gate, beta, state)      # ggml_gated_delta_net
    g.expand(g.set(d, g.view(out), g.view(g.ext(d))))                                 # the new state
    y = c.norm(g.view(out), il, 4 * d_inner * T)
    y = g.op(y.size, y, g.op(y.size, g.view(z), inplace=True), inplace=True)          # * silu(z)
    return g.view(g.op(4 * E * T, g.view(y), w=d))                                    # ssm_out


def _moe(c: _Ctx, h: Tensor, il: int, *, gating: int = 1, probs_bias: bool = False, norm_w: bool = True,
         scale: bool = False, n_ff: int | None = None, shared: int = 0, shared_gate: bool = True,
         logits: Tensor | None = None, gated: bool = True, n_used: int | None = None,
         grove: bool = False, remap: bool = False) -> Tensor:
    """llm_graph_context::build_moe_ffn (src/llama-graph.cpp): the router, its gating (`gating`: 1 softmax,
    2 sigmoid, 3 softmax over the chosen weights: llama_expert_gating_func_type), the selection bias
    (exp_probs_b), top-k, the weights (normalized: norm_w; scaled: expert_weights_scale not 0 or 1), the experts
    (`n_ff` wide) and their sum; then a shared expert `shared` wide (0: none), gated by a sigmoid
    (qwen3next's build_layer_ffn) or added as it is (deepseek.cpp and the graphs like it). `logits`: the router's
    output where the graph computes it itself (probs_in: smallthinker's router reads the layer's input). Without
    gate_exps (`gated` False: ernie4_5-moe's files) the up product's activation runs in place. `grove`: GROVEMOE's
    selection by a sigmoid of the logits, and for its chunk experts where they are fewer than the router's
    (`remap`) the selected ids cast to f32, scaled and cast back."""
    g, E, p, d, fd = c.g, c.E, c.p, c.dev[il], c.ffn_dev[il]      # fd: the experts' device (-cmoe and the like)
    md, arch = p.metadata, p.arch
    rows = h.size // (4 * E)
    n_exp, U = p.n_expert, n_used or p.n_expert_used
    if n_ff is None:
        n_ff = int(md.get(f"{arch}.expert_feed_forward_length", p.n_ff))
    if logits is None:
        logits = g.op(4 * n_exp * rows, h, w=d)
    probs = logits if gating == 3 else g.op(logits.size, logits, inplace=True)       # softmax / sigmoid
    select = g.op(probs.size, probs, w=d, inplace=True) if probs_bias else probs       # + exp_probs_b
    if grove:
        select = g.op(logits.size, logits, inplace=True)                              # sigmoid(logits)
    sel = g.view(g.op(4 * n_exp * rows, select), 4 * U + 4 * n_exp * (rows - 1))     # argsort, its top-k view
    if remap:
        sel = g.op(4 * U * rows, g.op(4 * U * rows, g.op(4 * U * rows, sel), inplace=True))  # cast, scale, cast
    w = g.op(4 * U * rows, g.view(probs), sel)                                        # get_rows: the weights
    if gating == 3:
        w = g.view(g.op(w.size, g.view(w), inplace=True))                             # softmax of the chosen
    if norm_w:
        w2 = g.view(w)                                                                # reshape_2d
        wsum = g.op(_a(4 * rows), g.op(_a(4 * rows), w2), inplace=True)               # clamp(sum_rows)
        w = g.view(g.op(4 * U * rows, w2, wsum, inplace=True))                        # w / sum
    if scale:
        w = g.op(w.size, w, inplace=True)
    g.expand(w)
    x = g.view(h)
    f = 4 * n_ff * U * rows
    act = g.op(f, g.op(f, x, sel, w=fd), g.op(f, x, sel, w=fd)) if gated \
        else g.op(f, g.op(f, x, sel, w=fd), inplace=True)                           # swiglu(gate, up) / silu(up)
    ex = g.op(4 * E * U * rows, act, sel, w=fd)
    ex = g.expand(g.op(ex.size, ex, w, inplace=True))                                 # * weights
    slots = [g.expand(g.view(ex, 4 * E + (rows - 1) * 4 * E * U)) for _ in range(U)]
    out = g.expand(g.op(4 * E * rows, slots[0], slots[1], inplace=True) if U > 1 else g.op(4 * E * rows, slots[0]))
    for v in slots[2:]:
        out = g.expand(g.op(out.size, out, v, inplace=True))
    if shared:
        fs = 4 * shared * rows
        sh = g.op(4 * E * rows, g.op(fs, g.op(fs, h, w=d), g.op(fs, h, w=d)), w=d)
        if shared_gate:
            sg = g.op(_a(4 * rows), g.op(_a(4 * rows), h, w=d), inplace=True)        # sigmoid(shared gate)
            sh = g.op(sh.size, sh, sg, inplace=True)
        out = g.op(out.size, out, sh, inplace=True)
    return out


class _Cache:
    """One KV cache's graph inputs: its K and V row indices, its KQ mask, the Hadamard rotations of a quantized
    cache (llama_kv_cache::build_input_k_idxs / v_idxs / k_rot / v_rot, build_attn_inp_kq_mask). The rotations
    exist where every layer of the cache has one head size, a multiple of 64 (llama_kv_cache ctor: attn_rot_k /
    attn_rot_v; K rotates by the largest power of two dividing it, V by 64)."""

    def __init__(self, g: Graph, layers: list, n_kv: int, T: int, fa: bool, v_trans: bool,
                 config: SplitConfig) -> None:
        self.n_kv = n_kv
        self.k_idxs = g.inp(8 * T)
        self.v_idxs = g.inp(8 * T * (layers[0].n_embd_v_gqa if v_trans else 1))
        self.mask = g.inp(n_kv * T * (2 if fa else 4))
        hk, hv = {la.n_embd_head_k for la in layers}, {la.n_embd_head_v for la in layers}
        nrot = 64
        while len(hk) == 1 and next(iter(hk)) % (nrot * 2) == 0:
            nrot *= 2
        quant_k, quant_v = config.type_k not in _QUANT_FREE, config.type_v not in _QUANT_FREE
        self.k_rot = g.inp(4 * nrot * nrot) if quant_k and len(hk) == 1 and next(iter(hk)) % 64 == 0 else None
        self.v_rot = g.inp(4 * 64 * 64) if quant_v and len(hv) == 1 and next(iter(hv)) % 64 == 0 else None


class _Attn:
    """The inputs of the KV cache (llm_graph_input_attn_kv, or _iswa: a full and a sliding-window cache) and
    build_attn / build_attn_mha (src/llama-graph.cpp), llama_kv_cache's cpy_k / cpy_v / get_k / get_v
    (src/llama-kv-cache.cpp)."""

    def __init__(self, c: _Ctx, fa: bool, v_trans: bool) -> None:
        cfg, g, T, p = c.config, c.g, c.T, c.p
        self.c, self.fa, self.v_trans = c, fa, v_trans
        # KV cells per stream (llama_context ctor: n_ctx_seq), one stream per sequence unless unified (-kvu)
        n_ctx = -(-cfg.n_ctx // 256) * 256
        n_kv = n_ctx if cfg.kv_unified else -(-(n_ctx // c.ns) // 256) * 256
        self.n_stream = cfg.n_streams
        kv_layers = [la for la in p.layers if la.has_kv]
        self.swa = [bool(p.n_swa and la.is_swa) for la in p.layers]
        full = [la for la, w in zip(p.layers, self.swa) if la.has_kv and not w]
        self.caches = {False: _Cache(g, full or kv_layers, n_kv, T, fa, v_trans, cfg)}
        swa = [la for la, w in zip(p.layers, self.swa) if la.has_kv and w]
        if swa:
            # llama_kv_cache_iswa: the window's cells, pad(n_swa + n_ubatch, 256), unless --swa-full
            window = p.n_swa * (cfg.n_seq_max if cfg.kv_unified else 1) + cfg.effective_n_ubatch
            n_swa = n_kv if cfg.swa_full else min(n_kv, -(-window // 256) * 256)
            self.caches[True] = _Cache(g, swa, n_swa, T, fa, v_trans, cfg)
        self.fa_nodes: list[tuple[Tensor | None, str]] = []     # each flash-attention node and its layer's device

    def __call__(self, cur: Tensor, pos: Tensor, il: int, gated: bool = False) -> Tensor:
        """gated: Q is twice as wide, its second half gates the attention output (qwen3next.cpp build_layer_attn)."""
        c, g, T = self.c, self.c.g, self.c.T
        d, layer = c.dev[il], c.p.layers[il]
        hd, n_head, n_kv_head = layer.n_embd_head_k, layer.n_head, layer.n_head_kv
        q_full = g.op(4 * hd * n_head * T * (2 if gated else 1), cur, w=d)
        gate = g.view(g.view(q_full), 4 * hd * n_head * T)
        q = g.op(4 * hd * n_head * T, c.norm(g.view(q_full), il, 4 * hd * n_head * T), pos, inplace=True)  # RoPE
        k = g.op(4 * hd * n_kv_head * T, cur, w=d)
        k = g.op(k.size, c.norm(g.view(k), il), pos, inplace=True)
        v = g.view(g.op(4 * hd * n_kv_head * T, cur, w=d))
        out = self.attend(q, k, v, il)
        if gated:
            gate = g.op(gate.size, g.op(gate.size, gate), inplace=True)     # sigmoid(cont(gate))
            out = g.op(gate.size, out, gate, inplace=True)
        return g.op(4 * c.E * T, out, w=d)                                   # wo

    def attend(self, q: Tensor, k: Tensor, v: Tensor, il: int, v_cont: bool = False,
               pos_bucket: Tensor | None = None) -> Tensor:
        """build_attn from the cache's rotations to the attention output, before wo: the cache writes and
        build_attn_mha. v_cont: V is a strided view (of a fused QKV product), which the transposed V cache copies
        contiguous first (llama_kv_cache::cpy_v's ggml_cont_2d). pos_bucket: T5's relative position bias
        (build_pos_bias) added to KQ, which rules flash attention out."""
        c, g, T = self.c, self.c.g, self.c.T
        d, layer, cfg = c.dev[il], c.p.layers[il], c.config
        hd, n_head, n_kv_head = layer.n_embd_head_k, layer.n_head, layer.n_head_kv
        hv = layer.n_embd_head_v          # the attention output's head size (minicpm3: V narrower than K)
        kv = self.caches[self.swa[il]]
        if kv.k_rot is not None:
            q = g.view(g.op(q.size, kv.k_rot, g.view(q)))
            k = g.view(g.op(k.size, kv.k_rot, g.view(k)))
        if kv.v_rot is not None:
            v = g.view(g.op(v.size, kv.v_rot, g.view(v)))
        g.expand(q)
        g.expand(v)
        g.expand(k)
        g.expand(g.set(d, g.view(k), kv.k_idxs))
        v_copy = v_cont and self.v_trans and kv.v_rot is None
        g.expand(g.set(d, g.op(v.size, v) if v_copy else g.view(v), kv.v_idxs))
        n_kv = kv.n_kv * self.n_stream                                       # the views span every stream
        kc = g.view(g.view(g.ext(d)), _row(cfg.type_k, hd) * n_kv_head * n_kv)
        vc = g.view(g.view(g.ext(d)), _row(cfg.type_v, hv) * n_kv_head * n_kv)
        qp = g.view(g.view(q))
        if self.fa and pos_bucket is None:
            out = g.op(4 * hv * n_head * T, qp, kc, vc, kv.mask)
            fa_node = out
            out = g.view(out)
        else:
            kq = g.op(4 * kv.n_kv * T * n_head, kc, qp)
            if pos_bucket is not None:
                # get_rows(attn_rel_b, pos_bucket) [n_head, n_kv * T] f32, then cont(permute): as large as KQ each
                bias = g.op(kq.size, g.op(kq.size, g.view(pos_bucket), w=d))
                kq = g.op(kq.size, kq, bias, inplace=True)
            kq = g.op(kq.size, kq, kv.mask, inplace=True)                    # soft_max_ext
            if not self.v_trans:
                vc = g.op(_row(cfg.type_v, hv) * n_kv_head * n_kv, g.view(vc))   # v_cont
            out = g.op(4 * hv * n_head * T, g.view(g.op(4 * hv * n_head * T, vc, kq)))   # cont(permute(kqv))
            fa_node = None
        g.expand(out)                  # build_attn_mha expands its result
        if kv.v_rot is not None:
            out = g.view(g.op(out.size, kv.v_rot, g.view(out)))
        self.fa_nodes.append((fa_node, d))
        return out


def _graph(c: _Ctx, fa: bool, v_trans: bool) -> tuple[Graph, list]:
    g, T, E, p = c.g, c.T, c.E, c.p
    tokens = g.inp(4 * T)
    g.expand(g.inp(4 * E * T))               # inp_embd: a text batch never reads it, it is allocated
    cur = g.expand(g.op(4 * E * T, tokens, w=HOST_NAME))              # get_rows(token_embd)
    attn = _Attn(c, fa, v_trans) if any(la.has_kv for la in p.layers) else None
    s_copy = g.inp(4 * c.ns)
    s_main, s_extra = g.view(s_copy, 4 * c.ns), g.view(s_copy, 0)
    pos = g.inp(4 * T) if attn is not None else None
    out_ids = g.inp(4 * c.T_out)
    n_layer = p.n_layer
    for il in range(n_layer):
        last = il == n_layer - 1
        if p.arch == "mamba2":
            y = _mamba2(c, s_main, s_extra, c.norm(cur, il), il)
            if last:
                y, cur = g.op(4 * E * c.T_out, y, out_ids), g.op(4 * E * c.T_out, cur, out_ids)
            cur = g.op(y.size, y, cur, inplace=True)                  # l_out
            continue
        if p.arch == "qwen3next":
            # llama_model_qwen3next::graph: the norm expanded first, gated delta net or gated attention, the
            # residual, the post-attention norm, the MoE with its shared expert, the residual
            h = g.expand(c.norm(cur, il))
            if p.layers[il].is_recurrent:
                y = _gated_delta_net(c, s_main, s_extra, h, il)
            else:
                assert attn is not None and pos is not None
                y = attn(h, pos, il, gated=True)
            cur = g.op(y.size, y, cur, inplace=True)
            cur = g.op(cur.size, _moe(c, c.norm(cur, il), il,
                                      shared=int(p.metadata.get(f"{p.arch}.expert_shared_feed_forward_length", 0))),
                       cur, inplace=True)
            continue
        # lfm2: operator norm, short convolution or attention, residual, FFN norm, dense SwiGLU FFN, residual
        h = c.norm(cur, il)
        if p.layers[il].is_recurrent:
            y = _shortconv(c, s_main, s_extra, h, il)
        else:
            assert attn is not None and pos is not None
            y = attn(h, pos, il)
        if last:
            y, cur = g.op(4 * E * c.T_out, y, out_ids), g.op(4 * E * c.T_out, cur, out_ids)
        cur = g.op(y.size, cur, y, inplace=True)
        h = c.norm(cur, il)
        rows, fd = cur.size // (4 * E), c.ffn_dev[il]
        f = 4 * p.n_ff * rows
        ff = g.op(f, g.op(f, h, w=fd), g.op(f, h, w=fd))                 # swiglu(gate, up)
        cur = g.op(cur.size, cur, g.op(cur.size, ff, w=fd), inplace=True)
    out_dev = c.dev[n_layer]
    h = c.norm(cur, -1, cur.size) if n_layer else cur
    if p.arch == "qwen3next":
        # the normed hidden state is an output (t_h_nextn, for MTP); the output rows are kept after the norm
        h.out = True
        h = g.op(4 * E * c.T_out, h, out_ids)
    g.expand(g.op(4 * p.n_vocab * c.T_out, h, w=out_dev, out=True))   # result_output
    return g, [(n, d) for n, d in (attn.fa_nodes if attn is not None else []) if n is not None]


def recurrent_compute_bytes(profile: ModelProfile, config: SplitConfig, layer_devices: list[str],
                            names: list[str], *, T: int, n_seqs: int, T_out: int, n_copies: int,
                            pin_norm: bool, ffn_devices: list[str] | None = None) -> dict[str, int]:
    """Compute buffer bytes of every backend in `names` for a `replayable` profile (`ffn_devices`: where tensor
    overrides put each layer's FFN weights, its experts for MoE). Remembered per profile and arguments: a
    48-layer MoE graph takes some 20 ms to replay."""
    return replay_compute_bytes(_graph, profile, config, layer_devices, names, T=T, n_seqs=n_seqs, T_out=T_out,
                                n_copies=n_copies, pin_norm=pin_norm, ffn_devices=ffn_devices)


GraphBuilder = Callable[[_Ctx, bool, bool], tuple[Graph, list]]


def replay_compute_bytes(build: GraphBuilder, profile: ModelProfile, config: SplitConfig,
                         layer_devices: list[str], names: list[str], *, T: int, n_seqs: int, T_out: int,
                         n_copies: int, pin_norm: bool, ffn_devices: list[str] | None = None) -> dict[str, int]:
    """The compute buffers of the graph `build` makes (with flash attention or not, V transposed or not; it
    returns the graph and each flash-attention node with its layer's device), scheduled and allocated, remembered
    per builder, profile and arguments."""
    key = (build, id(profile), config, tuple(layer_devices), tuple(names), T, n_seqs, T_out, n_copies, pin_norm,
           tuple(ffn_devices) if ffn_devices else None)
    hit = _CACHE.get(key)
    if hit is not None and hit[0]() is profile:
        return dict(hit[1])

    def make(devs: list[str], ffn: list[str] | None, cfg: SplitConfig, fa: bool) -> tuple[Graph, dict, list]:
        # the KV cache transposes V when flash attention is off when it is made (llama_model::create_memory)
        g, fa_nodes = build(_Ctx(profile, cfg, devs, T, n_seqs, T_out, pin_norm, ffn), fa, cfg.flash_attn == "off")
        return g, {"fa": fa_nodes}, []

    key = (build, T, n_seqs, T_out, pin_norm)
    run = template(make, profile, key, config, layer_devices, ffn_devices, config.flash_attn != "off").place(
        layer_devices, ffn_devices)
    if config.flash_attn == "auto" and run.moved("fa"):
        # llama_context::resolve_fused_ops: flash attention scheduled away from its layer's device is
        # turned off (and the reserve graph built again without it)
        run = template(make, profile, key, config, layer_devices, ffn_devices, False).place(layer_devices,
                                                                                          ffn_devices)
    tops = run.peaks(n_copies)
    out = {name: tops.get(name, 0) for name in names}
    if len(_CACHE) > 256:
        _CACHE.clear()
    _CACHE[key] = (weakref.ref(profile), out)
    return dict(out)


@per_profile
def replayable(profile: ModelProfile) -> bool:
    """Whether `profile`'s compute buffers are replayed here: a graph of RECURRENT_GRAPHS whose hyperparameters
    the file carries, without a sliding window (lfm2's iswa graph is not built), and with the tensors the
    graph built here reads where the profile lists them: qwen3next's fused QKV and gate projections (a file
    with the mixed ssm_in projection runs another graph), mamba2's grouped norm (ssm_norm, optional)."""
    arch = profile.arch
    if arch not in RECURRENT_GRAPHS or profile.n_swa or not all(f"{arch}.{k}" in profile.metadata
                                                               for k in _KEYS[arch]):
        return False
    if not any(layer.is_recurrent for layer in profile.layers):
        return False           # not the model's graph (the MTP head of placement.mtp: graph_mtp is not built here)
    names = {t.name.split(".", 2)[-1] for layer in profile.layers if layer.is_recurrent for t in layer.tensors}
    if not names:
        return True            # a profile without its tensor list (built in code): the graph as written here
    return {"qwen3next": "attn_qkv.weight" in names and "ssm_in.weight" not in names,
            "mamba2": "ssm_norm.weight" in names}.get(arch, True)
