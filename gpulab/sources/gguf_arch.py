"""llama.cpp's reading of a GGUF header: which tensors are the input, the output and each layer's,
the per-layer attention geometry (heads, KV heads, head sizes, sliding windows, layers without a
KV cache) and the MoE counts: a ModelProfile. These rules mirror llama.cpp (src/llama-arch.cpp,
src/llama-model.cpp load_hparams, src/llama-hparams.cpp) as the planner mirrors its placement.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..core.profile import LayerProfile, ModelProfile, TensorInfo
from .gguf_header import INT_TYPES, Array, Header
from .gguf_tables import BOOL, FILE_TYPE_NAMES

__all__ = ["build_profile"]

_MAX_LAYERS = 512             # LLAMA_MAX_LAYERS (src/llama-hparams.h)
_MAX_EXPERTS = 1024           # LLAMA_MAX_EXPERTS

# --- llama.cpp's view of the tensors (llm_tensor_info_mapping, src/llama-arch.cpp) -------------
# Base names (the tensor name without '.weight' / '.bias') of the INPUT and OUTPUT layers.
_INPUT_NAMES = frozenset({"token_embd", "position_embd", "token_types", "per_layer_token_embd",
                          "masked_embd_centroids", "masked_embd_ordering"})
# Repeating tensors named without "blk.N": llama.cpp puts each with the layer its create_tensor call
# numbers (the buffer list of dev_layer[bid], llama_model_base::create_tensor): gemma3n/gemma4 create the
# per-layer-input projection with bid 0, wavtokenizer-dec its posnet.N and convnext.N blocks with bid N,
# t5 its encoder's and decoder's enc.blk.N and dec.blk.N with bid N (src/models/t5.cpp); token_embd_norm
# (LLM_TENSOR_TOKEN_EMBD_NORM, "do the norms on the first layer") and wavtokenizer-dec's conv1d are
# LLM_TENSOR_LAYER_REPEATING tensors every loader creates with bid 0 (llama-arch.cpp; src/models/bert.cpp,
# bloom.cpp, rwkv6.cpp, wavtokenizer-dec.cpp).
_LAYER0_NAMES = frozenset({"per_layer_model_proj", "per_layer_proj_norm", "conv1d", "token_embd_norm"})
_NUMBERED_BLOCKS = ("posnet", "convnext")
_CODER_PREFIXES = ("enc", "dec")
_OUTPUT_NAMES = frozenset({
    "output", "output_norm", "cls", "cls.output", "cls.norm", "dense_2", "dense_3",
    "dec.output_norm", "enc.output_norm", "output_res_score", "output_hc_fn", "output_hc_base",
    "output_hc_scale", "output_hc_norm", "output_hc_down", "output_hc_up", "altup_proj",
    "altup_unembd_proj", "nextn.post_projection", "fc", "d2t", "markov_w1", "markov_w2",
    "conf_proj", "selector_predecessor", "selector_successor", "selector_hidden"})
# lfm2 stores its output norm as token_embd_norm (LLM_TENSOR_OUTPUT_NORM_LFM2); elsewhere that
# name is LLM_TENSOR_TOKEN_EMBD_NORM, a norm that llama.cpp puts with layer 0.
_LFM2_ARCHS = frozenset({"lfm2", "lfm2moe"})
# Encoders that have no output matrix at all: a missing output.weight is not a tied one there.
_NO_OUTPUT_ARCHS = frozenset({"bert", "jina-bert-v2", "jina-bert-v3", "nomic-bert",
                              "nomic-bert-moe", "neo-bert", "eurobert", "modern-bert"})
# Decoders whose graph multiplies by token_embd itself for the logits, where the input layer holds it
# (src/models/bitnet.cpp: no output tensor, no TENSOR_DUPLICATED copy on the output device).
_OUTPUT_IS_TOKEN_EMBD = frozenset({"bitnet"})
# llama_model::create_memory (src/llama-model.cpp): no memory at all for these.
_NO_MEMORY_ARCHS = _NO_OUTPUT_ARCHS | {"wavtokenizer-dec", "gemma-embedding", "dream", "llada",
                                       "llada-moe", "rnd1"}
# llm_arch_is_recurrent (src/llama-arch.cpp): a recurrent state, no KV cache.
_RECURRENT_ARCHS = frozenset({"mamba", "mamba2", "rwkv6", "rwkv6qwen2", "rwkv7", "arwkv7"})
# Hybrids whose load_arch_hparams marks a layer recurrent when its n_head_kv is 0.
_HYBRID_BY_HEADS = frozenset({"jamba", "granitehybrid", "lfm2", "lfm2moe", "plamo2",
                              "kimi-linear", "bailingmoe3", "kimi-k3", "glm5-next"})
# Hybrids with {arch}.attention.recurrent_layers, or else attention on every
# {arch}.full_attention_interval-th layer (this default otherwise).
_HYBRID_BY_INTERVAL = {"qwen3next": 4, "qwen35": 4, "qwen35moe": 4, "qwen4exp": 4, "minimax-01": 8}
# Archs whose load_arch_hparams reads key_length_mla / value_length_mla (src/models/<arch>.cpp):
# llama_hparams::is_mla() when both are non-zero; mistral4 is deepseek2's loader (models.h: a subclass).
_MLA_ARCHS = frozenset({"deepseek2", "deepseek32", "dots3note", "glm-dsa", "glm5-next", "hy_v4", "kimi-k3",
                        "kimi-linear", "bailingmoe3", "mistral4"})
# Archs with a lightning indexer's key cache beside the KV cache (_indexer_rows)
_INDEXER_CACHE_ARCHS = frozenset({"deepseek32", "glm-dsa", "minimax-m3", "glm5-next", "dots3note", "hy_v4",
                                  "qwen4exp"})

# Archs that add a layer past block_count (granite-switch.cpp: the adapter router's attention layer)
_ROUTER_LAYER_ARCHS = frozenset({"graniteswitch"})

# Archs whose load_arch_tensors give the nextn layers mtp_flags |= TENSOR_SKIP unless MTP is on
# (grep mtp_flags src/models/*.cpp; mistral4 is deepseek2's): "model has unused tensor ... -- ignoring".
_MTP_SKIP_ARCHS = frozenset({"bailingmoe3", "cohere2moe", "deepseek2", "deepseek32", "deepseek4", "glm-dsa",
                             "glm4moe", "glm5-next", "hy_v3", "mimo2", "mistral4", "nemotron_h", "nemotron_h_moe",
                             "qwen35", "qwen35moe", "qwen3next", "step35"}) | frozenset({
    # ... and those that skip them whatever MTP says ("preserved in GGUF but not executed yet")
    "bailingmoe2", "dots3note", "exaone-moe", "exaone4", "glm4"})
_MTP_NEVER_LOADED = frozenset({"bailingmoe2", "dots3note", "exaone-moe", "exaone4", "glm4"})


@dataclass(frozen=True)
class _Swa:
    """How one arch's load_arch_hparams (src/models/<arch>.cpp) marks its sliding-window layers."""

    pattern: int = 0            # n_pattern for load_swa_pattern / llama_hparams::set_swa_pattern
    dense_first: bool = False
    if_window: bool = False     # SWA only when {arch}.attention.sliding_window is present and > 0
    default: int | None = None  # window when the key is absent; None: llama.cpp requires the key
    forced: int | None = None   # window llama.cpp sets whatever the key says
    array_only: bool = False    # the per-layer {arch}.attention.sliding_window_pattern is required


