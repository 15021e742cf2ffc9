"""Small GGUF files of the architectures llama.cpp loads, with the tensors its loader creates.

Test support (and for notebooks): every tensor name and shape below is what the vendored
llama.cpp's `load_arch_tensors` (src/models/<arch>.cpp) creates for these hyperparameters, read
from its `create_tensor` calls (and checked by loading each file in llama.cpp:
tests/integration/test_arch_matrix_vs_llama.py). Optional tensors that real checkpoints ship are
written too: router biases (exp_probs_b), Q/K norms, attention biases, the MTP (nextn) layer.
Weights are zeros (a sparse file): llama.cpp loads and runs them; only bytes and shapes matter.
Dimensions are chosen so that every layer holds several MiB: a misplaced tensor shows beyond the
1 MiB tolerance of the checks.

    from gpulab.sources.arch_models import ARCH_MODELS, write_arch_model
    write_arch_model(tmp_path / "ds.gguf", "deepseek2")
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable

import numpy as np

__all__ = ["ARCH_MODELS", "CURATED", "DISCOVERED", "arch_tensors", "discovered_model", "tensor_type",
           "write_arch_model", "write_gguf"]

_Tensor = tuple[str, tuple[int, ...], str]      # name, ggml shape (ne0 first), ggml type
_E, _V = 1024, 8192                             # n_embd, n_vocab of every model here
_N_SPECIAL = 3 + 256


def _norm(name: str, n: int) -> _Tensor:
    return (name, (n,), "F32")


def _mat(name: str, *shape: int) -> _Tensor:
    return (name, tuple(shape), "F16")


def _io(tied: bool = False) -> tuple[list[_Tensor], list[_Tensor]]:
    head = [_mat("token_embd.weight", _E, _V)]
    tail = [_norm("output_norm.weight", _E)] + ([] if tied else [_mat("output.weight", _E, _V)])
    return head, tail


def _attn(b: str, n_q: int, n_kv: int, *, bias: bool = False, qk_norm: int = 0) -> list[_Tensor]:
    """create_tensor_qkv: separate Q, K, V (and their optional biases), then attn_output."""
    out = [_mat(b + "attn_q.weight", _E, n_q), _mat(b + "attn_k.weight", _E, n_kv), _mat(b + "attn_v.weight", _E, n_kv)]
    if bias:
        out += [_norm(b + "attn_q.bias", n_q), _norm(b + "attn_k.bias", n_kv), _norm(b + "attn_v.bias", n_kv)]
    if qk_norm:
        out += [_norm(b + "attn_q_norm.weight", qk_norm), _norm(b + "attn_k_norm.weight", qk_norm)]
    return out


def _experts(b: str, n_ff_exp: int, n_expert: int, router_bias: bool = False) -> list[_Tensor]:
    """The router (and its bias, exp_probs_b, where the loader creates one right after it), then the experts."""
    return [(b + "ffn_gate_inp.weight", (_E, n_expert), "F32"),
            *([_norm(b + "exp_probs_b.bias", n_expert)] if router_bias else []),
            _mat(b + "ffn_gate_exps.weight", _E, n_ff_exp, n_expert),
            _mat(b + "ffn_down_exps.weight", n_ff_exp, _E, n_expert),
            _mat(b + "ffn_up_exps.weight", _E, n_ff_exp, n_expert)]


def _shared(b: str, n_ff: int) -> list[_Tensor]:
    return [_mat(b + "ffn_gate_shexp.weight", _E, n_ff), _mat(b + "ffn_down_shexp.weight", n_ff, _E),
            _mat(b + "ffn_up_shexp.weight", _E, n_ff)]


def _dense(b: str, n_ff: int) -> list[_Tensor]:
    return [_mat(b + "ffn_gate.weight", _E, n_ff), _mat(b + "ffn_down.weight", n_ff, _E),
            _mat(b + "ffn_up.weight", _E, n_ff)]


def _nextn(b: str) -> list[_Tensor]:
    return [_mat(b + "nextn.eh_proj.weight", 2 * _E, _E), _norm(b + "nextn.enorm.weight", _E),
            _norm(b + "nextn.hnorm.weight", _E), _norm(b + "nextn.shared_head_norm.weight", _E)]


# --- the architectures: (GGUF key/values under '{arch}.', tensors) ------------------------------

def _dense_llama(bias: bool = False, qk_norm: bool = False, tied: bool = False,
                 extra: dict | None = None) -> Callable[[], tuple[dict, list[_Tensor]]]:
    """llama and the architectures whose loader creates the same blocks (src/models/llama.cpp, qwen2.cpp:
    Q/K/V biases, qwen3.cpp: Q/K norms, mistral3.cpp, smollm3.cpp)."""
    def build() -> tuple[dict, list[_Tensor]]:
        n_layer, n_head, n_kv, hd, n_ff = 6, 16, 4, 64, 3072
        head, tail = _io(tied)
        body = []
        for i in range(n_layer):
            b = f"blk.{i}."
            body += [_norm(b + "attn_norm.weight", _E), *_attn(b, n_head * hd, n_kv * hd, bias=bias,
                                                                qk_norm=hd if qk_norm else 0),
                     _mat(b + "attn_output.weight", n_head * hd, _E), _norm(b + "ffn_norm.weight", _E),
                     *_dense(b, n_ff)]
        kv = dict(block_count=n_layer, feed_forward_length=n_ff, **{
            "attention.head_count": n_head, "attention.head_count_kv": n_kv, "attention.key_length": hd,
            "attention.value_length": hd, "rope.dimension_count": hd, "attention.layer_norm_rms_epsilon": 1e-5},
                  **(extra or {}))
        return kv, head + body + tail
    return build


def _olmo2() -> tuple[dict, list[_Tensor]]:
    """OLMo 2 (src/models/olmo2.cpp): full-width Q/K norms, norms after attention and FFN only."""
    n_layer, n_head, n_kv, hd, n_ff = 6, 16, 4, 64, 3072
    head, tail = _io()
    body = []
    for i in range(n_layer):
        b = f"blk.{i}."
        body += [*_attn(b, n_head * hd, n_kv * hd), _mat(b + "attn_output.weight", n_head * hd, _E),
                 _norm(b + "attn_q_norm.weight", _E), _norm(b + "attn_k_norm.weight", n_kv * hd),
                 _norm(b + "post_attention_norm.weight", _E), *_dense(b, n_ff), _norm(b + "post_ffw_norm.weight", _E)]
    kv = dict(block_count=n_layer, feed_forward_length=n_ff, **{
        "attention.head_count": n_head, "attention.head_count_kv": n_kv, "rope.dimension_count": hd,
        "attention.layer_norm_rms_epsilon": 1e-6})
    return kv, head + body + tail


def _gemma(arch: str) -> Callable[[], tuple[dict, list[_Tensor]]]:
    def build() -> tuple[dict, list[_Tensor]]:
        n_layer, n_head, n_kv, hd, n_ff = 8, 8, 4, 128, 3072
        head, tail = _io(tied=True)
        body = []
        for i in range(n_layer):
            b = f"blk.{i}."
            body += [_norm(b + "attn_norm.weight", _E),
                     *_attn(b, n_head * hd, n_kv * hd, qk_norm=hd if arch == "gemma3" else 0),
                     _mat(b + "attn_output.weight", n_head * hd, _E), _norm(b + "post_attention_norm.weight", _E),
                     _norm(b + "ffn_norm.weight", _E), *_dense(b, n_ff), _norm(b + "post_ffw_norm.weight", _E)]
        kv = dict(block_count=n_layer, feed_forward_length=n_ff, **{
            "attention.head_count": n_head, "attention.head_count_kv": n_kv, "attention.key_length": hd,
            "attention.value_length": hd, "attention.layer_norm_rms_epsilon": 1e-6, "attention.sliding_window": 512})
        return kv, head + body + tail
    return build


def _qwen3moe() -> tuple[dict, list[_Tensor]]:
    n_layer, n_head, n_kv, hd, n_exp, n_used, n_ff_exp = 6, 16, 4, 64, 16, 4, 512
    head, tail = _io()
    body = []
    for i in range(n_layer):
        b = f"blk.{i}."
        body += [_norm(b + "attn_norm.weight", _E), *_attn(b, n_head * hd, n_kv * hd, qk_norm=hd),
                 _mat(b + "attn_output.weight", n_head * hd, _E), _norm(b + "ffn_norm.weight", _E),
                 *_experts(b, n_ff_exp, n_exp)]
    kv = dict(block_count=n_layer, feed_forward_length=3072, expert_count=n_exp, expert_used_count=n_used,
              expert_feed_forward_length=n_ff_exp, **{
                  "attention.head_count": n_head, "attention.head_count_kv": n_kv, "attention.key_length": hd,
                  "attention.value_length": hd, "attention.layer_norm_rms_epsilon": 1e-6})
    return kv, head + body + tail


def _deepseek2() -> tuple[dict, list[_Tensor]]:
    """DeepSeek-V3 shaped MLA (src/models/deepseek2.cpp), 1 dense lead layer, an MTP layer."""
    n_layer, n_nextn, n_head, q_lora, kv_lora, rope, nope, v_mla = 6, 1, 16, 512, 256, 64, 128, 128
    n_ff, n_exp, n_used, n_ff_exp, n_shared = 3072, 16, 4, 512, 1
    head, tail = _io()
    body = []
    for i in range(n_layer + n_nextn):
        b = f"blk.{i}."
        body += [_norm(b + "attn_norm.weight", _E), _norm(b + "attn_q_a_norm.weight", q_lora),
                 _norm(b + "attn_kv_a_norm.weight", kv_lora), _mat(b + "attn_q_a.weight", _E, q_lora),
                 _mat(b + "attn_q_b.weight", q_lora, n_head * (nope + rope)),
                 _mat(b + "attn_kv_a_mqa.weight", _E, kv_lora + rope),
                 _mat(b + "attn_k_b.weight", nope, kv_lora, n_head),
                 _mat(b + "attn_v_b.weight", kv_lora, v_mla, n_head),
                 _mat(b + "attn_output.weight", n_head * v_mla, _E), _norm(b + "ffn_norm.weight", _E)]
        if i < 1:
            body += _dense(b, n_ff)
        else:
            body += [*_experts(b, n_ff_exp, n_exp, router_bias=True), *_shared(b, n_ff_exp * n_shared)]
        if i >= n_layer:
            body += _nextn(b)
    kv = dict(block_count=n_layer + n_nextn, nextn_predict_layers=n_nextn, feed_forward_length=n_ff,
              leading_dense_block_count=1, expert_count=n_exp, expert_used_count=n_used,
              expert_feed_forward_length=n_ff_exp, expert_shared_count=n_shared, expert_weights_scale=2.5,
              expert_weights_norm=True, expert_gating_func=2, **{
                  "attention.head_count": n_head, "attention.head_count_kv": 1,
                  "attention.key_length": kv_lora + rope, "attention.value_length": kv_lora,
                  "attention.key_length_mla": nope + rope, "attention.value_length_mla": v_mla,
                  "attention.q_lora_rank": q_lora, "attention.kv_lora_rank": kv_lora,
                  "rope.dimension_count": rope, "attention.layer_norm_rms_epsilon": 1e-6})
    return kv, head + body + tail


def _glm4moe() -> tuple[dict, list[_Tensor]]:
    """GLM-4.5 shaped (src/models/glm4-moe.cpp): biased QKV, 1 dense lead layer, an MTP layer."""
    n_layer, n_nextn, n_head, n_kv, hd, n_ff, n_exp, n_used, n_ff_exp = 6, 1, 16, 4, 128, 3072, 16, 4, 512
    head, tail = _io()
    body = []
    for i in range(n_layer + n_nextn):
        b = f"blk.{i}."
        body += [_norm(b + "attn_norm.weight", _E), *_attn(b, n_head * hd, n_kv * hd, bias=True, qk_norm=hd),
                 _mat(b + "attn_output.weight", n_head * hd, _E), _norm(b + "post_attention_norm.weight", _E)]
        if i < 1:
            body += _dense(b, n_ff)
        else:
            body += [*_experts(b, n_ff_exp, n_exp, router_bias=True), *_shared(b, n_ff_exp)]
        if i >= n_layer:
            body += _nextn(b)
    kv = dict(block_count=n_layer + n_nextn, nextn_predict_layers=n_nextn, feed_forward_length=n_ff,
              leading_dense_block_count=1, expert_count=n_exp, expert_used_count=n_used,
              expert_feed_forward_length=n_ff_exp, expert_shared_count=1, expert_weights_scale=1.0,
              expert_weights_norm=True, expert_gating_func=2, **{
                  "attention.head_count": n_head, "attention.head_count_kv": n_kv, "attention.key_length": hd,
                  "attention.value_length": hd, "rope.dimension_count": hd // 2,
                  "attention.layer_norm_rms_epsilon": 1e-5})
    return kv, head + body + tail


def _qwen3next() -> tuple[dict, list[_Tensor]]:
    """Qwen3-Next shaped hybrid (src/models/qwen3next.cpp): 3 gated-delta-net layers : 1 attention."""
    n_layer, n_head, n_kv, hd, n_exp, n_used, n_ff_exp = 8, 16, 2, 128, 16, 4, 512
    d_conv, d_state, n_group, dt_rank = 4, 128, 4, 8
    key_dim, value_dim = d_state * n_group, d_state * dt_rank
    head, tail = _io()
    body = []
    for i in range(n_layer):
        b = f"blk.{i}."
        body += [_norm(b + "attn_norm.weight", _E), _norm(b + "post_attention_norm.weight", _E)]
        if (i + 1) % 4 == 0:
            body += [*_attn(b, n_head * hd * 2, n_kv * hd), _mat(b + "attn_output.weight", n_head * hd, _E),
                     _norm(b + "attn_q_norm.weight", hd), _norm(b + "attn_k_norm.weight", hd)]
        else:
            body += [_mat(b + "attn_qkv.weight", _E, key_dim * 2 + value_dim),
                     _mat(b + "attn_gate.weight", _E, value_dim),
                     (b + "ssm_conv1d.weight", (d_conv, key_dim * 2 + value_dim), "F32"),
                     _norm(b + "ssm_dt.bias", dt_rank), _norm(b + "ssm_a", dt_rank),
                     _mat(b + "ssm_ba.weight", _E, dt_rank * 2),
                     _norm(b + "ssm_norm.weight", d_state), _mat(b + "ssm_out.weight", value_dim, _E)]
        body += [*_experts(b, n_ff_exp, n_exp), (b + "ffn_gate_inp_shexp.weight", (_E,), "F32"), *_shared(b, n_ff_exp)]
    kv = dict(block_count=n_layer, feed_forward_length=3072, expert_count=n_exp, expert_used_count=n_used,
              expert_feed_forward_length=n_ff_exp, expert_shared_feed_forward_length=n_ff_exp,
              full_attention_interval=4,
              **{"attention.head_count": n_head, "attention.head_count_kv": n_kv, "attention.key_length": hd,
                 "attention.value_length": hd, "rope.dimension_count": hd // 4,
                 "attention.layer_norm_rms_epsilon": 1e-6, "ssm.conv_kernel": d_conv, "ssm.inner_size": value_dim,
                 "ssm.state_size": d_state, "ssm.time_step_rank": dt_rank, "ssm.group_count": n_group})
    return kv, head + body + tail


def _llama4() -> tuple[dict, list[_Tensor]]:
    """Llama 4 shaped (src/models/llama4.cpp): MoE every other layer, 3 chunked : 1 full attention."""
    n_layer, n_head, n_kv, hd, n_ff, n_exp, n_ff_exp = 8, 16, 4, 64, 3072, 16, 512
    head, tail = _io()
    body = []
    for i in range(n_layer):
        b = f"blk.{i}."
        body += [_norm(b + "attn_norm.weight", _E), *_attn(b, n_head * hd, n_kv * hd),
                 _mat(b + "attn_output.weight", n_head * hd, _E), _norm(b + "ffn_norm.weight", _E)]
        body += [*_experts(b, n_ff_exp, n_exp), *_shared(b, n_ff_exp)] if (i + 1) % 2 == 0 else _dense(b, n_ff)
    kv = dict(block_count=n_layer, feed_forward_length=n_ff, expert_count=n_exp, expert_used_count=1,
              expert_feed_forward_length=n_ff_exp, interleave_moe_layer_step=2, **{
                  "attention.head_count": n_head, "attention.head_count_kv": n_kv, "rope.dimension_count": hd,
                  "attention.layer_norm_rms_epsilon": 1e-5})
    return kv, head + body + tail


def _gpt_oss() -> tuple[dict, list[_Tensor]]:
    """gpt-oss shaped (src/models/openai-moe.cpp): sinks, biased experts, SWA every other layer."""
    n_layer, n_head, n_kv, hd, n_exp, n_used, n_ff_exp = 6, 16, 4, 64, 16, 4, 512
    head, tail = _io()
    body = []
    for i in range(n_layer):
        b = f"blk.{i}."
        body += [_norm(b + "attn_norm.weight", _E), _norm(b + "post_attention_norm.weight", _E),
                 *_attn(b, n_head * hd, n_kv * hd, bias=True), _mat(b + "attn_output.weight", n_head * hd, _E),
                 _norm(b + "attn_sinks.weight", n_head), *_experts(b, n_ff_exp, n_exp),
                 _norm(b + "attn_output.bias", _E), _norm(b + "ffn_gate_inp.bias", n_exp),
                 (b + "ffn_gate_exps.bias", (n_ff_exp, n_exp), "F32"), (b + "ffn_down_exps.bias", (_E, n_exp), "F32"),
                 (b + "ffn_up_exps.bias", (n_ff_exp, n_exp), "F32")]
    kv = dict(block_count=n_layer, feed_forward_length=3072, expert_count=n_exp, expert_used_count=n_used,
              expert_feed_forward_length=n_ff_exp, **{
                  "attention.head_count": n_head, "attention.head_count_kv": n_kv, "attention.key_length": hd,
                  "attention.value_length": hd, "rope.dimension_count": hd, "attention.sliding_window": 256,
                  "attention.layer_norm_rms_epsilon": 1e-5})
    return kv, head + body + tail


def _mamba2() -> tuple[dict, list[_Tensor]]:
    """Mamba-2 (src/models/mamba2.cpp): recurrent layers only, no attention, no KV cache."""
    n_layer, d_conv, d_inner, d_state, n_group, dt_rank = 6, 4, 2048, 128, 1, 32
    conv_dim = d_inner + 2 * n_group * d_state
    head, tail = _io()
    body = []
    for i in range(n_layer):
        b = f"blk.{i}."
        body += [_norm(b + "attn_norm.weight", _E), _mat(b + "ssm_in.weight", _E, d_inner + conv_dim + dt_rank),
                 (b + "ssm_conv1d.weight", (d_conv, conv_dim), "F32"), _norm(b + "ssm_conv1d.bias", conv_dim),
                 _norm(b + "ssm_dt.bias", dt_rank), (b + "ssm_a", (1, dt_rank), "F32"),
                 (b + "ssm_d", (1, dt_rank), "F32"),
                 (b + "ssm_norm.weight", (d_inner // n_group, n_group), "F32"), _mat(b + "ssm_out.weight", d_inner, _E)]
    kv = dict(block_count=n_layer, feed_forward_length=0, **{
        "attention.head_count": 0, "attention.layer_norm_rms_epsilon": 1e-5, "ssm.conv_kernel": d_conv,
        "ssm.inner_size": d_inner, "ssm.state_size": d_state, "ssm.time_step_rank": dt_rank,
        "ssm.group_count": n_group})
    return kv, head + body + tail


def _moe_dense_attn(arch: str) -> Callable[[], tuple[dict, list[_Tensor]]]:
    """qwen2moe (src/models/qwen2moe.cpp: biased QKV, a gated shared expert) and olmoe (olmoe.cpp:
    full-width Q/K norms, experts n_ff wide)."""
    def build() -> tuple[dict, list[_Tensor]]:
        n_layer, n_head, hd, n_exp, n_used, n_ff_exp = 6, 16, 64, 16, 4, 512
        n_kv = 16 if arch == "olmoe" else 4      # olmoe's K norm is n_embd wide: multi-head attention
        head, tail = _io()
        body = []
        for i in range(n_layer):
            b = f"blk.{i}."
            body += [_norm(b + "attn_norm.weight", _E), *_attn(b, _E, n_kv * hd, bias=arch == "qwen2moe"),
                     _mat(b + "attn_output.weight", _E, _E)]
            if arch == "olmoe":
                body += [_norm(b + "attn_q_norm.weight", _E), _norm(b + "attn_k_norm.weight", _E)]
            body += [_norm(b + "ffn_norm.weight", _E), *_experts(b, n_ff_exp, n_exp)]
            if arch == "qwen2moe":
                body += [(b + "ffn_gate_inp_shexp.weight", (_E,), "F32"), *_shared(b, 1024)]
        shared = {"expert_feed_forward_length": n_ff_exp, "expert_shared_feed_forward_length": 1024}
        kv = dict(block_count=n_layer, feed_forward_length=n_ff_exp if arch == "olmoe" else 3072, expert_count=n_exp,
                  expert_used_count=n_used, **(shared if arch == "qwen2moe" else {}),
                  **{"attention.head_count": n_head, "attention.head_count_kv": n_kv, "rope.dimension_count": hd,
                     "attention.layer_norm_rms_epsilon": 1e-6})
        return kv, head + body + tail
    return build


def _lfm2() -> tuple[dict, list[_Tensor]]:
    """LFM2 (src/models/lfm2.cpp): short-convolution layers (head_count_kv 0) between attention layers."""
    n_layer, n_head, n_kv, hd, n_ff, l_cache = 6, 16, 4, 64, 3072, 3
    heads_kv = [0, 0, n_kv, 0, 0, n_kv]
    head, tail = _io(tied=True)
    tail = [("token_embd_norm.weight", (_E,), "F32")]
    body = []
    for i in range(n_layer):
        b = f"blk.{i}."
        body += [_norm(b + "ffn_norm.weight", _E), *_dense(b, n_ff), _norm(b + "attn_norm.weight", _E)]
        if heads_kv[i]:
            body += [_norm(b + "attn_q_norm.weight", hd), _norm(b + "attn_k_norm.weight", hd),
                     *_attn(b, _E, n_kv * hd), _mat(b + "attn_output.weight", _E, _E)]
        else:
            body += [(b + "shortconv.conv.weight", (l_cache, _E), "F32"),
                     _mat(b + "shortconv.in_proj.weight", _E, 3 * _E),
                     _mat(b + "shortconv.out_proj.weight", _E, _E)]
    kv = dict(block_count=n_layer, feed_forward_length=n_ff, **{
        "attention.head_count": n_head, "attention.head_count_kv": heads_kv, "rope.dimension_count": hd,
        "attention.layer_norm_rms_epsilon": 1e-5, "shortconv.l_cache": l_cache})
    return kv, head + body + tail


def _exaone4() -> tuple[dict, list[_Tensor]]:
    """EXAONE 4 (src/models/exaone4.cpp): post norms, Q/K norms, an MTP layer it never loads."""
    n_layer, n_nextn, n_head, n_kv, hd, n_ff = 6, 1, 16, 4, 64, 3072
    head, tail = _io()
    body = []
    for i in range(n_layer + n_nextn):
        b = f"blk.{i}."
        body += [*_attn(b, n_head * hd, n_kv * hd), _mat(b + "attn_output.weight", _E, _E),
                 _norm(b + "post_attention_norm.weight", _E), _norm(b + "attn_q_norm.weight", hd),
                 _norm(b + "attn_k_norm.weight", hd), *_dense(b, n_ff), _norm(b + "post_ffw_norm.weight", _E)]
        if i >= n_layer:
            body += _nextn(b)
    kv = dict(block_count=n_layer + n_nextn, nextn_predict_layers=n_nextn, feed_forward_length=n_ff, **{
        "attention.head_count": n_head, "attention.head_count_kv": n_kv, "rope.dimension_count": hd,
        "attention.layer_norm_rms_epsilon": 1e-5})
    return kv, head + body + tail


def _cohere2() -> tuple[dict, list[_Tensor]]:
    """Command R7B (src/models/cohere2.cpp): parallel attention and FFN, 3 sliding : 1 global."""
    n_layer, n_head, n_kv, hd, n_ff = 8, 16, 4, 64, 3072
    head, tail = _io(tied=True)
    body = []
    for i in range(n_layer):
        b = f"blk.{i}."
        body += [_norm(b + "attn_norm.weight", _E), *_attn(b, _E, n_kv * hd), _mat(b + "attn_output.weight", _E, _E),
                 *_dense(b, n_ff)]
    kv = dict(block_count=n_layer, feed_forward_length=n_ff, logit_scale=0.25, **{
        "attention.head_count": n_head, "attention.head_count_kv": n_kv, "rope.dimension_count": hd,
        "attention.layer_norm_epsilon": 1e-5, "attention.sliding_window": 512})
    return kv, head + body + tail


CURATED: dict[str, Callable[[], tuple[dict, list[_Tensor]]]] = {
    "llama": _dense_llama(), "qwen2": _dense_llama(bias=True), "qwen3": _dense_llama(qk_norm=True, tied=True),
    "mistral3": _dense_llama(), "smollm3": _dense_llama(tied=True),
    "granite": _dense_llama(extra={"logit_scale": 8.0, "residual_scale": 0.22, "embedding_scale": 12.0,
                                   "attention.scale": 0.015625}),
    "olmo2": _olmo2, "gemma2": _gemma("gemma2"), "gemma3": _gemma("gemma3"), "qwen3moe": _qwen3moe,
    "deepseek2": _deepseek2, "glm4moe": _glm4moe, "qwen3next": _qwen3next, "llama4": _llama4, "gpt-oss": _gpt_oss,
    "mamba2": _mamba2, "qwen2moe": _moe_dense_attn("qwen2moe"), "olmoe": _moe_dense_attn("olmoe"), "lfm2": _lfm2,
    "exaone4": _exaone4, "cohere2": _cohere2, "internlm2": _dense_llama(),
    # the loaders that create llama's blocks (src/models/<arch>.cpp)
    "baichuan": _dense_llama(), "exaone": _dense_llama(), "nanbeige": _dense_llama(), "xverse": _dense_llama(),
    "maincoder": _dense_llama(qk_norm=True),
}


_VALUE_TYPES = {"u8": "UINT8", "i8": "INT8", "u16": "UINT16", "i16": "INT16", "u32": "UINT32", "i32": "INT32",
                "u64": "UINT64", "i64": "INT64", "f32": "FLOAT32", "f64": "FLOAT64", "bool": "BOOL", "str": "STRING"}
_F32_TENSORS = ("ffn_gate_inp", "exp_probs_b", "ssm_a", "ssm_d", "ssm_conv1d", "ssm_dt", "shortconv.conv",
                "time_mix", "channel_mix", "conv1d", "ssm_norm", "_norm", "norm.", "bias",
                "token_types")    # ggml_add of its row: the CPU adds no F16 operand (bert.cpp; converters write F32)


def tensor_type(name: str, shape: tuple[int, ...]) -> str:
    """The ggml type a generated tensor is written in: F16 for matrices, F32 for vectors and for the
    tensors ggml's recurrent and routing ops read as F32 (ssm_conv, ssm_scan, rwkv_wkv, the router), I32
    for a table of expert ids."""
    if "tid2eid" in name:      # deepseek4's hash routing: expert ids by token, read by ggml_get_rows as its rows
        return "I32"
    if len([n for n in shape if n > 1]) <= 1 or any(k in name for k in _F32_TENSORS):
        return "F32"
    return "F16"


def _discovered() -> dict[str, dict]:
    """The architectures scripts/discover_arch_models.py found llama.cpp loads and makes a context for."""
    path = pathlib.Path(__file__).with_name("arch_models.json")
    if not path.exists():
        return {}
    found = json.loads(path.read_text())
    return {a: f for a, f in found.items() if a not in CURATED and f.get("context") == "ok"}


DISCOVERED = _discovered()
ARCH_MODELS: tuple[str, ...] = (*CURATED, *sorted(DISCOVERED))


def _model(arch: str) -> tuple[dict[str, tuple[str | None, object]], list[_Tensor]]:
    """(full key -> (value type or None to infer, value), tensors) of `arch`'s model."""
    if arch in CURATED:
        kv, tensors = CURATED[arch]()
        keys: dict[str, tuple[str | None, object]] = {
            f"{arch}.context_length": (None, 32768), f"{arch}.embedding_length": (None, _E),
            f"{arch}.vocab_size": (None, _V)}
        keys.update({f"{arch}.{k}": (None, v) for k, v in kv.items()})
        return keys, tensors
    return discovered_model(DISCOVERED[arch])


