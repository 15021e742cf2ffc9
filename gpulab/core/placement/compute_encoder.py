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
  neo-bert          src/models/neo-bert.cpp (fused QKV, gate and up in one product, no lm_head)
  modern-bert       src/models/modern-bert.cpp (neo-bert's with LayerNorms, the token embeddings normed)
  bert & co         src/models/bert.cpp: bert, jina-bert-v2, jina-bert-v3, nomic-bert, nomic-bert-moe
                    (LayerNorms after attention and the FFN, none before; learned positions for bert)
  t5encoder, t5     src/models/t5.cpp graph<true> (the relative position bias on KQ) and graph<false>, the
                    decoder t5 reserves (cross-attention over n_ctx_train encoder rows)
  wavtokenizer-dec  src/models/wavtokenizer-dec.cpp (convolutions as im2col and a product, group norms pinned
                    to layer 0's device, the posnet and convnext blocks on their layer's device)

Checked on the architecture matrix (tests/integration/test_arch_matrix_vs_llama.py, CPU RPC devices).
"""

from __future__ import annotations

import weakref

from ..config import SplitConfig
from ..devices import HOST_NAME
from ..profile import ModelProfile
from .ggml_replay import Graph, Tensor, per_profile, template
from .recurrent import _Attn, _Ctx, _moe

__all__ = ["ENCODER_GRAPHS", "encoder_compute_bytes", "encoder_replayable"]

# arch -> (has an lm_head, Q/K norms, MoE expert weights normalized, gemma's sandwich norms and scaled input,
#          LayerNorms (not RMS), a norm of the token embeddings)
_LLAMA_LIKE = {
    "dream": (True, False, False, False, False, False),
    "llada": (True, False, False, False, False, False),
    "llama-embed": (False, False, False, False, False, False),
    "eurobert": (False, False, False, False, False, False),
    "rnd1": (True, True, True, False, False, False),
    "llada-moe": (True, True, False, False, False, False),
    "gemma-embedding": (False, True, False, True, False, False),
    "neo-bert": (False, False, False, False, False, False),
    "modern-bert": (False, False, False, False, True, True),
}
_BERT = frozenset({"bert", "jina-bert-v2", "jina-bert-v3", "nomic-bert", "nomic-bert-moe"})
ENCODER_GRAPHS = frozenset(_LLAMA_LIKE) | _BERT | {"t5encoder", "t5", "wavtokenizer-dec"}
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

    def __call__(self, cur: Tensor, pos: Tensor | None, il: int, qk_norm: bool, q_scale: bool = False,
                 pos_bucket: Tensor | None = None) -> Tensor:
        """pos None: no RoPE (bert). Biases where the layer has them (build_qkv's separate path). pos_bucket: T5's
        relative position bias (build_pos_bias, added to KQ: no flash attention with a KQ bias, build_attn_mha)."""
        c, g, T = self.c, self.c.g, self.c.T
        d, layer = c.dev[il], c.p.layers[il]
        hd, n_head, n_kv_head = layer.n_embd_head_k, layer.n_head, layer.n_head_kv
        qs, ks = 4 * hd * n_head * T, 4 * hd * n_kv_head * T
        qkv_w = next((t.shape[1] for t in layer.tensors if t.name.endswith(".attn_qkv.weight")), 0)
        if qkv_w:
            # build_qkv's fused path: Q, K and V are views of one product
            qkv = _biased(c, g.op(4 * qkv_w * T, cur, w=d), il, "attn_qkv")
            q, k, v = g.view(qkv, qs), g.view(qkv, ks), g.view(qkv, ks)
        else:
            q, k, v = (g.view(_biased(c, g.op(size, cur, w=d), il, name))    # wq/wk/wv (+ bias), reshaped
                       for size, name in ((qs, "attn_q"), (ks, "attn_k"), (ks, "attn_v")))
        if qk_norm:
            q, k = c.norm(q, il, qs), c.norm(k, il, ks)
        if pos is not None:
            q = g.op(qs, q, pos, inplace=True)               # RoPE (in place only on a norm's output)
            k = g.op(ks, k, pos, inplace=True)
        if q_scale:
            q = g.op(qs, q, inplace=True)                    # ggml_scale(Q, f_attention_scale)
        mask = self.mask_swa if layer.is_swa else self.mask
        out = self.mha(q, k, v, il, T, mask, pos_bucket)
        return _biased(c, g.op(4 * c.E * T, out, w=d), il, "attn_output")   # wo (+ bias)

    def mha(self, q: Tensor, k: Tensor, v: Tensor, il: int, n_kv: int, mask: Tensor,
            pos_bucket: Tensor | None = None) -> Tensor:
        """build_attn's expands and build_attn_mha over `n_kv` rows of K and V (the ubatch's, or the encoder
        output's for T5's cross-attention, build_attn with llm_graph_input_attn_cross): the output before wo."""
        c, g, T = self.c, self.c.g, self.c.T
        d, layer = c.dev[il], c.p.layers[il]
        qs, ks = 4 * layer.n_embd_head_k * layer.n_head * T, 4 * layer.n_embd_head_k * layer.n_head_kv * n_kv
        for t in (q, k, v):                                  # build_attn expands Q, K, V first
            g.expand(t)
        qp, kp, vp = g.view(g.view(q)), g.view(k), g.view(v)
        if self.fa and pos_bucket is None:
            # K and V are f32 products: cast to f16 for flash attention
            out = g.op(qs, qp, g.op(ks // 2, kp), g.op(ks // 2, vp), mask)
            self.fa_nodes.append((out, d))
            out = g.view(out)
        else:
            kq = g.op(4 * n_kv * T * layer.n_head, kp, qp)
            if pos_bucket is not None:
                # get_rows(attn_rel_b, pos_bucket) [n_head, T * T] f32, then cont(permute): as large as KQ each
                bias = g.op(kq.size, g.op(kq.size, g.view(pos_bucket), w=d))
                kq = g.op(kq.size, kq, bias, inplace=True)
            kq = g.op(kq.size, kq, mask, inplace=True)       # soft_max_ext
            vc = g.op(ks, g.view(vp))                        # v_cont: cont(transpose(v))
            out = g.op(qs, g.view(g.op(qs, vc, kq)))         # cont_2d(permute(kqv))
        g.expand(out)
        return out


def _has(c: _Ctx, il: int, name: str) -> bool:
    return any(t.name.endswith(f".{name}") for t in c.p.layers[il].tensors)


def _biased(c: _Ctx, x: Tensor, il: int, name: str) -> Tensor:
    """x + the layer's `name`.bias where it has one (an ADD in place, on the layer's device)."""
    return c.g.op(x.size, x, w=c.dev[il], inplace=True) if _has(c, il, f"{name}.bias") else x


def _fused_up(c: _Ctx, il: int) -> bool:
    """jina-bert-v2's up_contains_gate: no ffn_gate and ffn_up wider than n_ff (src/models/bert.cpp)."""
    return not _has(c, il, "ffn_gate.weight") and any(
        t.name.endswith(".ffn_up.weight") and len(t.shape) > 1 and t.shape[1] != c.p.n_ff
        for t in c.p.layers[il].tensors)


