"""Ask the vendored llama.cpp which keys and tensors each architecture needs, and write them down.

For every architecture llama.cpp names (src/llama-arch.cpp LLM_ARCH_NAMES) that gpulab's curated
models (gpulab.sources.arch_models) do not write, a child process loads a growing GGUF file until
llama.cpp accepts it, reading what to add from the loader's own errors
(src/llama-model-loader.cpp):

  key not found in model: K              -> add K (a value chosen from its name)
  key K has wrong type T but expected U  -> retype K
  missing tensor 'T'                     -> add T (and the same tensor in every block) with a
                                            shape no loader asks for, so that ...
  tensor 'T' has wrong shape; expected S -> ... the next load says its shape
  wrong number of tensors                -> drop the block tensors the loader never asked for

Where llama.cpp stops on an assert instead of naming a key (no experts, MLA geometry, a hybrid's
recurrent layers), the architecture's source supplies seeds (SEEDS, seeds()) and the assert's text a
retry with the values it asks for (RETRIES). Then the child creates a context (what the matrix
measures) and decodes 8 tokens. Weights are zeros in a sparse file; the loader never reads them.
The result, gpulab/sources/arch_models.json, is what write_arch_model writes for those architectures;
those llama.cpp did not accept keep the first check they failed (docs/COVERAGE.md lists them).

The committed file is the one the architecture matrix proved. Run over every architecture today, the script
rewrites 14 of its entries (bert, deepseek2-ocr, ernie4_5, gemma4, glm-dsa, hy_v4, jamba, laguna, mellum, mistral4,
nemotron_h_moe, paddleocr, phi3, step35: expert counts, gating and sliding-window keys, hy_v4's hyper-connection
count), because later retries and guesses answer their loaders otherwise: name the architectures you mean to
change, and rerun their matrix rows after.

    python scripts/discover_arch_models.py [arch ...]      # all by default: about 8 min on one core
    GPULAB_ARCH_MODELS_OUT=/tmp/x.json ...                 # somewhere else than the package's file
    GPULAB_DISCOVER_TRACE=1 python scripts/discover_arch_models.py --child ARCH OUT.json '{}'   # each load's answer
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(os.environ.get("GPULAB_ARCH_MODELS_OUT", ROOT / "gpulab" / "sources" / "arch_models.json"))
MAX_LOADS = 1500
TRACE = bool(os.environ.get("GPULAB_DISCOVER_TRACE"))
_BOGUS = (3, 5, 7)          # a shape no loader asks for: the first load that reaches it names the real one

# Base hyperparameters: the curated models' sizes (n_embd 1024, 8192 tokens), 6 blocks.
BASE = {"context_length": 32768, "embedding_length": 1024, "vocab_size": 8192, "block_count": 6,
        "feed_forward_length": 3072, "attention.head_count": 16, "attention.head_count_kv": 4,
        "rope.dimension_count": 64, "attention.layer_norm_rms_epsilon": 1e-5}


@functools.lru_cache(maxsize=1)
def llama_src() -> Path:
    """The vendored llama.cpp: GPULAB_LLAMA_CPP_SRC, or the source scripts/llama-tools.sh built the tools from."""
    given = os.environ.get("GPULAB_LLAMA_CPP_SRC")
    if given:
        return Path(given)
    found = subprocess.run([str(ROOT / "scripts" / "llama-tools.sh"), "--find-only", "llama-server"],
                           capture_output=True, text=True, env=dict(os.environ, PY=sys.executable))
    src = Path(found.stdout.strip()).parents[1] / "src" / "vendor" / "llama.cpp" if found.returncode == 0 else None
    if src is None or not (src / "src" / "llama-arch.cpp").is_file():
        sys.exit("the vendored llama.cpp is not at hand: set GPULAB_LLAMA_CPP_SRC to vendor/llama.cpp of the "
                 "pinned llama-cpp-python sdist, or run scripts/llama-tools.sh")
    return src


# Keys a loader reads as optional but its tensors need: written whenever the architecture's source
# (src/models/<arch>.cpp) names them.
SEEDS = ("LLM_KV_EXPERT_COUNT", "LLM_KV_EXPERT_USED_COUNT", "LLM_KV_EXPERT_FEED_FORWARD_LENGTH",
         "LLM_KV_EXPERT_SHARED_FEED_FORWARD_LENGTH", "LLM_KV_EXPERT_SHARED_COUNT", "LLM_KV_LEADING_DENSE_BLOCK_COUNT",
         "LLM_KV_ATTENTION_KV_LORA_RANK", "LLM_KV_ATTENTION_Q_LORA_RANK", "LLM_KV_SSM_CONV_KERNEL",
         "LLM_KV_SSM_INNER_SIZE", "LLM_KV_SSM_STATE_SIZE", "LLM_KV_SSM_TIME_STEP_RANK", "LLM_KV_SSM_GROUP_COUNT")


QKV = "(separate Q, K and V)"
OPTIONAL = "(the optional tensors of the loader)"
NO_FFN = "(accepted without an FFN)"
SHAPES = "(block tensors' shapes)"
ZERO_WIDTH = "(a shape with a zero dimension expected)"
OPTIONAL_KEYS = "(the optional keys of the loader)"
FA_OFF = "(a context with flash attention off)"

# What to add when llama.cpp stops on a value it did not ask for by name (an assert, an abort): the
# message it stops with, and the keys to write on the next try.
RETRIES = [
    # a loader that needs experts (the base loader reads their counts as optional); one that builds a dense
    # or a MoE model from the same code stays dense, as most checkpoints of those architectures are
    ("n_ids_used > 0", {"expert_count": 8, "expert_used_count": 2}),
    ("zero experts", {"expert_count": 8, "expert_used_count": 2}),
    ("n_expert must be > 0", {"expert_count": 8, "expert_used_count": 2}),
    ("n_expert && n_expert_used", {"expert_count": 8, "expert_used_count": 2}),
    ("n_expert and n_expert_used must be > 0", {"expert_count": 8, "expert_used_count": 2}),
    ("fatal error", {"expert_gating_func": 1}),                 # llm_graph_context::build_moe_ffn: no gating
    ("n_embd_head_qk_nope >= 1", {"attention.q_lora_rank": 512, "attention.kv_lora_rank": 256,
                                  "attention.key_length": 192, "attention.value_length": 128}),
    ("sections[0] > 0", {"rope.dimension_sections": [16, 8, 8, 0]}),
    # a loader whose Q/K/V are all optional (create_tensor_qkv(..., TENSOR_NOT_REQUIRED), phi3) accepts
    # a file without attention and crashes building the graph: write separate Q, K and V
    ("exit -11", {QKV: True}),
    # ... or other tensors it creates only when present (qwen35's fused QKV and gate on recurrent layers)
    ("exit -11", {OPTIONAL: True}),
    ("n_group == 0", {"ssm.group_count": 0}),                  # plamo2's Mamba layers have no groups
    ("indexer_kpool > 1", {"attention.indexer.kpool": 2, "attention.indexer.top_k": 64}),
    ("n_layer() == n_slot", {"hrm.layers_per_stack": 1, "hrm.h_cycles": 2, "hrm.l_cycles": 2}),  # 1 x 2 x 3 = 6
    ("kda_gate_lower_bound < 0.0f", {"kda.safe_gate": True, "kda.gate_lower_bound": -5.0}),
    ("n_embd == hparams.n_embd_r()", {"token_shift_count": 1}),    # rwkv6qwen2, arwkv7: one shifted row
    ("time_mix_lerp_fused == NULL", {OPTIONAL: True}),             # rwkv6: its lerp tensors are optional
    # a reshape of Q that assumes as many KV heads as query heads (t5's n_embd_k_gqa-wide Q)
    ("ggml_nelements(a) == ne0*ne1*ne2)", {"attention.head_count_kv": 16}),
    ("a->ne[0] == b->ne[0]", {"attention.head_count_kv": 16}),     # ... or a product of them (minicpm3)
    # ... but deepseek4's raw (uncompressed) cache holds one MQA head (deepseek4.cpp build_attention_impl reshapes
    # its KV to [n_embd_head, 1, n_tokens]; V is K), 128 wide with 64 RoPE dims (DeepSeek-V4: 512, 64), and must
    # come after the line above: the later retry's value wins
    ("build_raw_attention", {"attention.head_count_kv": 1, "attention.key_length": 128,
                             "attention.value_length": 128}),
    # rwkv6's time mix repeats K and V per KV head unless n_head_kv is 0 or n_embd / head_size: its converter
    # (convert_hf_to_gguf.py Rwkv6Model) writes head_count 0, "required by llama.cpp, unused"
    ("ggml_nelements(a) == ne0*ne1*ne2*ne3", {"attention.head_count": 0, "attention.head_count_kv": 0}),
    ("expects sqrtsoftplus MoE scoring", {"expert_gating_func": 4}),  # LLAMA_EXPERT_GATING_FUNC_TYPE_SQRT_SOFTPLUS
    # accepted without any FFN, because every FFN tensor of the loader is optional (mimo2, step35, hy_v3):
    # real checkpoints have one, so the optional tensors are written too
    (NO_FFN, {OPTIONAL: True}),
    # a width from a key the loader reads as optional (rwkv7's gate LoRA rank): a zero-wide tensor would
    # abort the loader's op test (ggml_mul_mat of a "transposed" weight), so the optional keys are written
    (ZERO_WIDTH, {OPTIONAL_KEYS: True}),
    ("HKV == Hd", {"attention.indexer.head_count": 4}),           # minimax-m3: one indexer head per KV head
    ("MLA is nope-only", {"rope.dimension_count": 0, "attention.key_length": 256}),  # glm5-next: K is kv_lora alone
    # keys a loader reads as optional and then requires (draft models: the target's layers and width)
    ("requires 'extract_layers'", {"target_layers": [1, 3, 5]}),    # eagle3: exactly 3
    ("requires 'target_layers'", {"target_layers": [1, 3, 5]}),     # dflash
    ("requires embedding_length_out", {"embedding_length_out": 2048}),  # gemma4-assistant: the target is wider
    # a loader that reads a tensor's width from the file (ml.get_tensor_meta) and aborts on the impossible
    # shape offered first: that tensor in every block, in ggml order (BASE: n_embd 1024, n_ff 3072, 16 heads)
    ("unexpected attention gate width", {SHAPES: {"attn_gate.weight": [1024, 16]}}),  # laguna: one per head
    ("n_ffn_up == n_ff", {SHAPES: {"ffn_up.weight": [1024, 2 * 3072]}}),  # jina-bert-v2: GEGLU, up and gate fused
    # a token-type table the loader sizes by an optional vocabulary key: zero rows, and the graph's view of
    # row 0 is out of bounds (jina-bert-v2; bert asks for the key by name)
    ("data_size + view_offs <= ggml_nbytes(view_src)", {"tokenizer.ggml.token_type_count": 2}),
]


# ... and when those are spent and llama.cpp still makes no context: a graph that reads a value the loader took as
# optional (afmoe builds the sliding-window inputs whether or not attention.sliding_window was given)
LAST_RETRIES = [("exit -11", {OPTIONAL_KEYS: True}),
                # ... or a graph llama.cpp cannot build with flash attention, whatever the values (plm.cpp gives
                # build_attn a 2-D V, which llama_kv_cache::cpy_v reads as n_tokens heads): the context without it
                ("a->ne[0] == b->ne[0]", {FA_OFF: True})]


@functools.cache
def _source(relative: str) -> str:
    """A file of the vendored llama.cpp's src/, read once per process."""
    return (llama_src() / "src" / relative).read_text()


