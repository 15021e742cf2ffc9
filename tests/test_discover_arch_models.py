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