def _layer_norm(c: _Ctx, x: Tensor, il: int, dev: str, bias: bool = True) -> Tensor:
    """build_norm with LLM_NORM (src/llama-graph.cpp): ggml_norm is not run in place (ggml_op_can_inplace),
    its result is the "norm" pinned to the layer's device; the weight's MUL and the bias' ADD are."""
    g = c.g
    n = g.op(x.size, x, w=c.dev[il] if c.pin and il >= 0 else None)
    n = g.op(n.size, n, w=dev, inplace=True)
    return g.op(n.size, n, w=dev, inplace=True) if bias else n


def _bert(c: _Ctx, fa: bool) -> tuple[Graph, list, list]:
    """llama_model_bert::graph (src/models/bert.cpp): bert, jina-bert-v3, nomic-bert, nomic-bert-moe. Norms
    after attention and the FFN (LayerNorm), no norm before them, no output norm, no lm_head."""
    g, T, E, p = c.g, c.T, c.E, c.p
    arch = p.arch
    tokens = g.inp(4 * T)
    g.expand(g.inp(4 * E * T))               # inp_embd
    pos = g.inp(4 * T)
    cur = g.expand(g.op(4 * E * T, tokens, w=HOST_NAME))              # get_rows(token_embd)
    if any(t.name == "token_types.weight" for t in p.input_tensors):
        # + type_embd's row 0: a view of a weight has no buffer yet when the scheduler runs (views are set up at
        # allocation), so the add is not held on the host: the norm pinned to layer 0 pulls it over, with the row
        cur = g.op(cur.size, cur, g.view(g.ext(HOST_NAME), 4 * E), inplace=True)
    if arch == "bert":
        cur = g.op(cur.size, g.op(cur.size, pos, w=HOST_NAME), cur, inplace=True)   # + get_rows(pos_embd, pos)
    # token_embd_norm is a tensor of layer 0 (llama-arch.cpp: LLM_TENSOR_LAYER_REPEATING, "do the norms on the
    # first layer"): its MUL and ADD run on layer 0's device, and pull the position add there too
    cur = _layer_norm(c, cur, 0, c.dev[0])
    attn = _NoCacheAttn(c, fa)
    out_ids = g.inp(4 * c.T_out)
    rope = arch in ("nomic-bert", "nomic-bert-moe", "jina-bert-v3")
    n_layer = p.n_layer
    for il in range(n_layer):
        d = c.dev[il]
        res = cur
        y = attn(cur, pos if rope else None, il, False)
        if il == n_layer - 1:
            y, res = g.op(4 * E * c.T_out, y, out_ids), g.op(4 * E * c.T_out, res, out_ids)
        cur = _layer_norm(c, g.op(y.size, y, res, inplace=True), il, d)   # attn_output_norm
        rows, fd = cur.size // (4 * E), c.ffn_dev[il]
        f = 4 * p.n_ff * rows
        if arch == "nomic-bert":
            ff = g.op(cur.size, g.op(f, g.op(f, cur, w=fd), g.op(f, cur, w=fd)), w=fd)  # down(swiglu(gate, up))
        elif arch == "jina-bert-v2":
            up = _biased(c, g.op(2 * f if _fused_up(c, il) else f, cur, w=fd), il, "ffn_up")
            # GEGLU: gate and up in one product (up_contains_gate), else geglu_split(gate, up)
            glu = g.op(f, up) if _fused_up(c, il) else g.op(f, g.op(f, cur, w=fd), up)
            ff = _biased(c, g.op(cur.size, glu, w=fd), il, "ffn_down")
        else:
            up = g.op(f, _biased(c, g.op(f, cur, w=fd), il, "ffn_up"), inplace=True)   # gelu(up + b)
            ff = _biased(c, g.op(cur.size, up, w=fd), il, "ffn_down")
        cur = _layer_norm(c, g.op(cur.size, ff, cur, inplace=True), il, d)       # layer_output_norm
    cur.out = True
    g.expand(cur)
    return g, attn.fa_nodes, []