@functools.cache
def arch_source(arch: str) -> str:
    """The text of the vendored llama.cpp's src/models/*.cpp that defines `arch`'s llama_model class."""
    enum = re.search(r'\{\s*(LLM_ARCH_\w+),\s*"' + re.escape(arch) + '"', _source("llama-arch.cpp"))
    cls = enum and re.search(r"case " + enum.group(1) + r":\s*return new (llama_model_\w+)\(",
                             _source("llama-model.cpp"))
    if not cls:
        return ""
    name = cls.group(1)
    models = sorted(f"models/{f.name}" for f in (llama_src() / "src" / "models").glob("*.cpp"))
    for _ in range(4):       # a class without its own loader is its base class's (mistral4: deepseek2)
        for f in models:
            text = _source(f)
            if f"{name}::load_arch_hparams" in text or f"{name}::load_arch_tensors" in text:
                return text
        base = re.search(r"struct " + name + r"\s*:\s*public (llama_model_\w+)", _source("models/models.h"))
        if not base:
            break
        name = base.group(1)
    return ""


def optional_tensors(arch: str) -> list[str]:
    """The names of the tensors `arch`'s loader creates with TENSOR_NOT_REQUIRED ("%d": the block)."""
    names = dict(re.findall(r'\{\s*(LLM_TENSOR_\w+),\s*"([^"]+)"\s*\}', _source("llama-arch.cpp")))
    out = []
    for m in re.finditer(r"create_tensor\(tn\((LLM_TENSOR_\w+),\s*\"(\w+)\"([^;]*);", arch_source(arch)):
        if "TENSOR_NOT_REQUIRED" in m.group(3) and m.group(1) in names and "rope_factors" not in names[m.group(1)]:
            out.append(f"{names[m.group(1)]}.{m.group(2)}")
    # ... a block tensor named without a suffix (hy_v3's router bias: tn(LLM_TENSOR_FFN_EXP_PROBS_B, i))
    for m in re.finditer(r"create_tensor\(tn\((LLM_TENSOR_\w+),\s*\w+\)([^;]*);", arch_source(arch)):
        if "TENSOR_NOT_REQUIRED" in m.group(2) and "%d" in names.get(m.group(1), ""):
            out.append(names[m.group(1)])
    # ... and the experts' gate and up where create_tensor_gate_up_exps takes them as optional (hy_v3): separate,
    # as converters write them (llama-model.cpp: the fused gate_up is read first, then these)
    if re.search(r"create_tensor_gate_up_exps\([^;]*TENSOR_NOT_REQUIRED", arch_source(arch)):
        out += [f"{names['LLM_TENSOR_FFN_GATE_EXPS']}.weight", f"{names['LLM_TENSOR_FFN_UP_EXPS']}.weight"]
    return list(dict.fromkeys(out))