_SWA_RULES: dict[str, _Swa] = {
    "gemma2": _Swa(2, default=4096),
    "gemma3": _Swa(6, if_window=True),
    "gemma3n": _Swa(5),
    "gemma-embedding": _Swa(6),
    "cohere2": _Swa(4),
    "cohere2moe": _Swa(4, dense_first=True),
    "exaone-moe": _Swa(4),
    "afmoe": _Swa(4, if_window=True),
    "mellum": _Swa(4, if_window=True),
    "muse-glimmer": _Swa(4),
    "olmo2": _Swa(4, if_window=True),
    "gpt-oss": _Swa(2),
    "plamo3": _Swa(8, if_window=True),
    "smallthinker": _Swa(4, dense_first=True, if_window=True, forced=4096),
    "laguna": _Swa(4, dense_first=True, if_window=True),
    "modern-bert": _Swa(3, dense_first=True, if_window=True),
    **{a: _Swa(array_only=True) for a in ("gemma4", "gemma4-assistant", "granite_swa", "maple",
                                          "mimo2", "spark2_5", "step35", "dots3note")},
    # Not SWA in llama.cpp even when the GGUF carries a window: llama (Mistral 7B), mistral3,
    # qwen2/qwen3 and their MoEs, phi3 (its SWA is disabled) -- they are simply not listed.
}