def _llama_like(c: _Ctx, fa: bool) -> tuple[Graph, list, list]:
    g, T, E, p = c.g, c.T, c.E, c.p
    logits, qk_norm, norm_w, sandwich, layer_norm, tok_norm = _LLAMA_LIKE[p.arch]

    def norm(x: Tensor, il: int) -> Tensor:
        """build_norm without a bias: RMS (in place) or LayerNorm (modern-bert: ggml_norm not in place)."""
        if not layer_norm:
            return c.norm(x, il, x.size)
        return _layer_norm(c, x, il, c.dev[il] if il >= 0 else c.dev[p.n_layer], bias=False)

    tokens = g.inp(4 * T)
    g.expand(g.inp(4 * E * T))               # inp_embd: a text batch never reads it, it is allocated
    cur = g.expand(g.op(4 * E * T, tokens, w=HOST_NAME))              # get_rows(token_embd)
    if sandwich:
        cur = g.expand(g.op(cur.size, cur, inplace=True))             # ggml_scale(inpL, sqrt(n_embd))
    if tok_norm:
        cur = norm(cur, 0)                   # token_embd_norm: a tensor of layer 0 (see _bert)
    pos = g.inp(4 * T)
    attn = _NoCacheAttn(c, fa)
    out_ids = g.inp(4 * c.T_out)
    n_layer = p.n_layer
    for il in range(n_layer):
        res = cur
        # modern-bert's first layer may have no attention norm (attn_norm TENSOR_NOT_REQUIRED)
        h = cur if p.arch == "modern-bert" and not _has(c, il, "attn_norm.weight") else norm(cur, il)
        y = attn(h, pos, il, qk_norm, q_scale=sandwich)
        if il == n_layer - 1:
            y, res = g.op(4 * E * c.T_out, y, out_ids), g.op(4 * E * c.T_out, res, out_ids)
        if sandwich:
            y = c.norm(y, il)                                          # attn_post_norm
        ffn_inp = g.op(y.size, y, res, inplace=True)
        h = norm(ffn_inp, il)
        rows, fd = ffn_inp.size // (4 * E), c.ffn_dev[il]
        f = 4 * p.n_ff * rows
        if p.n_expert:
            ff = _moe(c, h, il, norm_w=norm_w)
        elif p.arch in ("neo-bert", "modern-bert"):
            # gate and up in one product (neo-bert's SWIGLU, modern-bert's GEGLU, LLM_FFN_SEQ): one GLU input
            ff = g.op(ffn_inp.size, g.op(f, g.op(2 * f, h, w=fd)), w=fd)
        else:
            ff = g.op(ffn_inp.size, g.op(f, g.op(f, h, w=fd), g.op(f, h, w=fd)), w=fd)   # down(swiglu(gate, up))
        if sandwich:
            # ffn_post_norm is built with il -1: not pinned, its weight's MUL runs on the layer's device
            ff = g.op(ff.size, g.op(ff.size, ff, inplace=True), w=c.dev[il], inplace=True)
        cur = g.op(ffn_inp.size, ff, ffn_inp, inplace=True)
    out_dev = c.dev[n_layer]
    h = norm(cur, -1) if n_layer else cur
    if logits:
        h = g.op(4 * p.n_vocab * c.T_out, h, w=out_dev)                 # result_output
    h.out = True
    g.expand(h)
    return g, attn.fa_nodes, []


