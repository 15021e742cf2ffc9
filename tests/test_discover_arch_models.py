"""scripts/discover_arch_models.py's reading of the vendored llama.cpp source: the values it writes
before the first load where the loader would assert rather than name a key."""

from __future__ import annotations

import importlib.util

import pytest

from llama_tools import REPO, vendored_src

pytestmark = pytest.mark.skipif(vendored_src() is None, reason="the vendored llama.cpp source is not at hand")


@pytest.fixture(scope="module")
def discover():
    import os
    os.environ.setdefault("GPULAB_LLAMA_CPP_SRC", str(vendored_src()))
    spec = importlib.util.spec_from_file_location("discover_arch_models", REPO / "scripts" / "discover_arch_models.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_experts_are_written_when_the_loader_says_it_needs_them(discover):
    # grok's loader throws "<arch> model cannot have zero experts"; the base loader reads the counts as
    # optional, so they are not seeded: a retry on that message writes them
    assert "grok.expert_count" not in discover.seeds("grok")
    message = discover.arch_source("grok")
    retry = [keys for pattern, keys in discover.RETRIES if pattern in message and "expert_count" in keys]
    assert retry and retry[0]["expert_count"] == 8 and retry[0]["expert_used_count"] == 2


def test_a_subclass_without_its_own_loader_reads_its_base_class_source(discover):
    # models.h: struct llama_model_mistral4 : public llama_model_deepseek2 -> deepseek2's MLA geometry
    seeds = discover.seeds("mistral4")
    assert seeds["mistral4.attention.kv_lora_rank"] == 256 and seeds["mistral4.attention.key_length_mla"] == 192
    assert seeds["mistral4.attention.head_count_kv"] == 1


def test_hybrids_marked_by_zero_kv_heads_get_recurrent_layers(discover):
    assert discover.seeds("jamba")["jamba.attention.head_count_kv"] == [0, 0, 4, 0, 0, 4]
    nemotron = discover.seeds("nemotron_h")     # recurrent, FFN-only and attention layers
    assert nemotron["nemotron_h.feed_forward_length"] == [0, 3072, 0, 0, 3072, 0]


def test_optional_tensors_come_from_the_loaders_create_tensor_calls(discover):
    # qwen35's recurrent layers have a fused QKV and a gate created TENSOR_NOT_REQUIRED
    assert {"blk.%d.attn_qkv.weight", "blk.%d.attn_gate.weight"} <= set(discover.optional_tensors("qwen35"))


@pytest.mark.parametrize("arch,tensor,shape", [
    # laguna.cpp aborts on a gate width that is neither per head (16) nor per element (1024)
    ("laguna", "attn_gate.weight", [1024, 16]),
    # jina-bert-v2.cpp asserts n_ffn_up == n_ff || n_ffn_up == n_ff * 2: up and gate fused
    ("jina-bert-v2", "ffn_up.weight", [1024, 6144]),
])
def test_a_width_the_loader_reads_from_the_file_is_answered_with_its_shape(discover, arch, tensor, shape):
    # the message each loader stops with is in its own source; the retry that answers it names the shape
    source = discover.arch_source(arch)
    retry = [keys[discover.SHAPES] for pattern, keys in discover.RETRIES
             if discover.SHAPES in keys and pattern in source]
    assert retry == [{tensor: shape}]


def _said(discover, arch: str, assert_text: str, where: str) -> str:
    """What the parent reads from a child that aborted making the context: ggml's assert, and the graph function
    its backtrace names (both checked to be in the vendored source first)."""
    ggml = (discover.llama_src() / "ggml" / "src" / "ggml.c").read_text()
    assert f"GGML_ASSERT({assert_text})" in ggml
    assert where.rsplit("::", 1)[1] in discover.arch_source(arch)
    return f"aborted: ggml/src/ggml.c:1: GGML_ASSERT({assert_text}) failed in {where}"


def test_rwkv6_is_written_without_attention_heads_as_its_converter_does(discover):
    # rwkv6-base.cpp repeats K per KV head unless n_head_kv is 0 (or n_embd / head_size): with the base
    # file's 4 KV heads the 4-D reshape of K aborts
    assert "ggml_reshape_4d(ctx0, k, head_size, 1, n_head_kv, n_tokens)" in discover._source("models/rwkv6-base.cpp")
    said = _said(discover, "rwkv6", "ggml_nelements(a) == ne0*ne1*ne2*ne3", "llama_model_rwkv6::graph::graph")
    assert discover.retry(said, {}, False) == {"attention.head_count": 0, "attention.head_count_kv": 0}


def test_deepseek4_raw_cache_holds_one_mqa_head(discover):
    # build_raw_attention stores a [n_embd_head, 1, n_tokens] KV: one KV head, whatever the other ggml_set_rows
    # abort's answer (16, minicpm3's) says; the head keeps 64 of its 128 values unrotated
    said = _said(discover, "deepseek4", "a->ne[0] == b->ne[0]", "llama_model_deepseek4::graph::build_raw_attention")
    assert discover.retry(said, {}, False) == {"attention.head_count_kv": 1, "attention.key_length": 128,
                                               "attention.value_length": 128}
    minicpm3 = said.replace("llama_model_deepseek4::graph::build_raw_attention", "llama_model_minicpm3::graph::graph")
    assert discover.retry(minicpm3, {}, False) == {"attention.head_count_kv": 16}


def test_plm_context_is_made_with_flash_attention_off(discover):
    # plm.cpp gives build_attn a 2-D V: with flash attention llama_kv_cache::cpy_v reads it as n_tokens heads,
    # whatever the heads; once the head-count retry is spent, the context is made without flash attention
    said = _said(discover, "plm", "a->ne[0] == b->ne[0]", "llama_model_plm::graph::graph")
    assert discover.retry(said, {"attention.head_count_kv": 16}, False) == {discover.FA_OFF: True}
    assert discover.retry(said, {"attention.head_count_kv": 16}, True) == {}    # (a context: nothing to retry)


def test_hy_v3_optional_experts_and_router_bias_are_written(discover):
    # hy-v3.cpp: create_tensor_gate_up_exps(..., TENSOR_NOT_REQUIRED) and tn(LLM_TENSOR_FFN_EXP_PROBS_B, i)
    # (no suffix); without them the loader counts 117 tensors in the file and creates 99
    assert {"blk.%d.ffn_gate_exps.weight", "blk.%d.ffn_up_exps.weight", "blk.%d.exp_probs_b"} <= set(
        discover.optional_tensors("hy_v3"))


def test_qwen4exp_attention_layers_keep_separate_q_k_v():
    # qwen4exp's graph reads wq/wk/wv on its attention layers (build_layer_attn) though create_tensor_qkv takes a
    # fused QKV first: the linear layers' fused QKV is not copied to them (a null wq segfaulted the context)
    import json
    entry = json.loads((REPO / "gpulab" / "sources" / "arch_models.json").read_text())["qwen4exp"]
    names = {n for n, _ in entry["tensors"]}
    assert entry["context"] == "ok"
    assert {"blk.3.attn_q.weight", "blk.3.attn_k.weight", "blk.3.attn_v.weight"} <= names
    assert "blk.3.attn_qkv.weight" not in names and "blk.2.attn_qkv.weight" in names