def optional_keys(arch: str) -> list[str]:
    """The keys `arch`'s loader reads with required = false (ml.get_key(LLM_KV_..., x, false)) that the
    generator has a value for (_guess's table)."""
    names = dict(re.findall(r'\{\s*(LLM_KV_\w+),\s*"%s\.([^"]+)"', _source("llama-arch.cpp")))
    found = re.findall(r"get_key\((LLM_KV_\w+),[^;]*?,\s*(?:/\*[^*]*\*/\s*)?false\s*\)", arch_source(arch))
    return [f"{arch}.{names[k]}" for k in dict.fromkeys(found) if k in names and names[k] in _GUESSED]


def seeds(arch: str) -> dict[str, object]:
    names = dict(re.findall(r'\{\s*(LLM_KV_\w+),\s*"%s\.([^"]+)"', _source("llama-arch.cpp")))
    text = arch_source(arch)
    wanted = [k for k in SEEDS if k in text]
    if "moe" in arch:            # named for its experts (granitemoe loads without them, but no checkpoint does)
        wanted += ["LLM_KV_EXPERT_COUNT", "LLM_KV_EXPERT_USED_COUNT"]
    out = {f"{arch}.{names[k]}": _guess(f"{arch}.{names[k]}", False) for k in wanted if k in names}
    if re.search(r"kv_lora_rank|LLM_KV_ATTENTION_KV_LORA_RANK|is_mla", text):
        # the curated deepseek2's low-rank attention (DeepSeek-V3's proportions): 128 + 64 RoPE dims per
        # head; with MLA, GGUFs store the absorbed K (kv_lora + rope) and V (kv_lora), one KV head
        out.update({f"{arch}.attention.q_lora_rank": 512, f"{arch}.attention.kv_lora_rank": 256,
                    f"{arch}.attention.key_length": 192, f"{arch}.attention.value_length": 128})
        if "is_mla" in text or "LLM_KV_ATTENTION_KEY_LENGTH_MLA" in text:   # (bailingmoe3 reads it unasked)
            out.update({f"{arch}.attention.head_count_kv": 1, f"{arch}.attention.key_length": 320,
                        f"{arch}.attention.value_length": 256, f"{arch}.attention.key_length_mla": 192,
                        f"{arch}.attention.value_length_mla": 128})
    if re.search(r"is_recr_impl\[\w+\]\s*=\s*[^;]*n_head_kv\(\w+\) == 0", text):
        # a hybrid that marks recurrent layers by 0 KV heads: 2 recurrent layers to 1 attention layer
        # (MLA attention layers keep their one KV head: kimi-linear, bailingmoe3)
        kvh = out.get(f"{arch}.attention.head_count_kv", 4)
        out[f"{arch}.attention.head_count_kv"] = [0, 0, kvh, 0, 0, kvh]
        if "n_ff(i) == 0" in text:       # nemotron_h: recurrent, FFN-only and attention-only layers
            out[f"{arch}.feed_forward_length"] = [0, 3072, 0, 0, 3072, 0]
    return out