def _t5_encoder(c: _Ctx, fa: bool) -> tuple[Graph, list, list]:
    """llama_model_t5::graph<true> (src/models/t5.cpp), t5encoder's graph: RMS norms before attention and the FFN,
    the relative position bias on KQ, GEGLU (with ffn_gate) or RELU, the encoder's output norm, no lm_head."""
    g, T, E, p = c.g, c.T, c.E, c.p
    tokens = g.inp(4 * T)
    g.expand(g.inp(4 * E * T))               # inp_embd
    cur = g.expand(g.op(4 * E * T, tokens, w=HOST_NAME))              # get_rows(token_embd)
    pos_bucket = g.inp(4 * T * T)                                      # inp_pos_bucket_enc [T, T] i32
    attn = _NoCacheAttn(c, fa)
    out_ids = g.inp(4 * c.T_out)
    n_layer = p.n_layer
    for il in range(n_layer):
        res = cur
        y = attn(c.norm(cur, il), None, il, False, pos_bucket=pos_bucket)
        if il == n_layer - 1:
            y, res = g.op(4 * E * c.T_out, y, out_ids), g.op(4 * E * c.T_out, res, out_ids)
        ffn_inp = g.op(y.size, y, res, inplace=True)
        h = c.norm(ffn_inp, il)
        cur = g.op(ffn_inp.size, _t5_ffn(c, h, il), ffn_inp, inplace=True)
    h = c.norm(cur, -1, cur.size) if n_layer else cur
    h.out = True
    g.expand(h)
    return g, [], []


