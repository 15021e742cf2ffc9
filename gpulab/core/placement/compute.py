"""Compute buffers: the scratch memory llama.cpp's scheduler reserves on each backend.

llama.cpp sizes them in `llama_context::sched_reserve` (src/llama-context.cpp): it builds the
worst-case prompt graph (`graph_reserve`: n_tokens = min(n_ctx, n_ubatch) tokens, every one an
output), splits it across the backends (`ggml_backend_sched_split_graph`,
ggml/src/ggml-backend.cpp) and lets ggml-alloc (`ggml_gallocr_reserve_n`, ggml/src/ggml-alloc.c)
place every intermediate tensor in one buffer per backend: a tensor is freed after its last
use, freed ranges are reused best-fit, and RMS_NORM/MUL/ADD/SOFT_MAX/ROPE... write into their
input when it has no other user. The `sched_reserve: <buffer> compute buffer size` line is the
high-water mark of that buffer.

The high-water mark is reached at one of a few moments of one layer, and it is the same
whether a backend holds 2 or 40 layers (the layers repeat), so the model is a handful of closed
forms per backend: "what is live, plus the holes ggml-alloc leaves below it, when the biggest
tensor of that phase is allocated". In units of T = n_tokens rows:

  ffn      gate, up and the GLU output, [n_ff, T] f32 each (llm_graph_context::build_ffn), or
           the MoE up/gate/GLU [n_ff_exp, n_expert_used, T] and expert outputs
           [n_embd, n_expert_used, T] (build_moe_ffn)
  attn     without flash attention: KQ = [n_kv, T, n_head] f32 (build_attn_mha), the term that
           grows with n_ctx * n_ubatch * n_head; with flash attention only Q before/after RoPE
  output   the logits [n_vocab, T] f32 and the normed hidden state, on the output layer's
           backend (exactly 4 * T * (n_vocab + n_embd) when that backend holds nothing else)

on top of what a backend keeps for the whole graph: its copies of the graph inputs
(`llm_graph_input_*`: KQ mask, positions, KV row indices, output ids), and on the host the
inputs themselves. "Row sets" below are [n_embd, T] f32 tensors (the residual stream, norms,
attention output): the holes ggml-alloc leaves are counted in those.

With pipeline parallelism (`ggml_backend_sched_new(..., parallel=true)`: several devices, the
whole model offloaded) the scheduler keeps GGML_SCHED_MAX_COPIES = 4 copies of every graph and
split input, none of them ever freed.

How it was derived: a Python replay of the scheduler's split pass and of ggml-alloc over the
llama, gemma2/gemma3 (sliding window), qwen3moe and Mixtral-style graphs (too slow to run per
plan, so not part of gpulab) matched every buffer llama.cpp logged in the calibration runs to
the byte; these closed forms stay within 10% of that replay for 99.9% of backends over the
shapes of Llama 2/3, Qwen2.5, Phi-3, SmolLM2, Gemma 2/3, Mixtral and Qwen3-30B-A3B (max 10.3%).
bench/compute_calibration.py measures them against real llama.cpp (RPC devices). The rules of the other
graphs (MLA: compute_mla; shared experts, dense layers in MoE models: compute_moe; norms after attention
and the FFN, RoPE-less layers, outputs gathered after the last layer, attention beside the FFN) were read
from ggml-alloc's layout of llama.cpp's own graph per device (bench/compute_trace.py: each tensor's
offset in the compute buffer through the scheduler's eval callback) on the architecture matrix
(tests/integration/test_arch_matrix_vs_llama.py). So were the variants of the older dense graphs, keyed on the
profile's tensors: an FFN without a gate (one [n_ff, T] tensor, not three), a LayerNorm output norm (not in
place), a fused QKV product (what it leaves below KQ, and flash attention reading Q as its view), learned
position embeddings, and the dense FFN's width as ffn_down reads it; and (round 3) sliding-window-only models, an
expert count without experts, experts without a gate, a GLU output in the norm's range, a residual-first add, a
row set between attention and its projection, the output product on the host, a skip connection, copied logits.

Recurrent graphs (mamba2, lfm2, qwen3next) are replayed op by op instead (gpulab.core.placement.recurrent):
their layers leave the buffer unlike each other; so are hrm_text, gemma4 and gemma3n (placement.hrm, .gemma4,
.gemma3n), whose graphs differ from llama's in every phase. Not modelled: op offload (CUDA, with layers on the host and
n_ubatch >= 32, runs the host layers' matrix products on the first GPU and copies their weights into its
compute buffer), split_mode row, KV cache not offloaded (-nkvo), the recurrent layers of other hybrids (no
KV): these are treated like a layer split of attention layers.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from itertools import accumulate, groupby

from ..config import SplitConfig
from ..devices import HOST_NAME
from ..profile import ModelProfile
from .compute_encoder import encoder_compute_bytes, encoder_replayable
from .compute_mla import after_two_moe, mla_geom, mla_host_peaks, mla_peaks
from .compute_moe import moe_flags, moe_then_layer, output_in_dense_hole, router_bytes, shared_expert_peaks
from .dense import dense_compute_bytes, dense_replayable
from .gemma3n import gemma3n_compute_bytes, gemma3n_replayable
from .gemma4 import gemma4_compute_bytes, gemma4_replayable
from .granite_switch import switch_compute_bytes, switch_replayable
from .hrm import hrm_compute_bytes, hrm_replayable
from .hy_v4 import hy_v4_compute_bytes, hy_v4_replayable
from .kda import kda_compute_bytes, kda_replayable
from .recurrent import recurrent_compute_bytes, replayable

__all__ = ["estimate_compute_bytes", "compute_tokens", "pipeline_copies", "SCHED_MAX_COPIES", "dry_run_extra_bytes",
           "replay_for"]

SCHED_MAX_COPIES = 4          # GGML_SCHED_MAX_COPIES (ggml-backend.cpp)
_ALIGN = 32                   # TENSOR_ALIGNMENT: CPU and RPC buffers (CUDA pads to 128)


def _pad(x: int, n: int) -> int:
    return (x + n - 1) // n * n


def _a(nbytes: int) -> int:
    """ggml_dyn_tallocr_alloc pads every tensor to the buffer's alignment."""
    return (nbytes + _ALIGN - 1) // _ALIGN * _ALIGN


@dataclass(frozen=True)
class _Geom:
    """Per-profile constants (elements per token), computed once per profile."""
    n_embd: int
    n_vocab: int
    n_ff: int                    # dense FFN width
    q: int                       # widest n_head * n_embd_head_k: Q and the attention output
    kv: int                      # widest n_head_kv * n_embd_head_k: K and V of the ubatch
    n_head: int                  # most heads: KQ has n_kv * n_head values per token
    v_gqa_max: int               # n_embd_v_gqa_max: the transposed-V row indices per token
    moe: bool
    n_expert_used: int
    n_ff_exp: int                # expert FFN width
    swa: tuple[bool, ...]        # per layer: uses the sliding-window KV cache
    swa_prefix: tuple[int, ...]  # swa_prefix[i] = sliding-window layers among layers 0..i-1
    has_swa: bool
    # attn_prefix[i] = layers with attention (a KV cache) among layers 0..i-1; None when every layer has one
    attn_prefix: tuple[int, ...] | None = None
    # nope_prefix[i] = layers without RoPE among layers 0..i-1 (smollm3: every 4th, src/models/smollm3.cpp)
    nope_prefix: tuple[int, ...] | None = None


_GEOM: dict[int, tuple[weakref.ref, _Geom]] = {}
# hparams.n_no_rope_layer_step where the model's graph skips RoPE on every n-th layer (llama_model_smollm3)
_NO_ROPE_STEP = {"smollm3": 4}


