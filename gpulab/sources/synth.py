"""Random-weight GGUF models of any shape that real llama.cpp loads and runs.

Tests and benchmarks use these instead of downloaded models: the text they produce is noise,
but tensor names, shapes, types and bytes are exactly what llama.cpp's `load_arch_tensors`
of each architecture creates (vendored llama.cpp, `src/models/<arch>.cpp`), so placement,
buffer sizes and KV geometry are those of a real model of that shape.

    from gpulab.sources.synth import PRESETS, SynthSpec, write_model
    write_model(tmp_path / "m.gguf", PRESETS["tiny"])

Weights are streamed to the file from a small random pool (a few MiB, tiled from a random
block-aligned start per tensor), so the 8B preset writes at disk speed, not at the speed of a
random number generator. Quantized blocks are random bytes whose f16 scale fields are set to a
small finite value: llama.cpp's `check_tensors` (ggml_validate_row_data) accepts them.
"""

from __future__ import annotations

import pathlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ..core.profile import ModelProfile

__all__ = ["SynthSpec", "write_model", "PRESETS", "ARCHES", "WEIGHT_TYPES", "layer_tensor_names", "moe_profile",
           "synth_profile"]

# GGUF `general.architecture` values this module writes (llama-arch.cpp LLM_ARCH_NAMES).
ARCHES = ("llama", "gemma2", "gemma3", "qwen3moe")

# Byte offsets of the ggml_half scale fields inside one block (ggml-common.h block_*); every
# other byte of a block is a packed quant/sub-scale for which any value is valid.
_F16_FIELDS = {
    "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
    "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
}
WEIGHT_TYPES = ("F32", "F16", "BF16", *_F16_FIELDS)
_FILE_TYPE = {  # general.file_type (llama_ftype) a real file of that type would carry
    "F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q4_0": "MOSTLY_Q4_0",
    "Q4_1": "MOSTLY_Q4_1", "Q5_0": "MOSTLY_Q5_0", "Q5_1": "MOSTLY_Q5_1", "Q8_0": "MOSTLY_Q8_0",
    "Q2_K": "MOSTLY_Q2_K", "Q3_K": "MOSTLY_Q3_K_M", "Q4_K": "MOSTLY_Q4_K_M",
    "Q5_K": "MOSTLY_Q5_K_M", "Q6_K": "MOSTLY_Q6_K",
}
_POOL_BYTES = 4 << 20
_N_SPECIAL = 3 + 256   # <unk> <s> </s> and the 256 SPM byte tokens <0x00>..<0xFF>


@dataclass(frozen=True)
class SynthSpec:
    arch: str = "llama"          # one of ARCHES
    n_layer: int = 4
    n_embd: int = 256
    n_ff: int = 512              # dense FFN width; for MoE the default expert width
    n_head: int = 8
    n_head_kv: int = 4
    head_dim: int | None = None  # default n_embd // n_head
    n_vocab: int = 512           # >= 259: SPM vocab with byte fallback tokens
    n_ctx_train: int = 4096
    tied_output: bool = False    # True: no output.weight (llama.cpp duplicates token_embd)
    weight_type: str = "F16"     # 2-D matrices (and expert stacks); norms and ffn_gate_inp F32
    n_expert: int = 0            # >0 with arch="llama" gives a Mixtral-style MoE
    n_expert_used: int = 0
    n_ff_exp: int | None = None  # qwen3moe expert width, default n_ff
    sliding_window: int = 0      # gemma2/gemma3 `attention.sliding_window` (0: not written)
    seed: int = 0
    name: str = "gpulab-synth"

    @property
    def head_dim_(self) -> int:
        return self.head_dim if self.head_dim is not None else self.n_embd // self.n_head