# The values _guess gives keys it knows by name (the sizes of the curated models).
_GUESSED: dict[str, object] = {
    "expert_count": 8, "expert_used_count": 2, "expert_feed_forward_length": 512,
    "expert_shared_count": 1, "expert_shared_feed_forward_length": 512, "leading_dense_block_count": 1,
    "expert_group_count": 1, "expert_group_used_count": 1, "expert_gating_func": 1,
    "attention.kv_lora_rank": 256, "attention.q_lora_rank": 384, "attention.key_length": 64,
    "attention.kv_lora_rank_swa": 256, "attention.key_length_mla_swa": 192, "attention.value_length_mla_swa": 128,
    "attention.value_length": 64, "attention.sliding_window": 512, "attention.layer_norm_epsilon": 1e-5,
    "attention.layer_norm_rms_epsilon": 1e-5, "attention.group_norm_epsilon": 1e-5,
    "attention.group_norm_groups": 32, "attention.chunk_size": 512,
    "ssm.conv_kernel": 4, "ssm.inner_size": 2048, "ssm.state_size": 64, "ssm.time_step_rank": 32,
    "ssm.group_count": 1, "shortconv.l_cache": 3, "wkv.head_size": 64, "time_mix_extra_dim": 32,
    "time_decay_extra_dim": 64, "rescale_every_n_layers": 6, "token_shift_count": 2,
    "attention.decay_lora_rank": 64, "attention.iclr_lora_rank": 64,
    "attention.value_residual_mix_lora_rank": 32, "attention.gate_lora_rank": 128,
    "rope.dimension_sections": [16, 8, 8, 0], "embedding_length_per_layer_input": 256,
    "posnet.embedding_length": 1024, "posnet.block_count": 6, "convnext.embedding_length": 1024,
    "convnext.block_count": 6, "features_length": 1024, "vocab_size": 8192, "nextn_predict_layers": 1,
    "decoder_start_token_id": 0, "attention.relative_buckets_count": 32, "pooling_type": 1,
    # deepseek4.cpp accepts 0 (dense), 4 (with the indexer) and 128 per layer; one of each, twice
    "attention.compress_ratios": [0, 4, 128, 0, 4, 128],
    "hyper_connection.count": 4,                         # glm5-next.cpp asserts 4
    "adapters.count": 1, "adapters.token_ids_activate": [1], "adapters.token_ids_substitute": [2],
}


