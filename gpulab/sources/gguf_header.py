"""The GGUF header walker: key/value pairs and tensor infos, read with `struct` under explicit bounds.

Not `gguf.GGUFReader`: it loops once per array element while it parses (about 2 s for
SmolLM2-135M's 49k-token vocabulary), and an array claiming 2**60 elements makes that loop run
past the end of the map without ever failing, so it hangs. This walker mirrors the checks of
llama.cpp's `gguf_init_from_reader` (ggml/src/gguf.cpp) instead, with the type tables of
gguf_tables (not `gguf`, which imports numpy). It reads a whole file's map (gguf_file) or the
bytes remote.py fetched by HTTP range requests (raising Truncated with the bytes it needs), so a
URL and a local copy give identical headers. What the header means for llama.cpp is gguf_arch's.

What the planner does not read is skipped by its length, not parsed: a numeric array longer
than _MAX_ARRAY_KEEP (a tokenizer's scores and token types) by its element size, without
touching its bytes (so remote.py does not fetch them), and a string array (tokens, merges) by
hopping over its length prefixes in one tight loop, checked once at the end.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from . import gguf_tables as T

__all__ = ["Header", "Array", "Truncated", "parse_header", "INT_TYPES"]

# --- bounds ---------------------------------------------------------------------------------
# Every loop below consumes at least one byte per step and is also capped by an item budget, so
# no header, however it lies, costs more than about a second or more memory than the file holds.
_MAX_ITEMS = 1 << 22          # KV pairs + string-array elements + tensors (real files: < 10**6)
_MAX_KV = 1 << 16             # real files: < 100
_MAX_TENSORS = 1 << 20        # real files: < 10**5 even with per-expert tensors
_MAX_KEY_LEN = 1 << 16
_MAX_STR_KEEP = 1 << 20       # longer string values are skipped, not decoded
_MAX_ARRAY_KEEP = 4096        # numeric arrays up to this length keep their values (per-layer arrays)

_GGML_MAX_NAME = 64           # tensor names must be shorter (gguf.cpp)
_GGML_MAX_DIMS = 4
_MIN_KV_BYTES = 8 + 4 + 1     # key length, type, smallest value
_MIN_TENSOR_BYTES = 8 + 4 + 4 + 8   # name length, n_dims, type, offset
_HEADER_FIXED = 24            # magic, version, n_tensors, n_kv

_SCALAR_FMT = {T.UINT8: "B", T.INT8: "b", T.UINT16: "H", T.INT16: "h", T.UINT32: "I", T.INT32: "i",
               T.FLOAT32: "f", T.BOOL: "?", T.UINT64: "Q", T.INT64: "q", T.FLOAT64: "d"}
_U64 = struct.Struct("<Q")
INT_TYPES = {T.UINT8, T.INT8, T.UINT16, T.INT16, T.UINT32, T.INT32, T.UINT64, T.INT64}
_GGML_TYPES = T.GGML_TYPES   # id -> (name, block size, bytes per block)


class Truncated(Exception):
    """The bytes at hand end before the header does: the walker goes on once it has bytes
    `start` to `needed` (it never reads the bytes it skipped before `start`). Inside a string
    array, `hint` guesses where the array ends, from the strings read so far (0: no guess)."""

    def __init__(self, needed: int, start: int = 0, hint: int = 0):
        super().__init__(needed)
        self.needed, self.start, self.hint = needed, start, hint


@dataclass(frozen=True)
class Array:
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
class Header:
    version: int
    kv: dict                  # key -> scalar or Array
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
            raise Truncated(end, start)
        self.off = end
        return start

    def skip(self, n: int) -> None:
        """Step over n bytes without reading them (they may lie past the bytes at hand)."""
        if self.off + n > self.total:
            raise self.fail(f"truncated: the header needs byte {self.off + n} but the file has {self.total}")
        self.off += n

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


def parse_header(buf, avail: int, total: int, fail) -> Header:
    """Walk magic, counts, KV pairs and tensor infos as llama.cpp's gguf_init_from_reader does.

    `buf` holds the first `avail` bytes of a file of `total` bytes. Raises `fail(msg)` (an
    exception factory) for a malformed file and Truncated when more bytes are needed."""
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
        if key == "general.alignment" and vtype != T.UINT32:
            raise fail("general.alignment is not a uint32")   # gguf.cpp insists on the type

    alignment = kv.get("general.alignment", T.DEFAULT_ALIGNMENT)
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
    return Header(version, kv, tuple(tensors), header_bytes, data_offset)


def _read_value(w: _Walker, key: str) -> tuple[int, object]:
    """(GGUF type, value): a scalar, a string (None when too long to keep) or an Array."""
    vtype = w.scalar("I")
    if vtype == T.STRING:
        return vtype, w.string(f"value of {key!r}", _MAX_STR_KEEP, strict=False)
    if vtype in _SCALAR_FMT:
        return vtype, w.scalar(_SCALAR_FMT[vtype])
    if vtype != T.ARRAY:
        raise w.fail(f"key {key!r} has invalid GGUF type {vtype}")
    etype, n = w.scalar("I"), w.scalar("Q")
    if etype == T.STRING:
        if n * 8 > w.total - w.off:
            raise w.fail(f"array {key!r} claims {n} strings, more than the file can hold")
        w.count_item(n)
        _skip_strings(w, key, n)
        return vtype, Array(etype, n, None)
    if etype not in _SCALAR_FMT:   # nested arrays included: gguf.cpp rejects them too
        raise w.fail(f"array {key!r} has invalid element type {etype}")
    fmt = _SCALAR_FMT[etype]
    size = struct.calcsize("<" + fmt)
    if n * size > w.total - w.off:
        raise w.fail(f"array {key!r} claims {n} elements, more than the file can hold")
    if n > _MAX_ARRAY_KEEP:   # a tokenizer's scores or token types: nothing gpulab reads
        w.skip(n * size)
        return vtype, Array(etype, n, None)
    start = w.take(n * size)
    return vtype, Array(etype, n, struct.unpack_from(f"<{n}{fmt}", w.buf, start))


def _skip_strings(w: _Walker, key: str, n: int) -> None:
    """Step over n length-prefixed strings: each length locates the next, so this is the one
    per-element loop (10**5..10**6 times for a tokenizer), kept as tight as Python allows.

    The offsets only grow, so when the last one lies within the bytes at hand, so did every
    length read on the way; only then is the bound checked. A lying length makes unpack_from
    fail or the end overshoot; the careful walk then finds the element and raises its error."""
    unpack, buf, off = _U64.unpack_from, w.buf, w.off
    try:
        for _ in range(n):
            off += unpack(buf, off)[0] + 8
    except (struct.error, OverflowError):   # an offset past the buffer, or past ssize_t
        off = -1
    if 0 <= off <= min(w.avail, w.total):
        w.off = off
        return
    first = w.off
    for i in range(n):   # raises for the element that reaches past the end
        try:
            w.skip_string(f"element {i} of {key!r}")
        except Truncated as t:   # the strings to come are likely as long as those read
            t.hint = w.off + (w.off - first) * (n - i) * 9 // (8 * max(i, 1)) + 4096   # +1/8: later ones run longer
            raise
    raise AssertionError("unreachable: the fast walk overshot but the careful one did not")


def _read_tensor_info(w: _Walker, fail) -> _Tensor:
    name = w.string("a tensor name", _GGML_MAX_NAME - 1, strict=True)
    assert name is not None   # strict: a name too long raised
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