def _check(s: SynthSpec) -> None:
    if s.arch not in ARCHES:
        raise ValueError(f"arch {s.arch!r} not in {ARCHES}")
    if s.weight_type not in WEIGHT_TYPES:
        raise ValueError(f"weight_type {s.weight_type!r} not in {WEIGHT_TYPES}")
    if s.n_vocab < _N_SPECIAL:
        raise ValueError(f"n_vocab must be >= {_N_SPECIAL} (3 specials + 256 byte tokens)")
    if s.n_head % s.n_head_kv:
        raise ValueError("n_head must be a multiple of n_head_kv")
    moe = s.n_expert > 0
    if s.arch == "qwen3moe" and not moe:
        raise ValueError("qwen3moe needs n_expert > 0")   # qwen3moe.cpp throws otherwise
    if s.arch in ("gemma2", "gemma3") and moe:
        raise ValueError(f"{s.arch} has no experts")
    if moe and not 0 < s.n_expert_used <= s.n_expert:
        raise ValueError("need 0 < n_expert_used <= n_expert")   # llama_model_base::load_hparams asserts
    if s.arch == "llama" and s.n_ff_exp not in (None, s.n_ff):
        raise ValueError("llama MoE experts are n_ff wide (llama.cpp ignores expert_feed_forward_length)")
    if s.arch == "gemma2" and not s.tied_output:
        # gemma2.cpp always creates `output` as a duplicate of token_embd: an output.weight in
        # the file would be left over ("wrong number of tensors").
        raise ValueError("gemma2 always ties output to token_embd: set tied_output=True")


def _tensors(s: SynthSpec) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, ggml shape ne0-first, ggml type) in file order, as load_arch_tensors creates them."""
    wt, hd = s.weight_type, s.head_dim_
    q, kv = s.n_head * hd, s.n_head_kv * hd
    ff_exp = s.n_ff_exp or s.n_ff
    out: list[tuple[str, tuple[int, ...], str]] = [("token_embd.weight", (s.n_embd, s.n_vocab), wt)]
    for i in range(s.n_layer):
        b = f"blk.{i}."
        out += [(b + "attn_norm.weight", (s.n_embd,), "F32"),
                (b + "attn_q.weight", (s.n_embd, q), wt),
                (b + "attn_k.weight", (s.n_embd, kv), wt),
                (b + "attn_v.weight", (s.n_embd, kv), wt),
                (b + "attn_output.weight", (q, s.n_embd), wt)]
        if s.arch in ("gemma2", "gemma3"):
            out.append((b + "post_attention_norm.weight", (s.n_embd,), "F32"))
        if s.arch in ("gemma3", "qwen3moe"):   # per-head RMS norm of Q and K
            out += [(b + "attn_q_norm.weight", (hd,), "F32"), (b + "attn_k_norm.weight", (hd,), "F32")]
        out.append((b + "ffn_norm.weight", (s.n_embd,), "F32"))
        if s.n_expert:
            # the router stays F32, as llama-quant leaves ffn_gate_inp unquantized
            out += [(b + "ffn_gate_inp.weight", (s.n_embd, s.n_expert), "F32"),
                    (b + "ffn_gate_exps.weight", (s.n_embd, ff_exp, s.n_expert), wt),
                    (b + "ffn_up_exps.weight", (s.n_embd, ff_exp, s.n_expert), wt),
                    (b + "ffn_down_exps.weight", (ff_exp, s.n_embd, s.n_expert), wt)]
        else:
            out += [(b + "ffn_gate.weight", (s.n_embd, s.n_ff), wt),
                    (b + "ffn_up.weight", (s.n_embd, s.n_ff), wt),
                    (b + "ffn_down.weight", (s.n_ff, s.n_embd), wt)]
        if s.arch in ("gemma2", "gemma3"):
            out.append((b + "post_ffw_norm.weight", (s.n_embd,), "F32"))
    out.append(("output_norm.weight", (s.n_embd,), "F32"))
    if not s.tied_output:
        out.append(("output.weight", (s.n_embd, s.n_vocab), wt))
    return out


def layer_tensor_names(spec: SynthSpec) -> list[str]:
    """Names of the tensors of one block, `blk.0.` prefix stripped (for tests and docs)."""
    return [n[len("blk.0."):] for n, _, _ in _tensors(spec) if n.startswith("blk.0.")]


def _vocab(n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece ("llama") vocab: llama_vocab::impl::load needs <0x0A> for its
    linefeed token, and the byte tokens make any text tokenizable by byte fallback."""
    from gguf import TokenType as T
    toks = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [T.UNKNOWN, T.CONTROL, T.CONTROL] + [T.BYTE] * 256
    toks += [f"\u2581t{i}" for i in range(n_vocab - len(toks))]
    types += [T.NORMAL] * (n_vocab - len(types))
    scores = [0.0] * _N_SPECIAL + [-float(i) for i in range(n_vocab - _N_SPECIAL)]
    return toks, scores, [int(t) for t in types]