def _count(kv: dict, key: str, default, fail):
    v = kv.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise fail(f"{key} is {v!r}, expected a non-negative integer")
    return v


def _per_layer(kv: dict, key: str, n_layer: int, default: list[int], fail) -> list[int]:
    """llama_model_loader::get_key_or_arr: one value for all layers, or exactly one per layer."""
    v = kv.get(key)
    if not isinstance(v, Array):
        c = _count(kv, key, None, fail)
        return list(default) if c is None else [c] * n_layer
    if v.values is None or v.elem_type not in INT_TYPES | {BOOL} or v.length != n_layer:
        raise fail(f"{key} has {v.length} entries, expected {n_layer} integers (one per layer)")
    if any(x < 0 for x in v.values):
        raise fail(f"{key} has a negative entry")
    return [int(x) for x in v.values]


def _flags(kv: dict, key: str, n_layer: int, fail) -> list[bool] | None:
    """A per-layer flag array ({arch}.attention.sliding_window_pattern, .recurrent_layers)."""
    v = kv.get(key)
    if not isinstance(v, Array):
        return None
    if v.values is None or v.elem_type not in INT_TYPES | {BOOL} or v.length > _MAX_LAYERS:
        raise fail(f"{key} has {v.length} entries, expected up to {_MAX_LAYERS} per-layer flags")
    return ([bool(x) for x in v.values] + [False] * n_layer)[:n_layer]


def _swa_layers(arch, kv, n_layer, n_main, n_head_kv, fail) -> tuple[list[bool], int]:
    """(is_swa per layer, n_swa) as llama.cpp's load_arch_hparams leaves hparams.is_swa_impl."""
    none = [False] * n_layer, 0
    key = f"{arch}.attention.sliding_window"
    window = _count(kv, key, None, fail)
    pattern_key = f"{arch}.attention.sliding_window_pattern"

    def pattern(n_pattern: int, dense_first: bool = False) -> list[bool]:
        # llama_model_base::load_swa_pattern: a per-layer array wins, then a scalar pattern,
        # then the arch default, applied by llama_hparams::set_swa_pattern to non-nextn layers.
        flags = _flags(kv, pattern_key, n_layer, fail)
        if flags is not None:
            return flags
        n_pattern = _count(kv, pattern_key, n_pattern, fail)
        if dense_first:
            return [il < n_main and (n_pattern == 0 or il % n_pattern != 0) for il in range(n_layer)]
        return [il < n_main and (n_pattern == 0 or il % n_pattern < n_pattern - 1)
                for il in range(n_layer)]

    if arch == "llama4":   # chunked attention, 3 chunked : 1 full, unless the window is 0
        return none if window == 0 else (pattern(4), 8192)
    if arch == "exaone4":  # only the 64-layer (32B) model interleaves
        return (pattern(4), 4096 if window is None else window) if n_main == 64 else none
    if arch == "lfm2":     # every attention layer slides when a window is given
        return ([il < n_main and n_head_kv[il] > 0 for il in range(n_layer)], window) if window else none
    rule = _SWA_RULES.get(arch)
    if rule is None or (rule.if_window and not window):
        return none
    if rule.array_only:
        layers = _flags(kv, pattern_key, n_layer, fail)
        if layers is None:
            raise fail(f"{pattern_key} (per-layer flags) is missing; llama.cpp requires it for {arch}")
    else:
        layers = pattern(rule.pattern, rule.dense_first)
    if window is None:
        if rule.default is None and rule.forced is None:
            raise fail(f"{key} is missing; llama.cpp requires it for {arch}")
        window = rule.default
    if rule.forced is not None:
        window = rule.forced
    return (layers, window) if any(layers) and window else none


