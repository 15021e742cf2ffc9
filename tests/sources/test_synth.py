"""Synthetic GGUFs: what the file says (gguf.GGUFReader) and what real llama.cpp makes of it."""

from __future__ import annotations

import ctypes
import math
import re
from contextlib import contextmanager
from dataclasses import replace

import pytest

gguf = pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp")

from gpulab.sources.synth import PRESETS, WEIGHT_TYPES, SynthSpec, layer_tensor_names, write_model  # noqa: E402

ATTN = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output"]
DENSE = ["ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
MOE = ["ffn_norm", "ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"]
QK_NORM = ["attn_q_norm", "attn_k_norm"]
# per-layer tensors as each arch's load_arch_tensors creates them (vendored src/models/*.cpp)
LAYER_TENSORS = {
    "llama": ATTN + DENSE,
    "llama-moe": ATTN + MOE,
    "gemma2": ATTN + ["post_attention_norm"] + DENSE + ["post_ffw_norm"],
    "gemma3": ATTN + ["post_attention_norm"] + QK_NORM + DENSE + ["post_ffw_norm"],
    "qwen3moe": ATTN + QK_NORM + MOE,
}

SMALL = SynthSpec(n_layer=2, n_embd=256, n_ff=256, n_head=4, n_head_kv=2, n_vocab=300)


@contextmanager
def captured_llama_log():
    """All of llama.cpp's log lines (debug level included) while the block runs."""
    lines: list[str] = []

    @llama_cpp.llama_log_callback   # the ctypes callback must outlive its use: `cb` is held here
    def cb(level, text, user_data):
        lines.append(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(cb, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        # hand logging back to the callback llama-cpp-python installs at import
        from llama_cpp import _logger
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


def load_and_decode(path, n_tokens: int = 8) -> dict:
    """Load on the CPU with tensor validation, decode a few random tokens, return what
    llama.cpp reports."""
    with captured_llama_log() as lines:
        mp = llama_cpp.llama_model_default_params()
        mp.n_gpu_layers = 0
        mp.check_tensors = True   # ggml_validate_row_data: no NaN/inf in f16 scales or floats
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), mp)
        assert model, "".join(lines[-20:])
        try:
            vocab = llama_cpp.llama_model_get_vocab(model)
            n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
            cp = llama_cpp.llama_context_default_params()
            cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_threads, cp.n_threads_batch = 64, 64, 64, 2, 2
            ctx = llama_cpp.llama_init_from_model(model, cp)
            assert ctx, "".join(lines[-20:])
            try:
                ids = [1] + [(7919 * i + 3) % n_vocab for i in range(1, n_tokens)]
                toks = (llama_cpp.llama_token * n_tokens)(*ids)
                assert llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(toks, n_tokens)) == 0
                logits = llama_cpp.llama_get_logits_ith(ctx, -1)
                assert all(math.isfinite(logits[i]) for i in range(n_vocab))
            finally:
                llama_cpp.llama_free(ctx)
            text = b"hello world\n"
            out = (llama_cpp.llama_token * 64)()
            n_tok = llama_cpp.llama_tokenize(vocab, text, len(text), out, 64, True, False)
            facts = dict(
                n_layer=llama_cpp.llama_model_n_layer(model),
                n_embd=llama_cpp.llama_model_n_embd(model),
                n_head=llama_cpp.llama_model_n_head(model),
                n_head_kv=llama_cpp.llama_model_n_head_kv(model),
                n_swa=llama_cpp.llama_model_n_swa(model),
                n_ctx_train=llama_cpp.llama_model_n_ctx_train(model),
                n_vocab=n_vocab,
                size=llama_cpp.llama_model_size(model),
                n_tokenized=n_tok,
            )
        finally:
            llama_cpp.llama_model_free(model)
    log = "".join(lines)
    facts["is_swa"] = {int(il): int(s) for il, s in re.findall(
        r"load_tensors: layer +(\d+) assigned to device \S+, is_swa = (\d)", log)}
    return facts