def _t5_decoder(c: _Ctx, fa: bool) -> tuple[Graph, list, list]:
    """llama_model_t5::graph<false> (src/models/t5.cpp), the graph t5 reserves (llama_context::graph_reserve builds
    the default graph type, the decoder): self-attention over the KV cache with the relative position bias, then
    cross-attention over the encoder output, which the reserve sizes at n_ctx_train rows (build_inp_cross_embd and
    build_attn_inp_cross: no encoder output yet), the FFN, the output norm and the lm_head."""
    g, T, E, p = c.g, c.T, c.E, c.p
    n_enc = int(p.metadata.get(f"{p.arch}.context_length", 0) or 0)            # hparams.n_ctx_train
    tokens = g.inp(4 * T)
    g.expand(g.inp(4 * E * T))               # inp_embd
    cur = g.expand(g.op(4 * E * T, tokens, w=HOST_NAME))              # get_rows(token_embd)
    embd_enc = g.inp(4 * E * n_enc)                                    # cross_embd
    # the KV cache is made before flash attention 'auto' is resolved: V is transposed only with it off
    self_attn = _Attn(c, fa, v_trans=c.config.flash_attn == "off")
    pos_bucket = g.inp(4 * self_attn.caches[False].n_kv * T)           # inp_pos_bucket_dec [n_kv, T] i32
    cross = _NoCacheAttn(c, fa)
    cross_mask = g.inp(n_enc * T * (2 if fa else 4))                   # cross_kq_mask [n_enc, T]
    out_ids = g.inp(4 * c.T_out)
    n_layer = p.n_layer
    for il in range(n_layer):
        d, layer = c.dev[il], p.layers[il]
        qs, ks = 4 * layer.n_embd_head_k * layer.n_head * T, 4 * layer.n_embd_head_k * layer.n_head_kv * T
        res = cur
        h = c.norm(cur, il)
        q, k, v = g.view(g.op(qs, h, w=d)), g.view(g.op(ks, h, w=d)), g.view(g.op(ks, h, w=d))
        y = self_attn.attend(q, k, v, il, pos_bucket=pos_bucket)
        res = g.op(res.size, g.op(4 * E * T, y, w=d), res, inplace=True)   # wo, + inpSA
        h = c.norm(res, il)                                                  # attn_norm_cross
        ke = 4 * layer.n_embd_head_k * layer.n_head_kv * n_enc
        q, k, v = g.view(g.op(qs, h, w=d)), g.view(g.op(ke, embd_enc, w=d)), g.view(g.op(ke, embd_enc, w=d))
        y = g.op(4 * E * T, cross.mha(q, k, v, il, n_enc, cross_mask), w=d)   # wo_cross
        if il == n_layer - 1:
            y, res = g.op(4 * E * c.T_out, y, out_ids), g.op(4 * E * c.T_out, res, out_ids)
        ffn_inp = g.op(y.size, y, res, inplace=True)
        cur = g.op(ffn_inp.size, _t5_ffn(c, c.norm(ffn_inp, il), il), ffn_inp, inplace=True)
    h = c.norm(cur, -1, cur.size) if n_layer else cur
    h = g.op(4 * p.n_vocab * c.T_out, h, w=c.dev[n_layer], out=True)  # result_output
    g.expand(h)
    return g, cross.fa_nodes, []


