"""Compute buffers of the older dense attention graphs, replayed op by op (gpulab.core.placement.ggml_replay).

Their layers repeat, but the closed forms of gpulab.core.placement.compute missed a row set here and there on
graphs unlike llama's: LayerNorms (GGML_OP_NORM is not run in place), fused QKV products whose Q and K are roped
out of a strided view, attention beside the FFN with its sums in the graph's order, biases. So these graphs are
built in llama.cpp's order and handed to the scheduler's split and ggml-alloc, like the recurrent ones
(placement.recurrent, whose attention (`_Attn`) is shared):

  qwen       src/models/qwen.cpp: RMS norms, fused QKV with its bias (3 n_embd wide), SwiGLU FFN
  falcon     src/models/falcon.cpp: one LayerNorm read by attention and the GELU FFN, ffn + attn + residual
  gptneox    src/models/gptneox.cpp: LayerNorms with biases, fused QKV and its bias, the output bias, GELU FFN
             with biases; use_parallel_residual: ffn(ln2(x)) + x + attn(ln1(x))
  command-r  src/models/command-r.cpp: one LayerNorm (no bias) read by attention and the FFN, ffn + residual + attn
  plamo      src/models/plamo.cpp: RMS norm read by attention and the FFN, ffn + attn + residual
  stablelm   src/models/stablelm.cpp: LayerNorms with biases; without ffn_norm the FFN reads the attention's norm
  refact     src/models/refact.cpp: ALiBi, no RoPE
  olmo       src/models/olmo.cpp: LayerNorms without weights (not named "norm", so never pinned)
  openelm    src/models/openelm.cpp: fused QKV, RMS Q/K norms of its views, residual + attention
  plamo3     src/models/plamo3.cpp: fused QKV, Q/K norms, norms after attention and the FFN, fused SwiGLU
  cogvlm     src/models/cogvlm.cpp: fused QKV, no output rows gathered (no inp_out_ids)
  phimoe     phi3.cpp's graph: residual + FFN; deepseek2-ocr: deepseek2.cpp's OCR attention; dbrx: LayerNorms, the
             FFN's norm named attn_output_norm; grok: norms after attention and the experts; arctic: a dense FFN and
             its residual, then the experts of the normed layer input; minimax-m2: Q/K norms before the reshape
  sliding    two caches (llm_graph_input_attn_kv_iswa): exaone-moe and muse-glimmer rope their window layers only,
             muse-glimmer gates attention and norms after it with plain RMS norms; cohere2moe (attention beside
             the MoE) gathers the output rows after the output norm, which is an output (t_h_nextn)
  step35     src/models/step35.cpp: a head-wise attention gate over a 3-D view of the output, sigmoid expert
             gating and a shared expert, the dense FFN tensors of MoE layers unused, rows gathered after the last
             layer and the layer's output an output (t_h_nextn) (branch attn)
  minicpm3   low-rank Q and KV (V narrower than K), the lm-head scale of result_norm (an output: a new tensor)
  mistral4   deepseek2.cpp's absorbed MLA over a K-only cache (_Mla); deepseek2 itself, its nextn layers left out
  glm4moe    glm4-moe.cpp: the FFN's norm is post_attention_norm; its nextn layers left out (the trunk's graph)
  DSA        deepseek32.cpp, glm-dsa.cpp and dots3note's full-attention layers: _Mla masked by the lightning
             indexer's top-k (_Indexer); glm-dsa's shared indexer layers reuse the last full layer's
  grovemoe   the experts, then the chunk experts of their output (_grove_moe)
  MoE        build_moe_ffn (placement.recurrent._moe) with the loader's gating, weight norm and scale, after
             leading dense layers, a shared expert added as it is: deepseek.cpp, bailingmoe.cpp, bailingmoe2.cpp,
             dots1.cpp; mellum.cpp and qwen3vlmoe.cpp (no shared expert; qwen3vlmoe without deepstack layers),
             smallthinker.cpp (the router reads the layer's input, before its norm)

  shared     build_norm, build_qkv, build_ffn, build_attn, build_inp_out_ids (src/llama-graph.cpp)
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import SplitConfig
from ..devices import HOST_NAME
from ..profile import ModelProfile
from .ggml_replay import Graph, Tensor, per_profile
from .minimax_msa import Msa
from .recurrent import _Attn, _Ctx, _moe, _row, replay_compute_bytes

__all__ = ["DENSE_GRAPHS", "dense_compute_bytes", "dense_replayable"]



class _Layer:
    """The tensors a layer has (optional biases and norms decide the ops the graph builds)."""

    def __init__(self, profile: ModelProfile, il: int) -> None:
        self.shapes = {t.name.split(".", 2)[-1]: t.shape for t in profile.layers[il].tensors}
        self.names = set(self.shapes)

    def width(self, name: str) -> int:
        """A matrix's output width (its ne1)."""
        return int(self.shapes[name][1])

    def has(self, name: str) -> bool:
        return name in self.names


def _norm(c: _Ctx, x: Tensor, il: int, *, rms: bool, bias: bool, weight: bool = True) -> Tensor:
    """build_norm: the norm (named "norm": pinned to the layer's device under full offload or small ubatches,
    llama_context::graph_get_cb), the weight's MUL and the bias' ADD in place. GGML_OP_NORM is not among the ops
    ggml-alloc runs in place (ggml_op_can_inplace, ggml/src/ggml-alloc.c); RMS_NORM is."""
    g = c.g
    d = c.dev[il] if il >= 0 else c.dev[c.p.n_layer]
    named = weight or bias                   # build_norm names it "norm" only with a weight or a bias
    n = g.op(x.size, x, w=d if c.pin and il >= 0 and named else None, inplace=rms)
    if weight:
        n = g.op(n.size, n, w=d, inplace=True)
    return g.op(n.size, n, w=d, inplace=True) if bias else n


