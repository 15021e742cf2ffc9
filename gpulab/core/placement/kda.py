"""Compute buffers of the KDA/MLA hybrids, replayed op by op (gpulab.core.placement.ggml_replay).

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

Every device of the architecture matrix within the rounding of llama.cpp's log (tests/integration/
test_arch_matrix_vs_llama.py, CPU RPC devices) and tests/core/placement/test_hybrid_graphs.py.
"""

from __future__ import annotations

from ..config import SplitConfig
from ..devices import HOST_NAME
from ..profile import ModelProfile
from .dense import _Layer, _Mla
from .ggml_replay import Graph, Tensor
from .recurrent import _Attn, _Ctx, _ffn, _moe, _situ, replay_compute_bytes

__all__ = ["KDA_GRAPHS", "kda_compute_bytes", "kda_replayable"]

KDA_GRAPHS = frozenset({"kimi-linear", "bailingmoe3", "kimi-k3"})
_KEYS = ("ssm.conv_kernel", "kda.head_dim")


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


def _graph(c: _Ctx, fa: bool, v_trans: bool) -> tuple[Graph, list]:
    g, T, E, p = c.g, c.T, c.E, c.p
    md, arch = p.metadata, p.arch
    tokens = g.inp(4 * T)
    g.expand(g.inp(4 * E * T))               # inp_embd: a text batch never reads it, it is allocated
    cur = g.expand(g.op(4 * E * T, tokens, w=HOST_NAME))              # get_rows(token_embd)
    attn = _Attn(c, fa, v_trans)
    mla = _Mla(c, attn, fa)
    s_copy = g.inp(4 * c.ns)
    s_main, s_extra = g.view(s_copy, 4 * c.ns), g.view(s_copy, 0)
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
    tokens = g.inp(4 * T)
    g.expand(g.inp(4 * E * T))
    cur = g.expand(g.op(4 * E * T, tokens, w=HOST_NAME))              # get_rows(token_embd)
    attn = _Attn(c, fa, v_trans)
    mla = _Mla(c, attn, fa)
    s_copy = g.inp(4 * c.ns)
    s_main, s_extra = g.view(s_copy, 4 * c.ns), g.view(s_copy, 0)
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


def kda_compute_bytes(profile: ModelProfile, config: SplitConfig, layer_devices: list[str], names: list[str], *,
                      T: int, n_seqs: int, T_out: int, n_copies: int, pin_norm: bool,
                      ffn_devices: list[str] | None = None) -> dict[str, int]:
    """Compute buffer bytes of every backend in `names` for a `kda_replayable` profile."""
    build = _graph_k3 if profile.arch == "kimi-k3" else _graph
    return replay_compute_bytes(build, profile, config, layer_devices, names, T=T, n_seqs=n_seqs, T_out=T_out,
                                n_copies=n_copies, pin_norm=pin_norm, ffn_devices=ffn_devices)


def kda_replayable(profile: ModelProfile) -> bool:
    """Whether `profile`'s graph is built here: a KDA_GRAPHS file with its hyperparameters and tensor list, KDA
    layers with separate Q, K, V products (not the fused attn_qkv), attention layers with absorbed MLA."""
    arch = profile.arch
    if arch not in KDA_GRAPHS or not all(f"{arch}.{k}" in profile.metadata for k in _KEYS):
        return False
    names = {t.name.split(".", 2)[-1] for layer in profile.layers for t in layer.tensors}
    return "attn_q.weight" in names and "attn_qkv.weight" not in names and "attn_k_b.weight" in names \
        and not any(layer.is_nextn and layer.tensors for layer in profile.layers)
