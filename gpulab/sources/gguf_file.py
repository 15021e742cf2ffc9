"""Read a ModelProfile from a local GGUF file: the header only, never the weights.

The header is walked with `struct` over a read-only memory map, under explicit bounds, rather
than handed to `gguf.GGUFReader`: GGUFReader loops once per array element while it parses
(about 2 s for SmolLM2-135M's 49k-token vocabulary), and an array claiming 2**60 elements makes
that loop run past the end of the map without ever failing, so it hangs. The walker below mirrors
the checks of llama.cpp's `gguf_init_from_reader` (ggml/src/gguf.cpp) instead; the `gguf`
package still supplies the type tables. The same walker reads the prefix that `remote.py`
fetched by HTTP range requests, so a URL and a local copy give identical profiles.
"""

from __future__ import annotations

import mmap
import os
import stat
import struct
from dataclasses import dataclass

import gguf

from ..core.profile import LayerProfile, ModelProfile, TensorInfo
from ..errors import ModelFormatError

__all__ = ["read_profile"]

# --- bounds ---------------------------------------------------------------------------------
# Every loop below consumes at least one byte per step and is also capped by an item budget, so
# no header, however it lies, costs more than about a second or more memory than the file holds.
_MAX_ITEMS = 1 << 22          # KV pairs + string-array elements + tensors (real files: < 10**6)
_MAX_KV = 1 << 16             # real files: < 100
_MAX_TENSORS = 1 << 20        # real files: < 10**5 even with per-expert tensors
_MAX_KEY_LEN = 1 << 16
_MAX_STR_KEEP = 1 << 20       # longer string values are skipped, not decoded
_MAX_ARRAY_KEEP = 4096        # numeric arrays up to this length keep their values (per-layer arrays)
_MAX_LAYERS = 512             # LLAMA_MAX_LAYERS (src/llama-hparams.h)
_MAX_EXPERTS = 1024           # LLAMA_MAX_EXPERTS
_GGML_MAX_NAME = 64           # tensor names must be shorter (gguf.cpp)
_GGML_MAX_DIMS = 4
_MIN_KV_BYTES = 8 + 4 + 1     # key length, type, smallest value
_MIN_TENSOR_BYTES = 8 + 4 + 4 + 8   # name length, n_dims, type, offset
_HEADER_FIXED = 24            # magic, version, n_tensors, n_kv

_VT = gguf.GGUFValueType
_SCALAR_FMT = {_VT.UINT8: "B", _VT.INT8: "b", _VT.UINT16: "H", _VT.INT16: "h", _VT.UINT32: "I",
               _VT.INT32: "i", _VT.FLOAT32: "f", _VT.BOOL: "?", _VT.UINT64: "Q", _VT.INT64: "q",
               _VT.FLOAT64: "d"}
_U64 = struct.Struct("<Q")
_INT_TYPES = {_VT.UINT8, _VT.INT8, _VT.UINT16, _VT.INT16, _VT.UINT32, _VT.INT32, _VT.UINT64, _VT.INT64}

# name, block size, bytes per block. gguf-py lags the vendored ggml: Q2_0 (ggml.h, id 42) is
# block_q2_0 in ggml-common.h, 64 elements in a half scale plus 16 bytes.
_GGML_TYPES: dict[int, tuple[str, int, int]] = {
    int(t): (t.name, *gguf.GGML_QUANT_SIZES[t]) for t in gguf.GGMLQuantizationType
    if t in gguf.GGML_QUANT_SIZES}
_GGML_TYPES.setdefault(42, ("Q2_0", 64, 18))


class _Truncated(Exception):
    """The bytes at hand end before the header does; `needed` is how many it takes to go on."""

    def __init__(self, needed: int):
        super().__init__(needed)
        self.needed = needed


@dataclass(frozen=True)
class _Array:
    elem_type: int
    length: int
    values: tuple | None      # None for string arrays and long numeric arrays


@dataclass(frozen=True)
class _Tensor:
    name: str
    type_name: str
    shape: tuple[int, ...]
    n_bytes: int
    offset: int               # relative to the data section


@dataclass(frozen=True)
class _Header:
    version: int
    kv: dict                  # key -> scalar or _Array
    tensors: tuple[_Tensor, ...]
    header_bytes: int         # where the KV pairs and tensor infos end
    data_offset: int