def _t5_ffn(c: _Ctx, h: Tensor, il: int) -> Tensor:
    """T5's FFN (build_ffn): GEGLU where the layer has ffn_gate (flan-T5), else RELU."""
    g, fd = c.g, c.ffn_dev[il]
    f = 4 * c.p.n_ff * (h.size // (4 * c.E))
    if _has(c, il, "ffn_gate.weight"):
        return g.op(h.size, g.op(f, g.op(f, h, w=fd), g.op(f, h, w=fd)), w=fd)     # down(geglu(gate, up))
    return g.op(h.size, g.op(f, g.op(f, h, w=fd), inplace=True), w=fd)             # down(relu(up))


def _wavtokenizer(c: _Ctx, fa: bool) -> tuple[Graph, list, list]:
    """llama_model_wavtokenizer_dec::graph (src/models/wavtokenizer-dec.cpp): a 1-D convolution, the posnet blocks
    (group norms, convolutions, one attention block), LayerNorms, the convnext blocks (depthwise convolution, an
    ungated GELU FFN), the output norm and projection. Channels-first: a row set is [T, C]. A convolution
    (ggml_conv_1d_ph, ggml/src/ggml.c) is an f16 im2col [C_in * K, T] and a product [T, C_out] f32; the posnet and
    convnext blocks of index i hold layer i's weights (their device), conv1d and token_embd_norm layer 0's. No
    attention mask, no output rows gathered: every op runs on all T tokens."""
    g, T, p = c.g, c.T, c.p
    md, arch = p.metadata, p.arch
    C = int(md.get(f"{arch}.posnet.embedding_length", p.n_embd))
    n_pos = int(md.get(f"{arch}.posnet.block_count", 0))
    n_cnx = int(md.get(f"{arch}.convnext.block_count", 0))
    n_out = next((t.shape[1] for t in p.output_tensors if t.name == "output.weight" and len(t.shape) > 1), C)
    rs = 4 * C * T                                                     # a row set, [T, C] f32
    d0 = c.dev[0]

    def conv(x: Tensor, k: int, d: str) -> Tensor:
        col = g.op(2 * C * k * T, x, w=d)                              # im2col (f16)
        return g.op(rs, g.view(col), w=d)                              # mul_mat(im2col, kernel)

    def biased(x: Tensor, d: str) -> Tensor:
        return g.op(x.size, x, w=d, inplace=True)

    pinned: list[tuple[Tensor, str]] = []

    def group_norm(x: Tensor, d: str) -> Tensor:
        # reshape, ggml_group_norm (not in place), reshape: the last view is the "norm", built with il 0 and so
        # pinned to layer 0's device (llama_context::graph_get_cb) whichever block it is; the scheduler leaves
        # the group norm where its neighbours run, but a reader elsewhere than the pinned view copies it over
        n = g.view(g.op(rs, g.view(x)))
        if c.pin:
            pinned.append((n, d0))
        return g.op(rs, g.op(rs, n, w=d, inplace=True), w=d, inplace=True)

    def swish(x: Tensor) -> Tensor:
        return g.op(rs, g.op(rs, x, inplace=True), x, inplace=True)    # sigmoid(x) * x

    tokens = g.inp(4 * T)
    g.expand(g.inp(4 * C * T))               # inp_embd
    cur = g.expand(g.op(4 * p.n_embd * T, tokens, w=HOST_NAME))       # get_rows(token_embd)
    cur = g.op(4 * p.n_embd * T, g.view(cur))                          # cont(transpose)
    cur = biased(conv(cur, 7, d0), d0)                                 # conv1d + b
    for il in range(n_pos):
        d = c.dev[il]
        inp = cur
        if il == 5:
            cur = group_norm(cur, d)
        elif il == 2:
            h = group_norm(cur, d)
            q, k, v = (biased(conv(h, 1, d), d) for _ in range(3))
            q, k = g.op(rs, g.view(q)), g.op(rs, g.view(k))            # cont(transpose)
            kq = g.op(4 * T * T, k, q)
            kq = g.op(kq.size, kq, inplace=True)                       # soft_max_ext, no mask
            cur = g.op(rs, kq, v)
            cur = g.op(rs, biased(conv(cur, 1, d), d), inp, inplace=True)
        else:
            h = conv(swish(group_norm(cur, d)), 3, d)
            h = conv(swish(group_norm(biased(h, d), d)), 3, d)
            cur = g.op(rs, biased(h, d), inp, inplace=True)
    cur = g.op(rs, g.view(cur))                                        # cont(transpose): [C, T]
    cur = _layer_norm(c, cur, 0, d0)                                   # token_embd_norm (layer 0's)
    cur = g.op(rs, g.view(cur))                                        # cont(transpose)
    f = 4 * p.n_ff * T
    for il in range(n_cnx):
        d = c.dev[il]
        inp = cur
        col = g.op(2 * 7 * C * T, g.view(cur), w=d)                    # conv_1d_dw: im2col [7, T, C] f16
        h = biased(g.view(g.op(rs, col, w=d)), d)                      # mul_mat(im2col, dw), + b
        h = g.op(rs, g.view(h))                                        # cont(transpose)
        h = _layer_norm(c, h, -1, d)                                   # built with il -1: not pinned
        h = g.op(f, biased(g.op(f, h, w=d), d), inplace=True)          # gelu(pw1 + b)
        h = g.op(rs, biased(g.op(rs, h, w=d), d), w=d, inplace=True)   # (pw2 + b) * gamma
        cur = g.op(rs, g.op(rs, g.view(h)), inp, inplace=True)         # cont(transpose), + inpL
    out_dev = c.dev[p.n_layer]
    cur = _layer_norm(c, g.op(rs, g.view(cur)), -1, out_dev)
    cur = biased(g.op(4 * n_out * T, cur, w=out_dev), out_dev)          # output + b
    cur.out = True
    g.expand(cur)
    return g, [], pinned


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
    build = {"t5encoder": _t5_encoder, "t5": _t5_decoder, "wavtokenizer-dec": _wavtokenizer}.get(
        profile.arch, _bert if profile.arch in _BERT else _llama_like)

    def make(devs: list[str], ffn: list[str] | None, cfg: SplitConfig, fa: bool) -> tuple[Graph, dict, list]:
        g, fa_nodes, pinned = build(_Ctx(profile, cfg, devs, T, n_seqs, T_out, pin_norm, ffn), fa)
        return g, {"fa": fa_nodes}, pinned      # a pinned view: its readers elsewhere copy it

    tkey = (build, T, n_seqs, T_out, pin_norm)     # the graph, built once for every placement
    run = template(make, profile, tkey, config, layer_devices, ffn_devices, config.flash_attn != "off").place(
        layer_devices, ffn_devices)
    if config.flash_attn == "auto" and run.moved("fa"):
        # llama_context::resolve_fused_ops: flash attention scheduled away from its layer's device is
        # turned off (and the reserve graph built again without it)
        run = template(make, profile, tkey, config, layer_devices, ffn_devices, False).place(layer_devices,
                                                                                           ffn_devices)
    tops = run.peaks(n_copies)
    out = {name: tops.get(name, 0) for name in names}
    if len(_CACHE) > 256:
        _CACHE.clear()
    _CACHE[key] = (weakref.ref(profile), out)
    return dict(out)


@per_profile
def encoder_replayable(profile: ModelProfile) -> bool:
    """Whether `profile`'s compute buffers are replayed here: a graph of ENCODER_GRAPHS with the tensors the
    graph built here reads (separate Q/K/V products; Q/K norms where the graph has them)."""
    if profile.arch not in ENCODER_GRAPHS or not profile.layers:
        return False
    if profile.arch == "wavtokenizer-dec":
        # the posnet is llama.cpp's fixed six blocks (resnet, resnet, attention, resnet, resnet, norm)
        return int(profile.metadata.get("wavtokenizer-dec.posnet.block_count", 0) or 0) == 6
    names = {t.name.rsplit(".", 2)[-2] + "." + t.name.rsplit(".", 1)[-1] for layer in profile.layers
             for t in layer.tensors if t.name.count(".") >= 2}
    if not names:
        return True            # a profile without its tensor list (built in code): the graph as written here
    if profile.arch in _BERT and profile.metadata.get(f"{profile.arch}.moe_every_n_layers"):
        return False           # nomic-bert-moe's expert layers (ungated GELU experts) are not built here
    if profile.arch in _BERT and names & {"attn_q_norm.weight", "attn_k_norm.weight", "attn_norm_2.weight"}:
        return False           # bert.cpp's Q/K LayerNorms and second attention norm are not built here
    return "attn_qkv.weight" in names or "attn_q.weight" in names