def discovered_model(found: dict) -> tuple[dict[str, tuple[str | None, object]], list[_Tensor]]:
    """An entry of arch_models.json ({"kv", "types", "tensors"}) as write_gguf's keys and tensors."""
    types = found.get("types", {})
    return ({k: (types.get(k), v) for k, v in found["kv"].items()},
            [(n, tuple(s), tensor_type(n, tuple(s))) for n, s in found["tensors"]])


def arch_tensors(arch: str) -> list[_Tensor]:
    """The tensors write_arch_model writes for `arch`, in file order."""
    return _model(arch)[1]


def _n_bytes(shape: tuple[int, ...], gtype: str) -> int:
    return int(np.prod(shape)) * (4 if gtype in ("F32", "I32") else 2)


def write_arch_model(path, arch: str) -> pathlib.Path:
    """Write the model of `arch` at `path` (zero weights, a sparse file) and return the path."""
    kv, tensors = _model(arch)
    return write_gguf(path, arch, kv, tensors)


def write_gguf(path, arch: str, kv: dict[str, tuple[str | None, object]], tensors: list[_Tensor]) -> pathlib.Path:
    """A GGUF of `arch` with keys `kv` (full key -> (value type, value)), the test vocab, and zero
    `tensors` (a sparse file: only the header is written)."""
    import gguf

    from .synth import add_vocab
    path = pathlib.Path(path)
    w = gguf.GGUFWriter(path, arch)
    try:
        w.add_name("gpulab generated model")  # not the arch: llama-vocab sets per-name token attributes (phi3)
        w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
        for key, (vtype, value) in kv.items():
            if vtype is not None:
                t = gguf.GGUFValueType[_VALUE_TYPES[vtype]]
                if isinstance(value, list):
                    w.add_key_value(key, value, gguf.GGUFValueType.ARRAY, sub_type=t)
                else:
                    w.add_key_value(key, value, t)
            elif isinstance(value, list):
                w.add_array(key, value)
            elif isinstance(value, bool):
                w.add_bool(key, value)
            elif isinstance(value, float):
                w.add_float32(key, value)
            else:
                w.add_uint32(key, int(value))  # type: ignore[call-overload]
        add_vocab(w, _V)
        for name, shape, gtype in tensors:
            w.add_tensor_info(name, tuple(reversed(shape)), np.dtype(np.float32), _n_bytes(shape, gtype),
                              raw_dtype=gguf.GGMLQuantizationType[gtype])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        assert w.fout is not None    # opened by write_header_to_file
        f = w.fout[0]
        end = f.tell()
        for _name, shape, gtype in tensors:
            end = (end + w.data_alignment - 1) // w.data_alignment * w.data_alignment + _n_bytes(shape, gtype)
        f.truncate((end + w.data_alignment - 1) // w.data_alignment * w.data_alignment)
    finally:
        w.close()
    return path