def _guess(key: str, array: bool) -> object:
    """A value for a key the loader asked for, from its name (the sizes of the curated models)."""
    k = key.split(".", 1)[1] if "." in key else key
    if k in _GUESSED:
        value = _GUESSED[k]
    elif "epsilon" in k:
        value = 1e-5
    elif any(w in k for w in ("scale", "factor", "multiplier", "softcap", "base", "temperature")):
        value = 1.0
    elif "length" in k or "size" in k or "dim" in k:
        value = 64
    else:
        value = 1
    if array and not isinstance(value, list):
        value = [value] * BASE["block_count"]
    return value


_GGUF_TYPES = {"uint8": "u8", "int8": "i8", "uint16": "u16", "int16": "i16", "uint32": "u32", "int32": "i32",
               "float32": "f32", "bool": "bool", "str": "str", "uint64": "u64", "int64": "i64", "float64": "f64"}


def _retype(value: object, want: str) -> object:
    if want == "bool":
        return bool(value)
    if want.startswith("f"):
        return float(value) if not isinstance(value, list) else [float(v) for v in value]
    if want == "str":
        return str(value)
    return int(value) if not isinstance(value, list) else [int(v) for v in value]


def write(path: Path, arch: str, kv: dict, types: dict, tensors: dict) -> None:
    """The file of this try, written as write_arch_model will write the accepted entry."""
    from gpulab.sources.arch_models import discovered_model, write_gguf
    write_gguf(path, arch, *discovered_model({"kv": kv, "types": types,
                                              "tensors": [(n, s) for n, (s, _) in tensors.items()]}))