def _kv_layers(arch, kv, n_layer, n_main, n_head_kv, n_ff, fail) -> list[bool]:
    """Which layers get a KV cache: llama_model::create_memory's layer filters and reuse."""
    if arch in _NO_MEMORY_ARCHS or arch in _RECURRENT_ARCHS:
        return [False] * n_layer
    if arch == "falcon-h1":   # attention and SSM side by side in every layer
        return [True] * n_layer
    if arch in ("nemotron_h", "nemotron_h_moe"):
        # is_recr = n_head_kv == 0 && n_ff == 0 on main layers; filter_attn = !is_recr && n_ff == 0
        return [n_ff[i] == 0 and not (i < n_main and n_head_kv[i] == 0) for i in range(n_layer)]
    if arch in _HYBRID_BY_HEADS:
        return [h > 0 for h in n_head_kv]
    if arch in _HYBRID_BY_INTERVAL:
        recr = _flags(kv, f"{arch}.attention.recurrent_layers", n_layer, fail)
        if recr is None and isinstance(kv.get(f"{arch}.attention.recurrent_layers"), int):
            recr = [bool(kv[f"{arch}.attention.recurrent_layers"])] * n_layer
        if recr is None:
            every = _count(kv, f"{arch}.full_attention_interval", _HYBRID_BY_INTERVAL[arch], fail) or 1
            recr = [(i + 1) % every != 0 for i in range(n_layer)]
        return [i < n_main and not recr[i] for i in range(n_layer)]
    has = [True] * n_layer
    if arch == "gemma3n":       # layers from 20 on reuse the KV of earlier layers
        has = [i < 20 for i in range(n_layer)]
    elif arch == "gemma4":
        shared = _count(kv, f"{arch}.attention.shared_kv_layers", 0, fail)
        has = [i < n_layer - shared for i in range(n_layer)]
    if n_main < n_layer and n_main > 0:   # nextn (MTP) layers: no KV in the main context
        has = [h and i < n_main for i, h in enumerate(has)]
    return has


def _recurrent_layers(arch, kv, n_layer, n_main, n_head_kv, n_ff, has_kv, fail) -> list[bool]:
    """hparams.is_recr per layer, as create_memory's recurrent filter sees it (il < n_layer())."""
    if arch in _RECURRENT_ARCHS:
        return [i < n_main for i in range(n_layer)]
    if arch == "falcon-h1":
        return [i < n_main for i in range(n_layer)]
    if arch in ("nemotron_h", "nemotron_h_moe"):
        return [i < n_main and n_head_kv[i] == 0 and n_ff[i] == 0 for i in range(n_layer)]
    if arch in _HYBRID_BY_HEADS or arch in _HYBRID_BY_INTERVAL:
        return [i < n_main and not has_kv[i] for i in range(n_layer)]
    return [False] * n_layer


def _state_row(arch: str, kv: dict, n_embd: int, n_head: int, key_length: int, fail) -> tuple[int, int]:
    """(n_embd_r, n_embd_s): llama_hparams::n_embd_r() / n_embd_s() (src/llama-hparams.cpp)."""
    def key(k: str, default: int = 0) -> int:
        return _count(kv, f"{arch}.{k}", default, fail)
    d_conv, d_inner, d_state, n_group = (key("ssm.conv_kernel"), key("ssm.inner_size"), key("ssm.state_size"),
                                         key("ssm.group_count"))
    wkv = key("wkv.head_size")
    if wkv:                                   # RWKV: token shift and wkv state
        return key("token_shift_count", 2) * n_embd, n_embd * wkv
    kda = key("kda.head_dim")
    la = key_length if arch == "minimax-01" else 0    # minimax-01: n_embd_head_la = key_length
    l_cache = key("shortconv.l_cache")
    if l_cache:                               # LFM2 short convolutions
        r = n_embd * (l_cache - 1)
    elif kda:                                 # Kimi KDA: conv state for Q, K and V
        r = 3 * (d_conv - 1 if d_conv > 0 else 3) * n_head * kda
    else:                                     # Mamba's conv_states
        r = (d_conv - 1 if d_conv > 0 else 0) * (d_inner + 2 * n_group * d_state)
    if kda:
        s = kda * kda * n_head
    elif la:
        s = la * la * n_head
    else:
        s = d_state * d_inner
    return r, s


