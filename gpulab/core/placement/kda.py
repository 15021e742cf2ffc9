"""Compute buffers of the KDA/MLA hybrids and glm5-next, replayed op by op (gpulab.core.placement.ggml_replay).

Kimi Delta Attention (KDA) layers are a gated delta net whose Q, K and V each run through a causal convolution
with its own slice of the layer's convolution state; the other layers are MLA over a K-only cache (absorbed:
attn_k_b, attn_v_b), then a dense FFN (the leading layers) or MoE. The delta net and the state reads are
placement.recurrent's (_Ctx.rs, _moe, _ffn), the MLA attention placement.dense's (_Mla):

  kimi-linear  llama_model_kimi_linear::graph (src/models/kimi-linear.cpp): causal_conv1d for Q, K and V (the
               projection, the concat with the state's slice, the slice written back, ssm_conv with a reshaped
               weight, silu), g1 = softplus(f_b(f_a(x)) + dt_bias) * A (A a reshaped weight), beta = sigmoid of a
               reshape, the state read, Q and K L2-normed (build_gdn_l2_norm: rms_norm, scale), the fused delta net
               (build_delta_net_fused, src/models/delta-net-base.cpp), the state written, the output normed
               (ssm_o_norm, named "norm") and gated by sigmoid(g_b(g_a(x))), made contiguous, wo; MLA without
               RoPE; the shared expert's build_ffn where the file has it (without it build_ffn is silu of its
               input: src/llama-graph.cpp build_ffn)
  bailingmoe3  llama_model_bailingmoe3::graph (src/models/bailingmoe3.cpp): the layer's norm not expanded first,
               one gate product f_a(x) + dt_bias, lower_bound * sigmoid(x * A), one output gate product g_a(x);
               MLA with RoPE and a low-rank Q (attn_q_a), no wo in build_attn: the output times sigmoid of a
               head-wise gate of the normed input, cont_2d, wo; the shared expert; no rows gathered in the last
               layer: the output norm is an output (t_h_nextn) and the rows are gathered after it. Files with
               a loaded MTP layer (nextn) are not built here (its graph, graph_mtp, is another)
  kimi-k3      llama_model_kimi_k3::graph (src/models/kimi-k3.cpp): attention residuals (res_push / res_mix: a
               bank of layer inputs every attn_res_block_size layers, RMS-normed scores, a softmax, ggml_dsv4_hc_pre)
               before each norm and the output norm; KDA with one full-rank output gate (ssm_g); MLA without RoPE,
               an optional output gate; SiTU activations (kimi_k3_situ, build_moe_ffn's LLM_FFN_SITU) in the dense
               FFN, the experts (router logits passed in) and the optional shared expert
  glm5-next    llama_model_glm5_next::graph (src/models/glm5-next.cpp): hyper-connections (4 streams of the
               residual: build_hc_pre's RMS-normed mixes, the fused ggml_dsv4_hc_pre / _hc_comb / _hc_post, each
               unfused by resolve_fused_ops where the scheduler puts one off its layer's device: build_hc_pre's and
               build_hc_post's loops, whose strided views are copied at their ggml_nbytes) around KDA or DSA and
               the FFN; DSA: nope-only absorbed MLA whose mask is the k-pool indexer's selection (build_kpool_select,
               the scatter path: key | gate | zero rows cached, the new pools pooled and cached, the fused
               lightning indexer, top-k ordered, the selected cells scattered into a -inf mask plus the causal
               one); the output rows of every stream gathered, their mean. Not built: the gather path (16 tokens
               or fewer per ubatch) and the unfused Sinkhorn of hc_comb (small ops)

Every device of the architecture matrix within the rounding of llama.cpp's log (tests/integration/
test_arch_matrix_vs_llama.py, CPU RPC devices) and tests/core/placement/test_hybrid_graphs.py.
"""

from __future__ import annotations

from ..config import SplitConfig
from ..devices import HOST_NAME
from ..profile import ModelProfile
from .dense import _Layer, _Mla
from .ggml_replay import Graph, Tensor
from .recurrent import _Attn, _Ctx, _ffn, _moe, _row, _situ, replay_compute_bytes

__all__ = ["KDA_GRAPHS", "kda_compute_bytes", "kda_replayable"]

KDA_GRAPHS = frozenset({"kimi-linear", "bailingmoe3", "kimi-k3", "glm5-next"})
_KEYS = ("ssm.conv_kernel", "kda.head_dim")
_GLM5_KEYS = ("hyper_connection.count", "attention.indexer.kpool", "attention.indexer.key_length",
              "attention.indexer.head_count", "attention.indexer.top_k")


