"""What gpulab models exactly, architecture by architecture, and the one-line doubts a plan carries.

A plan is silent when every term (placement, weights, KV, recurrent state, compute) is what
llama.cpp allocates, to its log's rounding (32 KiB; compute within 1 MiB), as the integration
matrix checked (tests/integration/test_arch_matrix_vs_llama.py, docs/COVERAGE.md). Anything else
says so in one line: the term, why, and how large the doubt is where it was measured.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import SplitConfig
from ..profile import ModelProfile
from ..units import format_bytes
from .compute import compute_tokens
from .compute_encoder import encoder_replayable
from .compute_mla import mla_geom
from .compute_moe import moe_flags
from .dense import DENSE_GRAPHS, dense_replayable
from .granite_switch import switch_replayable
from .hy_v4 import hy_v4_replayable
from .kda import kda_replayable
from .recurrent import RECURRENT_GRAPHS, replayable

__all__ = ["CACHE_NOT_MODELLED", "COMPUTE_CHECKED", "COMPUTE_EXACT", "COMPUTE_MEASURED_MIB", "Doubt",
           "WEIGHTS_NOT_EXACT", "doubts"]

# Architectures whose compute buffers the closed forms of gpulab.core.placement.compute were
# derived from (llama, gemma2/3, qwen3moe) or checked on by the architecture matrix with the same
# errors as llama's (qwen2, qwen3, mistral3, granite, gpt-oss, olmoe, internlm2, exaone, maincoder,
# nanbeige, xverse), and those of COMPUTE_EXACT. The others get a compute doubt. (Every architecture of the
# matrix is now exact: the doubts for a checked graph that is not exact apply to none of them.)
COMPUTE_CHECKED = frozenset({"llama", "gemma2", "gemma3", "qwen3moe", "qwen2", "qwen3", "mistral3", "granite",
                             "gpt-oss", "olmoe", "internlm2", "exaone", "maincoder", "nanbeige", "xverse"})

# Architectures whose compute buffers the architecture matrix found within 1 MiB of llama.cpp's on every
# device in every setting, f16 and quantized caches and the pipelined output device included: no compute
# doubt in those settings. Llama's dense graph (src/models/llama.cpp and the loaders that build it), the
# qwen3moe/olmoe MoE graph, deepseek2's absorbed MLA (compute_mla), qwen2moe's and glm4moe's shared expert
# (compute_moe), gpt-oss's rows gathered after the last layer, gemma2/3's and olmo2's norms after attention
# and the FFN, baichuan's RoPE-less layers, cohere2's attention beside the FFN, llama4's interleaved dense and
# MoE layers with the input weighted before the experts. The recurrent graphs gpulab
# replays (placement.recurrent: mamba2, lfm2, qwen3next) are exact wherever they were checked.
COMPUTE_EXACT = frozenset({"llama", "qwen2", "qwen3", "mistral3", "granite", "internlm2", "exaone", "maincoder",
                           "nanbeige", "xverse", "qwen3moe", "olmoe", "smollm3", "exaone4", "deepseek2", "qwen2moe",
                           "glm4moe", "gpt-oss", "gemma2", "gemma3", "olmo2", "baichuan", "cohere2", "llama4",
                           *RECURRENT_GRAPHS,
                           # discovered models (scripts/discover_arch_models.py) the matrix found exact in every
                           # setting: loaders that build llama's dense or MoE graph under another name
                           "chatglm", "deci", "gemma", "glm4", "hunyuan-dense", "hunyuan_vl", "orion", "paddleocr",
                           "pangu-embedded", "qwen2vl", "qwen3tts", "qwen3vl", "seed_oss", "minicpm",
                           # graphs whose differences from llama's placement.compute models: an FFN without a
                           # gate, a LayerNorm output norm, a fused QKV product, learned positions
                           "apertus", "arcee", "bloom", "codeshell", "gpt2", "jais", "jais2", "mpt", "nemotron",
                           "phi2", "pockettts", "starcoder", "starcoder2",
                           # discovered, exact since the MLA/MoE round (compute_moe: a shared expert)
                           "hunyuan-moe",
                           # branch attn (round 3): every layer sliding-window, an expert count without experts,
                           # experts without a gate, a GLU output in the norm's range, a residual-first add, a gate
                           # or sub-norm between attention and its projection, the output product on the host, a
                           # skip connection, chameleon's image logits
                           "granite_swa", "maple", "mimo2", "spark2_5", "phi3", "ernie4_5", "granitemoe", "bitnet",
                           "chameleon", "talkie",
                           # ... replayed (placement.hrm): passes of two weight stacks over cache slots
                           "hrm_text",
                           # ... replayed (placement.gemma4): per-layer inputs, norms around every phase
                           "gemma4",
                           # ... replayed (placement.gemma3n): AltUp, LAuReL, per-layer inputs
                           "gemma3n",
                           # ... replayed (placement.dense): step35's head-wise gate, rows gathered after the last layer
                           "step35",
                           # branch small: graphs replayed op by op (placement.dense), every device of the 6
                           # settings within 1 MiB
                           "qwen", "falcon", "gptneox", "command-r", "plamo", "stablelm", "refact", "olmo",
                           "openelm", "plamo3", "cogvlm", "minicpm3", "deepseek", "bailingmoe", "bailingmoe2",
                           "dots1", "mellum", "qwen3vlmoe", "smallthinker", "ernie4_5-moe", "minimax-m2", "dbrx",
                           "grok", "arctic", "phimoe", "deepseek2-ocr", "exaone-moe", "cohere2moe", "muse-glimmer",
                           "grovemoe", "mistral4",
                           # branch encoders: attention without a KV cache, replayed (compute_encoder)
                           "dream", "llada", "llama-embed", "eurobert", "rnd1", "llada-moe", "gemma-embedding",
                           "bert", "jina-bert-v3", "nomic-bert", "nomic-bert-moe", "neo-bert", "modern-bert",
                           "t5encoder", "t5", "wavtokenizer-dec", "jina-bert-v2",
                           # branch recurrent2: replayed (placement.recurrent), in RECURRENT_GRAPHS
                           "mamba", "jamba", "falcon-h1", "granitehybrid", "nemotron_h", "nemotron_h_moe",
                           "lfm2moe", "qwen35", "qwen35moe", "rwkv6qwen2", "arwkv7",
                           "plamo2", "minimax-01",
                           # branch newarchs: replayed op by op (placement.dense), every device of the 6 settings
                           # within 1 MiB
                           "laguna", "afmoe", "dflash", "minimax-m3", "dots3note",
                           # ... replayed (placement.granite_switch): the router layer, switched LoRA deltas
                           "graniteswitch",
                           # ... replayed (placement.hy_v4): hyper-connections around absorbed MLA and the FFN
                           "hy_v4",
                           # branch hybrid3: replayed (placement.recurrent): RWKV-7 with LayerNorms, a gated time
                           # mix with a group norm, two token shifts, the channel mix
                           "rwkv7",
                           # ... replayed (placement.kda): KDA layers (a gated delta net behind causal convolutions
                           # of Q, K and V) beside absorbed MLA over a K-only cache, MoE
                           "kimi-linear", "bailingmoe3", "kimi-k3",
                           # ... and glm5-next's hyper-connections around KDA and DSA with its k-pool indexer
                           "glm5-next",
                           # branch dsa: replayed (placement.dense): deepseek2's absorbed MLA masked by the DSA
                           # lightning indexer's top-k (_Indexer)
                           "deepseek32", "glm-dsa"})


# Architectures whose memory is not llama_kv_cache / llama_memory_recurrent as gpulab sizes them
# (llama_model::create_memory, src/llama-model.cpp): the DSV4 compressed cache, KDA/linear-attention
# states gpulab sizes from the formula but has not run. (The lightning indexers' key caches of
# deepseek32, glm-dsa, minimax-m3, glm5-next, dots3note, hy_v4 and qwen4exp are counted: LayerProfile.n_embd_k_idx;
# hy_v4's cache is llama_kv_cache or llama_kv_cache_dsa, not the DSV4 one: create_memory, src/llama-model.cpp.)
CACHE_NOT_MODELLED = {
    "deepseek4": "the DSV4 compressed KV cache (llama_kv_cache_dsv4) is not modelled",
}


def _wide_expert_outputs(profile: ModelProfile) -> float:
    """n_embd / n_ff_exp where a MoE graph with a shared expert or MLA (compute_moe, compute_mla) has expert
    outputs wider than an expert's up and gate together (DeepSeek-V3: 3.5; the matrix's models: 2); else 0."""
    if not profile.n_expert or not moe_flags(profile).shared:
        return 0.0
    ff_exp = next((t.shape[1] for layer in profile.layers for t in layer.tensors
                   if "up_exps" in t.name and len(t.shape) >= 2), 0)
    return profile.n_embd / ff_exp if ff_exp and profile.n_embd > 2 * ff_exp else 0.0


# The largest compute error per device the architecture matrix measured (all its settings) for the
# architectures whose graph gpulab sizes as a llama-like one, in MiB, rounded up to 0.5 MiB
# (`scripts/arch_coverage.py --bounds` prints this table from test-artifacts/arch_matrix.json). Since issue 27's
# third round only the five architectures the generator reached last are here; a plan of one the matrix has not
# run, or of a graph branch no replay builds, states its compute doubt as not checked.
COMPUTE_MEASURED_MIB: dict[str, float] = {
    "deepseek4": 152,
    "hy_v3": 3,
    "plm": 4.5,
    "qwen4exp": 76.5,
    "rwkv6": 32.5,
}

# Weights gpulab places otherwise than llama.cpp, as the matrix measured them: why, and the largest
# error per device in MiB.
# (wavtokenizer-dec's conv1d, 28 MiB here, was left unplaced until branch encoders put it with layer 0: none left)
WEIGHTS_NOT_EXACT: dict[str, tuple[str, float]] = {}


@dataclass(frozen=True)
class Doubt:
    term: str              # 'weights', 'kv', 'state', 'compute'
    text: str              # the one line a person reads
    bound_bytes: int       # the largest error measured where this doubt applies (0: not measured)

    def __str__(self) -> str:
        return self.text


_MiB = 1 << 20
_QUANTIZED_FREE = ("f32", "f16", "bf16")


def _measured(arch: str, what: str, unmeasured: str) -> Doubt:
    """A compute doubt: `what`, with the largest error the matrix measured for `arch`
    (COMPUTE_MEASURED_MIB), or followed by `unmeasured` and no bound where it was not measured."""
    mib = COMPUTE_MEASURED_MIB.get(arch, 0)
    if mib:
        return Doubt("compute", f"compute: {what} (measured up to {format_bytes(mib * _MiB)} off per device)",
                     int(mib * _MiB))
    return Doubt("compute", f"compute: {what}{unmeasured}", 0)


def doubts(profile: ModelProfile, config: SplitConfig, layer_devices: list[str] | None = None,
           output_shares_layers: bool = False, replayed: bool = False) -> tuple[Doubt, ...]:
    """The terms of a plan of `profile` under `config` that are not exact, each with the largest error
    the architecture matrix measured where it applies (tests/integration/test_arch_matrix_vs_llama.py,
    CPU RPC devices, n_embd 1024). `layer_devices`: the plan's placement (for settings that matter
    only on some devices); `output_shares_layers`: pipelined, and the output layer's device holds
    repeating layers too; `replayed`: the plan's compute buffers come from an op-by-op replay of the graph
    (compute.replay_for), so the closed forms' doubts do not apply."""
    out: list[Doubt] = []
    arch = profile.arch
    if arch in WEIGHTS_NOT_EXACT:
        why, mib = WEIGHTS_NOT_EXACT[arch]
        out.append(Doubt("weights", f"weights: {why} (measured up to {format_bytes(mib * _MiB)} off per device)",
                         int(mib * _MiB)))
    if arch in CACHE_NOT_MODELLED:
        out.append(Doubt("kv", f"KV: {CACHE_NOT_MODELLED[arch]} for {arch}", 0))
    recurrent = any(layer.is_recurrent for layer in profile.layers)
    # absorbed MLA (attn_k_b/attn_v_b) is modelled (compute_mla); the older graph with attn_kv_b is not
    mla = any(layer.has_kv and not layer.has_v for layer in profile.layers) \
        and (arch not in COMPUTE_EXACT or mla_geom(profile) is None)
    if replayed or replayable(profile) or encoder_replayable(profile) or kda_replayable(profile):
        pass                   # replayed op by op (compute.replay_for): exact wherever checked
    elif recurrent or arch in RECURRENT_GRAPHS:
        # (a graph replayed elsewhere but not for this file: a branch the replay does not build)
        pure = not any(layer.has_kv for layer in profile.layers)
        what = "recurrent graph is" if pure else "recurrent layers are"
        out.append(_measured(arch, f"{arch}'s {what} not modelled", " (mamba2's, lfm2's and qwen3next's, before "
                             "they were replayed: up to 75 MiB too low per device at n_embd 1024)"))
    elif mla:
        out.append(_measured(arch, f"{arch}'s MLA attention is sized as deepseek2's absorbed MLA (compute_mla) or "
                             "as plain attention", " (not measured)"))
    elif (arch in DENSE_GRAPHS and not dense_replayable(profile.trunk)) or \
            (arch == "graniteswitch" and not switch_replayable(profile)) or \
            (arch == "hy_v4" and not hy_v4_replayable(profile)):
        # a graph replayed op by op, but this file takes a branch the replay does not build (MTP layers,
        # deepstack layers, hy_v4's DSA indexer, GLM 5.2's default indexer pattern, ...): the closed forms size it
        out.append(_measured(arch, f"{arch}'s graph takes a branch that placement.dense does not build for this "
                             "file, sized by the closed forms", " (not measured)"))
    elif arch not in COMPUTE_CHECKED and arch not in COMPUTE_EXACT:
        out.append(_measured(arch, f"{arch}'s graph is sized as a llama-like graph", "; not checked against llama.cpp"))
    else:
        exact = arch in COMPUTE_EXACT
        if not exact and (config.type_k not in _QUANTIZED_FREE or config.type_v not in _QUANTIZED_FREE):
            out.append(Doubt("compute", "compute: with a quantized KV cache, up to 2.1 MiB off per device "
                             "(measured; the rule is not derived)", int(2.2 * _MiB)))
        if profile.n_expert and layer_devices is not None and "CPU" in layer_devices \
                and any(d != "CPU" for d in layer_devices):
            out.append(Doubt("compute", "compute: MoE layers split between the host and devices, up to 9 MiB "
                             "too low on a device (measured: gpt-oss, -ngl 2 on one device)", int(9.1 * _MiB)))
        if layer_devices and layer_devices[-1] == "CPU":
            # -ngl 0: ggml-alloc puts the logits above what the last layer left, not at the bottom
            # (SmolLM2 on RPC devices: 0 to 4.26 MiB, not monotonic in -c; at most two row sets and
            # the KQ mask, tests/integration/test_real_models_exact_vs_llama.py)
            T, _, _ = compute_tokens(config)
            n_kv = -(-max(config.n_ctx, 1) // 256) * 256
            bound = 2 * 4 * profile.n_embd * T + n_kv * T * (2 if config.flash_attn != "off" else 4) + 64 * 1024
            out.append(Doubt("compute", f"compute: the host's buffer with the output layer on it can be up to "
                             f"{bound / _MiB:.1f} MiB higher (where ggml-alloc puts the logits; measured)", bound))
        if output_shares_layers and not exact:
            out.append(Doubt("compute", "compute: pipelined, the output layer's device is up to 2 MiB off "
                             "(measured)", int(2.1 * _MiB)))
        wide = _wide_expert_outputs(profile)
        if wide:
            T, _, _ = compute_tokens(config)
            bound = 2 * 4 * profile.n_embd * T + 64 * 1024
            out.append(Doubt("compute", f"compute: {arch}'s expert outputs are {wide:.1f}x as wide as an expert's "
                             "up projection; its MoE rules were derived at 2x (variants of the matrix's models at 4x: "
                             f"up to two row sets off per device, {bound / _MiB:.1f} MiB here)", bound))
    if profile.n_nextn and any(layer.is_nextn and layer.tensors for layer in profile.layers):
        out.append(Doubt("compute", f"compute: {arch} loads its {profile.n_nextn} MTP layer(s) with the "
                         "model; their graph is not modelled", 0))
    if not config.offload_kqv:
        out.append(Doubt("compute", "compute: with the KV cache on the host (-nkvo) the attention runs there; "
                         "not modelled", 0))
    return tuple(out)