def _no_rope_step(profile: ModelProfile) -> int:
    """Every how many layers the graph skips RoPE (0: never). Baichuan ropes only its 7B (32 layers,
    LLM_TYPE_7B; src/models/baichuan.cpp): 13B uses ALiBi, other sizes neither."""
    if profile.arch == "baichuan":
        return 0 if profile.n_layer == 32 else 1
    return _NO_ROPE_STEP.get(profile.arch, 0)
# graphs with their norms after attention and the FFN, none before (src/models/olmo2.cpp, exaone4.cpp)
_POST_NORM = frozenset({"olmo2", "exaone4"})
# graphs that run attention and the FFN side by side on the same normed input (src/models/cohere2.cpp)
_PARALLEL = frozenset({"cohere2", "phi2", "falcon"})
# ... of those, the graphs that add attention and FFN outputs first and the residual last (src/models/phi2.cpp,
# falcon.cpp; cohere2 adds the residual first): after the host, all three operands come over (phi2's trace,
# bench/compute_trace.py, -ngl 4), the third one's range a hole under the next layer's FFN
_SUM_THEN_RESIDUAL = frozenset({"phi2", "falcon"})
# graphs with norms after attention and the FFN besides those before (src/models/gemma2.cpp, gemma3.cpp):
# the device of the last layer and the output keeps the hole below the FFN
_SANDWICH = frozenset({"gemma2", "gemma3"})
# graphs that gather the output rows (inp_out_ids) after the last layer, not inside it (src/models/openai-moe.cpp):
# the last layer is a whole layer, and the gathered rows are one row set more below the logits
_GATHER_AFTER = frozenset({"gpt-oss"})
# graphs whose every layer adds a scaled copy of the normed input embeddings (src/models/talkie.cpp: embd_skip): that
# row set stays live through the whole graph on every device holding layers
_EMBD_SKIP = frozenset({"talkie"})


def _weightless_norms(profile: ModelProfile) -> bool:
    """The layers' norms carry no weight (talkie's build_norm(inpL, nullptr, ...)): build_norm names only a norm
    with a weight "norm" (src/llama-graph.cpp), so llama_context::graph_get_cb pins none of them to the layer's
    device and the device before computes the first one and sends it, as with layers on the host."""
    return bool(profile.layers) and profile.arch in _EMBD_SKIP and not any(
        t.name.endswith(".attn_norm.weight") for t in profile.layers[0].tensors)


# graphs that make one more row set between attention and its output projection: a per-head gate computed from the
# attention's input norm, which stays live through attention (src/models/spark2-5.cpp: wqkv_gate), or a
# norm of the attention output (src/models/bitnet.cpp: attn_sub_norm, not in place over the reshaped output). A
# quantized V cache then closes no hole below the FFN (-ts 1,1,1 q4_0); after host layers that row set leaves no room
# below the FFN, and the model's last layer gathers its rows into its range (-ngl 4). Measured: bench/compute_trace.py
_ATTN_OUT_EXTRA = frozenset({"spark2_5", "bitnet"})
# ... of those, the graphs whose attention output projection takes the attention output's range back, right above
# the residual: on the host no hole is left below the FFN (bitnet -ngl 4)
_ATTN_OUT_BACK = frozenset({"bitnet"})


# graphs whose output product reads the token embeddings, not an output tensor of the output layer
_OUTPUT_READS_TOKEN_EMBD = frozenset({"bitnet"})


# graphs that overwrite a range of the logits after the output product: how many values (src/models/chameleon.cpp:
# img_token_end_idx - img_token_start_idx)
_IMAGE_LOGITS_SUPPRESSED = {"chameleon": 8196 - 4}
# graphs whose closing residual add reads the residual first (src/models/phi3.cpp: ggml_add(ctx0, residual, cur)):
# l_out is written in place over ffn_inp, not over ffn_out, and the last layer's gathered residual then leaves
# a row set's hole below its FFN on the device of the output (bench/compute_trace.py, phi3 -ts 1,1)
_RESIDUAL_FIRST = frozenset({"phi3"})


def _has_experts(profile: ModelProfile) -> bool:
    """The graph runs build_moe_ffn: expert tensors, not only an expert count. llama_model::load_hparams reads
    expert_count for every architecture, but phi3's and ernie4_5's graphs (src/models/phi3.cpp, ernie4-5.cpp)
    build a dense FFN where their loaders created no expert tensors (phi3 with n_expert 8: dense)."""
    if any(layer.is_recurrent for layer in profile.layers):
        # a hybrid not replayed (jamba) keeps MoE sizing: the error it states was measured with it
        return profile.n_expert > 0
    return profile.n_expert > 0 and any(t.is_expert for layer in profile.layers for t in layer.tensors)


def _ungated_ffn(profile: ModelProfile) -> bool:
    """Every layer's dense FFN is up and down only: no ffn_gate, and ffn_up as wide as ffn_down reads (not
    phi3's fused gate+up). build_ffn (src/llama-graph.cpp) then keeps one [n_ff, T] tensor live: ffn_up,
    its bias add and its activation (GELU, RELU_SQR's relu and sqr, apertus' xielu) are ops that
    ggml-alloc runs in place (ggml_op_can_inplace: ADD, UNARY, SQR), where llama's gate, up and GLU output
    are three (src/models/starcoder2.cpp, nemotron.cpp, arcee.cpp, jais2.cpp, codeshell.cpp, apertus.cpp)."""
    if _has_experts(profile) or any(layer.is_recurrent for layer in profile.layers):
        # a hybrid not replayed (nemotron_h) keeps llama's sizing: its recurrent layers are not modelled, and
        # the error it states was measured with that sizing
        return False
    seen = False
    for layer in profile.layers:
        up = down = None
        for t in layer.tensors:
            kind = t.name.split(".")[-2] if t.name.count(".") >= 2 else ""
            if kind == "ffn_gate":
                return False
            if kind == "ffn_up" and t.name.endswith(".weight"):
                up = t
            elif kind == "ffn_down" and t.name.endswith(".weight"):
                down = t
        if up is None or down is None:
            continue
        if len(up.shape) < 2 or up.shape[1] != down.shape[0]:
            return False
        seen = True
    return seen


# LayerNorm output norms whose bias a checkpoint may leave out (mpt: output_norm_b TENSOR_NOT_REQUIRED,
# src/models/mpt.cpp)
_LAYER_NORM_NO_BIAS = frozenset({"mpt"})


def _dense_ff(profile: ModelProfile) -> int:
    """The dense FFN's width as the graph sees it: what ffn_down reads (its ne0), the widest layer's.
    qwen's loader makes its FFN n_ff / 2 wide (src/models/qwen.cpp: ffn_gate {n_embd, n_ff / 2}), so
    feed_forward_length is not it there. Only a layer whose ffn_up agrees (as wide, or twice: a fused gate+up)
    counts; a profile without them (hand-built, placeholder shapes): feed_forward_length."""
    widths = []
    for layer in profile.layers:
        shapes = {t.name.rsplit(".", 2)[-2]: t.shape for t in layer.tensors
                  if t.name.endswith((".ffn_down.weight", ".ffn_up.weight")) and len(t.shape) >= 2}
        if "ffn_down" in shapes and "ffn_up" in shapes:
            w = shapes["ffn_down"][0]
            if shapes["ffn_up"][1] in (w, 2 * w):
                widths.append(w)
    return max(widths, default=profile.n_ff)