def child(arch: str, out: Path, extra: dict) -> None:
    """Load until llama.cpp accepts the file; write {"kv", "types", "tensors"} or {"error"} to `out`."""
    from gpulab.runtime import llama_lib
    from gpulab.runtime.logcapture import LogCapture
    lc = llama_lib.llama_cpp()
    kv: dict[str, object] = {f"{arch}.{k}": v for k, v in BASE.items()}
    kv.update(seeds(arch))
    kv.update({k if k.startswith("tokenizer.") else f"{arch}.{k}": v for k, v in extra.items()
               if k not in (QKV, OPTIONAL, SHAPES, OPTIONAL_KEYS, FA_OFF)})
    types: dict[str, str] = {}
    tensors: dict[str, tuple[tuple[int, ...], bool]] = {}   # name -> (ggml shape, asked for by the loader)
    n_layer = BASE["block_count"]
    # real checkpoints ship token_embd even where the loader takes output.weight in its place (codeshell)
    tensors["token_embd.weight"] = (_BOGUS, False)
    if extra.get(QKV):     # asked for by nobody yet: the loader says their shapes when it reaches them
        tensors.update({f"blk.{i}.attn_{x}.weight": (_BOGUS, False) for i in range(n_layer) for x in "qkv"})
    if extra.get(OPTIONAL_KEYS):
        for key in optional_keys(arch):
            kv.setdefault(key, _guess(key, False))
    for suffix, shape in extra.get(SHAPES, {}).items():
        tensors.update({f"blk.{i}.{suffix}": (tuple(shape), True) for i in range(n_layer)})
    if extra.get(OPTIONAL):
        for pattern in optional_tensors(arch):
            for i in range(n_layer) if "%d" in pattern else [0]:
                tensors.setdefault(pattern.replace("%d", str(i)), (_BOGUS, False))
    result: dict = {"error": f"gave up after {MAX_LOADS} loads"}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{arch}.gguf"
        for _ in range(MAX_LOADS):
            write(path, arch, kv, types, tensors)
            params = lc.llama_model_default_params()
            params.n_gpu_layers = 0
            with LogCapture() as cap:
                model = lc.llama_model_load_from_file(str(path).encode(), params)
            log = cap.text
            if model:
                result = {"kv": kv, "types": types,
                          "tensors": [[n, list(s)] for n, (s, _) in tensors.items()]}
                _decode(lc, model, out, result, flash_attn=not extra.get(FA_OFF))
                lc.llama_model_free(model)
                break
            m = re.search(r"error loading model: (.*)", log) or re.search(r"error: (.*)", log)
            msg = m.group(1).strip() if m else log.strip().splitlines()[-1:]
            if TRACE:      # each load's answer, for a load that ends in an abort (the child dies with it)
                print(msg, file=sys.stderr, flush=True)
            if (m := re.search(r"array key not found in model: (\S+)", log)) or \
                    (m := re.search(r"key not found in model: (\S+)", log)):
                key = m.group(1)
                if key in kv:
                    result = {"error": f"loader asks for {key} again"}
                    break
                kv[key] = _guess(key, "array key" in m.group(0))
            elif (m := re.search(r"key (\S+) has wrong type (\w+) but expected type arr", log)) and m.group(1) in kv:
                v = kv[m.group(1)]             # an array where a scalar was written: one per block
                kv[m.group(1)] = v if isinstance(v, list) else [v] * n_layer
            elif m := re.search(r"key (\S+) has wrong type (\w+) but expected type (\w+)", log):
                types[m.group(1)] = _GGUF_TYPES.get(m.group(3), m.group(3))
                kv[m.group(1)] = _retype(kv[m.group(1)], types[m.group(1)])
            elif m := re.search(r"key (\S+) has wrong array length; expected (\d+)", log):
                v = kv[m.group(1)]
                kv[m.group(1)] = ([v[0]] if isinstance(v, list) else [v]) * int(m.group(2))
            elif m := re.search(r"expected scalar, found array for key: (\S+)", log):
                v = kv[m.group(1)]
                kv[m.group(1)] = v[0] if isinstance(v, list) else v
            elif m := (re.search(r"missing tensor '([^']+)'", log) or re.search(r"tensor '([^']+)' not found", log)):
                name = m.group(1)
                if name in tensors:
                    result = {"error": f"loader asks for {name} again"}
                    break
                tensors[name] = (_BOGUS, False)
                if b := re.match(r"blk\.(\d+)\.(.*)", name):       # the same tensor in every block
                    for i in range(n_layer + int(kv.get(f"{arch}.nextn_predict_layers", 0) or 0)):
                        # ... but a fused QKV only where the loader asks for it: a hybrid's attention layers
                        # take a fused one in place of the separate Q, K and V their graph reads (qwen4exp)
                        if extra.get(QKV) and b.group(2).startswith("attn_qkv.") and \
                                f"blk.{i}.attn_q.weight" in tensors:
                            continue
                        tensors.setdefault(f"blk.{i}.{b.group(2)}", (_BOGUS, False))
            elif m := re.search(r"tensor '([^']+)' has wrong shape; expected ([\d, ]+), got", log):
                shape = tuple(int(x) for x in m.group(2).split(","))
                if 0 in shape and not extra.get(OPTIONAL_KEYS):
                    result = {"error": f"{ZERO_WIDTH} {m.group(1)}: {shape}"}
                    break
                tensors[m.group(1)] = (shape, True)
            elif "needs to define token type count" in log and "tokenizer.ggml.token_type_count" not in kv:
                kv["tokenizer.ggml.token_type_count"] = 2
            elif (m := re.search(r"(\S+) must be greater than one, got", log)) and m.group(1) in kv:
                kv[m.group(1)] = 2
            elif "wrong number of tensors" in log:
                unasked = [n for n, (_, asked) in tensors.items() if not asked]
                if not unasked:
                    result = {"error": str(msg)}
                    break
                for n in unasked:
                    del tensors[n]
            else:
                result = {"error": str(msg)}
                break
    out.write_text(json.dumps(result))