def _qkv(c: _Ctx, h: Tensor, pos: Tensor, il: int, lay: _Layer, spec: _Spec,
         rms: bool) -> tuple[Tensor, Tensor, Tensor, bool]:
    """build_qkv and the RoPE of Q and K (a RoPE of a view is never in place: ggml_gallocr_allocate_node reuses
    only a parent it allocated itself). Returns Q, K, V and whether V is a strided view of a fused product."""
    g, T, d = c.g, c.T, c.dev[il]
    layer = c.p.layers[il]
    nq, nk = 4 * layer.n_head * layer.n_embd_head_k * T, 4 * layer.n_head_kv * layer.n_embd_head_k * T
    nv = 4 * layer.n_head_kv * layer.n_embd_head_v * T
    if lay.has("attn_q_a.weight"):
        return _lora_qkv(c, h, pos, il, lay)
    if lay.has("attn_qkv.weight"):
        # the product is as wide as the weight (qwen's is 3 n_embd whatever n_head_kv says: src/models/qwen.cpp)
        qkv = g.op(4 * lay.width("attn_qkv.weight") * T, h, w=d)
        if lay.has("attn_qkv.bias"):
            qkv = g.op(qkv.size, qkv, w=d, inplace=True)
        q, k, v = g.view(qkv, nq), g.view(qkv, nk), g.view(qkv, nv)
        fused = True
    else:
        proj = []
        for name, size in (("attn_q", nq), ("attn_k", nk), ("attn_v", nv)):
            t = g.op(size, h, w=d)
            if lay.has(f"{name}.bias"):
                t = g.op(size, t, w=d, inplace=True)
            if spec.qk_norm_flat and lay.has(f"{name}_norm.weight"):
                t = _norm(c, t, il, rms=rms, bias=False)
            proj.append(g.view(t))             # ggml_reshape_3d
        q, k, v = proj
        fused = False
    if not spec.qk_norm_flat:
        if lay.has("attn_q_norm.weight"):
            q = _norm(c, q, il, rms=rms, bias=False)
        if lay.has("attn_k_norm.weight"):
            k = _norm(c, k, il, rms=rms, bias=False)
    if _ropes(c.p, il, spec):
        # the rope factors, where the graph passes them, are a source of each RoPE (layer 0's tensor)
        rf = (c.rope_w,) if c.rope_w is not None else ()
        q = g.op(q.size, q, pos, *rf, inplace=True)
        k = g.op(k.size, k, pos, *rf, inplace=True)
    return q, k, v, fused


def _lora_qkv(c: _Ctx, h: Tensor, pos: Tensor, il: int, lay: _Layer) -> tuple[Tensor, Tensor, Tensor, bool]:
    """minicpm3's low-rank Q and KV (src/models/minicpm3.cpp): Q through q_a, its norm (in place on the product)
    and q_b, roped out of its reshape; the compressed KV and the RoPE part views of one kv_a_mqa product, the
    compressed part normed into a new tensor and expanded by kv_b; V a contiguous copy of its view of that; K the
    concat of its no-RoPE view and the roped RoPE part repeated over the heads."""
    g, T, d = c.g, c.T, c.dev[il]
    layer = c.p.layers[il]
    n_head, hk, hv = layer.n_head, layer.n_embd_head_k, layer.n_embd_head_v
    kv_rank = int(lay.shapes["attn_kv_a_norm.weight"][0])
    n_rope = lay.width("attn_kv_a_mqa.weight") - kv_rank
    q = _norm(c, g.op(4 * lay.width("attn_q_a.weight") * T, h, w=d), il, rms=True, bias=False)
    q = g.op(4 * lay.width("attn_q_b.weight") * T, q, w=d)
    kv_pe = g.op(4 * lay.width("attn_kv_a_mqa.weight") * T, h, w=d)
    kv = g.op(4 * lay.width("attn_kv_b.weight") * T,
              _norm(c, g.view(kv_pe, 4 * kv_rank * T), il, rms=True, bias=False), w=d)
    v = g.op(4 * hv * n_head * T, g.view(kv, 4 * hv * n_head * T))                   # cont(v_states)
    q = g.op(q.size, g.view(q), pos, inplace=True)                                    # RoPE of the reshape
    k_pe = g.op(4 * n_rope * T, g.view(kv_pe, 4 * n_rope * T), pos, inplace=True)
    k = g.op(4 * hk * n_head * T, g.view(kv, 4 * (hk - n_rope) * n_head * T),
             g.op(4 * n_rope * n_head * T, k_pe))                                     # concat(k_nope, repeat(k_pe))
    return q, k, v, False