def _norm_out_of_place(profile: ModelProfile) -> bool:
    """The output norm is a LayerNorm (build_norm with LLM_NORM, src/llama-graph.cpp: ggml_norm, then the
    weight's MUL and the bias' ADD): GGML_OP_NORM is not among the ops ggml-alloc runs in place
    (ggml_op_can_inplace, ggml/src/ggml-alloc.c), so result_norm is a new row set beside the last layer's
    output, where llama's RMS_NORM overwrites it. llama.cpp's loaders create output_norm.bias only for these
    graphs (src/models/starcoder2.cpp, nemotron.cpp, codeshell.cpp, jais2.cpp, ...)."""
    return profile.arch in _LAYER_NORM_NO_BIAS or any(t.name == "output_norm.bias" for t in profile.output_tensors)


# graphs without RoPE (ALiBi or learned positions: src/models/bloom.cpp, mpt.cpp, jais.cpp, starcoder.cpp,
# gpt2.cpp, refact.cpp call no ggml_rope_ext): Q stays a view of a fused QKV product
_NO_ROPE = frozenset({"bloom", "mpt", "jais", "starcoder", "gpt2", "refact"})


def _fused_qkv_width(profile: ModelProfile) -> int:
    """Values per token of the widest fused QKV product (attn_qkv, [n_embd_q + 2 n_embd_k, T]); 0: separate Q/K/V."""
    return max((t.shape[1] for layer in profile.layers for t in layer.tensors
                if t.name.endswith(".attn_qkv.weight") and len(t.shape) >= 2), default=0)


def _below_kq_fused(profile: ModelProfile, e: int, q: int, T: int, quant_k: bool) -> int | None:
    """What lies below KQ (flash attention off) in a layer with a fused QKV projection (build_qkv's fused path,
    src/llama-graph.cpp: Q, K, V are views of one product), None for separate Q/K/V. The product sits above the
    residual and the norm's range (which Q or its RoPE reuses) and is freed after its last view is read: with a
    quantized K cache Q's Hadamard rotation (attn_inp_k_rot) lands above it, so it stays; with an f16 K cache
    a RoPE'd Q and K were copied out of it and KQ reuses its range, but ALiBi's Q (no RoPE) is read by KQ
    itself (_NO_ROPE). Measured on RPC devices, n_embd 1024 (bloom, mpt, gptneox, qwen; bench/compute_trace.py)."""
    width = _fused_qkv_width(profile)
    if not width:
        return None
    qkv = _a(4 * width * T)
    if quant_k:
        return 2 * e + qkv + q
    return 2 * e + (qkv if profile.arch in _NO_ROPE else 0)


def _fa_reads_qkv(profile: ModelProfile, fa: bool) -> bool:
    """Flash attention reads Q as a view of the fused QKV product (no RoPE, _NO_ROPE): the product is still live
    when the attention output is made, which takes the attention norm's freed range, and the output projection
    then lands where the product was, above the device's input copies; the residual add (ffn_inp) writes in
    place there. So a layer after the host's two operands gets no room for ffn_inp below the inputs (one row
    set more under the FFN), and the model's last layer has its ffn_inp at the bottom rather than above its
    input copies. Measured: bloom, mpt, jais on RPC devices, -ngl 4 over 3 devices (bench/compute_trace.py)."""
    return fa and profile.arch in _NO_ROPE and _fused_qkv_width(profile) > 0


def _learned_positions(profile: ModelProfile) -> bool:
    """The input is token plus learned position embeddings (position_embd: src/models/starcoder.cpp, gpt2.cpp):
    the host gathers both rows ([n_embd, T] f32 each) and, pipelined with no layer on the host, the add runs
    on the first device, which then receives both (GGML_SCHED_MAX_COPIES times). Measured on RPC devices."""
    return any(t.name.startswith("position_embd.") for t in profile.input_tensors)


def _geom(profile: ModelProfile) -> _Geom:
    hit = _GEOM.get(id(profile))
    if hit is not None and hit[0]() is profile:
        return hit[1]
    layers = profile.layers
    n_ff_exp = 0
    for layer in layers:        # ffn_{up,gate}_exps: ggml shape (n_embd, n_ff_exp, n_expert)
        n_ff_exp = max((t.shape[1] for t in layer.tensors
                        if t.is_expert and ("up_exps" in t.name or "gate_exps" in t.name) and len(t.shape) >= 2),
                       default=0)
        if n_ff_exp:
            break
    moe = _has_experts(profile)
    step = _no_rope_step(profile)
    swa = tuple(bool(layer.is_swa) for layer in layers)
    g = _Geom(
        n_embd=profile.n_embd, n_vocab=profile.n_vocab, n_ff=_dense_ff(profile),
        q=max((layer.n_head * layer.n_embd_head_k for layer in layers), default=profile.n_embd),
        kv=max((layer.n_head_kv * layer.n_embd_head_k for layer in layers), default=profile.n_embd),
        n_head=max((layer.n_head for layer in layers), default=1),
        v_gqa_max=profile.max_n_embd_v_gqa,
        moe=moe, n_expert_used=max(profile.n_expert_used, 1) if moe else 0,
        n_ff_exp=n_ff_exp or profile.n_ff,
        swa=swa, swa_prefix=(0, *accumulate(int(x) for x in swa)),
        has_swa=any(swa) and profile.n_swa > 0,
        # recurrent (hybrid) models: a device may hold no attention layer at all
        attn_prefix=(0, *accumulate(int(layer.has_kv) for layer in layers))
        if any(layer.is_recurrent for layer in layers) else None,
        nope_prefix=(0, *accumulate(int((i + 1) % step == 0) for i in range(len(layers)))) if step else None)
    key = id(profile)
    _GEOM[key] = (weakref.ref(profile, lambda _r: _GEOM.pop(key, None)), g)
    return g


def _rot_bytes(heads: set[int], quantized: bool, k: bool) -> int:
    """One KV cache's Hadamard rotation input (attn_inp_k_rot / attn_inp_v_rot, [nrot, nrot] f32).

    llama_kv_cache ctor (src/llama-kv-cache.cpp): attn_rot_k / attn_rot_v when that cache is quantized
    and every one of its layers has the same head size, a multiple of 64; build_input_k_rot takes the
    largest power of two >= 64 dividing the head size, build_input_v_rot always 64."""
    if not quantized or len(heads) != 1:
        return 0
    head = next(iter(heads))
    if head <= 0 or head % 64:
        return 0
    nrot = 64
    if k:
        while head % (nrot * 2) == 0:
            nrot *= 2
    return _a(4 * nrot * nrot)


def _rot_inputs(profile: ModelProfile, config: SplitConfig, g: _Geom) -> tuple[int, int]:
    """Bytes of the rotation inputs of the full-attention and the sliding-window cache: graph inputs
    like the KV mask (llm_graph_input_attn_kv(_iswa), build_attn_inp_kv*_impl in src/llama-graph.cpp), so
    held on the host and copied to every backend whose layers use that cache, GGML_SCHED_MAX_COPIES
    times when pipelining. Gemma 3 (head 256) with a q8_0 K cache: 256 KiB per cache, 2 MiB in all."""
    qk = config.type_k not in ("f32", "f16", "bf16")
    qv = config.type_v not in ("f32", "f16", "bf16")
    out = []
    for want_swa in (False, True):
        layers = [layer for i, layer in enumerate(profile.layers)
                  if layer.has_kv and (g.has_swa and g.swa[i]) == want_swa]
        out.append(_rot_bytes({layer.n_embd_head_k for layer in layers}, qk, True)
                   + _rot_bytes({layer.n_embd_head_v for layer in layers}, qv, False))
    return out[0], out[1]