def _decode(lc, model, out: Path, result: dict, flash_attn: bool = True) -> None:
    """Create a context (what the matrix measures: llama.cpp reserves its graphs there), then decode
    8 tokens (after encoding them, for an encoder-decoder). Each outcome is written before the next
    step: an abort kills the child, and the parent says which step it was."""
    import ctypes
    cp = lc.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_threads, cp.n_threads_batch = 512, 64, 64, 1, 1
    if not flash_attn:       # (the default is auto: on where the devices support it)
        cp.flash_attn_type = 0       # LLAMA_FLASH_ATTN_TYPE_DISABLED
        result["flash_attn"] = "off"
    result["context"] = "aborted"
    out.write_text(json.dumps(result))
    from gpulab.runtime.logcapture import LogCapture
    with LogCapture() as cap:
        ctx = lc.llama_init_from_model(model, cp)
    why = re.search(r"failed to initialize the context: ([^(\n]*)", cap.text)   # (a draft asks for its target's)
    result["context"] = "ok" if ctx else f"refused: {why.group(1).strip()}" if why else "refused"
    result["decode"] = "aborted"
    out.write_text(json.dumps(result))
    if not ctx:
        result["decode"] = "no context"
        return
    try:
        toks = (ctypes.c_int32 * 8)(*range(3, 11))
        if lc.llama_model_has_encoder(model):
            rc = lc.llama_encode(ctx, lc.llama_batch_get_one(toks, 8))
            if rc != 0:
                result["decode"] = f"llama_encode returned {rc}"
                return
            toks = (ctypes.c_int32 * 1)(max(0, lc.llama_model_decoder_start_token(model)))
            rc = lc.llama_decode(ctx, lc.llama_batch_get_one(toks, 1))
        else:
            rc = lc.llama_decode(ctx, lc.llama_batch_get_one(toks, 8))
        result["decode"] = "ok" if rc == 0 else f"llama_decode returned {rc}"
    finally:
        lc.llama_free(ctx)


