"""What gpulab models exactly, architecture by architecture, and the one-line doubts a plan carries.

A plan is silent when every term (placement, weights, KV, recurrent state, compute) is what
llama.cpp allocates, to its log's rounding (32 KiB; compute within 1 MiB), as the integration
matrix checked (tests/integration/test_arch_matrix_vs_llama.py, docs/COVERAGE.md). Anything else
says so in one line: the term, why, and how large the doubt is where it was measured.
"""

from __future__ import annotations

from ..config import SplitConfig
from ..profile import ModelProfile

__all__ = ["COMPUTE_CHECKED", "plan_doubts", "CACHE_NOT_MODELLED"]

# Architectures whose compute buffers the closed forms of gpulab.core.placement.compute were
# derived from and checked on (real llama.cpp on RPC devices): llama-like graphs.
COMPUTE_CHECKED = frozenset({"llama", "gemma2", "gemma3", "qwen3moe", "qwen2", "qwen3", "mistral3"})

# Architectures whose memory is not llama_kv_cache / llama_memory_recurrent as gpulab sizes them
# (llama_model::create_memory, src/llama-model.cpp): a lightning-indexer cache beside MLA, the
# DSV4 compressed cache, KDA/linear-attention states gpulab sizes from the formula but has not run.
CACHE_NOT_MODELLED = {
    "deepseek32": "the lightning indexer's K cache (llama_memory_hybrid_idx) is not counted",
    "glm-dsa": "the lightning indexer's K cache (llama_memory_hybrid_idx) is not counted",
    "deepseek4": "the DSV4 compressed KV cache (llama_kv_cache_dsv4) is not modelled",
    "hy_v4": "the DSV4 compressed KV cache (llama_kv_cache_dsv4) is not modelled",
    "kimi-k3": "its hybrid cache with an indexer is not modelled",
    "glm5-next": "its hybrid cache with an indexer is not modelled",
    "dflash": "its draft-stage cache is not modelled",
}


def plan_doubts(profile: ModelProfile, config: SplitConfig) -> tuple[str, ...]:
    """One line per term of this plan that is not exact; () when all are."""
    out: list[str] = []
    arch = profile.arch
    if arch in CACHE_NOT_MODELLED:
        out.append(f"KV: {CACHE_NOT_MODELLED[arch]} for {arch}")
    recurrent = any(l.is_recurrent for l in profile.layers)
    mla = any(l.has_kv and not l.has_v for l in profile.layers)
    if recurrent:
        out.append(f"compute: {arch}'s recurrent layers are sized as attention layers "
                   "(devices holding only recurrent layers: up to ~35 MiB too high at n_embd 1024)")
    elif mla:
        out.append(f"compute: {arch}'s MLA attention graph is sized as plain attention "
                   "(measured within ~6 MiB per device at n_embd 1024, more with -fa on and a quantized cache)")
    elif arch not in COMPUTE_CHECKED:
        out.append(f"compute: {arch}'s graph is sized as a llama-like graph; not checked against llama.cpp")
    if profile.n_nextn and any(l.is_nextn and l.tensors for l in profile.layers):
        out.append(f"weights/KV: {arch} loads its {profile.n_nextn} MTP layer(s) with the model; "
                   "their compute is not modelled")
    if not config.offload_kqv:
        out.append("compute: with the KV cache on the host (-nkvo) the attention runs there; not modelled")
    return tuple(out)