def _mask_hole(fa: bool, swa: bool, mask: int, e: int, f: int, kvh: int) -> int:
    """What stays below the logits on the host when it runs the whole graph (-ngl 0): the KQ mask's
    range, freed after the last layer's attention (ggml_gallocr_free_node, ggml/src/ggml-alloc.c), is
    reused best-fit by the last layer's tensors, and the result_norm the logits read can end up above
    it instead of at the bottom. Measured, not derived (SmolLM2-135M on the host, -c 512..4096, -ub
    128..512; tests/integration/test_real_models_exact_vs_llama.py):
      flash attention off (f32 mask): one row set more once an FFN tensor fits in the mask's range, on
        a graph with one mask (Gemma 3 270M, with a sliding-window mask beside it, shows none);
      flash attention on (f16 mask): the mask and two row sets when the range holds a row set and the
        ubatch's K and V but not two row sets (seen at -c 2048 only)."""
    if not fa:
        return e if mask >= f and not swa else 0
    return mask + 2 * e if e + 2 * kvh <= mask < 2 * e else 0


def compute_tokens(config: SplitConfig) -> tuple[int, int, int]:
    """(n_tokens, n_seqs, n_ubatch) of the graph llama_context::sched_reserve reserves.

    llama_context ctor: n_batch capped at n_ctx (causal attention), n_ubatch at n_batch (see
    SplitConfig.effective_n_ubatch), then n_ctx padded to 256; sched_reserve: n_tokens = min(n_ctx, n_ubatch),
    n_seqs = n_seq_max; graph_reserve rounds n_tokens up to a multiple of n_seqs.
    """
    n_ctx = _pad(config.n_ctx, 256)
    n_ubatch = config.effective_n_ubatch
    n_seqs = max(1, config.n_seq_max)
    return _pad(min(n_ctx, n_ubatch), n_seqs), n_seqs, n_ubatch


def pipeline_copies(config: SplitConfig, layer_devices: list[str], n_devices: int) -> int:
    """Copies the scheduler keeps of every input: GGML_SCHED_MAX_COPIES when pipelining.

    llama_context ctor: pipeline parallelism needs more than one model device, every layer and
    the output offloaded (n_gpu_layers > n_layer), split_mode layer, KV offload, no tensor
    overrides, and async compute and events on every device (CUDA and RPC have both).
    """
    if (n_devices > 1 and config.split_mode == "layer" and config.offload_kqv
            and HOST_NAME not in layer_devices and not config.has_tensor_overrides):
        return SCHED_MAX_COPIES
    return 1


def dry_run_extra_bytes(profile: ModelProfile, config: SplitConfig, layer_devices: list[str],
                        names: list[str]) -> dict[str, int]:
    """What llama.cpp's `no_alloc` dry run (the measurement of common_fit_params, and of
    llama-fit-params -fitp) counts in a compute buffer beyond what a real load allocates.

    Measured, not derived: with pipeline parallelism, every offload device after the first that holds
    repeating layers holds
    GGML_SCHED_MAX_COPIES more [n_embd, n_tokens] f32 row sets in the dry run's breakdown than in the
    buffer a real load logs (RPC devices; dense and MoE, n_embd 512-1024, -ub 256/512, -fa on/off;
    tests/integration/test_fit_vs_llama.py). Nothing otherwise."""
    nc = pipeline_copies(config, layer_devices, len(names) - 1)
    if nc == 1:
        return {}
    T = compute_tokens(config)[0]
    e = _a(4 * profile.n_embd * T)
    first = layer_devices[0]
    # a device holding the output layer alone gets nothing more
    return {d: nc * e for d in dict.fromkeys(layer_devices[:profile.n_layer]) if d != first and d != HOST_NAME}


def replay_for(profile: ModelProfile, stray: frozenset[str] = frozenset(), ffn_parts: dict | None = None,
               ffn_moved: tuple | None = None) -> str | None:
    """Which op-by-op replay sizes `profile`'s compute buffers (None: the closed forms below), given
    estimate_compute_bytes' view of the tensor overrides: the dense replay runs FFN products where their
    weights are, not a product split from its FFN's other weights."""
    if encoder_replayable(profile):
        return "encoder"
    if hrm_replayable(profile):
        return "hrm"
    if gemma3n_replayable(profile):
        return "gemma3n"
    if gemma4_replayable(profile):
        return "gemma4"
    if kda_replayable(profile):
        return "kda"
    if replayable(profile):
        return "recurrent"
    if hy_v4_replayable(profile) and not stray and not ffn_parts:
        return "hy_v4"
    if switch_replayable(profile) and not stray and not ffn_parts:
        return "switch"
    if dense_replayable(profile) and (not stray and not ffn_parts or ffn_moved is not None):
        return "dense"
    return None


# hrm: passes of two weight stacks over cache slots; gemma3n: AltUp's copies of the hidden state, LAuReL,
# per-layer inputs; gemma4: per-layer inputs and norms around every phase
_OWN_GRAPHS = {"hrm": hrm_compute_bytes, "gemma3n": gemma3n_compute_bytes, "gemma4": gemma4_compute_bytes}