def check_file(path, spec: SynthSpec, layer_key: str) -> gguf.GGUFReader:
    """The GGUF holds exactly the tensors, shapes, bytes and keys the spec implies."""
    r = gguf.GGUFReader(path)
    kv = {k: f.contents() for k, f in r.fields.items()}
    a = spec.arch
    assert kv["general.architecture"] == a
    assert kv[f"{a}.block_count"] == spec.n_layer
    assert kv[f"{a}.embedding_length"] == spec.n_embd
    assert kv[f"{a}.attention.head_count"] == spec.n_head
    assert kv[f"{a}.attention.head_count_kv"] == spec.n_head_kv
    assert kv[f"{a}.context_length"] == spec.n_ctx_train
    assert len(kv["tokenizer.ggml.tokens"]) == spec.n_vocab
    if spec.n_expert:
        assert kv[f"{a}.expert_count"] == spec.n_expert
        assert kv[f"{a}.expert_used_count"] == spec.n_expert_used
    if spec.sliding_window:
        assert kv[f"{a}.attention.sliding_window"] == spec.sliding_window

    hd = spec.head_dim or spec.n_embd // spec.n_head
    ff = spec.n_ff_exp or spec.n_ff
    e, q, k = spec.n_embd, spec.n_head * hd, spec.n_head_kv * hd
    shapes = {  # ggml order, ne0 first
        "attn_norm": (e,), "ffn_norm": (e,), "post_attention_norm": (e,), "post_ffw_norm": (e,),
        "attn_q_norm": (hd,), "attn_k_norm": (hd,),
        "attn_q": (e, q), "attn_k": (e, k), "attn_v": (e, k), "attn_output": (q, e),
        "ffn_gate": (e, spec.n_ff), "ffn_up": (e, spec.n_ff), "ffn_down": (spec.n_ff, e),
        "ffn_gate_inp": (e, spec.n_expert), "ffn_gate_exps": (e, ff, spec.n_expert),
        "ffn_up_exps": (e, ff, spec.n_expert), "ffn_down_exps": (ff, e, spec.n_expert),
        "token_embd": (e, spec.n_vocab), "output": (e, spec.n_vocab), "output_norm": (e,),
    }
    want = {"token_embd.weight", "output_norm.weight"} | (
        set() if spec.tied_output else {"output.weight"})
    want |= {f"blk.{i}.{n}.weight" for i in range(spec.n_layer) for n in LAYER_TENSORS[layer_key]}
    assert {t.name for t in r.tensors} == want
    for t in r.tensors:
        short = t.name.split(".")[-2]
        assert tuple(int(d) for d in t.shape) == shapes[short], t.name
        gtype = "F32" if len(shapes[short]) == 1 or short == "ffn_gate_inp" else spec.weight_type
        assert t.tensor_type.name == gtype, t.name
        block, type_size = gguf.GGML_QUANT_SIZES[t.tensor_type]
        assert t.n_bytes == math.prod(shapes[short]) // block * type_size
    return r


def tensor_bytes(r) -> int:
    return sum(int(t.n_bytes) for t in r.tensors)