def _run_child(arch: str, extra: dict) -> dict:
    """The child's answer for `arch`, with why it died where it did."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        try:
            p = subprocess.run([sys.executable, __file__, "--child", arch, f.name, json.dumps(extra)], env=env,
                               timeout=600, capture_output=True, text=True)
        except subprocess.TimeoutExpired:
            return {"error": "no answer in 600 s"}
        text = Path(f.name).read_text()
        got = json.loads(text) if text else {}
        if p.returncode != 0:
            lines = p.stderr.strip().splitlines()
            why = [x for x in lines if "GGML_ASSERT" in x or "what()" in x or "error" in x.lower()
                   or re.search(r"\.(cpp|c):\d+: ", x)]         # ggml_abort: file:line: message
            tail = ((why or lines or [f"exit {p.returncode}"])[-1]).strip()
            tail = re.sub(r"^\S*/vendor/llama\.cpp/", "", tail)     # the build's temporary path says nothing
            # the graph function ggml_abort's backtrace (gdb's, on stdout) names: where a row width went wrong
            if frame := re.search(r" in (llama_model_\w+::graph::\w+)\(", p.stdout + p.stderr):
                tail += f" in {frame.group(1)}"
            if not got:
                got = {"error": f"llama.cpp aborted: {tail}"}
            else:
                got = {k: (f"aborted: {tail}" if v == "aborted" else v) for k, v in got.items()}
        return got


def retry(said: str, extra: dict, context: bool) -> dict:
    """The keys to add for the next try, from what the last one `said` (RETRIES, a later match winning; then
    LAST_RETRIES where they are spent and llama.cpp made no context)."""
    more = {k: v for pattern, keys in RETRIES if pattern in said for k, v in keys.items() if k not in extra}
    if not more and not context:
        more = {k: v for pattern, keys in LAST_RETRIES if pattern in said for k, v in keys.items() if k not in extra}
    return more


def main(argv: list[str]) -> int:
    if argv[:1] == ["--child"]:
        child(argv[1], Path(argv[2]), json.loads(argv[3]))
        return 0
    sys.path.insert(0, str(ROOT / "scripts"))
    from arch_coverage import llama_archs

    from gpulab.sources.arch_models import CURATED
    archs = argv or [a for a in llama_archs() if a not in CURATED]
    found = json.loads(OUT.read_text()) if OUT.exists() else {}
    for arch in archs:
        extra: dict = {}
        built = None        # the last try llama.cpp made a context for: a retry for its decode may lose it
        for _ in range(len(RETRIES) + 1):
            got = _run_child(arch, extra)
            said = " ".join(str(v) for v in got.values() if isinstance(v, str))
            if got.get("context") == "ok" and "LLM_TENSOR_FFN_UP" in arch_source(arch) and not any(
                    re.search(r"blk\.\d+\.ffn_(up|down)", n) for n, _ in got.get("tensors", [])):
                said += " " + NO_FFN
            if got.get("context") == "ok" and NO_FFN not in said:      # (a model without its FFN is no fallback)
                built = got
            more = retry(said, extra, got.get("context") == "ok")
            if TRACE:
                print(f"{arch}: {said[:300]} -> {more}", file=sys.stderr, flush=True)
            if not more or (got.get("context") == "ok" and got.get("decode") == "ok" and NO_FFN not in said):
                break
            extra.update(more)
        if got.get("context") != "ok" and built is not None:
            got = built
        found[arch] = got
        said = got.get("error") or f"context {got.get('context')}, decode {got.get('decode')}"
        print(f"{arch}: {said} ({len(got.get('tensors', []))} tensors)", flush=True)
        OUT.write_text(json.dumps(dict(sorted(found.items())), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