def _indexer_rows(arch: str, kv: dict, n_layer: int, n_main: int, recurrent: list[bool], is_swa: list[bool],
                  k_swa: int, fail) -> list[int]:
    """The indexer cache's K row per layer (0: none): create_memory's layer filters in src/llama-model.cpp.
    deepseek32 and glm-dsa (llama_kv_cache_dsa): the trunk's layers, glm-dsa's only where the indexer is full
    (attention.indexer.types; without it every layer before GLM 5.2's 1M context, then GLM_5_2_DEFAULT_INDEXER_TYPES
    of src/models/glm-dsa.cpp); minimax-m3 (llama_kv_cache_msa): the layers after the leading dense ones;
    glm5-next (llama_memory_hybrid_idx): the trunk's attention layers where the indexer is full, each row the key,
    gate and pooled value (3 x indexer_head_size with a kpool); dots3note (llama_kv_cache_dsa_iswa): the trunk's
    layers where the indexer is full (attention.indexer.types), sliding-window ones too, whose row is
    n_embd_head_k_swa: llama_kv_cache_dsa sets only n_embd_head_k_full of the indexer's hparams to
    indexer_head_size (src/llama-kv-cache-dsa.cpp). The indexer cache holds every cell (no window) whatever the
    layer's kind. hy_v4: none without an indexer (attention.indexer.top_k 0: llama_kv_cache), else
    llama_kv_cache_dsa's for the layers attention.indexer.types marks full (none without it: hparams' default).
    qwen4exp (llama_memory_hybrid_idx, its filter_idx in llama_model::create_memory): the trunk's attention layers,
    each row the key (its loader reads no kpool)."""
    if arch not in _INDEXER_CACHE_ARCHS:
        return [0] * n_layer
    row = _count(kv, f"{arch}.attention.indexer.key_length", 0, fail)
    if arch == "hy_v4":
        if not _count(kv, f"{arch}.attention.indexer.top_k", 0, fail):
            return [0] * n_layer
        full_hy = _per_layer(kv, f"{arch}.attention.indexer.types", n_main, [0] * n_main, fail)
        return [row if il < n_main and full_hy[il] else 0 for il in range(n_layer)]
    if arch == "minimax-m3":
        lead = _count(kv, f"{arch}.leading_dense_block_count", 0, fail)
        return [row if il >= lead else 0 for il in range(n_layer)]
    if arch == "qwen4exp":
        return [row if il < n_main and not recurrent[il] else 0 for il in range(n_layer)]
    full = [1] * n_layer
    if arch == "glm-dsa" and _count(kv, f"{arch}.context_length", 0, fail) >= 1048576:
        full = [int(il < 2 or (il - 2) % 4 == 0) if il < 78 else 0 for il in range(n_layer)]
    full = _per_layer(kv, f"{arch}.attention.indexer.types", n_main, full[:n_main], fail) + full[n_main:]
    if arch == "dots3note":
        return [(k_swa if is_swa[il] else row) if il < n_main and full[il] else 0 for il in range(n_layer)]
    if arch == "glm5-next":
        row *= 3 if _count(kv, f"{arch}.attention.indexer.kpool", 0, fail) > 0 else 1
        full = [f and not r for f, r in zip(full, recurrent)]
    return [row if il < n_main and full[il] else 0 for il in range(n_layer)]


def _base_name(name: str) -> str:
    return name.rsplit(".", 1)[0] if name.endswith((".weight", ".bias")) else name