def add_vocab(w, n_vocab: int) -> None:
    """The SentencePiece vocab of `_vocab` into GGUFWriter `w`, with <s> and </s> as BOS and EOS."""
    toks, scores, types = _vocab(n_vocab)
    w.add_tokenizer_model("llama")
    w.add_token_list(toks)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)


def _pool(gtype: str, rng: np.random.Generator) -> memoryview:
    """A few MiB of valid data of one ggml type, a whole number of blocks long."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    if gtype in ("F32", "F16", "BF16"):
        x = rng.standard_normal(_POOL_BYTES // 4, dtype=np.float32) * np.float32(0.02)
        if gtype == "F16":
            x = x.astype(np.float16)
        elif gtype == "BF16":
            x = (x.view(np.uint32) >> 16).astype(np.uint16)  # truncate to bfloat16
        return memoryview(x.tobytes())
    _, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[gtype]]
    blocks = np.frombuffer(rng.bytes(_POOL_BYTES // type_size * type_size), np.uint8)
    blocks = blocks.reshape(-1, type_size).copy()
    # Scales: 2**-12, small and finite, so weights stay O(0.01) and nothing is NaN/inf.
    scale = np.frombuffer(np.float16(2.0 ** -12).tobytes(), np.uint8)
    for off in _F16_FIELDS[gtype]:
        blocks[:, off:off + 2] = scale
    return memoryview(blocks.tobytes())


def _n_bytes(shape: tuple[int, ...], gtype: str) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[gtype]]
    if shape[0] % block:
        # ggml quantizes rows (ne0) in whole blocks; llama.cpp refuses a ragged row
        raise ValueError(f"{gtype} needs rows (ne0={shape[0]}) in multiples of {block}")
    return int(np.prod(shape)) // block * type_size


def write_model(path, spec: SynthSpec, *, weights: bool = True) -> pathlib.Path:
    """Write `spec` as a GGUF file at `path` and return the path.

    weights=False: the header only, the file extended to its full size as a sparse file (the
    weights read as zeros, no disk is used): a 70B-sized model to plan in a notebook in
    milliseconds. Loading it gives zeros for every weight."""
    import gguf

    _check(spec)
    path = pathlib.Path(path)
    tensors = [(n, shape, t, _n_bytes(shape, t)) for n, shape, t in _tensors(spec)]

    w = gguf.GGUFWriter(path, spec.arch)
    try:
        _write(w, spec, tensors, weights)
    finally:
        w.close()
    return path


def synth_profile(spec: SynthSpec, path: str = "synth (not written)"):
    """The ModelProfile of the file write_model would write, without writing it: for what-ifs on
    models too big to write (PRESETS['llama3-8b'] is 4.6 GB). Models without sliding-window
    layers only (their pattern is gpulab.sources.gguf_arch's to decide); tests check it against
    read_profile of a written file."""
    from ..core.profile import LayerProfile, ModelProfile, TensorInfo
    _check(spec)
    if spec.sliding_window:
        raise ValueError("synth_profile does not place sliding-window layers; write the model and read it")
    tensors: list[TensorInfo] = []
    at = 0
    for n, shape, gtype in _tensors(spec):
        nb = _n_bytes(shape, gtype)
        tensors.append(TensorInfo(n, gtype, shape, nb, at))
        at += -(-nb // 32) * 32          # GGUF's default alignment
    hd = spec.head_dim_
    by_layer: dict[int, list] = {}
    for t in tensors:
        if t.name.startswith("blk."):
            by_layer.setdefault(int(t.name.split(".")[1]), []).append(t)
    layers = tuple(LayerProfile(i, tuple(by_layer[i]), n_head=spec.n_head, n_head_kv=spec.n_head_kv,
                                n_embd_head_k=hd, n_embd_head_v=hd) for i in range(spec.n_layer))
    return ModelProfile(path=path, arch=spec.arch, name=spec.name, file_bytes=at, n_layer=spec.n_layer,
                        n_embd=spec.n_embd, n_ff=spec.n_ff, n_vocab=spec.n_vocab, n_ctx_train=spec.n_ctx_train,
                        layers=layers, input_tensors=tuple(t for t in tensors if t.name == "token_embd.weight"),
                        output_tensors=tuple(t for t in tensors if t.name.startswith("output")),
                        tied_output=spec.tied_output, n_expert=spec.n_expert, n_expert_used=spec.n_expert_used)


def _write(w, s: SynthSpec, tensors: list[tuple[str, tuple[int, ...], str, int]], weights: bool = True) -> None:
    import gguf

    arch = s.arch
    w.add_name(s.name)
    w.add_file_type(gguf.LlamaFileType[_FILE_TYPE[s.weight_type]])
    if s.weight_type not in ("F32", "F16", "BF16"):
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    # llama_model_base::load_hparams: context_length, embedding_length, block_count required;
    # the rest are optional there, but are written so readers see the whole geometry.
    w.add_context_length(s.n_ctx_train)
    w.add_embedding_length(s.n_embd)
    w.add_block_count(s.n_layer)
    w.add_feed_forward_length(s.n_ff)
    w.add_head_count(s.n_head)
    w.add_head_count_kv(s.n_head_kv)
    w.add_key_length(s.head_dim_)
    w.add_value_length(s.head_dim_)
    # llama/qwen3moe insist n_rot == head dim ("invalid n_rot"), so say it explicitly.
    w.add_rope_dimension_count(s.head_dim_)
    w.add_layer_norm_rms_eps(1e-6)   # required key for all four arches
    w.add_vocab_size(s.n_vocab)
    if s.n_expert:
        w.add_expert_count(s.n_expert)
        w.add_expert_used_count(s.n_expert_used)
        if arch == "qwen3moe":
            w.add_expert_feed_forward_length(s.n_ff_exp or s.n_ff)
    if s.sliding_window:
        # gemma3: SWA only when this key is > 0; gemma2 defaults to 4096 without it.
        # Which layers slide is llama.cpp's default pattern (load_swa_pattern), not written.
        w.add_sliding_window(s.sliding_window)

    add_vocab(w, s.n_vocab)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)

    for name, shape, gtype, nbytes in tensors:
        # add_tensor_info wants numpy order (ne reversed); a non-uint8 dtype keeps the shape
        # in elements, raw_dtype gives the ggml type.
        w.add_tensor_info(name, tuple(reversed(shape)), np.dtype(np.float32), nbytes,
                          raw_dtype=gguf.GGMLQuantizationType[gtype])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()

    # Stream the data ourselves (GGUFWriter would want every tensor in memory): each tensor
    # starts at an aligned offset, the alignment GGUFWriter used for the offsets it wrote.
    rng = np.random.default_rng(s.seed)
    pools: dict[str, memoryview] = {}
    ones = memoryview(np.ones(max(s.n_embd, s.head_dim_), np.float32).tobytes())
    f = w.fout[0]
    if not weights:                    # the same offsets, nothing written: a sparse file
        end = f.tell()
        for *_, nbytes in tensors:
            end = (end + w.data_alignment - 1) // w.data_alignment * w.data_alignment + nbytes
        f.truncate((end + w.data_alignment - 1) // w.data_alignment * w.data_alignment)
        return
    for _name, shape, gtype, nbytes in tensors:
        w.write_padding(f, f.tell())
        if len(shape) == 1:            # norm weights: 1.0, the identity scale
            f.write(ones[:nbytes])
            continue
        if gtype not in pools:
            pools[gtype] = _pool(gtype, rng)
        pool = pools[gtype]
        unit = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[gtype]][1]   # bytes per block
        pos = int(rng.integers(len(pool) // unit)) * unit   # block-aligned random start
        left = nbytes
        while left:
            n = min(left, len(pool) - pos)
            f.write(pool[pos:pos + n])
            left, pos = left - n, 0
    w.write_padding(f, f.tell())


_LLAMA3: dict[str, Any] = dict(n_head=32, n_head_kv=8, n_vocab=128256, n_ctx_train=8192, weight_type="Q4_0")

PRESETS: dict[str, SynthSpec] = {
    # fast tests: ~1 MiB, loads and decodes in well under a second on CPU
    "tiny": SynthSpec(),
    "tiny-swa": SynthSpec(arch="gemma3", n_layer=6, sliding_window=32, tied_output=True,
                          name="gpulab-synth-swa"),
    "tiny-moe": SynthSpec(arch="qwen3moe", n_expert=4, n_expert_used=2, n_ff_exp=128,
                          name="gpulab-synth-moe"),
    "llama3-8b": SynthSpec(n_layer=32, n_embd=4096, n_ff=14336, name="llama3-8b-synth", **_LLAMA3),
    "llama3-70b-8layers": SynthSpec(n_layer=8, n_embd=8192, n_ff=28672, name="llama3-70b-8layers-synth",
                                    **{**_LLAMA3, "n_head": 64}),
}


def moe_profile(n_layer: int = 48, n_embd: int = 2048, n_expert: int = 128, n_expert_used: int = 8,
                n_ff_exp: int = 768, n_head: int = 32, n_head_kv: int = 4, head_dim: int = 128,
                n_vocab: int = 151936, bits_per_weight: float = 4.5, name: str = "moe") -> ModelProfile:
    """The profile of a MoE model shaped like a real one, without writing it (defaults:
    Qwen3-30B-A3B at ~4.5 bits per weight): per layer attention, norms, a router and three
    expert stacks of n_expert experts each, named, shaped and ordered as write_model writes a
    qwen3moe (tests/sources check that), laid out one after the other. For
    what-ifs at sizes no test should write (planner only: llama.cpp cannot load it)."""
    from dataclasses import replace

    from ..core.profile import LayerProfile, ModelProfile, TensorInfo

    def t(name_: str, shape: tuple[int, ...], bpw: float = bits_per_weight) -> TensorInfo:
        n = 1
        for d in shape:
            n *= d
        return TensorInfo(name_, "Q4_K" if bpw < 16 else "F32", shape, int(n * bpw / 8))
    q, kv = n_head * head_dim, n_head_kv * head_dim
    built: list[LayerProfile] = []
    for i in range(n_layer):
        b = f"blk.{i}."
        tensors = (t(b + "attn_norm.weight", (n_embd,), 32), t(b + "attn_q.weight", (n_embd, q)),
                   t(b + "attn_k.weight", (n_embd, kv)), t(b + "attn_v.weight", (n_embd, kv)),
                   t(b + "attn_output.weight", (q, n_embd)), t(b + "attn_q_norm.weight", (head_dim,), 32),
                   t(b + "attn_k_norm.weight", (head_dim,), 32), t(b + "ffn_norm.weight", (n_embd,), 32),
                   t(b + "ffn_gate_inp.weight", (n_embd, n_expert), 32),
                   t(b + "ffn_gate_exps.weight", (n_embd, n_ff_exp, n_expert)),
                   t(b + "ffn_up_exps.weight", (n_embd, n_ff_exp, n_expert)),
                   t(b + "ffn_down_exps.weight", (n_ff_exp, n_embd, n_expert)))
        built.append(LayerProfile(index=i, tensors=tensors, n_head=n_head, n_head_kv=n_head_kv,
                                  n_embd_head_k=head_dim, n_embd_head_v=head_dim))
    emb: tuple[TensorInfo, ...] = (t("token_embd.weight", (n_embd, n_vocab)),)
    out: tuple[TensorInfo, ...] = (t("output_norm.weight", (n_embd,), 32), t("output.weight", (n_embd, n_vocab)))
    at = 1 << 20
    laid = []
    for x in [*emb, *(x for layer in built for x in layer.tensors), *out]:
        laid.append(replace(x, offset=at))
        at += x.n_bytes
    placed = iter(laid)
    emb = (next(placed),)
    layers = tuple(replace(layer, tensors=tuple(next(placed) for _ in layer.tensors)) for layer in built)
    out = tuple(next(placed) for _ in out)
    total = sum(x.n_bytes for x in emb + out) + sum(layer.weights_bytes for layer in layers)
    return ModelProfile(path=f"{name} (no file)", arch="qwen3moe", name=name, file_bytes=total, n_layer=n_layer,
                        n_embd=n_embd, n_ff=n_ff_exp, n_vocab=n_vocab, n_ctx_train=40960, layers=layers,
                        input_tensors=emb, output_tensors=out, tied_output=False, n_expert=n_expert,
                        n_expert_used=n_expert_used)