CASES = {
    "llama-gqa": (PRESETS["tiny"], "llama"),
    "llama-mha-tied-q8": (replace(SMALL, n_head_kv=4, tied_output=True, weight_type="Q8_0"), "llama"),
    "gemma3-swa": (PRESETS["tiny-swa"], "gemma3"),
    "gemma2-swa": (replace(SMALL, arch="gemma2", n_layer=4, tied_output=True, sliding_window=16), "gemma2"),
    "qwen3moe": (PRESETS["tiny-moe"], "qwen3moe"),
    "llama-moe": (replace(SMALL, n_expert=4, n_expert_used=2, head_dim=128), "llama-moe"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_arch_loads_and_decodes(tmp_path, case):
    spec, layer_key = CASES[case]
    path = write_model(tmp_path / "m.gguf", spec)
    r = check_file(path, spec, layer_key)
    assert layer_tensor_names(spec) == [n + ".weight" for n in LAYER_TENSORS[layer_key]]
    got = load_and_decode(path)
    assert got["n_layer"] == spec.n_layer
    assert got["n_embd"] == spec.n_embd
    assert (got["n_head"], got["n_head_kv"]) == (spec.n_head, spec.n_head_kv)
    assert got["n_vocab"] == spec.n_vocab
    assert got["n_ctx_train"] == spec.n_ctx_train
    assert got["n_tokenized"] > 1   # SPM byte fallback tokenizes any text
    # llama_model_size counts every tensor once, the tied output (a duplicate) not again
    assert got["size"] == tensor_bytes(r)
    # one debug line per layer and one for the output layer (index n_layer, never SWA)
    assert sorted(got["is_swa"]) == list(range(spec.n_layer + 1))
    assert got["is_swa"][spec.n_layer] == 0


def test_swa_patterns(tmp_path):
    # llama_hparams::set_swa_pattern(n_pattern): layer il slides iff il % n_pattern < n_pattern - 1;
    # gemma3 defaults to n_pattern 6 (5 local : 1 global), gemma2 to 2 (alternating).
    g3 = replace(PRESETS["tiny-swa"], n_layer=7)
    got = load_and_decode(write_model(tmp_path / "g3.gguf", g3))
    assert got["n_swa"] == g3.sliding_window
    assert [got["is_swa"][i] for i in range(7)] == [1, 1, 1, 1, 1, 0, 1]
    g2 = CASES["gemma2-swa"][0]
    got = load_and_decode(write_model(tmp_path / "g2.gguf", g2))
    assert got["n_swa"] == g2.sliding_window
    assert [got["is_swa"][i] for i in range(4)] == [1, 0, 1, 0]
    # gemma3 without a sliding window: no SWA layer at all
    got = load_and_decode(write_model(tmp_path / "g3f.gguf", replace(g3, sliding_window=0)))
    assert got["n_swa"] == 0 and not any(got["is_swa"].values())


@pytest.mark.parametrize("wtype", WEIGHT_TYPES)
def test_weight_types(tmp_path, wtype):
    spec = replace(SMALL, weight_type=wtype, n_layer=1)
    path = write_model(tmp_path / "m.gguf", spec)
    r = check_file(path, spec, "llama")
    assert load_and_decode(path, n_tokens=4)["size"] == tensor_bytes(r)


def test_deterministic_and_seeded(tmp_path):
    a = write_model(tmp_path / "a.gguf", SMALL).read_bytes()
    assert a == write_model(tmp_path / "b.gguf", SMALL).read_bytes()
    assert a != write_model(tmp_path / "c.gguf", replace(SMALL, seed=1)).read_bytes()


def test_presets_shapes():
    p8, p70 = PRESETS["llama3-8b"], PRESETS["llama3-70b-8layers"]
    assert (p8.n_layer, p8.n_embd, p8.n_ff, p8.n_head, p8.n_head_kv, p8.n_vocab, p8.weight_type) == (
        32, 4096, 14336, 32, 8, 128256, "Q4_0")
    assert (p70.n_layer, p70.n_embd, p70.n_ff, p70.n_head, p70.n_head_kv, p70.n_vocab) == (
        8, 8192, 28672, 64, 8, 128256)


@pytest.mark.parametrize("bad", [
    dict(arch="mamba"),
    dict(weight_type="IQ2_XXS"),
    dict(n_vocab=100),
    dict(arch="qwen3moe"),                         # no experts
    dict(n_expert=4, n_expert_used=0),
    dict(arch="gemma2", tied_output=False),        # gemma2 always ties
    dict(weight_type="Q4_K", n_ff=320),            # ffn_down rows not whole 256-blocks
])
def test_rejects_what_llama_cpp_would(tmp_path, bad):
    with pytest.raises(ValueError):
        write_model(tmp_path / "m.gguf", replace(SMALL, **bad))


def test_moe_profile_is_shaped_as_a_written_qwen3moe(tmp_path):
    """moe_profile (what-ifs at sizes no test writes) names, shapes and orders tensors as the
    file write_model writes and read_profile reads."""
    from gpulab.sources.read import read_profile
    from gpulab.sources.synth import moe_profile
    shape = dict(n_layer=2, n_embd=256, n_expert=4, n_expert_used=2, n_head=4, n_head_kv=2, n_vocab=512)
    built = moe_profile(n_ff_exp=128, head_dim=64, **shape)
    read = read_profile(write_model(tmp_path / "q.gguf", SynthSpec(arch="qwen3moe", n_ff=128, n_ff_exp=128,
                                                                   head_dim=64, **shape)))

    def names_shapes(p):
        return [(t.name, t.shape) for t in (*p.input_tensors, *(t for layer in p.layers for t in layer.tensors),
                                            *p.output_tensors)]
    assert names_shapes(built) == names_shapes(read)
    for a, b in zip(built.layers, read.layers):
        assert (a.n_head, a.n_head_kv, a.n_embd_head_k, a.n_embd_head_v) == (b.n_head, b.n_head_kv,
                                                                            b.n_embd_head_k, b.n_embd_head_v)
    assert (built.n_expert, built.n_expert_used, built.arch) == (read.n_expert, read.n_expert_used, read.arch)
def test_header_only_model_is_the_same_file_less_its_weights(tmp_path):
    """weights=False: same size, same header, same profile; the weights are a hole (zeros)."""
    import os

    from gpulab.sources.read import read_profile
    spec = SynthSpec(n_layer=3, n_embd=256, n_ff=512, n_vocab=512, weight_type="Q8_0")
    full = write_model(tmp_path / "full.gguf", spec)
    sparse = write_model(tmp_path / "sparse.gguf", spec, weights=False)
    assert os.path.getsize(full) == os.path.getsize(sparse)
    a, b = read_profile(full), read_profile(sparse)
    assert a.layers == b.layers and a.output_tensors == b.output_tensors and a.input_tensors == b.input_tensors
    assert full.read_bytes()[:2048] == sparse.read_bytes()[:2048]     # the header (its vocab runs past this)
    assert not any(sparse.read_bytes()[-1024:])
@pytest.mark.parametrize("spec", [SynthSpec(n_layer=3, n_embd=256, n_ff=512, n_head=8, n_head_kv=2, weight_type="Q8_0"),
                                  SynthSpec(arch="qwen3moe", n_layer=2, n_expert=4, n_expert_used=2, n_ff_exp=128),
                                  SynthSpec(n_layer=2, tied_output=True)], ids=["dense-q8", "moe", "tied"])
def test_synth_profile_is_what_read_profile_reads(tmp_path, spec):
    from gpulab import read_profile
    from gpulab.sources.synth import synth_profile
    got, want = synth_profile(spec), read_profile(write_model(tmp_path / "m.gguf", spec))
    for a in ("arch", "n_layer", "n_embd", "n_ff", "n_vocab", "tied_output", "n_expert", "n_expert_used"):
        assert getattr(got, a) == getattr(want, a), a
    strip = lambda ts: [(t.name, t.ggml_type, t.shape, t.n_bytes) for t in ts]  # noqa: E731
    assert strip(got.input_tensors) == strip(want.input_tensors)
    assert strip(got.output_tensors) == strip(want.output_tensors)
    for g, w in zip(got.layers, want.layers, strict=True):
        assert strip(g.tensors) == strip(w.tensors)
        assert (g.n_head, g.n_head_kv, g.n_embd_head_k, g.is_swa, g.has_kv) == (w.n_head, w.n_head_kv, w.n_embd_head_k,
                                                                               w.is_swa, w.has_kv)