def _kda(c: _Ctx, s_main: Tensor, s_extra: Tensor, cur: Tensor, il: int) -> Tensor:
    """One KDA layer of llama_model_kimi_linear::graph, up to and with wo."""
    g, d, T, ns = c.g, c.dev[il], c.T, c.ns
    md, arch, layer = c.p.metadata, c.p.arch, c.p.layers[il]
    hd, n_head = int(md[f"{arch}.kda.head_dim"]), layer.n_head
    d_conv, d_inner = int(md[f"{arch}.ssm.conv_kernel"]), hd * n_head
    n_embd_r = layer.n_embd_r
    conv_all = c.rs(il, s_main, s_extra, 4 * n_embd_r * ns)
    conv_x = []
    for _ in "qkv":          # causal_conv1d: its state's slice (a strided view), the projection, the concat
        state = g.view(conv_all, 4 * (d_conv - 1) * d_inner + (ns - 1) * 4 * n_embd_r)
        x = g.op(4 * d_inner * T, cur, w=d)
        cx = g.op(4 * (d_conv - 1 + T // ns) * d_inner * ns, state, g.view(g.view(x)))
        g.expand(g.set(d, g.view(cx), g.view(g.ext(d))))                 # the last d_conv - 1 columns stored
        conv_x.append(cx)
    e_in = 4 * d_inner * T
    beta_w = 4 * n_head * T
    f_a = g.op(4 * c.shapes[f"blk.{il}.ssm_f_a.weight"][1] * T, cur, w=d)
    g1 = g.op(e_in, f_a, w=d) if f"blk.{il}.ssm_f_b.weight" in c.names else f_a   # f_b(f_a(x)) or f_a(x)
    g1 = g.op(e_in, g1, w=d, inplace=True)                               # + dt_bias
    if f"{arch}.kda.gate_lower_bound" in md:
        # bailingmoe3: lower_bound * sigmoid(x * A), A a reshaped weight, x a reshape (a view: no MUL in place);
        # kimi-k3 scales by -1 before the sigmoid (in place too)
        g1 = g.op(e_in, g.view(g1), c.reshaped(il, "ssm_a"))
        if arch == "kimi-k3":
            g1 = g.op(e_in, g1, inplace=True)
        g1 = g.op(e_in, g.op(e_in, g1, inplace=True), inplace=True)
    else:
        g1 = g.op(e_in, g1, inplace=True)                                # softplus
        g1 = g.op(e_in, g.view(g1), c.reshaped(il, "ssm_a"), inplace=True)    # * A (a reshaped weight)
    beta = g.op(beta_w, g.view(g.op(beta_w, cur, w=d)))                  # sigmoid of a reshape
    state = g.view(c.rs(il, s_main, s_extra, 4 * layer.n_embd_s * ns))

    def conv(cx: Tensor, name: str) -> Tensor:                           # silu(ssm_conv(conv_x, reshaped w))
        return g.view(g.op(e_in, g.view(g.op(e_in, cx, c.reshaped(il, f"ssm_conv1d_{name}.weight"))), inplace=True))

    def l2(x: Tensor) -> Tensor:                                         # build_gdn_l2_norm: scale(rms_norm)
        return g.op(e_in, g.op(e_in, x, inplace=True), inplace=True)

    q, k, v = l2(conv(conv_x[0], "q")), l2(conv(conv_x[1], "k")), conv(conv_x[2], "v")
    out = g.op(4 * hd * n_head * (T + hd * ns), q, k, v, g.view(g1), beta, state)   # ggml_gated_delta_net
    o = g.op(e_in, g.view(out, e_in))                                    # cont(output)
    g.expand(g.set(d, g.view(out), g.view(g.ext(d))))                    # the new state
    normed = c.norm(g.view(o), il)                                       # ssm_o_norm
    g_name = f"blk.{il}.ssm_g_a.weight" if f"blk.{il}.ssm_g_a.weight" in c.names else f"blk.{il}.ssm_g.weight"
    g2 = g.op(4 * c.shapes[g_name][1] * T, g.view(cur), w=d)
    if f"blk.{il}.ssm_g_b.weight" in c.names:                            # g_b(g_a(x)), or bailingmoe3's g_a(x)
        g2 = g.op(e_in, g2, w=d)
    y = g.op(e_in, normed, g.op(e_in, g.view(g2)), inplace=True)         # * sigmoid(g2)
    return g.op(4 * c.E * T, g.op(e_in, y), w=d)                         # wo(cont_2d)


def _inputs(c: _Ctx, fa: bool, v_trans: bool) -> tuple[Tensor, _Attn, _Mla, Tensor, Tensor]:
    """What every KDA hybrid's graph starts with, in llama.cpp's order: the token ids, inp_embd (a text batch never
    reads it, it is allocated), get_rows(token_embd) on the host, the KV cache's inputs (with MLA's) and the
    recurrent state's copy indices (s_main, s_extra views). Returns (embeddings, attention, MLA, s_main, s_extra)."""
    g, T, E = c.g, c.T, c.E
    tokens = g.inp(4 * T)
    g.expand(g.inp(4 * E * T))
    cur = g.expand(g.op(4 * E * T, tokens, w=HOST_NAME))
    attn = _Attn(c, fa, v_trans)
    mla = _Mla(c, attn, fa)
    s_copy = g.inp(4 * c.ns)
    return cur, attn, mla, g.view(s_copy, 4 * c.ns), g.view(s_copy, 0)


def _graph(c: _Ctx, fa: bool, v_trans: bool) -> tuple[Graph, list]:
    g, T, E, p = c.g, c.T, c.E, c.p
    md, arch = p.metadata, p.arch
    cur, attn, mla, s_main, s_extra = _inputs(c, fa, v_trans)
    kimi = arch == "kimi-linear"
    pos = None if kimi else g.inp(4 * T)          # kimi-linear's MLA has no RoPE
    out_ids = g.inp(4 * c.T_out)
    n_dense = int(md.get(f"{arch}.leading_dense_block_count", 0))
    scale = float(md.get(f"{arch}.expert_weights_scale", 0.0)) not in (0.0, 1.0)
    for il in range(p.n_layer):
        lay = _Layer(p, il)
        d = c.dev[il]
        inp_sa = cur
        h = c.norm(cur, il)
        if kimi:
            g.expand(h)
        if p.layers[il].is_recurrent:
            y = _kda(c, s_main, s_extra, h, il)
        elif kimi:
            y = g.op(4 * E * T, mla(h, None, il, lay), w=d)               # MLA without RoPE, wo
        else:
            # bailingmoe3: MLA without wo, * sigmoid(a head-wise gate of the normed input), cont_2d, wo
            y = mla(h, pos, il, lay)
            gate = g.op(4 * p.layers[il].n_head * T, g.view(g.op(4 * p.layers[il].n_head * T, h, w=d)))
            y = g.op(4 * E * T, g.op(y.size, g.op(y.size, g.view(y), gate)), w=d)
        if kimi and il == p.n_layer - 1:
            y, inp_sa = g.op(4 * E * c.T_out, y, out_ids), g.op(4 * E * c.T_out, inp_sa, out_ids)
        ffn_inp = g.op(y.size, y, inp_sa, inplace=True)
        h = c.norm(ffn_inp, il)
        if il < n_dense:
            ff = _ffn(c, h, il)
        else:
            shared = lay.width("ffn_up_shexp.weight") if lay.has("ffn_up_shexp.weight") else 0
            # kimi-linear renormalizes the chosen weights always, bailingmoe3 as its file says
            norm_w = kimi or bool(md.get(f"{arch}.expert_weights_norm", False))
            ff = _moe(c, h, il, gating=int(md.get(f"{arch}.expert_gating_func", 1)),
                      probs_bias=lay.has("exp_probs_b.bias"), norm_w=norm_w, scale=scale,
                      n_ff=lay.width("ffn_up_exps.weight"), shared=shared, shared_gate=False)
            if not shared:                                               # build_ffn without tensors: silu(x)
                ff = g.op(ff.size, ff, g.op(h.size, h), inplace=True)
        cur = g.op(ff.size, ff, ffn_inp, inplace=True)
    h = c.norm(cur, -1, cur.size) if p.n_layer else cur
    if not kimi:
        # bailingmoe3: the normed state is an output (t_h_nextn, for MTP); the output rows gathered after it
        h.out = True
        h = g.op(4 * E * c.T_out, h, out_ids)
    g.expand(g.op(4 * p.n_vocab * c.T_out, h, w=c.dev[p.n_layer], out=True))   # result_output
    return g, [(n, d) for n, d in attn.fa_nodes if n is not None]


class _ResMix:
    """kimi-k3's attention residuals (llama_model_kimi_k3::graph::res_push / res_mix): the layer inputs banked
    every attn_res_block_size layers (concatenated along a new axis), and a softmax over their RMS-normed scores
    and the current stream's mixing them (ggml_dsv4_hc_pre over the bank, the stream times its weight)."""

    def __init__(self, c: _Ctx) -> None:
        self.c = c
        self.bank: Tensor | None = None
        self.n = 0

    def push(self, x: Tensor) -> None:
        g = self.c.g
        ckpt = g.view(x)
        self.bank = ckpt if self.bank is None else g.op(self.bank.size + x.size, self.bank, ckpt)   # concat
        self.n += 1

    def __call__(self, cur: Tensor, il: int) -> Tensor:
        if self.bank is None:
            return cur                                               # layer 0: nothing banked yet
        c, g, src = self.c, self.c.g, self.bank
        d = c.dev[il] if il >= 0 else c.dev[c.p.n_layer]
        rows = cur.size // (4 * c.E)

        def score(x: Tensor) -> Tensor:                               # sum_rows(rms_norm(x) * score_w)
            return g.op(4 * (x.size // (4 * c.E)), g.op(x.size, g.op(x.size, x, inplace=True), w=d, inplace=True))

        probs = g.op(4 * (self.n + 1) * rows, g.view(score(src)), score(cur))   # concat
        probs = g.op(probs.size, probs, inplace=True)                # soft_max
        p_src = g.op(4 * self.n * rows, g.view(probs))               # cont(view)
        p_cur = g.op(4 * rows, g.view(probs))
        out = g.op(cur.size, src, p_src)                             # ggml_dsv4_hc_pre
        return g.op(cur.size, out, g.op(cur.size, cur, p_cur, inplace=True), inplace=True)


def _graph_k3(c: _Ctx, fa: bool, v_trans: bool) -> tuple[Graph, list]:
    """llama_model_kimi_k3::graph (src/models/kimi-k3.cpp): attention residuals around every phase, KDA with one
    full-rank output gate (ssm_g), MLA without RoPE with an optional output gate (attn_gate) before wo, SiTU
    FFNs (kimi_k3_situ) and the latent MoE (build_latent_moe: the router reads the normed input, the experts'
    SiTU; the shared expert's where the file has one), the rows gathered after the last mix."""
    g, T, E, p = c.g, c.T, c.E, c.p
    md = p.metadata
    cur, attn, mla, s_main, s_extra = _inputs(c, fa, v_trans)
    out_ids = g.inp(4 * c.T_out)
    n_dense = int(md.get("kimi-k3.leading_dense_block_count", 0))
    block = int(md.get("kimi-k3.attn_res.block_size", 0))
    linear = float(md.get("kimi-k3.activation.situ_linear_beta", 0.0)) > 0
    scale = float(md.get("kimi-k3.expert_weights_scale", 0.0)) not in (0.0, 1.0)
    res = _ResMix(c)
    for il in range(p.n_layer):
        lay = _Layer(p, il)
        d, fd = c.dev[il], c.ffn_dev[il]
        prefix = cur
        x = res(prefix, il) if block else prefix
        banked = bool(block) and il % block == 0
        if banked:
            res.push(prefix)                                         # the raw layer input
        h = g.expand(c.norm(x, il))
        if p.layers[il].is_recurrent:
            y = _kda(c, s_main, s_extra, h, il)
        else:
            y = mla(h, None, il, lay)
            if lay.has("attn_gate.weight"):                          # * sigmoid(attn_gate(x))
                gate = g.op(4 * lay.width("attn_gate.weight") * T, h, w=d)
                y = g.op(y.size, y, g.op(gate.size, gate, inplace=True), inplace=True)
            y = g.op(4 * E * T, y, w=d)                              # wo
        prefix = y if banked else g.op(y.size, prefix, y, inplace=True)
        x = res(prefix, il) if block else prefix
        h = c.norm(x, il)
        rows = h.size // (4 * E)
        if il < n_dense:
            f = 4 * lay.width("ffn_gate.weight") * rows
            ff = g.op(h.size, _situ(g, g.op(f, h, w=fd), g.op(f, h, w=fd), linear), w=fd)
        else:
            logits = g.op(4 * p.n_expert * rows, h, w=d)
            ff = _moe(c, h, il, gating=int(md.get("kimi-k3.expert_gating_func", 1)),
                      probs_bias=lay.has("exp_probs_b.bias"),
                      norm_w=bool(md.get("kimi-k3.expert_weights_norm", False)), scale=scale,
                      n_ff=lay.width("ffn_up_exps.weight"), logits=logits, situ=linear)
            if lay.has("ffn_gate_shexp.weight"):
                fs = 4 * lay.width("ffn_gate_shexp.weight") * rows
                sh = g.op(h.size, _situ(g, g.op(fs, h, w=d), g.op(fs, h, w=d), linear), w=d)
                ff = g.op(ff.size, ff, sh, inplace=True)
        cur = g.op(ff.size, prefix, ff, inplace=True)
    if block:
        cur = res(cur, -1)
    cur = g.op(4 * E * c.T_out, cur, out_ids)
    h = c.norm(cur, -1, cur.size)
    g.expand(g.op(4 * p.n_vocab * c.T_out, h, w=c.dev[p.n_layer], out=True))   # result_output
    return g, [(n, d) for n, d in attn.fa_nodes if n is not None]


class _KPool:
    """glm5-next's k-pool indexer inputs (llama_model_glm5_next::graph::build_inp_kpool): the indexer cache's row
    indices, each pool's caching cell and members, the pools' mask (f16: the fused lightning indexer), the tail,
    the selection slots' mask, the pools this ubatch completes. At reserve every pool is new
    (llama_memory_hybrid_idx_context: n_pool_real = cells / kpool * n_seq_max, padded by kpool_pad)."""

    def __init__(self, c: _Ctx, n_kv: int) -> None:
        g, T, md = c.g, c.T, c.p.metadata
        self.kpool = int(md["glm5-next.attention.indexer.kpool"])
        self.ih = int(md["glm5-next.attention.indexer.key_length"])
        self.n_ih = int(md["glm5-next.attention.indexer.head_count"])
        real = n_kv // self.kpool * max(1, c.config.n_seq_max)
        self.n_pool = max(64, -(-(real + 1) // 64) * 64)                  # kpool_pad
        self.n_new = max(real, 1)
        self.n_top = min(self.n_pool, int(md["glm5-next.attention.indexer.top_k"]) // self.kpool)
        tail = bool(md.get("glm5-next.attention.indexer.kpool_select_tail", True))
        self.n_sel = self.kpool * self.n_top + (self.kpool - 1 if tail else 0)
        self.tail = tail
        self.k_idxs = g.inp(8 * T)
        self.pool_cells, self.pool_idxs = g.inp(4 * self.n_pool), g.inp(4 * self.kpool * self.n_pool)
        self.pool_mask = g.inp(2 * self.n_pool * T)
        self.tail_idxs = g.inp(4 * (self.kpool - 1) * T)
        self.gather_mask = g.inp(4 * self.n_sel * T)
        self.new_pool_idxs, self.new_pool_rep = g.inp(4 * self.kpool * self.n_new), g.inp(8 * self.n_new)
        for t in (self.pool_cells, self.pool_idxs, self.pool_mask, self.tail_idxs, self.gather_mask):
            g.expand(t)                                                   # expanded when built


def _dsa(c: _Ctx, h: Tensor, il: int, lay: _Layer, mla: _Mla, kp: _KPool, fa: bool, prev: list[Tensor]) -> Tensor:
    """llama_model_glm5_next::graph::build_dsa_layer and build_kpool_select (the scatter path: more than 16
    tokens): nope-only absorbed MLA over a K-only cache whose mask is the indexer's selection."""
    g, d, T, cfg = c.g, c.dev[il], c.T, c.config
    n_head = c.p.layers[il].n_head
    kv_rank = int(lay.shapes["attn_kv_a_norm.weight"][0])
    hk = lay.width("attn_q_b.weight") // n_head
    hv = int(lay.shapes["attn_v_b.weight"][1])
    ih, kpool, n_new, n_pool, n_top, n_sel = kp.ih, kp.kpool, kp.n_new, kp.n_pool, kp.n_top, kp.n_sel
    n_kv = mla.n_kv
    full = lay.has("indexer.attn_k.weight")
    if full:
        # the key | gate | zero row written to the indexer cache, the completed pools pooled and written back
        ik = c.norm(g.op(4 * ih * T, h, w=d), il, ln=True)
        ig = g.op(4 * ih * T, h, w=d)
        zero = g.view(g.leaf(d, 4 * ih * T))                              # ggml_fill of a new tensor, in place
        packed = g.op(4 * 3 * ih * T, g.op(4 * 2 * ih * T, ik, ig), zero)        # concat(concat(ik, ig), zero)
        g.expand(g.set(d, g.view(packed), kp.k_idxs, g.view(g.ext(d))))
        rows = g.op(4 * 2 * ih * kpool * n_new, g.view(g.ext(d)), g.view(kp.new_pool_idxs))   # gather key | gate
        e = 4 * ih * kpool * n_new
        logits = g.op(e, g.op(e, g.view(rows), w=d))                     # cont(permute(gate + ape))
        probs = g.op(e, g.view(logits), inplace=True)                    # soft_max of a reshape
        pk = g.op(e, g.view(rows))                                       # cont(permute(key))
        pooled_new = g.op(4 * ih * n_new, g.op(e, g.view(probs), pk, inplace=True))   # sum_rows(probs * pk)
        g.expand(g.set(d, g.view(pooled_new), kp.new_pool_rep, g.view(g.ext(d))))
    qr = c.norm(g.op(4 * lay.width("attn_q_a.weight") * T, h, w=d), il)
    q = g.op(4 * hk * n_head * T, qr, w=d)
    q_abs = g.op(4 * kv_rank * n_head * T, g.view(q), w=d)               # wk_b x permute(q)
    kv = c.norm(g.op(4 * kv_rank * T, h, w=d), il)
    if full:
        iq = g.op(4 * ih * kp.n_ih * T, qr, w=d)
        pooled = g.op(4 * ih * n_pool, g.view(g.ext(d)), kp.pool_cells)  # gather_pooled
        weights = g.op(4 * kp.n_ih * T, g.op(4 * kp.n_ih * T, h, w=d), inplace=True)
        score = g.op(4 * n_pool * T, g.view(iq), g.view(pooled), weights, kp.pool_mask)   # lightning indexer
        top = g.op(4 * n_top * T, score)                                  # top_k
        top_f = g.op(4 * n_top * T, top)                                  # cast
        order = g.op(4 * n_top * T, g.view(g.op(4 * n_top * T, g.view(score), top)))   # argsort(get_rows)
        top = g.op(4 * n_top * T, g.op(4 * n_top * T, g.view(g.op(4 * n_top * T, g.view(top_f), order))))
        sel_idx = g.op(4 * kpool * n_top * T, kp.pool_idxs, g.view(top))  # get_rows: the pools' members
        if kp.tail:
            sel_idx = g.op(4 * n_sel * T, g.view(sel_idx), kp.tail_idxs)  # concat the tail
        # the scatter: -inf everywhere, 0 at the selected cells (dead slots to dump rows), + the causal mask
        mt = 2 if fa else 4                                               # the KQ mask's type (f16 with FA)
        seed = g.op(4, g.view(sel_idx, 4))
        zeros = g.op(4 * n_sel * T, g.op(4, seed, inplace=True))          # repeat(fill(seed, 0))
        idx = g.op(4 * n_sel * T, sel_idx)                                # cast
        dump = g.op(4 * n_sel)                                            # arange
        live = g.op(4 * n_sel * T, g.view(kp.gather_mask))                # exp
        idx = g.op(idx.size, g.op(idx.size, g.op(idx.size, idx, dump, inplace=True), live, inplace=True), dump,
                   inplace=True)
        idx = g.op(4 * n_sel * T, idx)                                    # cast
        mseed = g.op(2, seed) if fa else seed
        mask_all = g.op(mt * (n_kv + n_sel) * T, g.op(mseed.size, mseed, inplace=True))   # repeat(fill(-inf))
        sel = Tensor("view", mask_all.size, (zeros, g.view(idx), mask_all), root=mask_all)   # set_rows
        sel = g.op(mt * n_kv * T, g.view(sel), g.view(mla.mask))          # + the causal mask
        prev[:] = [sel]
    else:
        sel = prev[0]                                                     # a shared indexer layer
    g.expand(q_abs)
    g.expand(kv)
    g.expand(g.set(d, g.view(kv), mla.k_idxs, g.view(g.ext(d))))
    k = g.view(g.ext(d), _row(cfg.type_k, kv_rank) * n_kv * mla.attn.n_stream)
    qp = g.view(q_abs)
    if fa:
        out = g.op(4 * kv_rank * n_head * T, qp, g.view(k), g.view(k), g.view(sel))
        fa_node: Tensor | None = out
        out = g.op(4 * hv * n_head * T, g.view(g.op(4 * hv * n_head * T, g.view(out), w=d)))   # v_mla, cont
    else:
        kq = g.op(4 * n_kv * T * n_head, g.view(k), qp)
        kq = g.op(kq.size, kq, g.view(sel), inplace=True)                 # soft_max_ext
        vt = g.op(_row(cfg.type_k, kv_rank) * n_kv * mla.attn.n_stream, g.view(g.view(k)))   # cont(transpose(v))
        kqv = g.op(4 * hv * n_head * T, g.op(4 * kv_rank * n_head * T, vt, kq), w=d)   # v, then v_mla
        out = g.op(kqv.size, g.view(kqv))                                 # cont(permute)
        fa_node = None
    g.expand(out)
    mla.attn.fa_nodes.append((fa_node, d))
    return g.op(4 * c.E * T, out, w=d)                                    # wo


def _graph_glm5(c: _Ctx, fa: bool, v_trans: bool) -> tuple[Graph, list]:
    """llama_model_glm5_next::graph (src/models/glm5-next.cpp): hyper-connections (hc streams of the residual,
    the fused DeepSeek V4 ops: build_hc_pre's mixes, pre and post weights, ggml_dsv4_hc_comb / _hc_pre /
    _hc_post) around KDA or DSA attention and around the FFN; the rows gathered over the streams, their mean,
    the output norm."""
    g, T, E, p = c.g, c.T, c.E, c.p
    md = p.metadata
    hc = int(md["glm5-next.hyper_connection.count"])
    cur, attn, mla, s_main, s_extra = _inputs(c, fa, v_trans)
    kp = _KPool(c, mla.n_kv)
    out_ids = g.inp(4 * c.T_out)
    n_dense = int(md.get("glm5-next.leading_dense_block_count", 0))
    scale = float(md.get("glm5-next.expert_weights_scale", 0.0)) not in (0.0, 1.0)
    x = g.op(4 * hc * E * T, g.view(cur))                            # repeat_4d: hc_init
    prev: list[Tensor] = []
    # strided views' ggml_nbytes (what a copy to another device takes): one stream of the hc-stream state, a
    # [1, tokens] column of the post and comb weights, the [hc, tokens] pre/post slices of the mixes
    mix = (2 + hc) * hc

    def stream(t: Tensor, rows: int = T) -> Tensor:
        return g.view(t, 4 * E + (rows - 1) * 4 * hc * E)

    def column(t: Tensor, width: int) -> Tensor:
        return g.view(t, 4 + (T - 1) * 4 * width)

    def hc_pre(x: Tensor, il: int, which: str) -> tuple[Tensor, Tensor]:
        d = c.dev[il]
        mixes = g.op(4 * (2 + hc) * hc * T, g.op(x.size, g.view(x)), w=d)     # hc_fn x rms_norm(flat)
        pre = g.op(4 * hc * T, g.view(mixes, 4 * hc + (T - 1) * 4 * mix), c.reshaped(il, f"hc_{which}_scale.weight"))
        pre = g.op(pre.size, g.op(pre.size, g.op(pre.size, pre, c.reshaped(il, f"hc_{which}_base.weight"),
                                                 inplace=True), inplace=True), inplace=True)   # + base, sigmoid, scale
        if "hc_pre" in c.unfused:
            # build_hc_pre's loop: each stream times its weight, summed
            out = g.op(4 * E * T, stream(x), column(pre, hc))
            for _ in range(hc - 1):
                out = g.op(out.size, out, g.op(4 * E * T, stream(x), column(pre, hc)), inplace=True)
            return mixes, out
        out = g.op(4 * E * T, x, pre)                                      # ggml_dsv4_hc_pre
        c.fused_nodes.setdefault("hc_pre", []).append((out, d))
        return mixes, out

    def hc_post(y: Tensor, residual: Tensor, mixes: Tensor, il: int, which: str) -> Tensor:
        d = c.dev[il]
        post = g.op(4 * hc * T, g.view(mixes, 4 * hc + (T - 1) * 4 * mix), c.reshaped(il, f"hc_{which}_scale.weight"))
        post = g.op(post.size, g.op(post.size, g.op(post.size, post, c.reshaped(il, f"hc_{which}_base.weight"),
                                                   inplace=True), inplace=True), inplace=True)
        comb = g.op(4 * hc * hc * T, mixes, w=d)                           # ggml_dsv4_hc_comb (its Sinkhorn
        c.fused_nodes.setdefault("hc_comb", []).append((comb, d))         # unfused: small ops not built here)
        if "hc_post" in c.unfused:
            # build_hc_post's loops: per destination stream y * post + the sum of residual streams * comb,
            # concatenated stream by stream
            e = 4 * E * T
            out: Tensor | None = None
            for _ in range(hc):
                cur = g.op(e, y, column(post, hc), inplace=True)
                for _ in range(hc):
                    cur = g.op(e, cur, g.op(e, stream(residual), column(comb, hc * hc)), inplace=True)
                out = g.view(cur) if out is None else g.op(out.size + e, out, g.view(cur))
            assert out is not None
            return out
        out = g.op(4 * hc * E * T, y, residual, post, comb)                # ggml_dsv4_hc_post
        c.fused_nodes.setdefault("hc_post", []).append((out, d))
        return out

    for il in range(p.n_layer):
        lay = _Layer(p, il)
        residual = x
        mixes, h = hc_pre(x, il, "attn")
        h = g.expand(c.norm(h, il))
        if p.layers[il].is_recurrent:
            y = _kda(c, s_main, s_extra, h, il)
        else:
            y = _dsa(c, h, il, lay, mla, kp, fa, prev)
        x = hc_post(y, residual, mixes, il, "attn")
        residual = x
        mixes, h = hc_pre(x, il, "ffn")
        h = c.norm(h, il)
        if il < n_dense:
            ff = _ffn(c, h, il)
        else:
            ff = _moe(c, h, il, gating=int(md.get("glm5-next.expert_gating_func", 1)),
                      probs_bias=lay.has("exp_probs_b.bias"),
                      norm_w=bool(md.get("glm5-next.expert_weights_norm", False)), scale=scale,
                      n_ff=lay.width("ffn_up_exps.weight"),
                      shared=lay.width("ffn_up_shexp.weight") if lay.has("ffn_up_shexp.weight") else 0,
                      shared_gate=False)
        x = hc_post(ff, residual, mixes, il, "ffn")
    x = g.op(4 * hc * E * c.T_out, g.view(x), out_ids)                  # the output rows of every stream
    acc = g.op(4 * E * c.T_out, stream(x, c.T_out), stream(x, c.T_out))   # build_hc_mean
    for _ in range(hc - 2):
        acc = g.op(acc.size, acc, stream(x, c.T_out), inplace=True)
    h = c.norm(g.op(acc.size, acc, inplace=True), -1)                     # scale, the output norm
    g.expand(g.op(4 * p.n_vocab * c.T_out, h, w=c.dev[p.n_layer], out=True))   # result_output
    return g, [(n, d) for n, d in attn.fa_nodes if n is not None]


def kda_compute_bytes(profile: ModelProfile, config: SplitConfig, layer_devices: list[str], names: list[str], *,
                      T: int, n_seqs: int, T_out: int, n_copies: int, pin_norm: bool,
                      ffn_devices: list[str] | None = None,
                      ffn_moved: tuple[tuple[int, str, str], ...] | None = None) -> dict[str, int]:
    """Compute buffer bytes of every backend in `names` for a `kda_replayable` profile (`ffn_moved`: the FFN
    weights tensor overrides put away from their layer, each expert product run there: recurrent._moe)."""
    build = {"kimi-k3": _graph_k3, "glm5-next": _graph_glm5}.get(profile.arch, _graph)
    return replay_compute_bytes(build, profile, config, layer_devices, names, T=T, n_seqs=n_seqs, T_out=T_out,
                                n_copies=n_copies, pin_norm=pin_norm, ffn_devices=ffn_devices, ffn_moved=ffn_moved)


def kda_replayable(profile: ModelProfile) -> bool:
    """Whether `profile`'s graph is built here: a KDA_GRAPHS file with its hyperparameters and tensor list, KDA
    layers with separate Q, K, V products (not the fused attn_qkv), attention layers with absorbed MLA."""
    arch = profile.arch
    keys = (*_KEYS, *_GLM5_KEYS) if arch == "glm5-next" else _KEYS
    if arch not in KDA_GRAPHS or not all(f"{arch}.{k}" in profile.metadata for k in keys):
        return False
    names = {t.name.split(".", 2)[-1] for layer in profile.layers for t in layer.tensors}
    return "attn_q.weight" in names and "attn_qkv.weight" not in names and "attn_k_b.weight" in names \
        and not any(layer.is_nextn and layer.tensors for layer in profile.layers)