def estimate_compute_bytes(profile: ModelProfile, config: SplitConfig, layer_devices: list[str],
                           names: list[str], ffn_devices: list[str] | None = None,
                           stray: frozenset[str] = frozenset(),
                           ffn_parts: dict[str, frozenset[str]] | None = None,
                           ffn_moved: tuple[tuple[int, str, str], ...] | None = None,
                           n_outputs: int | None = None) -> dict[str, int]:
    """Bytes of the compute buffer of every backend in `names` (0 where nothing runs).

    `n_outputs`: llama_context_params.n_outputs_max where a program sets it (llama-server: its slots
    x (1 + the draft length), tools/server/server-context.cpp server_output_limits); None: n_batch,
    llama.cpp's default, so every token of the reserved ubatch is an output (graph_reserve gets
    min(n_tokens, n_outputs_max) outputs, llama_context::sched_reserve).

    `layer_devices` is the device of each layer 0..n_layer (the last entry is the output
    layer, 'CPU' the host); `names` the offload devices in llama.cpp's order, then 'CPU'.
    With tensor overrides: `ffn_devices` is where each layer's FFN weights are (an op runs where
    its weight is: ggml_backend_sched_backend_id_from_cur), `stray` the devices that got other
    weights of layers that are not theirs (an attention matrix moved alone), `ffn_parts` the
    devices that run some of a layer's FFN products but not its FFN (one expert tensor moved), and
    `ffn_moved` each FFN weight away from its layer as (layer, name, device) (placement.tensors.
    compute_sites; None where other weights moved too), whose products a replayed graph runs there.
    """
    g = _geom(profile)
    n_layer = profile.n_layer
    T, n_seqs, n_ubatch = compute_tokens(config)
    fa = config.flash_attn != "off"            # 'auto' resolves to on for CPU, CUDA and RPC
    nc = pipeline_copies(config, layer_devices, len(names) - 1)
    # llama_context::graph_get_cb pins each layer's "norm" to the layer's device when the
    # whole model is offloaded or the ubatch is small. Otherwise the scheduler computes a
    # device's first norm on the device before it, which then sends the norm and the residual.
    # (only a norm with a weight is named "norm": build_norm, src/llama-graph.cpp; talkie's weightless norms are not)
    pinned_norm = (HOST_NAME not in layer_devices or T < 32) and not _weightless_norms(profile)
    replay = replay_for(profile, stray, ffn_parts, ffn_moved)
    if replay == "encoder":
        # attention without a KV cache (embedding and diffusion models): replayed (placement.compute_encoder)
        return encoder_compute_bytes(profile, config, layer_devices, names, T=T, n_seqs=n_seqs,
                                     T_out=T if n_outputs is None else max(1, min(T, n_outputs)),
                                     n_copies=nc, pin_norm=pinned_norm, ffn_devices=ffn_devices)
    if replay in _OWN_GRAPHS:
        # graphs of one architecture each, replayed op by op (placement.hrm, gemma3n, gemma4)
        return _OWN_GRAPHS[replay](profile, config, layer_devices, names, T=T, n_seqs=n_seqs,
                                   T_out=T if n_outputs is None else max(1, min(T, n_outputs)), n_copies=nc,
                                   pin_norm=pinned_norm)
    if replay == "kda":
        # KDA/MLA hybrids and glm5-next: replayed (placement.kda)
        return kda_compute_bytes(profile, config, layer_devices, names, T=T, n_seqs=n_seqs,
                                 T_out=T if n_outputs is None else max(1, min(T, n_outputs)),
                                 n_copies=nc, pin_norm=pinned_norm, ffn_devices=ffn_devices, ffn_moved=ffn_moved)
    if replay == "recurrent":
        # a graph whose layers leave ggml-alloc's buffer unlike each other: replayed (placement.recurrent)
        return recurrent_compute_bytes(profile, config, layer_devices, names, T=T, n_seqs=n_seqs,
                                       T_out=T if n_outputs is None else max(1, min(T, n_outputs)),
                                       n_copies=nc, pin_norm=pinned_norm, ffn_devices=ffn_devices,
                                       ffn_moved=ffn_moved)
    if replay == "hy_v4":
        # hyper-connections around absorbed MLA and the FFN: replayed (placement.hy_v4)
        return hy_v4_compute_bytes(profile, config, layer_devices, names, T=T, n_seqs=n_seqs,
                                   T_out=T if n_outputs is None else max(1, min(T, n_outputs)),
                                   n_copies=nc, pin_norm=pinned_norm, ffn_devices=ffn_devices)
    if replay == "switch":
        # the router's attention and switched LoRA deltas on every product: replayed (placement.granite_switch)
        return switch_compute_bytes(profile, config, layer_devices, names, T=T, n_seqs=n_seqs,
                                    T_out=T if n_outputs is None else max(1, min(T, n_outputs)),
                                    n_copies=nc, pin_norm=pinned_norm, ffn_devices=ffn_devices)
    if replay == "dense":
        # an older dense graph, replayed op by op (placement.dense), each FFN product where its weight is
        return dense_compute_bytes(profile, config, layer_devices, names, T=T, n_seqs=n_seqs,
                                   T_out=T if n_outputs is None else max(1, min(T, n_outputs)),
                                   n_copies=nc, pin_norm=pinned_norm, ffn_devices=ffn_devices, ffn_moved=ffn_moved)

    # KV cells per stream (llama_context ctor: n_ctx_seq), and the sliding-window cache
    # (llama_kv_cache_iswa: pad(min(size_base, n_swa + n_ubatch), 256) unless --swa-full)
    n_stream = config.n_streams         # one stream with a unified cache (-kvu)
    n_kv = _pad(config.n_ctx, 256) if config.kv_unified else _pad(_pad(config.n_ctx, 256) // n_seqs, 256)
    n_kv_swa = n_kv
    if g.has_swa and not config.swa_full:
        n_kv_swa = min(n_kv, _pad(profile.n_swa * (config.n_seq_max if config.kv_unified else 1) + n_ubatch, 256))

    E = g.n_embd
    e = _a(4 * E * T)                  # a row set: [n_embd, T] f32
    # attention and the FFN both read the layer's norm and are summed at the end (cohere2): the attention
    # output stays live through the FFN, one row set more there
    par_e = e if profile.arch in _PARALLEL else 0
    sum_last = profile.arch in _SUM_THEN_RESIDUAL
    q = _a(4 * g.q * T)                # Q (before and after RoPE), the attention output
    kvh = _a(4 * g.kv * T)             # K or V of the ubatch
    f = _a(4 * g.n_ff * T)             # ffn_gate, ffn_up, the GLU output
    T_out = T if n_outputs is None else max(1, min(T, n_outputs))
    logits = _a(4 * g.n_vocab * T_out)  # result_output: min(n_tokens, n_outputs_max) rows
    # bitnet's output product reads token_embd itself (src/models/bitnet.cpp: build_lora_mm(model.tok_embd, cur)),
    # which stays in host memory: the scheduler runs it on the host, which receives result_norm and holds the logits
    host_logits = 0
    if profile.arch in _OUTPUT_READS_TOKEN_EMBD:
        host_logits, logits = logits, 0
    if profile.arch in _IMAGE_LOGITS_SUPPRESSED:
        # chameleon sets its image tokens' logits with ggml_set_1d, not in place: a second copy of the logits on
        # top of the first, and the 8192 -FLT_MAX values (img_logits, clamped in place) beside
        # (src/models/chameleon.cpp)
        logits = 2 * logits + _a(4 * _IMAGE_LOGITS_SUPPRESSED[profile.arch])
    # graph inputs (llm_graph_input_*): built on the host, copied to each backend that uses them
    tok = _a(4 * T)                    # inp_tokens (i32)
    pos = _a(4 * T)                    # inp_pos (i32)
    out_ids = _a(4 * T_out)            # inp_out_ids (i32): the model's last layer gathers these
    k_idxs = _a(8 * T)                 # attn_inp_k_idxs (i64): KV rows to store K in
    # attn_inp_v_idxs (i64): with a transposed V cache (no flash attention) one per element
    v_idxs = _a(8 * T * (1 if fa else g.v_gqa_max))
    mask_elt = 2 if fa else 4          # build_attn_inp_kq_mask: f16 for flash attention
    rot_full, rot_swa = _rot_inputs(profile, config, g)
    rot_k = _rot_inputs(profile, config.replace(type_v="f16"), g) != (0, 0)    # attn_rot_k on some cache
    mla = mla_geom(profile)
    if mla is not None:
        # MLA's K-only cache (build_attn_inp_k, src/llama-graph.cpp): K row indices and the mask, no V row
        # indices and no rotation inputs
        v_idxs = rot_full = 0
    mask = _a(n_kv * T * mask_elt)
    mask_swa = _a(n_kv_swa * T * mask_elt) if g.has_swa else 0
    # a KV kind no layer uses (every layer sliding-window: granite_swa, maple, step35...) has its inputs built
    # (build_attn_inp_kv_iswa) but no op reads them, so they are not in the graph and take no memory
    # (a graph with recurrent layers keeps them counted: the error it states was measured so, minimax-01)
    any_full = g.attn_prefix is not None or any(layer.has_kv and not (g.has_swa and g.swa[i])
                                                for i, layer in enumerate(profile.layers))
    kv_in_full = k_idxs + v_idxs + mask + rot_full if any_full else 0
    kv_in_swa = k_idxs + v_idxs + mask_swa + rot_swa if g.has_swa else 0
    all_inputs = pos + kv_in_full + kv_in_swa + out_ids
    # KQ of build_attn_mha: [n_kv, T / n_stream, n_head, n_stream] f32, one stream per sequence
    kq_full = _a(4 * n_kv * (T // n_stream) * g.n_head * n_stream)
    kq_swa = _a(4 * n_kv_swa * (T // n_stream) * g.n_head * n_stream)

    ungated = _ungated_ffn(profile)
    recurrent = any(layer.is_recurrent for layer in profile.layers)
    if g.moe:
        # build_moe_ffn: up, gate and GLU [n_ff_exp, n_expert_used, T]; the expert outputs
        # [n_embd, n_expert_used, T] reuse up's and gate's range if they fit, else go on top
        U = g.n_expert_used
        fe = _a(4 * g.n_ff_exp * U * T)
        fd = _a(4 * E * U * T)
        down_on_top = fd > 2 * fe
        ffn_big = 3 * fe + (fd if down_on_top else 0)
        mf = moe_flags(profile)
        # a GLU output no wider than a row set takes the FFN norm's range, freed once up has read it, and the
        # expert outputs take gate's and up's (maple, mimo2: 512-wide experts, two used, over n_embd 1024)
        # (not where a shared expert or grovemoe's chunk experts read the norm after the routed experts, nor in a
        # graph with recurrent layers, whose stated error was measured with llama's sizing)
        glu_in_norm = (mf.gated_experts and fe <= e and not down_on_top and not mf.shared and not recurrent
                       and not any("_chexps" in t.name for layer in profile.layers for t in layer.tensors))
        if glu_in_norm:
            ffn_big = 2 * fe
        if not mf.gated_experts and not recurrent:
            # no gate (granitemoe's optional ffn_gate_exps left out): up, its activation in place, and the expert
            # outputs on top while up is read (build_moe_ffn: cur = up; ggml_silu)
            ffn_big = fe + fd
        # row sets below the FFN: residual, norm, a hole, and the router's small tensors
        # (logits, argsort, weights) take one more when the expert outputs go on top
        ffn_slots = 3 * e + (e if down_on_top else 0)
        # the closing ops of a host layer (expert weighting, the sum over experts, the add)
        # run on the next device, which receives the expert outputs, weights and ffn_inp
        host_boundary = fd + _a(4 * U * T) + e
        # ... and puts the layer's small tensors (residual, norms, Q) and as many of up/gate
        # as fit into their range
        room = host_boundary - 2 * e - 2 * max(0, q - e)
        n_fit = min(2, max(0, room) // fe) if fe else 0
        # the expert outputs reuse up's and gate's range only where the two lie side by side: with
        # one of them in the host operands' range they do not (measured: RPC devices, n_embd 1024,
        # qwen3moe and gpt-oss, fd = 2 fe; issue 27)
        ffn_after_host = host_boundary + (3 - n_fit) * fe + (fd if down_on_top or (n_fit == 1 and fd > fe) else 0)
        if glu_in_norm:
            ffn_after_host = host_boundary + ffn_big    # gate and up above the host's operands (maple, -ngl 4)
        shx = mf.shared
        if shx:
            # the host layer's adds of the shared expert (and its gate) run on the next device (compute_moe)
            host_boundary = 3 * e
            ffn_after_host = host_boundary + ffn_big
        ffn_unit = fe
        part_out = {"gate": fe, "up": fe, "down": fd}
    else:
        ffn_big = f if ungated else 3 * f
        ffn_slots = 3 * e + par_e
        # ffn_out and ffn_inp of the host layer's closing add (or the three of _SUM_THEN_RESIDUAL's)
        host_boundary = 3 * e if sum_last else 2 * e
        ffn_after_host = 0
        shx = False
        mf = None
        ffn_unit = f
        part_out = {"gate": f, "up": f, "down": e}

    # One pass over the runs of layers (llama.cpp gives each device one contiguous run):
    # per device [n_layers, has full-attention layers, has SWA layers, device before it,
    #             full layers after its first, SWA layers after its first]
    stats: dict[str, list] = {}
    prev = None
    i = 0
    pre = g.swa_prefix
    nope_devs: set[str] = set()
    # no layer ropes (baichuan below 32 layers): Q is the product itself, one tensor less in every attention
    all_nope = _no_rope_step(profile) == 1
    for d, run in groupby(layer_devices[:n_layer]):
        n = len(list(run))
        n_swa = pre[i + n] - pre[i] if g.has_swa else 0
        n_swa_later = n_swa - (1 if g.has_swa and g.swa[i] else 0)
        n_attn = g.attn_prefix[i + n] - g.attn_prefix[i] if g.attn_prefix is not None else n
        if g.nope_prefix is not None and g.nope_prefix[i + n] > g.nope_prefix[i]:
            nope_devs.add(d)
        s = stats.get(d)
        if s is None:
            # a device of recurrent layers only has no attention inputs (mask, KV indices) and no KQ
            stats[d] = [n, n_swa < n_attn, n_swa > 0, prev, n - 1 - n_swa_later > 0 and n_attn > 0,
                        n_swa_later > 0]
        else:                           # not a llama.cpp placement; count it sensibly
            s[0] += n
            s[1] = s[4] = s[1] or n_swa < n
            s[2] = s[5] = s[2] or n_swa > 0
        prev = d
        i += n
    out_dev = layer_devices[n_layer]
    last_dev = layer_devices[n_layer - 1] if n_layer else out_dev
    offloaded = any(d != HOST_NAME for d in stats)

    out = dict.fromkeys(names, 0)
    router = router_bytes(profile.n_expert, g.n_expert_used, T, mf.router_rows) if mf is not None else 0
    # a shared-expert MoE layer's output lands above its expert outputs (compute_moe), but with flash attention
    # a Q wider than a row set (glm4moe) leaves a hole below that takes it every other layer
    high_out = shx and (not fa or q <= e)
    # ... on pipelined devices only: on one whose input copies are freed no such hole is left (glm4moe -sm none)
    high_out_np = shx
    # no norm before attention (the norms follow attention and the FFN: olmo2, exaone4): one row set
    # less below KQ, and no hole the quantized V cache closes below the FFN
    post = profile.arch in _POST_NORM
    # result_norm beside the last l_out; a parallel graph's freed attention output leaves a row set's hole
    # below, which takes it (phi2, falcon: the pipelined output device, arch matrix)
    norm_e = e if _norm_out_of_place(profile) and not par_e else 0
    qkv_view = _fa_reads_qkv(profile, fa)
    pos_e = e if _learned_positions(profile) else 0
    gather_after = profile.arch in _GATHER_AFTER
    post_e = e if post else 0
    skip_e = e if profile.arch in _EMBD_SKIP else 0
    attn_extra = profile.arch in _ATTN_OUT_EXTRA
    own_inputs: dict[str, int] = {}
    for name in names:
        s = stats.get(name)
        has_out = out_dev == name

        if name == HOST_NAME:
            # Graph inputs are allocated first. inp_embd (the embeddings input, which a text
            # batch never reads) is never freed; nor is an input copied to another backend
            # (the split graph keeps a view of it). embd = get_rows(token_embd) runs here.
            persist = nc * (tok + e + all_inputs)
            # the output product on the host (bitnet): result_norm's copies come in, the logits above them; an
            # embedding row set is freed for them, and without pipelining the inputs the devices copied too
            # (measured: -ts 1,1 and 3,1 pipelined; -sm none)
            out_here = (persist + nc * e if nc > 1 else tok + 2 * e) + host_logits if host_logits else 0
            if s is None:
                out[name] = max(persist + e + pos_e, out_here)     # the rows the first device's add reads stay
                continue
            persist += skip_e
            peaks = [persist + ffn_slots - (e if profile.arch in _ATTN_OUT_BACK else 0) + ffn_big, out_here]
            if not fa:
                peaks.append(persist + 3 * e + q + (kq_full if s[1] else kq_swa))
            if has_out:        # ngl 0: inputs only used here are freed after the last layer
                peaks.append(tok + e + (all_inputs if offloaded else 0) + e + _mask_hole(fa, g.has_swa, mask, e, f, kvh)
                             + logits)
            if mla is not None:
                peaks += mla_host_peaks(mla, T, persist=persist + e, n_layers=s[0], e=e, kq=0 if fa else kq_full,
                                        first_dense=not any(t.is_expert for t in profile.layers[0].tensors))
            if has_out and high_out and mf is not None and mla is None:
                # -ngl 0: the last shared-expert MoE layer's output above its expert outputs, the logits on top
                peaks += shared_expert_peaks(ffn_base=persist + 2 * e, fe=ffn_unit, fd=part_out["down"], e=e,
                                             offset=mf.output_offset(ffn_unit, part_out["down"]), kq=0,
                                             logits=logits, next_layer=False, has_out=True)
            if mf is not None and mla is None and fa and not mf.layer_moe[0]:
                # a leading dense layer: its FFN input above the embeddings and the freed attention output, gate
                # and up on it; the GLU output takes the range those two left where it fits (glm4moe)
                peaks.append(persist + 2 * e + q + (2 * f if e + q >= f else 3 * f))
            out[name] = max(peaks)
            continue

        if s is None:
            if has_out:
                # the output layer alone: the hidden state comes over, is normed in place,
                # and the logits go above it
                after_host = n_layer == 0 or layer_devices[n_layer - 1] == HOST_NAME
                # (with a shared expert the host's layer ends on the host: only the output norm's input comes
                # over; deepseek2 -sm none -ngl 2, where the MTP layer is the device's)
                if g.moe and after_host and nc == 1 and not shx:
                    out[name] = host_boundary + e + logits   # + the new sum over the experts
                else:
                    # a weightless output norm runs on the device before, which sends result_norm itself (talkie)
                    out[name] = nc * e + (e if nc > 1 and not _weightless_norms(profile) else 0) + logits
            continue

        n_l, has_full, has_swa, before, full_later, swa_later = s
        # this device's copies of the graph inputs
        inputs = pos + (kv_in_full if has_full else 0) + (kv_in_swa if has_swa else 0)
        if last_dev == name:
            inputs += out_ids
        own_inputs[name] = inputs
        kq_dev = kq_full if has_full else kq_swa if has_swa else 0
        # what the layer before sends: the host's closing add operands, embd (layer 0) or
        # the previous device's l_out (norm pinned), or that device's norm and l_out
        if before == HOST_NAME:
            boundary = host_boundary
        elif before is None or pinned_norm or post:        # no norm before attention (olmo2): none sent
            boundary = e
        else:
            boundary = 2 * e
        if skip_e and nc == 1:
            inputs += skip_e        # the normed embeddings every layer reads, computed here or a copy

        if nc > 1:
            # pipelined: every input copy is kept 4 times and none is ever freed
            base = nc * (boundary + (pos_e if before is None else 0) + inputs)
            # the normed embeddings every layer reads: computed on the first device, copied to the others
            base += skip_e if before is None else nc * skip_e
            # The hole below the FFN: a quantized V cache leaves none on a device without the model's
            # last layer (n_embd 512 real loads and 1024 dry runs, q8_0 and q4_0; issue 14), nor does
            # the device of the last layer and the output (f16 and quantized); the last layer's device
            # without the output keeps it. With flash attention off, a quantized K cache leaves none
            # below KQ either. Measured on RPC devices over llama's dense graph, within 1 MiB on every
            # device of the architecture matrix (tests/integration/test_arch_matrix_vs_llama.py) and on
            # SmolLM2 (test_real_models_exact_vs_llama.py); issue 27.
            quant_v = config.type_v not in ("f32", "f16", "bf16")
            holds_last = last_dev == name
            quant_k = config.type_k not in ("f32", "f16", "bf16")
            # (a residual-first add keeps it open unless a quantized V cache closes it: phi3, -ts 1,1 f16 against
            # -ts 1,1,1 q4_0)
            closed = (holds_last and has_out and not par_e and not (profile.arch in _SANDWICH and n_l > 1)
                      and (quant_v or profile.arch not in _RESIDUAL_FIRST)) \
                or ((quant_v or (quant_k and not fa)) and (not holds_last or gather_after) and not post
                    and not attn_extra)
            if par_e:
                # attention and the FFN side by side (cohere2): a quantized V closes no hole; the last layer alone
                # with the output does (measured: -ts 3,1 q8_0 and 1,1,1 q4_0)
                closed = holds_last and has_out and n_l == 1
            elif fa and (q > e or all_nope) and not holds_last and not post:
                # wide Q (Gemma 3 270M), or Q not roped (baichuan): the K rotation's extra Q/K products
                # (attn_inp_k_rot) close the hole as a quantized V does, and with both it stays open (measured:
                # -ub 256/512, 2 and 3 RPC devices)
                closed = quant_v != rot_k
            # with flash attention the hole is the freed attention output (kqv_out, [n_head * n_embd_head, T]),
            # wider than a row set where Q is (Gemma 3 270M: 1024 against 640; its first devices were
            # 0.75 MiB low at -ub 512, exact with this over -c 2048/4096, -ub 128..512, 2 and 3 devices)
            # (a layer alone without a norm before its FFN (olmo2): its input straight below the FFN)
            slots = ffn_slots - e - (post_e if n_l == 1 else 0) if closed \
                else ffn_slots + (max(q - e, 0) if fa and not g.moe else 0)
            peaks = [base + slots + ffn_big, base + 2 * e + 2 * q]
            if not fa:
                # one row set less below KQ with a quantized K: the norm; a layer alone on its device (its input
                # among the copies) has only its norm there, the rotated Q in Q's place (gemma2, llama4: -ts 1,2,1)
                below_kq = 2 * e if quant_k and name not in nope_devs else 3 * e
                if quant_k and n_l == 1:
                    below_kq = e + par_e
                fused = _below_kq_fused(profile, e, q, T, quant_k)
                peaks.append(base + (fused if fused is not None else below_kq - post_e + q) + kq_dev)
            if has_out:
                peaks.append(base + (2 * e if gather_after and holds_last else e) + norm_e + logits)
            if high_out and mf is not None:
                # the FFN's range starts above the residual, the norm and the router (compute_moe)
                peaks[0] = base + 2 * e + router + ffn_big
                peaks += shared_expert_peaks(ffn_base=base + 2 * e + router, fe=ffn_unit, fd=part_out["down"], e=e,
                                             offset=mf.output_offset(ffn_unit, part_out["down"]),
                                             kq=0 if fa or mla is not None else kq_dev, logits=logits,
                                             next_layer=moe_then_layer(mf.device_layers(layer_devices, name),
                                                                       pipelined=True, weight_before=mf.weight_before),
                                             has_out=has_out and (mla is None
                                                                  or after_two_moe(profile, layer_devices, name))
                                             and not (fa and output_in_dense_hole(
                                                 mf, mf.device_layers(layer_devices, name), rot_k)))
            elif shx and has_out and mla is None:
                # the last layer's output in the hole above the FFN's norm, the logits on top (glm4moe, -fa on)
                peaks.append(base + 2 * e + logits)
            if mf is not None and fa and mla is None and not all(mf.device_layers(layer_devices, name)):
                # a dense layer of a MoE model (leading: glm4moe; interleaved: llama4): the freed attention output
                # (where Q is wide) and the FFN input below its gate, up and GLU output
                peaks.append(base + max(q, e) + e + 3 * f)
            if mla is not None:
                peaks += mla_peaks(mla, T, bottom=base, n_layers=n_l, pipelined=True,
                                   after_moe=after_two_moe(profile, layer_devices, name), e=e, kq=0 if fa else kq_dev,
                                   ffn_base=base + 2 * e + router, fe=ffn_unit if g.moe else 0, fd=part_out["down"])
            out[name] = max(peaks)
            continue

        if n_l == 1:
            # one layer: its attention is the last use of the input copies, so the FFN reuses
            # their range (after the host's operands, the model's last layer gathers its
            # ffn_inp into it: one more row set); K and V land above Q, not in older holes
            below = 3 * e if last_dev == name and before == HOST_NAME else 2 * e
            # the norm the device before sent (not pinned) is scaled in place: no row set more for it
            attn_in = boundary if before not in (None, HOST_NAME) and not pinned_norm else boundary + e
            # attention: Q before and after RoPE; a Q that is a view of the fused QKV product has neither
            attn = _a(4 * _fused_qkv_width(profile) * T) if qkv_view else 2 * q
            peaks = [below + par_e + ffn_big, attn_in + inputs + attn]
            if not fa:
                peaks.append(inputs + 3 * e - post_e + 2 * kvh + q + kq_dev)
        else:
            # during the FFN of the first layer, the inputs of a KV kind with no later layer on
            # this device are already freed, and reused when an FFN tensor fits in them
            ffn_inputs = inputs
            for present, later, size in ((has_full, full_later, kv_in_full), (has_swa, swa_later, kv_in_swa)):
                if present and not later and size >= ffn_unit:
                    ffn_inputs -= size
            if g.moe:
                ffn = (ffn_after_host if before == HOST_NAME
                       else (2 * e + router if high_out_np else ffn_slots) + ffn_big)
            else:
                # the residual and one hole below the FFN; two host operands leave room for both
                # (a layer without RoPE leaves the hole: smollm3, -ngl 4 in the arch matrix)
                room = boundary >= 2 * e and name not in nope_devs and not post and not qkv_view and not sum_last \
                    and not attn_extra
                ffn = (2 * e if room else 3 * e) + par_e + ffn_big
            # attention: Q before and after RoPE (a ROPE of a reshaped view is not in place)
            peaks = [ffn_inputs + ffn, inputs + 2 * e + 2 * q]
            if not fa:
                fused = _below_kq_fused(profile, e, q, T, config.type_k not in ("f32", "f16", "bf16"))
                below_kq = fused if fused is not None else 3 * e - post_e + (0 if all_nope else q)
                peaks.append(inputs + below_kq + kq_dev)

        # The model's last layer: when its input copies are smaller than a row set, its
        # ffn_inp (the gathered attention output) lands above them and the FFN on top.
        low = (e if post else 2 * e) + inputs
        glu_low = not g.moe and inputs - skip_e < e and f <= low - skip_e and not gather_after
        if all_nope or attn_extra:
            # the gathered attention output takes the bottom the attention left (baichuan, -ngl 4), or the gated
            # attention output's range (spark2_5, -ngl 4)
            pass
        elif gather_after and last_dev == name:
            # no gather inside the last layer: its FFN on its input, norm and the input copies (gpt-oss, -ngl 4)
            peaks.append(inputs + 2 * e + ffn_big)
        elif last_dev == name and not g.moe and inputs - skip_e < e and not qkv_view:
            peaks.append(low + e + par_e + (ffn_big if ungated else 2 * f if glu_low else 3 * f))
        elif last_dev == name and g.moe and n_l == 1 and inputs - skip_e < e:
            # MoE, the model's last layer alone: the gathered rows land above the input copies (out_ids
            # is still live), the FFN on top (qwen3moe, olmoe: arch matrix, -ngl 4 over 3 devices); llama4's input
            # weighted before the experts (n_expert_used 1) takes a hole, its up and gate go on top
            peaks.append(low + e + ffn_big - (ffn_unit if mf is not None and mf.weight_before else 0))
        if has_out:
            # After the last layer only the hidden state is live: result_norm is where the last
            # ffn_down went, the logits above it. That is the bottom of the buffer unless the
            # GLU output fitted below ffn_inp: then ffn_down went on top of everything.
            below_out = low + 2 * e if glu_low else 2 * e if gather_after and last_dev == name else e
            peaks.append(below_out + norm_e + logits)
        if high_out_np and mf is not None and n_l > 1 and before != HOST_NAME:
            peaks += shared_expert_peaks(ffn_base=inputs + 2 * e + router, fe=ffn_unit, fd=part_out["down"], e=e,
                                         offset=mf.output_offset(ffn_unit, part_out["down"]),
                                         kq=0 if fa or mla is not None else kq_dev, logits=logits,
                                         next_layer=moe_then_layer(mf.device_layers(layer_devices, name)),
                                         has_out=has_out and (mla is None
                                                              or after_two_moe(profile, layer_devices, name)))
        if mf is not None and fa and mla is None and before == HOST_NAME \
                and not all(mf.device_layers(layer_devices, name)):
            # a dense layer after host layers (llama4): its FFN input and norm, then gate, up and GLU output; the
            # KQ mask's copy lands in what the host's operands left
            peaks.append(inputs - (mask if has_full else 0) - (mask_swa if has_swa else 0) + 2 * e + 3 * f)
        if mla is not None:
            # the input copies the layer before sent are freed once read: the stack starts above the rest
            # (after host layers the KQ mask's copy lands above, in what the host's operands left)
            bottom = inputs + e - (mask if before == HOST_NAME and has_full else 0)
            peaks += mla_peaks(mla, T, bottom=bottom, n_layers=n_l, pipelined=False,
                               after_moe=after_two_moe(profile, layer_devices, name), e=e, kq=0 if fa else kq_dev,
                               ffn_base=bottom + e + router, fe=ffn_unit if g.moe else 0, fd=part_out["down"])
        out[name] = max(peaks)
    if ffn_devices is not None:
        _moved_ffn(out, profile, layer_devices, ffn_devices, stray, own_inputs, nc * (tok + e + all_inputs),
                   e=e, q=q, kq=None if fa else max(kq_full, kq_swa), ffn_big=ffn_big, logits=logits,
                   small=_a(4 * (g.n_expert_used or 1) * T) * 2)
    for dev, parts in (ffn_parts or {}).items():
        if dev not in out:
            continue
        # a product run away from the rest of its FFN: its input (the normed hidden state, or
        # for down the GLU output) and the router's ids and weights in, its output on top, and
        # the GLU output too where gate and up both run here
        need = (_a(4 * (g.n_expert_used or 1) * T) * 2 + sum(part_out[p] for p in parts)
                + (e if parts & {"gate", "up"} else part_out["gate"])
                + (part_out["gate"] if {"gate", "up"} <= parts else 0))
        base = nc * (tok + e + all_inputs) if dev == HOST_NAME else own_inputs.get(dev, 0)
        out[dev] = max(out[dev], base + need)
    return out


def _moved_ffn(out: dict, profile: ModelProfile, layer_devices: list[str], ffn_devices: list[str],
               stray: frozenset[str], own_inputs: dict, host_persist: int, *, e: int, q: int, kq: int | None,
               ffn_big: int, logits: int, small: int) -> None:
    """Tensor overrides move a layer's FFN (its experts, or its dense FFN) to another device: the
    FFN's ops then run there (the scheduler puts an op where its weight is), with the layer's
    normed hidden state and, for MoE, the router's choice copied over, and its result copied back.
    A device whose layers all lost their FFN keeps attention only; a device that runs FFNs of
    layers not its own gets the FFN's peak on top of what it has. Checked against llama.cpp's
    compute buffers on RPC devices (tests/integration/test_overrides_vs_llama.py)."""
    n_layer = profile.n_layer
    mine: dict[str, list[int]] = {}
    guest: set[str] = set()
    for il in range(n_layer):
        mine.setdefault(layer_devices[il], []).append(il)
        if ffn_devices[il] != layer_devices[il]:
            guest.add(ffn_devices[il])
    for dev, layers in mine.items():
        if dev not in out or all(ffn_devices[il] == dev for il in layers):
            continue
        if all(ffn_devices[il] != dev for il in layers):
            base = host_persist if dev == HOST_NAME else own_inputs.get(dev, 0)
            # the residual, the norm, Q before and after RoPE, and the FFN's result coming back
            attn = [base + 3 * e + 2 * q] + ([base + 3 * e + q + kq] if kq is not None else [])
            if layer_devices[n_layer] == dev:
                attn.append(base + e + logits)
            out[dev] = max(attn)
    for dev in guest:
        if dev not in out:
            continue
        base = host_persist if dev == HOST_NAME else own_inputs.get(dev, 0)
        # the normed hidden state (and the router's ids and weights) in, the FFN's tensors on top
        out[dev] = max(out[dev], base + e + small + ffn_big)
    for dev in stray:
        if dev in out:
            out[dev] += e      # a matrix product's input copy (or its output) beside what was there