def build_profile(h: Header, path: str, file_bytes: int, fail) -> ModelProfile:
    kv = h.kv
    arch = kv.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise fail("general.architecture is missing")
    n_layer = _count(kv, f"{arch}.block_count", None, fail)
    if n_layer is None:
        raise fail(f"{arch}.block_count is missing")
    if not 0 < n_layer <= _MAX_LAYERS:
        raise fail(f"{arch}.block_count is {n_layer}; llama.cpp accepts 1 to {_MAX_LAYERS}")
    for required in ("embedding_length", "context_length"):   # llama_model_base::load_hparams
        if f"{arch}.{required}" not in kv:
            raise fail(f"{arch}.{required} is missing")
    n_embd = _count(kv, f"{arch}.embedding_length", 0, fail)
    n_nextn = _count(kv, f"{arch}.nextn_predict_layers", 0, fail)
    if n_nextn > n_layer:
        raise fail(f"{arch}.nextn_predict_layers ({n_nextn}) exceeds block_count ({n_layer})")
    n_main = n_layer - n_nextn

    n_head = _per_layer(kv, f"{arch}.attention.head_count", n_layer, [0] * n_layer, fail)
    n_head_kv = _per_layer(kv, f"{arch}.attention.head_count_kv", n_layer, n_head, fail)
    n_ff = _per_layer(kv, f"{arch}.feed_forward_length", n_layer, [0] * n_layer, fail)
    n_expert = _count(kv, f"{arch}.expert_count", 0, fail)
    n_expert_used = max(_per_layer(kv, f"{arch}.expert_used_count", n_layer, [0] * n_layer, fail))
    if n_expert > _MAX_EXPERTS:
        raise fail(f"{arch}.expert_count is {n_expert}; llama.cpp accepts up to {_MAX_EXPERTS}")
    if n_expert_used > n_expert:
        raise fail(f"{arch}.expert_used_count ({n_expert_used}) exceeds expert_count ({n_expert})")

    # load_hparams: head sizes default to n_embd / n_head(0); SWA layers may have their own.
    head0 = n_embd // n_head[0] if n_head[0] else 0
    k_full = _count(kv, f"{arch}.attention.key_length", head0, fail) if n_head[0] else 0
    v_full = _count(kv, f"{arch}.attention.value_length", head0, fail) if n_head[0] else 0
    k_swa = _count(kv, f"{arch}.attention.key_length_swa", k_full, fail)
    v_swa = _count(kv, f"{arch}.attention.value_length_swa", v_full, fail)
    is_swa, n_swa = _swa_layers(arch, kv, n_layer, n_main, n_head_kv, fail)
    has_kv = _kv_layers(arch, kv, n_layer, n_main, n_head_kv, n_ff, fail)

    is_mla = (arch in _MLA_ARCHS and _count(kv, f"{arch}.attention.key_length_mla", 0, fail) > 0
              and _count(kv, f"{arch}.attention.value_length_mla", 0, fail) > 0)
    recurrent = _recurrent_layers(arch, kv, n_layer, n_main, n_head_kv, n_ff, has_kv, fail)
    state_row = _state_row(arch, kv, n_embd, n_head[0], k_full, fail) if any(recurrent) else (0, 0)
    skip_mtp = arch in _MTP_SKIP_ARCHS

    per_layer: list[list[TensorInfo]] = [[] for _ in range(n_layer)]
    inputs, outputs, others = [], [], []
    for t in h.tensors:
        info = TensorInfo(t.name, t.type_name, t.shape, t.n_bytes, offset=h.data_offset + t.offset)
        parts = t.name.split(".", 2)
        if parts[0] in _CODER_PREFIXES and parts[1:2] == ["blk"]:     # t5's enc.blk.N / dec.blk.N: layer N
            parts = t.name.split(".", 3)[1:]
        if parts[0] == "blk" and len(parts) == 3 and parts[1].isdigit():
            il = int(parts[1])
            if il >= n_layer:
                raise fail(f"tensor {t.name!r} is in layer {il} but block_count is {n_layer}")
            per_layer[il].append(info)
            continue
        base = _base_name(t.name)
        if (base in _LAYER0_NAMES and not (base == "token_embd_norm" and arch in _LFM2_ARCHS)) or (
                parts[0] in _NUMBERED_BLOCKS and len(parts) == 3 and parts[1].isdigit()):
            il = 0 if base in _LAYER0_NAMES else int(parts[1])
            if il < n_layer:
                per_layer[il].append(info)
                continue
        if base in _INPUT_NAMES:
            inputs.append(info)
        elif base in _OUTPUT_NAMES or t.name in _OUTPUT_NAMES or (
                base == "token_embd_norm" and arch in _LFM2_ARCHS):
            outputs.append(info)
        else:
            others.append(info)

    names = {t.name for t in h.tensors}
    tokens = kv.get("tokenizer.ggml.tokens")
    if isinstance(tokens, Array):   # its count: the strings themselves are skipped, never read
        n_vocab = tokens.length
    else:
        embd = next((t for t in h.tensors if t.name == "token_embd.weight"), None)
        fallback = embd.shape[1] if embd is not None and len(embd.shape) > 1 else 0
        n_vocab = _count(kv, f"{arch}.vocab_size", fallback, fail)

    file_type = kv.get("general.file_type")
    if isinstance(file_type, int) and not isinstance(file_type, bool):
        file_type = FILE_TYPE_NAMES.get(file_type, str(file_type))
    else:
        file_type = ""
    name = kv.get("general.name")
    if not isinstance(name, str) or not name:
        if "://" in path:   # a URL: drop the query (?download=true) before taking the file name
            path_part = path.split("?", 1)[0].split("#", 1)[0]
        else:
            path_part = path
        name = os.path.basename(path_part.rstrip("/")).removesuffix(".gguf")
    metadata = {k: (v.values if isinstance(v, Array) else v) for k, v in kv.items()
                if v is not None and not (isinstance(v, Array) and v.values is None)}

    nextn = [il >= n_main and skip_mtp for il in range(n_layer)]
    k_idx = _indexer_rows(arch, kv, n_layer, n_main, recurrent, is_swa, k_swa, fail)
    layers = tuple(
        LayerProfile(
            index=il, tensors=() if nextn[il] else tuple(per_layer[il]), n_head=n_head[il], n_head_kv=n_head_kv[il],
            n_embd_head_k=k_swa if is_swa[il] else k_full,
            n_embd_head_v=v_swa if is_swa[il] else v_full,
            is_swa=is_swa[il], has_kv=has_kv[il], has_v=not is_mla,
            n_embd_r=state_row[0] if recurrent[il] else 0, n_embd_s=state_row[1] if recurrent[il] else 0,
            n_embd_k_idx=k_idx[il],
            is_nextn=il >= n_main, mtp_tensors=tuple(per_layer[il]) if nextn[il] else ())
        for il in range(n_layer))
    if arch in _ROUTER_LAYER_ARCHS:
        # llama_model_granite_switch::load_arch_hparams (src/models/granite-switch.cpp): one more layer at
        # index block_count, without weights, holds the adapter router's K/V (one head, one KV head, no RoPE);
        # n_layer_all = block_count + 1 places it as any layer, and its cache is not filtered
        layers += (LayerProfile(index=n_layer, tensors=(), n_head=1, n_head_kv=1, n_embd_head_k=k_full,
                                n_embd_head_v=v_full),)
        n_layer += 1
    return ModelProfile(
        path=path, arch=arch, name=name, file_bytes=file_bytes, n_layer=n_layer, n_embd=n_embd,
        n_ff=max(n_ff), n_vocab=n_vocab,
        n_ctx_train=_count(kv, f"{arch}.context_length", 0, fail),
        layers=layers, input_tensors=tuple(inputs), output_tensors=tuple(outputs),
        # llama.cpp loads token_embd a second time as the output matrix (TENSOR_DUPLICATED)
        tied_output=("output.weight" not in names and "token_embd.weight" in names
                     and arch not in _NO_OUTPUT_ARCHS and arch not in _OUTPUT_IS_TOKEN_EMBD),
        n_expert=n_expert, n_expert_used=n_expert_used, n_swa=n_swa, file_type=file_type,
        other_tensors=tuple(others), metadata=metadata, n_nextn=n_nextn,
        mtp_never_loaded=n_nextn > 0 and arch in _MTP_NEVER_LOADED)