class _Walker:
    """A cursor over the bytes at hand (`avail` of them) of a file of `total` bytes."""

    def __init__(self, buf, avail: int, total: int, fail):
        self.buf, self.avail, self.total, self.fail = buf, avail, total, fail
        self.off = 0
        self.items = 0

    def take(self, n: int) -> int:
        start, end = self.off, self.off + n
        if end > self.total:
            raise self.fail(f"truncated: the header needs byte {end} but the file has {self.total}")
        if end > self.avail:
            raise _Truncated(end)
        self.off = end
        return start

    def scalar(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        return struct.unpack_from("<" + fmt, self.buf, self.take(size))[0]

    def string(self, what: str, limit: int, strict: bool) -> str | None:
        n = self.scalar("Q")
        if n > self.total - self.off:
            raise self.fail(f"{what} claims {n} bytes, past the end of the file")
        if n > limit:
            if strict:
                raise self.fail(f"{what} is {n} bytes long (at most {limit})")
            self.take(n)
            return None
        raw = bytes(self.buf[self.take(n):self.off])
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            if strict:
                raise self.fail(f"{what} at offset {self.off - n} is not UTF-8") from None
            return raw.decode("utf-8", errors="replace")

    def skip_string(self, what: str) -> None:
        n = self.scalar("Q")
        if n > self.total - self.off:
            raise self.fail(f"{what} claims {n} bytes, past the end of the file")
        self.take(n)

    def count_item(self, n: int = 1) -> None:
        self.items += n
        if self.items > _MAX_ITEMS:
            raise self.fail(f"header holds more than {_MAX_ITEMS} entries; not a model gpulab can read")


def _parse_header(buf, avail: int, total: int, fail) -> _Header:
    """Walk magic, counts, KV pairs and tensor infos as llama.cpp's gguf_init_from_reader does.

    `buf` holds the first `avail` bytes of a file of `total` bytes. Raises `fail(msg)` (an
    exception factory) for a malformed file and _Truncated when more bytes are needed."""
    w = _Walker(buf, avail, total, fail)
    if total < 4:
        raise fail(f"not a GGUF file: {total} bytes, too short for a header")
    magic = bytes(buf[w.take(4):4])
    if magic != b"GGUF":
        raise fail(f"not a GGUF file (magic {magic!r}, expected b'GGUF')")
    version = w.scalar("I")
    if version & 0xFFFF == 0 and version:
        raise fail(f"GGUF version {version:#x}: a big-endian file, which llama.cpp cannot load here")
    if version not in (2, 3):
        raise fail(f"unsupported GGUF version {version} (llama.cpp reads versions 2 and 3)")
    n_tensors, n_kv = w.scalar("Q"), w.scalar("Q")
    # Guard before looping: each entry occupies a minimum number of bytes, so the counts must fit.
    if (n_kv > _MAX_KV or n_tensors > _MAX_TENSORS
            or n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_BYTES > total - _HEADER_FIXED):
        raise fail(f"header claims {n_tensors} tensors and {n_kv} KV pairs, more than a "
                   f"{total}-byte file can hold")

    kv: dict = {}
    for _ in range(n_kv):
        w.count_item()
        key = w.string("a key", _MAX_KEY_LEN, strict=True)
        if not key:
            raise fail(f"empty key at offset {w.off}")
        if key in kv:
            raise fail(f"duplicate key {key!r}")
        vtype, kv[key] = _read_value(w, key)
        if key == "general.alignment" and vtype != _VT.UINT32:
            raise fail("general.alignment is not a uint32")   # gguf.cpp insists on the type

    alignment = kv.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
    if alignment <= 0 or alignment & (alignment - 1):
        raise fail(f"alignment {alignment} is not a power of two")

    tensors, names, data_size = [], set(), 0
    for _ in range(n_tensors):
        w.count_item()
        t = _read_tensor_info(w, fail)
        if t.name in names:
            raise fail(f"duplicate tensor name {t.name!r}")
        names.add(t.name)
        # gguf.cpp: tensors lie back to back in the data section, each padded to the alignment.
        if t.offset != data_size:
            raise fail(f"tensor {t.name!r} has data offset {t.offset}, expected {data_size}")
        data_size += -(-t.n_bytes // alignment) * alignment
        tensors.append(t)

    header_bytes = w.off
    data_offset = -(-header_bytes // alignment) * alignment if n_tensors else header_bytes
    for t in tensors:
        end = data_offset + t.offset + t.n_bytes
        if end > total:   # llama_model_loader: "tensor data is not within the file bounds"
            raise fail(f"truncated: tensor {t.name!r} ends at byte {end} but the file has {total}")
    return _Header(version, kv, tuple(tensors), header_bytes, data_offset)


def _read_value(w: _Walker, key: str) -> tuple[int, object]:
    """(GGUF type, value): a scalar, a string (None when too long to keep) or an _Array."""
    vtype = w.scalar("I")
    if vtype == _VT.STRING:
        return vtype, w.string(f"value of {key!r}", _MAX_STR_KEEP, strict=False)
    if vtype in _SCALAR_FMT:
        return vtype, w.scalar(_SCALAR_FMT[vtype])
    if vtype != _VT.ARRAY:
        raise w.fail(f"key {key!r} has invalid GGUF type {vtype}")
    etype, n = w.scalar("I"), w.scalar("Q")
    if etype == _VT.STRING:
        if n * 8 > w.total - w.off:
            raise w.fail(f"array {key!r} claims {n} strings, more than the file can hold")
        w.count_item(n)
        # The one per-element loop (each string's length locates the next), kept tight: it runs
        # 10**5..10**6 times for a tokenizer. Out of bounds, skip_string raises the right error.
        unpack, buf, off, end = _U64.unpack_from, w.buf, w.off, min(w.avail, w.total)
        for i in range(n):
            if off + 8 > end or off + 8 + unpack(buf, off)[0] > end:
                w.off = off
                w.skip_string(f"element {i} of {key!r}")   # raises: past the end
                off = w.off
                continue
            off += 8 + unpack(buf, off)[0]
        w.off = off
        return vtype, _Array(etype, n, None)
    if etype not in _SCALAR_FMT:   # nested arrays included: gguf.cpp rejects them too
        raise w.fail(f"array {key!r} has invalid element type {etype}")
    fmt = _SCALAR_FMT[etype]
    size = struct.calcsize("<" + fmt)
    if n * size > w.total - w.off:
        raise w.fail(f"array {key!r} claims {n} elements, more than the file can hold")
    start = w.take(n * size)
    values = struct.unpack_from(f"<{n}{fmt}", w.buf, start) if n <= _MAX_ARRAY_KEEP else None
    return vtype, _Array(etype, n, values)


def _read_tensor_info(w: _Walker, fail) -> _Tensor:
    name = w.string("a tensor name", _GGML_MAX_NAME - 1, strict=True)
    n_dims = w.scalar("I")
    if n_dims > _GGML_MAX_DIMS:
        raise fail(f"tensor {name!r} has {n_dims} dimensions (at most {_GGML_MAX_DIMS})")
    shape = tuple(w.scalar("Q") for _ in range(n_dims))
    n_elements = 1
    for d in shape:
        n_elements *= d
        if d >= 1 << 63 or n_elements >= 1 << 63:
            raise fail(f"tensor {name!r} shape {shape} overflows int64")
    type_id = w.scalar("I")
    if type_id not in _GGML_TYPES:
        raise fail(f"tensor {name!r} has unknown ggml type {type_id}")
    type_name, block, block_bytes = _GGML_TYPES[type_id]
    if (shape[0] if shape else 1) % block:
        raise fail(f"tensor {name!r} of type {type_name} has rows of {shape[0]} elements, "
                   f"not a multiple of its block size {block}")
    n_bytes = n_elements // block * block_bytes
    offset = w.scalar("Q")
    return _Tensor(name, type_name, shape, n_bytes, offset)


# --- llama.cpp's view of the tensors (llm_tensor_info_mapping, src/llama-arch.cpp) -------------
# Base names (the tensor name without '.weight' / '.bias') of the INPUT and OUTPUT layers.
_INPUT_NAMES = frozenset({"token_embd", "position_embd", "token_types", "per_layer_token_embd",
                          "masked_embd_centroids", "masked_embd_ordering"})
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
    if not isinstance(v, _Array):
        c = _count(kv, key, None, fail)
        return list(default) if c is None else [c] * n_layer
    if v.values is None or v.elem_type not in _INT_TYPES | {_VT.BOOL} or v.length != n_layer:
        raise fail(f"{key} has {v.length} entries, expected {n_layer} integers (one per layer)")
    if any(x < 0 for x in v.values):
        raise fail(f"{key} has a negative entry")
    return [int(x) for x in v.values]


def _flags(kv: dict, key: str, n_layer: int, fail) -> list[bool] | None:
    """A per-layer flag array ({arch}.attention.sliding_window_pattern, .recurrent_layers)."""
    v = kv.get(key)
    if not isinstance(v, _Array):
        return None
    if v.values is None or v.elem_type not in _INT_TYPES | {_VT.BOOL} or v.length > _MAX_LAYERS:
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


def _base_name(name: str) -> str:
    return name.rsplit(".", 1)[0] if name.endswith((".weight", ".bias")) else name


def _build_profile(h: _Header, path: str, file_bytes: int, fail) -> ModelProfile:
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

    per_layer: list[list[TensorInfo]] = [[] for _ in range(n_layer)]
    inputs, outputs, others = [], [], []
    for t in h.tensors:
        info = TensorInfo(t.name, t.type_name, t.shape, t.n_bytes)
        parts = t.name.split(".", 2)
        if parts[0] == "blk" and len(parts) == 3 and parts[1].isdigit():
            il = int(parts[1])
            if il >= n_layer:
                raise fail(f"tensor {t.name!r} is in layer {il} but block_count is {n_layer}")
            per_layer[il].append(info)
            continue
        base = _base_name(t.name)
        if base in _INPUT_NAMES:
            inputs.append(info)
        elif base in _OUTPUT_NAMES or t.name in _OUTPUT_NAMES or (
                base == "token_embd_norm" and arch in _LFM2_ARCHS):
            outputs.append(info)
        else:
            others.append(info)

    names = {t.name for t in h.tensors}
    tokens = kv.get("tokenizer.ggml.tokens")
    if isinstance(tokens, _Array):
        n_vocab = tokens.length
    else:
        embd = next((t for t in h.tensors if t.name == "token_embd.weight"), None)
        fallback = embd.shape[1] if embd is not None and len(embd.shape) > 1 else 0
        n_vocab = _count(kv, f"{arch}.vocab_size", fallback, fail)

    file_type = kv.get("general.file_type")
    if isinstance(file_type, int) and not isinstance(file_type, bool):
        try:
            file_type = gguf.LlamaFileType(file_type).name
        except ValueError:
            file_type = str(file_type)
    else:
        file_type = ""
    name = kv.get("general.name")
    if not isinstance(name, str) or not name:
        if "://" in path:   # a URL: drop the query (?download=true) before taking the file name
            path_part = path.split("?", 1)[0].split("#", 1)[0]
        else:
            path_part = path
        name = os.path.basename(path_part.rstrip("/")).removesuffix(".gguf")
    metadata = {k: (v.values if isinstance(v, _Array) else v) for k, v in kv.items()
                if v is not None and not (isinstance(v, _Array) and v.values is None)}

    layers = tuple(
        LayerProfile(
            index=il, tensors=tuple(per_layer[il]), n_head=n_head[il], n_head_kv=n_head_kv[il],
            n_embd_head_k=k_swa if is_swa[il] else k_full,
            n_embd_head_v=v_swa if is_swa[il] else v_full,
            is_swa=is_swa[il], has_kv=has_kv[il])
        for il in range(n_layer))
    return ModelProfile(
        path=path, arch=arch, name=name, file_bytes=file_bytes, n_layer=n_layer, n_embd=n_embd,
        n_ff=max(n_ff), n_vocab=n_vocab,
        n_ctx_train=_count(kv, f"{arch}.context_length", 0, fail),
        layers=layers, input_tensors=tuple(inputs), output_tensors=tuple(outputs),
        # llama.cpp loads token_embd a second time as the output matrix (TENSOR_DUPLICATED)
        tied_output=("output.weight" not in names and "token_embd.weight" in names
                     and arch not in _NO_OUTPUT_ARCHS),
        n_expert=n_expert, n_expert_used=n_expert_used, n_swa=n_swa, file_type=file_type,
        other_tensors=tuple(others), metadata=metadata)


def read_profile(path: str | os.PathLike) -> ModelProfile:
    """The ModelProfile of a local GGUF, read from its header (the weights are never read).

    Raises ModelFormatError, one line naming the file, for a missing or unreadable file and for
    anything llama.cpp would refuse (wrong magic, truncation, absurd counts, unknown types)."""
    src = os.fspath(path)

    def fail(msg: str) -> ModelFormatError:
        return ModelFormatError(f"{src}: {msg}")

    try:
        st = os.stat(src)
    except OSError as e:
        raise fail(f"cannot read the file ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):   # a FIFO or device would block or never end
        raise fail("not a regular file")
    if st.st_size == 0:
        raise fail("empty file, not a GGUF")
    try:
        with open(src, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            size = len(mm)
            try:
                header = _parse_header(mm, size, size, fail)
            except _Truncated as t:   # unreachable with the whole file at hand; kept as a guard
                raise fail(f"truncated: the header needs {t.needed} bytes, the file has {size}") from None
    except OSError as e:
        raise fail(f"cannot read the file ({e.strerror or e})") from None
    return _build_profile(header, src, size, fail)