class _Mla:
    """Absorbed MLA attention (llama_hparams::is_mla: attn_k_b, attn_v_b) over a K-only cache: its inputs (K row
    indices and the mask: build_attn_inp_k, src/llama-graph.cpp) and the layer's graph (the MLA branch of
    llama_model_deepseek2::graph, src/models/deepseek2.cpp; build_attn with llm_graph_input_attn_k and
    build_attn_mha's v_mla product)."""

    def __init__(self, c: _Ctx, attn: _Attn, fa: bool) -> None:
        self.c, self.attn, self.fa = c, attn, fa
        # each cache's K row indices and mask (dots3note's window layers: the SWA cache of llama_kv_cache_dsa_iswa);
        # an input no layer reads is not in the graph
        self.inputs = {swa: (cache.n_kv, c.g.inp(8 * c.T), c.g.inp(cache.n_kv * c.T * (2 if fa else 4)))
                       for swa, cache in attn.caches.items()}
        # the full cache's (glm5-next's DSA reads them: placement.kda)
        self.n_kv, self.k_idxs, self.mask = self.inputs[False]

    def __call__(self, h: Tensor, pos: Tensor | None, il: int, lay: _Layer, qr: Tensor | None = None,
                 top_k: Tensor | None = None) -> Tensor:
        """The attention output before wo (`pos` None: no RoPE; `qr`: the normed low-rank Q where the graph made
        it first, `top_k`: the lightning indexer's selection masking the attention, _Indexer)."""
        c, g, T, d = self.c, self.c.g, self.c.T, self.c.dev[il]
        layer, cfg, md, arch = c.p.layers[il], c.config, c.p.metadata, c.p.arch
        n_head = layer.n_head
        kv_rank = int(lay.shapes["attn_kv_a_norm.weight"][0])
        n_rope = lay.width("attn_kv_a_mqa.weight") - kv_rank
        swa = self.attn.swa[il]
        n_kv1, k_idxs, mask = self.inputs[swa]
        hv_mla = int(md.get(f"{arch}.attention.value_length_mla{'_swa' if swa else ''}",
                            lay.shapes["attn_v_b.weight"][1]))
        if lay.has("attn_q_a.weight"):
            if qr is None:
                qr = _norm(c, g.op(4 * lay.width("attn_q_a.weight") * T, h, w=d), il, rms=True, bias=False)
            q = g.op(4 * lay.width("attn_q_b.weight") * T, qr, w=d)
        else:
            q = g.op(4 * lay.width("attn_q.weight") * T, h, w=d)                     # the lite models' wq
        kv_pe = g.op(4 * (kv_rank + n_rope) * T, h, w=d)
        k_pe = g.view(kv_pe, 4 * n_rope * T)
        if lay.has("attn_k_norm.weight"):
            k_pe = _norm(c, k_pe, il, rms=True, bias=False)                             # dots3note's k_pe norm
        q_pe = g.view(q, 4 * n_rope * n_head * T)
        if pos is not None:                     # RoPE of the views (kimi-linear's MLA has none: kda)
            k_pe = g.op(k_pe.size, k_pe, pos, inplace=True)
        kv_cmpr = _norm(c, g.view(kv_pe, 4 * kv_rank * T), il, rms=True, bias=False)
        if pos is not None:
            q_pe = g.op(q_pe.size, q_pe, pos, inplace=True)
        q_abs = g.op(4 * kv_rank * n_head * T, g.view(g.view(q)), w=d)                # wk_b x q_nope
        qcur = g.op(4 * (kv_rank + n_rope) * n_head * T, g.view(q_abs), q_pe)         # concat
        v = g.view(kv_cmpr)                                                            # reshape_3d
        kcur = g.op(4 * (kv_rank + n_rope) * T, v, k_pe)                              # concat
        g.expand(qcur)
        g.expand(v)
        g.expand(kcur)
        g.expand(g.set(d, g.view(kcur), k_idxs))
        if top_k is not None:
            # build_attn(llm_graph_input_attn_k_dsa): the mask filled with -inf (a new tensor), zeros (a new
            # tensor filled in place) set at the selected cells (set_rows: an op whose result is a view of the
            # filled mask; it runs on a backend, so a top-k made on another device, glm-dsa's shared layers, is
            # copied there, once per layer: each reads its own view), + the mask
            mask_all = g.op(mask.size, mask)
            zeros = g.view(g.leaf(d, 4 * (top_k.size // (4 * T)) * T))
            sel = Tensor("set", 0, (zeros, g.view(top_k), g.view(mask_all)))
            mask = g.op(mask.size, Tensor("view", mask_all.size, (sel,), root=mask_all), mask)
        n_kv = n_kv1 * self.attn.n_stream
        k = g.view(g.ext(d), _row(cfg.type_k, kv_rank + n_rope) * n_kv)
        vk = g.view(k, _row(cfg.type_k, kv_rank) * n_kv)
        qp = g.view(g.view(qcur))
        if self.fa:
            out = g.op(4 * kv_rank * n_head * T, qp, g.view(k), g.view(vk), mask)
            fa_node = out
            out = g.op(4 * hv_mla * n_head * T, g.view(g.op(4 * hv_mla * n_head * T, g.view(out), w=d)))  # v_mla, cont
            out = g.view(out)
        else:
            kq = g.op(4 * n_kv1 * T * n_head, g.view(k), qp)
            kq = g.op(kq.size, kq, mask, inplace=True)                                 # soft_max_ext
            vt = g.op(_row(cfg.type_k, kv_rank) * n_kv, g.view(g.view(vk)))            # cont(transpose(v))
            kqv = g.op(4 * hv_mla * n_head * T, g.op(4 * kv_rank * n_head * T, vt, kq), w=d)   # v, then v_mla
            out = g.op(kqv.size, g.view(kqv))                                           # cont_2d(permute)
            fa_node = None
        g.expand(out)
        self.attn.fa_nodes.append((fa_node, d))
        return out


class _Indexer:
    """The DSA lightning indexer of deepseek32 and glm-dsa (llama_model_deepseek32::graph, src/models/deepseek32.cpp;
    llama_model_glm_dsa::graph, src/models/glm-dsa.cpp): its inputs (build_attn_inp_k_dsa_impl, src/llama-graph.cpp:
    the indexer cache's K row indices, its mask (f16: the fused lightning indexer, cparams.fused_lid) and the
    Hadamard matrix, llama_kv_cache::build_input_k_rot: nrot x nrot f32, nrot the largest power of two from 64
    dividing the indexer's head size) and each layer's top-k selection. glm-dsa's shared layers reuse the last
    full layer's (hparams.is_indexer_full)."""

    def __init__(self, c: _Ctx, mla: _Mla) -> None:
        md, arch, g = c.p.metadata, c.p.arch, c.g
        self.c, self.mla = c, mla
        self.ih = int(md[f"{arch}.attention.indexer.key_length"])
        self.n_ih = int(md[f"{arch}.attention.indexer.head_count"])
        self.n_top = min(mla.n_kv, int(md[f"{arch}.attention.indexer.top_k"]))
        nrot = 64
        while self.ih % (nrot * 2) == 0:
            nrot *= 2
        self.k_idxs, self.mask = g.inp(8 * c.T), g.inp(2 * mla.n_kv * c.T)
        self.k_rot = g.inp(4 * nrot * nrot)
        self.full = dsa_full_layers(c.p) or []      # never None here: dense_replayable
        self.prev: Tensor | None = None

    def __call__(self, h: Tensor, qr: Tensor, pos: Tensor, il: int) -> Tensor | None:
        """The layer's top-k cell indices (h: the normed layer input, qr: the normed low-rank Q); None: a dots3note
        window layer, which runs no indexer and attends over its window unmasked by one."""
        if not self.full[il]:
            return self.prev if self.c.p.arch == "glm-dsa" else None
        c, g, T, d = self.c, self.c.g, self.c.T, self.c.dev[il]
        iq = g.op(4 * self.ih * self.n_ih * T, qr, w=d)                    # indexer_attn_q_b
        iq = g.op(iq.size, g.view(iq), pos)                                # RoPE of the reshape
        ik = _norm(c, g.op(4 * self.ih * T, h, w=d), il, rms=False, bias=True)   # indexer_attn_k, LayerNorm
        ik = g.op(ik.size, g.view(ik), pos)                                # RoPE of the reshape
        iq = g.op(iq.size, self.k_rot, iq)                                 # the Hadamard transforms
        ik = g.op(ik.size, self.k_rot, ik)
        g.expand(g.set(d, g.view(ik), self.k_idxs))                        # stored in the indexer cache
        weights = g.op(4 * self.n_ih * T, h, w=d)                          # indexer_proj
        weights = g.op(weights.size, g.view(weights))                      # scale of a view: a new tensor
        n_kv = self.mla.n_kv * self.mla.attn.n_stream
        k = g.view(g.ext(d), _row(c.config.type_k, self.ih) * n_kv)        # the cached indexer keys
        score = g.op(4 * self.mla.n_kv * T, g.view(iq), k, weights, self.mask)   # ggml_lightning_indexer
        top = g.op(4 * self.n_top * T, g.op(4 * self.n_top * T, score))   # cont(top_k)
        self.prev = top
        return top


def dsa_full_layers(p: ModelProfile) -> list[bool] | None:
    """Which layers run the indexer (glm-dsa's others reuse the last one's top-k): every deepseek32 layer;
    dots3note's full-attention layers (src/models/dots3note.cpp: `!is_swa`); glm-dsa's attention.indexer.types,
    else every layer of a file trained below 1M tokens (GLM 5, 5.1: load_arch_hparams, src/models/glm-dsa.cpp;
    GLM 5.2's default pattern is not read here: None)."""
    md, arch, n = p.metadata, p.arch, p.n_layer
    if arch == "dots3note":
        return [not layer.is_swa for layer in p.layers]
    types = md.get(f"{arch}.attention.indexer.types")
    if arch == "glm-dsa" and types is not None:
        return [bool(t) for t in list(types)[:n]]
    if arch == "glm-dsa" and int(md.get(f"{arch}.context_length", 0)) >= 1048576:
        return None
    return [True] * n


def _ropes(p: ModelProfile, il: int, spec: _Spec) -> bool:
    """Whether layer il ropes Q and K: exaone-moe and muse-glimmer rope their sliding-window layers only, cohere2moe
    those and its leading dense ones (hparams.n_layer_dense_lead)."""
    if not spec.rope:
        return False
    if not spec.rope_only:
        return True
    if spec.rope_only == "step":
        return (il + 1) % 4 != 0             # llama_hparams::n_no_rope_layer_step, which afmoe's loader keeps at 4
    swa = bool(p.n_swa and p.layers[il].is_swa)
    lead = int(p.metadata.get(f"{p.arch}.leading_dense_block_count", 0))
    return swa or ("dense" in spec.rope_only and il < lead)


def _ffn(c: _Ctx, h: Tensor, il: int, lay: _Layer, n_ff: int) -> Tensor:
    """build_ffn: gated (LLM_FFN_PAR: gate and up products, the GLU's new tensor), an up product twice as wide
    as ffn_down reads split by the GLU (LLM_FFN_SWIGLU, plamo3), or up and its activation in place (GELU);
    biases added in place; ffn_down."""
    g, fu, fd = c.g, c.at(il, "ffn_up"), c.at(il, "ffn_down")
    rows = h.size // (4 * c.E)
    f = 4 * n_ff * rows
    up = g.op(4 * lay.width("ffn_up.weight") * rows, h, w=fu)
    if lay.has("ffn_up.bias"):
        up = g.op(up.size, up, w=fu, inplace=True)
    if lay.has("ffn_gate.weight"):
        cur = g.op(f, g.op(f, h, w=c.at(il, "ffn_gate")), up)   # swiglu_split(gate, up)
    elif up.size > f:
        cur = g.op(f, up)                                        # swiglu(up): halves it
    else:
        cur = g.op(f, up, inplace=True)                          # GELU
    out = g.op(h.size, cur, w=fd)
    if lay.has("ffn_down.bias"):
        out = g.op(out.size, out, w=fd, inplace=True)
    return out


@dataclass(frozen=True)
class _Spec:
    """How an architecture's layer differs from llama's (read from src/models/<arch>.cpp)."""
    rms: bool | None = True       # LLM_NORM_RMS, else LLM_NORM (LayerNorm); None: RMS where the file has an RMS eps
    norm_weight: bool = True      # the norms have weights (olmo's have none: not named "norm", not pinned)
    rope: bool = True             # refact: ALiBi, no RoPE
    qkv_reshape: bool = False     # fused QKV views taken of a reshape (openelm): a view of a view, same sizes
    parallel: str = ""            # the FFN reads the attention's norm: the adds after the FFN, in order
    par_res: bool = False         # gptneox use_parallel_residual: ffn(ln2(x)) + x + attn(ln1(x))
    residual_first: bool = False  # ffn_inp = residual + attention (openelm), not attention + residual
    post_attn: str = ""           # the norm after attention (plamo3, grok), after the FFN (plamo3, grok)
    post_ffn: str = ""
    ffn_norm: str = "ffn_norm"    # the FFN's norm (dbrx: attn_output_norm)
    arctic: bool = False          # a dense FFN and its residual, then the MoE of the normed layer input added
    mla: bool = False             # absorbed MLA over a K-only cache (_Mla)
    dsa: bool = False             # ... masked by the lightning indexer's top-k (_Indexer: deepseek32, glm-dsa)
    gating_none: int = 0          # the gating the loader puts for LLAMA_EXPERT_GATING_FUNC_TYPE_NONE or no key
                                  # (glm-dsa: sigmoid, 2; 0: the key as read, softmax without it)
    msa: bool = False             # minimax-m3's sparse attention past the leading dense layers (minimax_msa.Msa)
    grove: bool = False           # grovemoe: the experts, then its chunk experts of their output (_grove_moe)
    out_residual_first: bool = False  # l_out = residual + FFN (phi3's graph, which phimoe builds), not FFN + residual
    rope_only: str = ""           # RoPE only on sliding-window layers ("swa"), or those and leading dense ones,
                                  # or every layer but each hparams.n_no_rope_layer_step-th ("step": its default 4)
    embd_scale: bool = False      # the embeddings scaled (ggml_scale, in place: afmoe's MuP scale)
    post_attn_first: bool = False  # the norm after attention comes before the last layer's gather (afmoe)
    gather_after_norm: bool = False   # rows gathered after the output norm, the norm an output (t_h_nextn)
    gather_before_norm: bool = False  # rows gathered after the last layer, before the output norm, the last layer's
                                      # output an output (t_h_nextn: step35)
    gate_heads: bool = False      # the attention gate is head-wise, over a 3-D reshape of the output (step35)
    dense_unused: bool = False    # a MoE layer's dense FFN tensors are loaded but not run (step35), not grok's sum
    embd_norm: bool = False       # the embeddings RMS-normed without a weight (muse-glimmer)
    head_scale: bool = False      # result_norm scaled before the output product: a new tensor, result_norm being
                                  # an output (minicpm3's scale_lmhead)
    attn_gate: bool = False       # attention output * sigmoid(attn_gate product), before wo (muse-glimmer)
    post_plain: bool = False      # the post norms are ggml_rms_norm and a MUL, not build_norm (never pinned), and
                                  # the one after attention comes before the last layer's gather (muse-glimmer)
    gather: bool = True           # the last layer gathers the output rows (cogvlm builds no inp_out_ids)
    inp_embd: bool = True         # build_inp_embd's embeddings input exists (dflash makes its tokens input alone)
    rope_factors: bool = False    # every RoPE reads layer 0's rope_freqs where the file has it (dflash)
    gating: int = 0               # build_moe_ffn's gating as the graph passes it (0: hparams.expert_gating_func)
    norm_w: bool | None = None    # ... its weight normalization (None: hparams.expert_weights_norm)
    router_first: bool = False    # the router reads the layer's input, before its norm (smallthinker's probs_in)
    qk_norm_flat: bool = False    # Q/K norms of the products before their reshape (build_qkv reshape=false): in place


_SPECS = {
    "qwen": _Spec(),
    "falcon": _Spec(rms=False, parallel="attn,residual"),
    "gptneox": _Spec(rms=False),
    "command-r": _Spec(rms=False, parallel="residual,attn"),
    "plamo": _Spec(parallel="attn,residual"),
    "stablelm": _Spec(rms=False),
    "refact": _Spec(rope=False),
    "olmo": _Spec(rms=False, norm_weight=False),
    "openelm": _Spec(residual_first=True),
    "plamo3": _Spec(post_attn="post_attention_norm", post_ffn="post_ffw_norm"),
    "cogvlm": _Spec(gather=False),
    # MoE layers (ffn_gate_inp) after leading dense ones, a shared expert added as it is
    "deepseek": _Spec(gating=1, norm_w=False),
    "bailingmoe": _Spec(gating=1),
    "dots1": _Spec(),
    "bailingmoe2": _Spec(),
    # MoE layers only, no shared expert
    "mellum": _Spec(gating=1, norm_w=True),
    "qwen3vlmoe": _Spec(gating=1, norm_w=True),
    "smallthinker": _Spec(norm_w=True, router_first=True),
    "ernie4_5-moe": _Spec(gating=1, norm_w=True),
    "minimax-m2": _Spec(norm_w=True, qk_norm_flat=True),
    "dbrx": _Spec(rms=False, gating=1, norm_w=True, ffn_norm="attn_output_norm"),
    "grok": _Spec(gating=1, norm_w=True, post_attn="attn_output_norm", post_ffn="post_ffw_norm"),
    "arctic": _Spec(gating=1, norm_w=True, arctic=True),
    "phimoe": _Spec(gating=1, norm_w=True, out_residual_first=True),
    "deepseek2-ocr": _Spec(),       # deepseek2.cpp's OCR attention (separate Q, K, V; no MLA)
    "minicpm3": _Spec(head_scale=True),     # low-rank Q and KV (_lora_qkv)
    "grovemoe": _Spec(gating=1, norm_w=True, grove=True),
    "mistral4": _Spec(mla=True, gather_after_norm=False),   # deepseek2.cpp's graph
    # graphs whose nextn (MTP) layers the trunk's graph leaves out (dense_replayable: the trunk only)
    "deepseek2": _Spec(mla=True),                             # src/models/deepseek2.cpp
    # deepseek2's absorbed MLA masked by the DSA lightning indexer's top-k (_Indexer): src/models/deepseek32.cpp,
    # glm-dsa.cpp (branch dsa)
    "deepseek32": _Spec(mla=True, dsa=True),
    "glm-dsa": _Spec(mla=True, dsa=True, gating_none=2),
    "glm4moe": _Spec(ffn_norm="post_attention_norm"),         # src/models/glm4-moe.cpp
    # sliding-window graphs (llm_graph_input_attn_kv_iswa)
    "exaone-moe": _Spec(rope_only="swa"),
    "cohere2moe": _Spec(rms=None, parallel="residual,attn", rope_only="swa,dense", gather_after_norm=True),
    "muse-glimmer": _Spec(rope_only="swa", embd_norm=True, attn_gate=True, post_attn="post_attention_norm",
                          post_ffn="post_ffw_norm", post_plain=True),
    # src/models/step35.cpp: a head-wise attention gate, sigmoid gating of the experts (the loader's default), a
    # shared expert, the rows gathered after the last layer (branch attn)
    "step35": _Spec(attn_gate=True, gate_heads=True, gating=2, gather_before_norm=True, dense_unused=True),
    # src/models/laguna.cpp: the attention gate's softplus, head-wise where the gate is n_head wide, sigmoid
    # gating (the loader's default), a shared expert added as it is (branch newarchs)
    "laguna": _Spec(attn_gate=True, gating=2),
    # src/models/afmoe.cpp: embeddings scaled, no RoPE every 4th layer, a sigmoid attention gate, norms after
    # attention (before the gather) and the FFN (branch newarchs)
    # src/models/dflash.cpp graph<false>: the draft's token graph (a text batch: no target features), no output
    # rows gathered, norms after attention and the FFN, the layer's output scaled (branch newarchs)
    "dflash": _Spec(gather=False, inp_embd=False, rope_factors=True, post_attn="post_attention_norm",
                    post_ffn="post_ffw_norm"),
    # src/models/minimax-m3.cpp: Q/K norms of the reshapes, SwiGLU-OAI experts and shared expert; with flash
    # attention its sparse attention (minimax_msa) past the leading dense layers (branch newarchs)
    "minimax-m3": _Spec(msa=True),
    # src/models/dots3note.cpp: absorbed MLA (its window layers over the SWA cache), k_pe RMS-normed, a head-wise
    # sigmoid gate (branch newarchs); its full layers' DSA indexer (_Indexer, branch dsa)
    "dots3note": _Spec(mla=True, dsa=True, attn_gate=True),
    "afmoe": _Spec(rope_only="step", embd_scale=True, attn_gate=True, post_attn="post_attention_norm",
                   post_attn_first=True, post_ffn="post_ffw_norm"),
}


def _graph(c: _Ctx, fa: bool, v_trans: bool) -> tuple[Graph, list]:
    g, T, E, p = c.g, c.T, c.E, c.p
    spec = _SPECS[p.arch]
    tokens = g.inp(4 * T)
    if spec.inp_embd:
        g.expand(g.inp(4 * E * T))           # inp_embd: a text batch never reads it, it is allocated
    cur = g.expand(g.op(4 * E * T, tokens, w=HOST_NAME))              # get_rows(token_embd)
    attn = _Attn(c, fa, v_trans)
    rf = next((t for t in p.other_tensors if t.name == "rope_freqs.weight"), None)
    if spec.rope_factors and rf is not None:
        c.rope_w = g.weight(c.dev[0], rf.n_bytes)          # created with layer 0 (llama_model loader), on its device
    mla = _Mla(c, attn, fa) if spec.mla else None
    indexer = _Indexer(c, mla) if spec.dsa and mla is not None else None
    # minimax-m3: MSA with flash attention and a stream per sequence (msa_enabled), else dense attention
    msa = Msa(c, attn) if spec.msa and fa and (c.config.n_seq_max == 1 or not c.config.kv_unified) else None
    lead = int(p.metadata.get(f"{p.arch}.leading_dense_block_count", 0))
    pos = g.inp(4 * T)
    out_ids = g.inp(4 * c.T_out)
    n_layer = p.n_layer
    rms = spec.rms if spec.rms is not None else \
        bool(float(p.metadata.get(f"{p.arch}.attention.layer_norm_rms_epsilon", 0.0)))
    if spec.embd_norm or spec.embd_scale:
        cur = g.op(cur.size, cur, inplace=True)                       # build_norm(inpL, none, none, RMS, -1)
    par_res = spec.par_res or bool(p.metadata.get(f"{p.arch}.use_parallel_residual", False))

    def norm(x: Tensor, il: int, lay: _Layer | None, name: str) -> Tensor:
        # (plamo3's post norms are named without ".weight": LLM_TENSOR_ATTN_POST_NORM, llama-arch.cpp)
        has_w = spec.norm_weight and (lay is None or lay.has(f"{name}.weight") or lay.has(name))
        bias = lay.has(f"{name}.bias") if lay is not None else f"{name}.bias" in out_names
        return _norm(c, x, il, rms=rms, bias=bias, weight=has_w)

    out_names = {t.name for t in p.output_tensors}
    for il in range(n_layer):
        lay = _Layer(p, il)
        last = il == n_layer - 1 and spec.gather and not spec.gather_after_norm and not spec.gather_before_norm
        d = c.dev[il]
        n_ff = _ffn_width(p, il)
        h = norm(cur, il, lay, "attn_norm")
        # Falcon-40B: attention reads a second norm of the layer input, the FFN the first (falcon.cpp)
        h_attn = norm(cur, il, lay, "attn_norm_2") if lay.has("attn_norm_2.weight") else h
        if indexer is not None and mla is not None:
            # the normed low-rank Q, read by the indexer and then by the attention
            qr = _norm(c, g.op(4 * lay.width("attn_q_a.weight") * T, h_attn, w=d), il, rms=True, bias=False)
            y = mla(h_attn, pos, il, lay, qr=qr, top_k=indexer(h_attn, qr, pos, il))
        elif mla is not None:
            y = mla(h_attn, pos, il, lay)
        elif msa is not None and il >= lead:
            q, k, v, _ = _qkv(c, h_attn, pos, il, lay, spec, rms)
            y = msa(h_attn, q, k, v, pos, il)
        else:
            q, k, v, fused = _qkv(c, h_attn, pos, il, lay, spec, rms)
            y = attn.attend(q, k, v, il, v_cont=fused)
        if spec.attn_gate:
            gate = g.op(4 * lay.width("attn_gate.weight") * T, h_attn, w=d)
            # * sigmoid(gate); a head-wise gate multiplies a 3-D reshape (a view: not in place, step35)
            heads = spec.gate_heads or lay.width("attn_gate.weight") == c.p.layers[il].n_head
            y = g.op(y.size, g.view(y) if heads else y, g.op(gate.size, gate, inplace=True), inplace=True)
        y = g.op(4 * E * T, y, w=d)                                     # wo
        if lay.has("attn_output.bias"):
            y = g.op(y.size, y, w=d, inplace=True)
        rows = 4 * E * c.T_out
        if spec.parallel:
            # the FFN reads the attention's norm; then ffn + the two others in the graph's order
            if last:
                y, cur, h = g.op(rows, y, out_ids), g.op(rows, cur, out_ids), g.op(rows, h, out_ids)
            ff = _moe_ffn(c, h, il, lay, spec) if lay.has("ffn_gate_inp.weight") else _ffn(c, h, il, lay, n_ff)
            first, second = (y, cur) if spec.parallel == "attn,residual" else (cur, y)
            cur = g.op(ff.size, g.op(ff.size, ff, first, inplace=True), second, inplace=True)
            continue
        if spec.post_plain:
            y = g.op(y.size, g.op(y.size, y, inplace=True), w=d, inplace=True)        # rms_norm, * attn_post_norm
        elif spec.post_attn_first:
            y = norm(y, il, lay, spec.post_attn)
        # smallthinker: the router's product of the layer's input (gathered with it in the last layer)
        router = g.op(4 * p.n_expert * T, cur, w=d) if spec.router_first else None
        if last:
            y, cur = g.op(rows, y, out_ids), g.op(rows, cur, out_ids)
            if router is not None:
                router = g.op(4 * p.n_expert * c.T_out, router, out_ids)
            if not lay.has(f"{spec.ffn_norm}.weight"):
                h = g.op(rows, h, out_ids)
        if spec.post_attn and not spec.post_plain and not spec.post_attn_first:
            y = norm(y, il, lay, spec.post_attn)
        if par_res:
            ff = _ffn(c, norm(cur, il, lay, "ffn_norm"), il, lay, n_ff)
            cur = g.op(ff.size, g.op(ff.size, ff, cur, inplace=True), y, inplace=True)
            continue
        ffn_inp = g.op(y.size, cur, y, inplace=True) if spec.residual_first else g.op(y.size, y, cur, inplace=True)
        if spec.arctic:
            # src/models/arctic.cpp: ffn_out = ffn(norm(ffn_inp)) + ffn_inp; moe(norm_exps(inpSA)) + ffn_out
            ffn_out = g.op(ffn_inp.size, _ffn(c, norm(ffn_inp, il, lay, "ffn_norm"), il, lay, n_ff), ffn_inp,
                           inplace=True)
            moe = _moe_ffn(c, norm(cur, il, lay, "ffn_norm_exps"), il, lay, spec)
            cur = g.op(moe.size, moe, ffn_out, inplace=True)
            continue
        # stablelm without ffn_norm: the FFN reads the attention's norm
        has_norm = lay.has(f"{spec.ffn_norm}.weight") or not spec.norm_weight
        ffn_in = norm(ffn_inp, il, lay, spec.ffn_norm) if has_norm else h
        if lay.has("ffn_gate_inp.weight") and spec.grove:
            ff = _grove_moe(c, ffn_in, il, lay, spec)
        elif lay.has("ffn_gate_inp.weight"):
            ff = _moe_ffn(c, ffn_in, il, lay, spec, router)
            if lay.has("ffn_up.weight") and not spec.dense_unused:
                # grok: a dense FFN beside the experts, (ffn + moe) * sqrt(2) / 2
                ff = g.op(ff.size, g.op(ff.size, _ffn(c, ffn_in, il, lay, n_ff), ff, inplace=True), inplace=True)
        else:
            ff = _ffn(c, ffn_in, il, lay, n_ff)
        if spec.post_plain:
            ff = g.op(ff.size, g.op(ff.size, ff, inplace=True), w=c.ffn_dev[il], inplace=True)
        elif spec.post_ffn:
            ff = norm(ff, il, lay, spec.post_ffn)
        cur = g.op(ff.size, ffn_inp, ff, inplace=True) if spec.out_residual_first else \
            g.op(ff.size, ff, ffn_inp, inplace=True)
        if lay.has("layer_output_scale.weight"):
            cur = g.op(cur.size, cur, w=d, inplace=True)               # * out_scale (dflash)
    if spec.gather_before_norm and n_layer:
        cur.out = True
        cur = g.op(4 * E * c.T_out, cur, out_ids)
    h = norm(cur, -1, None, "output_norm") if n_layer else cur
    # result_norm (t_embd), and t_h_nextn where the graph sets it, are outputs (llm_graph_result::set_outputs):
    # never reused in place, never freed
    h.out = True
    if spec.gather_after_norm:
        h = g.op(4 * E * c.T_out, h, out_ids)
        h.out = True
    if spec.head_scale:
        h = g.op(h.size, h, inplace=True)
    g.expand(g.op(4 * p.n_vocab * (c.T_out if spec.gather else T), h, w=c.dev[n_layer], out=True))  # result_output
    return g, [(n, d) for n, d in attn.fa_nodes if n is not None]


def _moe_ffn(c: _Ctx, h: Tensor, il: int, lay: _Layer, spec: _Spec, logits: Tensor | None = None) -> Tensor:
    """build_moe_ffn with the hyperparameters the loader reads (llama_model_*::load_arch_hparams), and the
    shared expert's build_ffn added to its output (src/models/deepseek.cpp, dots1.cpp, bailingmoe*.cpp, ...)."""
    md, arch = c.p.metadata, c.p.arch
    scale = float(md.get(f"{arch}.expert_weights_scale", 0.0))
    norm_w = spec.norm_w if spec.norm_w is not None else bool(md.get(f"{arch}.expert_weights_norm", False))
    gating = spec.gating or int(md.get(f"{arch}.expert_gating_func", spec.gating_none or 1))
    return _moe(c, h, il, gating=gating or spec.gating_none,
                probs_bias=lay.has("exp_probs_b.bias"), norm_w=norm_w, scale=scale not in (0.0, 1.0),
                n_ff=lay.width("ffn_up_exps.weight"),
                shared=lay.width("ffn_up_shexp.weight") if lay.has("ffn_up_shexp.weight") else 0, shared_gate=False,
                logits=logits, gated=lay.has("ffn_gate_exps.weight"))


def _grove_moe(c: _Ctx, h: Tensor, il: int, lay: _Layer, spec: _Spec) -> Tensor:
    """src/models/grovemoe.cpp: one router product, build_moe_ffn over the experts, then over the chunk experts
    (n_expert / n_group_experts of them) of that output, which is added scaled (in place)."""
    g, p = c.g, c.p
    md, arch = p.metadata, p.arch
    logits = g.op(4 * p.n_expert * (h.size // (4 * c.E)), h, w=c.dev[il])
    scale = float(md.get(f"{arch}.expert_weights_scale", 0.0)) not in (0.0, 1.0)
    out = _moe(c, h, il, gating=1, norm_w=True, scale=scale, n_ff=lay.width("ffn_up_exps.weight"), logits=logits,
               grove=True)
    n_chunk = p.n_expert // max(1, int(md.get(f"{arch}.experts_per_group", 1)))
    ch = _moe(c, out, il, gating=1, norm_w=True, scale=scale, n_ff=lay.width("ffn_up_chexps.weight"), logits=logits,
              grove=True, n_used=min(p.n_expert_used, n_chunk), remap=n_chunk != p.n_expert)
    return g.op(out.size, out, g.op(ch.size, ch, inplace=True), inplace=True)


def _ffn_width(p: ModelProfile, il: int) -> int:
    """The FFN's width as ffn_down reads it (qwen's loader makes it n_ff / 2: src/models/qwen.cpp)."""
    for t in p.layers[il].tensors:
        if t.name.endswith(".ffn_down.weight") and len(t.shape) >= 2:
            return int(t.shape[0])
    return p.n_ff


def dense_compute_bytes(profile: ModelProfile, config: SplitConfig, layer_devices: list[str],
                        names: list[str], *, T: int, n_seqs: int, T_out: int, n_copies: int,
                        pin_norm: bool, ffn_devices: list[str] | None = None,
                        ffn_moved: tuple[tuple[int, str, str], ...] | None = None) -> dict[str, int]:
    """Compute buffer bytes of every backend in `names` for a `dense_replayable` profile (`ffn_devices`: where
    tensor overrides put each layer's FFN weights, its experts for MoE; `ffn_moved`: each FFN weight an override
    moved, its product run where it is), remembered per profile and arguments: a 60-layer graph takes
    14-27 ms to replay (dense to MoE; measured at load 4.3)."""
    return replay_compute_bytes(_graph, profile, config, layer_devices, names, T=T, n_seqs=n_seqs, T_out=T_out,
                                n_copies=n_copies, pin_norm=pin_norm, ffn_devices=ffn_devices, ffn_moved=ffn_moved)


@per_profile
def dense_replayable(profile: ModelProfile) -> bool:
    """Whether `profile`'s compute buffers are replayed here: a graph of DENSE_GRAPHS, every layer with attention
    (Q, K, V products or a fused one: no MLA) and a KV cache, and the tensor list read from the file (attention
    and FFN weights). smallthinker with a sliding window skips RoPE every n_no_rope_layer_step layers: not built."""
    if profile.arch not in _SPECS or not profile.layers or (profile.arch == "smallthinker" and profile.n_swa):
        return False
    if int(profile.metadata.get(f"{profile.arch}.n_deepstack_layers", 0)):
        return False           # qwen3vlmoe's deepstack adds (a wider inp_embd) are not built here
    if profile.n_nextn or not _is_trunk(profile):
        return False           # MTP layers (placement.mtp) run a graph of their own, not built here
    indexer = (f"{profile.arch}.attention.indexer.{k}" for k in ("key_length", "head_count", "top_k"))
    if _SPECS[profile.arch].dsa and (dsa_full_layers(profile) is None or not all(k in profile.metadata
                                                                                 for k in indexer)):
        return False           # GLM 5.2's default indexer pattern (not read here), or no indexer
    # an MLA layer (a K-only cache) is built as absorbed MLA (attn_k_b, attn_v_b), not the older graph with attn_kv_b
    return all(layer.has_kv and not layer.is_recurrent
               and any(t.name.endswith((".ffn_down.weight", ".ffn_down_exps.weight")) for t in layer.tensors)
               and any(t.name.endswith((".attn_qkv.weight", ".attn_q.weight", ".attn_q_a.weight", ".attn_k_b.weight"))
                       for t in layer.tensors)
               and (layer.has_v or any(t.name.endswith(".attn_k_b.weight") for t in layer.tensors))
               for layer in profile.layers)


def _is_trunk(profile: ModelProfile) -> bool:
    """Whether `profile` is the graph llm_build_* runs with MTP off: every layer when the file has no nextn
    layers, else its first n_layer() (ModelProfile.trunk; the nextn layers run graph_mtp, e.g.
    src/models/glm4-moe.cpp, in a context of their own: placement.mtp)."""
    md, arch = profile.metadata, profile.arch
    nextn = int(md.get(f"{arch}.nextn_predict_layers", 0))
    return not nextn or profile.n_layer == int(md.get(f"{arch}.block_count", 0)) - nextn


DENSE_GRAPHS = frozenset(_SPECS)
