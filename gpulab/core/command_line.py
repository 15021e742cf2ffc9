"""A pasted llama-server / llama-cli / llama-bench command line, read as gpulab settings.

    cmd = parse_command(["llama-server", "-m", "A.gguf", "--mmproj", "P.gguf", "-md", "D.gguf", "-ngl", "99"])
    cmd.config        # SplitConfig of the main model (flags through THE table, gpulab.core.settings)
    cmd.projector     # Projector: the mmproj file and where clip puts it
    cmd.draft         # Draft: the draft model's own SplitConfig, as llama-server derives it
    cmd.ignored       # flags that do not change memory (sampling, ports, templates...)
    cmd.unmodelled    # one line per flag that changes memory and that gpulab does not model

Every flag of the vendored common/arg.cpp is in exactly one of: the settings table, PROCESS_FLAGS
(the model, the projector, the draft, --rpc), IGNORED or UNMODELLED (tests/core/test_command_line.py
reads arg.cpp and checks it). A flag in none of them is an error, never dropped silently.
llama-bench's flags are tools/llama-bench/llama-bench.cpp's parse_cmd_params.
"""

from __future__ import annotations

import os
from collections.abc import Container
from dataclasses import dataclass

from .config import SplitConfig, parse_ngl, parse_tensor_split
from .errors import ConfigError
from .ggml_types import KV_CACHE_TYPES
from .settings import SETTINGS, Setting, value_from_text

__all__ = [
    "IGNORED",
    "PROCESS_FLAGS",
    "PROGRAMS",
    "SETTING_ALIASES",
    "UNMODELLED",
    "Command",
    "Draft",
    "Projector",
    "draft_config",
    "parse_command",
    "program_defaults",
]

PROGRAMS = ("llama-server", "llama-cli", "llama-bench")


@dataclass(frozen=True)
class Projector:
    """--mmproj: a clip encoder (tools/mtmd). llama-server: mparams.use_gpu = --mmproj-offload
    (default on), mparams.device = -mmdev (default: follows --device)."""
    path: str
    offload: bool = True
    device: str = ""              # -mmdev NAME; '' follows the main model


@dataclass(frozen=True)
class Draft:
    """-md: the draft model of speculative decoding, with its own settings
    (common_base_params_to_speculative, common/speculative.cpp)."""
    path: str
    config: SplitConfig


@dataclass(frozen=True)
class Command:
    program: str
    model: str
    config: SplitConfig
    given: frozenset[str] = frozenset()        # SplitConfig fields the command sets
    rpc: tuple[str, ...] = ()
    projector: Projector | None = None
    draft: Draft | None = None
    spec_types: tuple[str, ...] = ()           # --spec-type (draft-mtp uses the model's nextn layers)
    ignored: tuple[str, ...] = ()              # flags as given that do not change memory
    unmodelled: tuple[str, ...] = ()           # one line each: changes memory, not modelled
    bench_tests: tuple[str, ...] = ()          # llama-bench: the tests it runs (pp512, tg128)
    draft_n_max: int = 3                       # --spec-draft-n-max (common_params_speculative_draft)
    # -ctkd/-ctvd: the draft's cache types, which the MTP context takes too (common_base_params_to_speculative)
    draft_cache: tuple[str, str] = ("f16", "f16")

    def n_outputs(self) -> tuple[int | None, int | None]:
        """(main, draft) llama_context_params.n_outputs_max as the program sets them; None: n_batch.
        llama-server: server_output_limits (tools/server/server-context.cpp) = min(n_batch, slots x
        (1 + common_speculative_n_max)), where a draft type drafts --spec-draft-n-max tokens and no
        type drafts none; the draft's context: n_parallel outputs (common_base_params_to_speculative)."""
        c = self.config
        draft = c.n_seq_max if self.draft is not None or "draft-mtp" in self.spec_types else None
        if self.program != "llama-server":
            return None, draft
        n_draft = self.draft_n_max if any(t.startswith("draft-") for t in self.spec_types) else 0
        return server_n_outputs(c, n_draft), draft


# llama-server's spellings beyond the settings table's two (common/arg.cpp), -> the table's flag
SETTING_ALIASES = {"--gpu-layers": "-ngl", "-kvo": "-nkvo", "--kv-offload": "-nkvo", "--repack": "-nr",
                   "-no-kvu": "-kvu", "--no-kv-unified": "-kvu", "--op-offload": "--no-op-offload"}
# the positive spelling of an on/off pair: sets the opposite of the table's flag
_POSITIVE = {"-kvo", "--kv-offload", "--repack", "--op-offload", "-no-kvu", "--no-kv-unified"}

# flags of the process beyond one model's SplitConfig: takes a value?
PROCESS_FLAGS: dict[str, bool] = {
    "-m": True, "--model": True, "--rpc": True,
    "-mm": True, "--mmproj": True, "--mmproj-offload": False, "--no-mmproj-offload": False,
    "-mmdev": True, "--mmproj-device": True,
    "--spec-draft-model": True, "-md": True, "--model-draft": True,
    "--spec-draft-device": True, "-devd": True, "--device-draft": True,
    "--spec-draft-ngl": True, "-ngld": True, "--gpu-layers-draft": True, "--n-gpu-layers-draft": True,
    "--spec-draft-override-tensor": True, "-otd": True, "--override-tensor-draft": True,
    "--spec-draft-cpu-moe": False, "-cmoed": False, "--cpu-moe-draft": False,
    "--spec-draft-n-cpu-moe": True, "--spec-draft-ncmoe": True, "-ncmoed": True, "--n-cpu-moe-draft": True,
    "--spec-draft-type-k": True, "-ctkd": True, "--cache-type-k-draft": True,
    "--spec-draft-type-v": True, "-ctvd": True, "--cache-type-v-draft": True,
    "--spec-type": True, "--spec-draft-n-max": True,
}

# flags that change memory and that gpulab does not model: flag -> why (named in one line)
UNMODELLED: dict[str, str] = {
    **dict.fromkeys(("-hf", "-hfr", "--hf-repo", "-hff", "--hf-file", "-mu", "--model-url", "-dr", "--docker-repo"),
                    "the model is fetched by llama.cpp: plan the downloaded .gguf with -m"),
    **dict.fromkeys(("-mmu", "--mmproj-url"), "the projector is fetched by llama.cpp: give it with --mmproj"),
    **dict.fromkeys(("--mmproj-auto",), "the projector -hf fetches is not known here: give it with --mmproj"),
    **dict.fromkeys(("--spec-draft-hf", "-hfd", "-hfrd", "--hf-repo-draft"),
                    "the draft is fetched by llama.cpp: give it with -md"),
    **dict.fromkeys(("--mtp", "--dflash", "--eagle3"), "downloads a speculative head; give its file with -md"),
    **dict.fromkeys(("--lora", "--lora-scaled", "--lora-init-without-apply"), "LoRA adapters' weights are not planned"),
    **dict.fromkeys(("--control-vector", "--control-vector-scaled", "--control-vector-layer-range"),
                    "control vectors' tensors are not planned"),
    **dict.fromkeys(("-lm", "--load-mode", "-lzm", "--lazy-mode", "--numa"),
                    "how weights are read (mmap, lazy) changes host memory, not modelled"),
    **dict.fromkeys(("-cram", "--cache-ram"), "the prompt cache in host RAM is not planned"),
    **dict.fromkeys(("-ctxcp", "--ctx-checkpoints", "--swa-checkpoints", "-cms", "--checkpoint-min-step"),
                    "context checkpoints (host copies of SWA/recurrent state) are not planned"),
    **dict.fromkeys(("--kv-unified-per-slot", "--cache-idle-slots", "--no-cache-idle-slots"),
                    "per-slot KV caches are not planned"),
    **dict.fromkeys(("--image-min-tokens", "--image-max-tokens", "--mtmd-batch-max-tokens"),
                    "changes the projector's warm-up image, which gpulab sizes from the projector's defaults"),
    **dict.fromkeys(("--warmup", "--no-warmup"),
                    "without a warm-up clip reserves its compute buffer at the first image, not at load"),
    **dict.fromkeys(("--embedding", "--embeddings", "--rerank", "--reranking", "--pooling", "--attention"),
                    "embedding outputs change the output buffer, not modelled"),
    **dict.fromkeys(("-bs", "--backend-sampling", "--spec-draft-backend-sampling", "--no-spec-draft-backend-sampling"),
                    "backend sampling adds sampler buffers on the device, not modelled"),
    **dict.fromkeys(("--draft", "--draft-n", "--draft-max"),
                    "removed from this llama.cpp (llama-server refuses it): use --spec-draft-n-max"),
    **dict.fromkeys(("--override-kv",), "metadata overrides can change the model's shape"),
    **dict.fromkeys(("--models-dir", "--models-preset", "--models-max", "--models-autoload", "--no-models-autoload"),
                    "router mode: plan each model's own command (gpulab fleet import reads a preset)"),
    **dict.fromkeys(("--gpt-oss-20b-default", "--gpt-oss-120b-default", "--vision-gemma-4b-default",
                     "--vision-gemma-12b-default", "--fim-qwen-1.5b-default", "--fim-qwen-3b-default",
                     "--fim-qwen-7b-default", "--fim-qwen-7b-spec", "--fim-qwen-14b-spec", "--fim-qwen-30b-default",
                     "--embd-gemma-default", "--spec-default"),
                    "a preset that downloads a model and sets several flags: spell them out"),
    **dict.fromkeys(("-fitp", "--fit-print"), "llama-fit-params' own flag"),
    **dict.fromkeys(("-dt", "--defrag-thold"), "deprecated"),
    **dict.fromkeys(("--check-tensors",), "checks tensor data at load time (time, not memory)"),
}

# flags that do not change where or how much memory goes (sampling, serving, logging, prompts, threads,
# rope/yarn scaling, other tools' flags): accepted and listed as ignored
IGNORED: frozenset[str] = frozenset("""
-h --help --usage --version -cl --cache-list --completion-bash --server-base --verbose-prompt --display-prompt
--no-display-prompt -co --color -t --threads -tb --threads-batch -C --cpu-mask -Cr --cpu-range --cpu-strict --prio
--poll -Cb --cpu-mask-batch -Crb --cpu-range-batch --cpu-strict-batch --prio-batch --poll-batch -lcs
--lookup-cache-static -lcd --lookup-cache-dynamic -n --predict --n-predict --keep --context-shift --no-context-shift
--chunks -p --prompt -sys --system-prompt --perf --no-perf --show-timings --no-show-timings -f --file -sysf
--system-prompt-file --in-file -bf --binary-file -e --escape --no-escape -ptc --print-token-count --prompt-cache
--prompt-cache-all --prompt-cache-ro -r --reverse-prompt -sp --special -cnv --conversation -no-cnv --no-conversation
-st --single-turn -i --interactive -if --interactive-first -mli --multiline-input --in-prefix-bos --in-prefix
--in-suffix --spm-infill --samplers -s --seed --sampler-seq --sampling-seq --ignore-eos --temp --temperature --top-k
--top-p --min-p --top-nsigma --top-n-sigma --xtc-probability --xtc-threshold --typical --typical-p --repeat-last-n
--repeat-penalty --presence-penalty --frequency-penalty --dry-multiplier --dry-base --dry-allowed-length
--dry-penalty-last-n --dry-sequence-breaker --adaptive-target --adaptive-decay --dynatemp-range --dynatemp-exp
--mirostat --mirostat-lr --mirostat-ent -l --logit-bias --grammar --grammar-file -j --json-schema -jf
--json-schema-file --rope-scaling --rope-scale --rope-freq-base --rope-freq-scale --yarn-orig-ctx --yarn-ext-factor
--yarn-attn-factor --yarn-beta-slow --yarn-beta-fast -gan --grp-attn-n -gaw --grp-attn-w --hellaswag
--hellaswag-tasks --winogrande --winogrande-tasks --multiple-choice --multiple-choice-tasks --kl-divergence
--save-all-logits --kl-divergence-base --ppl-stride --ppl-output-type -ns --sequences -cb --cont-batching -nocb
--no-cont-batching --no-mmproj --no-mmproj-auto --image --audio --video --video-fps --video-timestamp-interval
--video-ffmpeg-dir --list-devices -a --alias --tags -hft --hf-token --context-file --chunk-size --chunk-separator
--junk --pos -o --output --output-file -ofreq --output-frequency --output-format --save-frequency --process-output
--ppl --no-ppl --chunk --from-chunk --show-statistics --parse-special --ids --stdin --no-bos --no-parse-special
--show-count -pps -tgs -npp -ntg -npl --embd-normalize --embd-output-format --embd-separator --cls-separator --host
--port --reuse-port --path --cors-origins --cors-methods --cors-headers --cors-credentials --no-cors-credentials
--api-prefix --ui-config --webui-config --ui-config-file --webui-config-file --ui-mcp-proxy --webui-mcp-proxy
--no-ui-mcp-proxy --no-webui-mcp-proxy --tools --tools-runtime --mcp-servers-config --mcp-servers-json -ag --agent
-no-ag --no-agent --ui --webui --no-ui --no-webui --api-key --api-key-file --ssl-key-file --ssl-cert-file
--chat-template-kwargs -to --timeout --sse-ping-interval --threads-http --cache-prompt --no-cache-prompt
--cache-reuse --metrics --props --slots --no-slots --slot-save-path --media-path --jinja --no-jinja
--reasoning-format -rea --reasoning --reasoning-effort --reasoning-budget --reasoning-budget-message
--reasoning-preserve --no-reasoning-preserve --chat-template --chat-template-file --skip-chat-parsing
--no-skip-chat-parsing --prefill-assistant --no-prefill-assistant -sps --slot-prompt-similarity --sleep-idle-seconds
--simple-io --positive-file --negative-file --pca-batch --pca-iter --method --log-disable --log-file --log-jsonl
--no-log-jsonl --log-prompts-dir --log-colors -v --verbose --log-verbose --offline -lv --verbosity --log-verbosity
--log-prefix --no-log-prefix --log-timestamps --no-log-timestamps --spec-draft-threads -td --threads-draft
--spec-draft-threads-batch -tbd --threads-batch-draft --spec-draft-cpu-mask -Cd --cpu-mask-draft
--spec-draft-cpu-range -Crd --cpu-range-draft --spec-draft-cpu-strict --cpu-strict-draft --spec-draft-prio
--prio-draft --spec-draft-poll --poll-draft --spec-draft-cpu-mask-batch -Cbd --cpu-mask-batch-draft
--spec-draft-cpu-range-batch -Crbd --cpu-range-batch-draft --spec-draft-cpu-strict-batch --cpu-strict-batch-draft
--spec-draft-prio-batch --prio-batch-draft --spec-draft-poll-batch --poll-batch-draft --spec-draft-n-min
--spec-synth-len --spec-synth-rates --spec-draft-p-split --draft-p-split --spec-draft-p-min --draft-p-min
--spec-ngram-mod-n-min --spec-ngram-mod-n-max --spec-ngram-mod-n-match --spec-ngram-simple-size-n
--spec-ngram-simple-size-m --spec-ngram-simple-min-hits --spec-ngram-map-k-size-n --spec-ngram-map-k-size-m
--spec-ngram-map-k-min-hits --spec-ngram-map-k4v-size-n --spec-ngram-map-k4v-size-m --spec-ngram-map-k4v-min-hits
--draft-min --draft-n-min --spec-ngram-size-n --spec-ngram-size-m --spec-ngram-min-hits --tts-lang
--tts-speaker-file --diffusion-steps --diffusion-visual --diffusion-eps --diffusion-algorithm --diffusion-alg-temp
--diffusion-block-length --diffusion-cfg-scale --diffusion-add-gumbel-noise -lr --learning-rate -lr-min
--learning-rate-min -decay-epochs --learning-rate-decay-epochs -wd --weight-decay -val-split --val-split -epochs
--epochs -opt --optimizer --check --save-logits --logits-output-dir --tensor-filter
""".split())

# flags of the ignored kind whose next token is not their value
_NO_VALUE = frozenset("""
-h --help --usage --version -cl --cache-list --completion-bash --verbose-prompt --display-prompt --no-display-prompt
--cpu-strict --cpu-strict-batch --context-shift --no-context-shift --perf --no-perf --show-timings --no-show-timings
-e --escape --no-escape --prompt-cache-all --prompt-cache-ro -sp --special -cnv --conversation -no-cnv
--no-conversation -st --single-turn -i --interactive -if --interactive-first -mli --multiline-input --in-prefix-bos
--spm-infill --ignore-eos --hellaswag --winogrande --multiple-choice --kl-divergence -cb --cont-batching -nocb
--no-cont-batching --no-mmproj --no-mmproj-auto --list-devices --ppl --no-ppl --show-statistics --parse-special
--ids --stdin --no-bos --no-parse-special --show-count -pps --reuse-port --cors-credentials --no-cors-credentials
--ui-mcp-proxy --webui-mcp-proxy --no-ui-mcp-proxy --no-webui-mcp-proxy -ag --agent -no-ag --no-agent --ui --webui
--no-ui --no-webui --cache-prompt --no-cache-prompt --metrics --props --slots --no-slots --jinja --no-jinja
--reasoning-preserve --no-reasoning-preserve --skip-chat-parsing --no-skip-chat-parsing --prefill-assistant
--no-prefill-assistant --simple-io --log-disable --log-jsonl --no-log-jsonl --log-colors -v --verbose --log-verbose
--offline --log-prefix --no-log-prefix --log-timestamps --no-log-timestamps --spec-draft-cpu-strict
--cpu-strict-draft --spec-draft-poll --poll-draft --spec-draft-cpu-strict-batch --cpu-strict-batch-draft
--diffusion-visual --diffusion-add-gumbel-noise --check --save-logits --mmproj-auto --lora-init-without-apply
--kv-unified-per-slot --cache-idle-slots --no-cache-idle-slots --warmup --no-warmup --embedding --embeddings
--rerank --reranking -bs --backend-sampling --spec-draft-backend-sampling --no-spec-draft-backend-sampling
--models-autoload --no-models-autoload --gpt-oss-20b-default --gpt-oss-120b-default --vision-gemma-4b-default
--vision-gemma-12b-default --fim-qwen-1.5b-default --fim-qwen-3b-default --fim-qwen-7b-default --fim-qwen-7b-spec
--fim-qwen-14b-spec --fim-qwen-30b-default --embd-gemma-default --spec-default -fitp --fit-print --check-tensors
--mtp --dflash --eagle3
""".split())

# llama-bench (tools/llama-bench/llama-bench.cpp parse_cmd_params): its spellings of the table's
# settings (values are comma-separated lists of tests; 0/1 for booleans) and its other flags
_BENCH_SETTINGS = {
    "-ngl": "n_gpu_layers", "--n-gpu-layers": "n_gpu_layers", "-sm": "split_mode", "--split-mode": "split_mode",
    "-mg": "main_gpu", "--main-gpu": "main_gpu", "-ts": "tensor_split", "--tensor-split": "tensor_split",
    "-dev": "devices", "--device": "devices", "-b": "n_batch", "--batch-size": "n_batch",
    "-ub": "n_ubatch", "--ubatch-size": "n_ubatch", "-ctk": "type_k", "--cache-type-k": "type_k",
    "-ctv": "type_v", "--cache-type-v": "type_v", "-fa": "flash_attn", "--flash-attn": "flash_attn",
    "-nkvo": "offload_kqv", "--no-kv-offload": "offload_kqv", "-nopo": "op_offload", "--no-op-offload": "op_offload",
    "-ot": "tensor_overrides", "--override-tensor": "tensor_overrides", "-ncmoe": "n_cpu_moe",
    "--n-cpu-moe": "n_cpu_moe", "--no-host": "no_host", "--repack": "use_extra_bufts",
}
BENCH_TESTS = {"-p": "n_prompt", "--n-prompt": "n_prompt", "-n": "n_gen", "--n-gen": "n_gen",
               "-d": "n_depth", "--n-depth": "n_depth", "-pg": "pg"}
BENCH_IGNORED = frozenset({"-r", "--repetitions", "-t", "--threads", "-C", "--cpu-mask", "--cpu-strict", "--poll",
                           "--prio", "--delay", "-o", "--output", "-oe", "--output-err", "-v", "--verbose",
                           "--progress", "--no-warmup", "--numa", "-h", "--help", "--version", "--list-devices",
                           "-hft", "--hf-token", "--offline"})
BENCH_UNMODELLED = {"-embd": "embedding outputs are not modelled", "--embeddings": "embedding outputs are not modelled",
                    "-lm": "how weights are read changes host memory, not modelled",
                    "--load-mode": "how weights are read changes host memory, not modelled",
                    "-lzm": "lazy loading changes host memory, not modelled",
                    "--lazy-mode": "lazy loading changes host memory, not modelled",
                    "-hf": "the model is fetched by llama-bench: plan the .gguf with -m",
                    "-hfr": "the model is fetched by llama-bench: plan the .gguf with -m",
                    "--hf-repo": "the model is fetched by llama-bench: plan the .gguf with -m",
                    "-hff": "the model is fetched by llama-bench: plan the .gguf with -m",
                    "--hf-file": "the model is fetched by llama-bench: plan the .gguf with -m",
                    **dict.fromkeys(("-fitt", "--fit-target", "-fitc", "--fit-ctx"),
                                    "llama-bench's own fit (tests whose -fitt is set) is not modelled: plan with "
                                    "llama-server's -fit")}
_BENCH_NO_VALUE = frozenset({"--cpu-strict", "--progress", "--no-warmup", "-v", "--verbose", "-h", "--help",
                             "--version", "--list-devices", "--offline"})

_BY_FLAG: dict[str, Setting] = {f: s for s in SETTINGS for f in s.flags}
_DEVICE_FLAGS = frozenset({"-dev", "--device", "-devd", "--device-draft", "--spec-draft-device", "-mmdev",
                           "--mmproj-device"})


def _program(argv0: str) -> str:
    base = os.path.basename(argv0)
    for p in PROGRAMS:
        if base == p or base.startswith(p + "."):   # llama-server.exe
            return p
    raise ConfigError(f"{argv0!r}: paste a command that starts with {', '.join(PROGRAMS)} (or its path)")


def _split_eq(argv: list[str]) -> list[str]:
    out: list[str] = []
    for t in argv:                          # --ctx-size=8192 is --ctx-size 8192 (common/arg.cpp)
        out += t.split("=", 1) if t.startswith("--") and "=" in t else [t]
    return out


def parse_command(argv: list[str]) -> Command:
    """The Command of a pasted command line (argv[0]: llama-server, llama-cli, llama-bench or a path to one)."""
    if not argv:
        raise ConfigError("no command: paste one after `--`, e.g. gpulab plan -- llama-server -m model.gguf")
    program = _program(argv[0])
    args = _split_eq(list(argv[1:]))
    if program == "llama-bench":
        return _parse_bench(args)
    return _parse_server(program, args)


def _parse_server(program: str, args: list[str]) -> Command:
    values: dict = {}
    rules: list[str] = []
    model = ""
    rpc: list[str] = []
    ignored: list[str] = []
    unmodelled: list[str] = []
    proj: dict = {}
    draft: dict = {"rules": []}
    spec_types: list[str] = []
    i = 0
    while i < len(args):
        flag = args[i]
        if (flag in _DEVICE_FLAGS and i + 1 < len(args) and "RPC" in args[i + 1] and not rpc
                and ("--rpc" in args[i:])):
            # common/arg.cpp parses in order: the RPC devices exist only once --rpc has been read
            raise ConfigError(f"{flag} {args[i + 1]} comes before --rpc: llama-server reads its flags in order and "
                              f"stops with 'invalid device'; put --rpc first")
        s = _BY_FLAG.get(SETTING_ALIASES.get(flag, flag))
        if s is not None:
            if s.kind in ("on", "off"):
                on = flag not in _POSITIVE
                values[s.attr] = on if s.kind == "on" else not on
                i += 1
                continue
            v = _value(args, i)
            if s.kind == "rules":
                rules.append(v)
            elif s.kind == "choice" and s.attr == "flash_attn":
                values[s.attr] = {"1": "on", "0": "off", "true": "on", "false": "off"}.get(v, v)
            else:
                values[s.attr] = value_from_text(s, v)
            i += 2
            continue
        if flag in PROCESS_FLAGS:
            v = _value(args, i) if PROCESS_FLAGS[flag] else ""
            _process_flag(flag, v, locals_=(proj, draft, spec_types, rpc))
            if flag in ("-m", "--model"):
                model = v
            i += 2 if PROCESS_FLAGS[flag] else 1
            continue
        if flag in UNMODELLED or flag in IGNORED:
            takes = flag not in _NO_VALUE and i + 1 < len(args) and not _is_flag(args[i + 1])
            shown = f"{flag} {args[i + 1]}" if takes else flag
            if flag in UNMODELLED:
                unmodelled.append(f"{shown}: {UNMODELLED[flag]}")
            else:
                ignored.append(shown)
            i += 2 if takes else 1
            continue
        if not flag.startswith("-"):
            raise ConfigError(f"{flag!r}: {program} takes no positional argument (a model is -m FILE)")
        raise ConfigError(f"{flag}: not a flag of the vendored {program} (common/arg.cpp)")
    if rules:
        values["tensor_overrides"] = tuple(item for text in rules for item in text.split(",") if item)
    if not model:
        raise ConfigError(f"the pasted {program} command has no -m MODEL")
    config = SplitConfig(**{**program_defaults(program, values), **values})
    projector = Projector(path=proj["path"], offload=proj.get("offload", True), device=proj.get("device", "")) \
        if "path" in proj else None
    dcfg = None
    if "path" in draft:
        dcfg = Draft(path=draft["path"], config=draft_config(config, draft))
    elif len(set(draft) - {"n_max"}) > 1:
        unmodelled.append("draft flags without -md: llama-server loads no draft model; they change nothing here")
    if any(t.startswith("ngram") for t in spec_types):
        unmodelled.append("--spec-type " + ",".join(spec_types) + ": n-gram drafts add outputs to the main "
                          "context (n_outputs_max), not modelled")
    return Command(program=program, model=model, config=config, given=frozenset(values), rpc=tuple(rpc),
                   projector=projector, draft=dcfg, spec_types=tuple(spec_types), ignored=tuple(ignored),
                   unmodelled=tuple(unmodelled), draft_n_max=draft.get("n_max", 3),
                   draft_cache=(draft.get("type_k", "f16"), draft.get("type_v", "f16")))


def _value(args: list[str], i: int) -> str:
    if i + 1 >= len(args):
        raise ConfigError(f"{args[i]} needs a value")
    return args[i + 1]


def server_n_outputs(config: SplitConfig, n_draft: int = 0) -> int:
    """llama-server's n_outputs_max: server_output_limits (tools/server/server-context.cpp) =
    min(n_batch, n_parallel x (1 + n_draft)) (common_speculative_get_output_limits)."""
    return max(1, min(config.n_batch, config.n_seq_max * (1 + n_draft)))


def program_defaults(program: str, given: Container[str]) -> dict:
    """What the program sets where the command does not: common_params' n_ctx = 0 (the training
    context, which fit may shrink); llama-server's -np -1, which tools/server/server.cpp turns into
    4 slots sharing one unified KV cache (llama-cli: 1 sequence)."""
    out: dict = {"n_ctx": 0}
    if program == "llama-server" and "n_seq_max" not in given:
        out.update(n_seq_max=4, kv_unified=True)
    return out


def _is_flag(t: str) -> bool:
    # '-1' is a value (e.g. --seed -1), '-ngl' a flag
    return t.startswith("-") and not t.lstrip("-").replace(".", "", 1).isdigit()


def _process_flag(flag: str, v: str, locals_) -> None:
    proj, draft, spec_types, rpc = locals_
    if flag == "--rpc":
        rpc.extend(x for x in v.split(",") if x)
    elif flag in ("-mm", "--mmproj"):
        proj["path"] = v
    elif flag == "--mmproj-offload":
        proj["offload"] = True
    elif flag == "--no-mmproj-offload":
        proj["offload"] = False
    elif flag in ("-mmdev", "--mmproj-device"):
        if v == "none":      # common/arg.cpp: mmproj_use_gpu = false
            proj["offload"], proj["device"] = False, ""
        else:
            proj["device"] = v
    elif flag in ("--spec-draft-model", "-md", "--model-draft"):
        draft["path"] = v
    elif flag in ("--spec-draft-device", "-devd", "--device-draft"):
        draft["devices"] = tuple(x.strip() for x in v.split(",") if x.strip())
    elif flag in ("--spec-draft-ngl", "-ngld", "--gpu-layers-draft", "--n-gpu-layers-draft"):
        draft["n_gpu_layers"] = parse_ngl(v)
    elif flag in ("--spec-draft-override-tensor", "-otd", "--override-tensor-draft"):
        draft["rules"].extend(x for x in v.split(",") if x)
    elif flag in ("--spec-draft-cpu-moe", "-cmoed", "--cpu-moe-draft"):
        draft["cpu_moe"] = True
    elif flag in ("--spec-draft-n-cpu-moe", "--spec-draft-ncmoe", "-ncmoed", "--n-cpu-moe-draft"):
        draft["n_cpu_moe"] = int(v)
    elif flag in ("--spec-draft-type-k", "-ctkd", "--cache-type-k-draft"):
        draft["type_k"] = _kv_type(flag, v)
    elif flag in ("--spec-draft-type-v", "-ctvd", "--cache-type-v-draft"):
        draft["type_v"] = _kv_type(flag, v)
    elif flag == "--spec-type":
        spec_types.extend(x for x in v.split(",") if x)
    elif flag == "--spec-draft-n-max":
        draft["n_max"] = int(v)


def _kv_type(flag: str, v: str) -> str:
    if v not in KV_CACHE_TYPES:
        raise ConfigError(f"{flag} {v!r} is not a KV cache type; use one of {', '.join(KV_CACHE_TYPES)}")
    return v


def draft_config(main: SplitConfig, draft: dict) -> SplitConfig:
    """The draft model's settings as common_base_params_to_speculative (common/speculative.cpp)
    derives them from the main model's: -devd (default: the main's --device), -ngld (default -1,
    which no fit touches: every layer), -otd/-cmoed/-ncmoed in place of the main's overrides,
    -ctkd/-ctvd (default f16), a single -devd device forces -sm layer; the rest (-c, -np, -kvu,
    -ub, -b, -fa, -ts, -mg) is the main model's."""
    devices = draft.get("devices", main.devices)
    split_mode = "layer" if len([d for d in draft.get("devices", ()) if d != "none"]) == 1 else main.split_mode
    return main.replace(devices=devices, n_gpu_layers=draft.get("n_gpu_layers", -1),
                        tensor_overrides=tuple(draft.get("rules", ())), cpu_moe=draft.get("cpu_moe", False),
                        n_cpu_moe=draft.get("n_cpu_moe", 0), n_cpu_ffn=0,
                        type_k=draft.get("type_k", "f16"), type_v=draft.get("type_v", "f16"),
                        split_mode=split_mode, fit="off")


def _parse_bench(args: list[str]) -> Command:
    values: dict = {}
    tests = {"n_prompt": "512", "n_gen": "128", "n_depth": "0"}
    model, rpc = "", []
    ignored, unmodelled = [], []
    i = 0
    while i < len(args):
        flag = args[i]
        takes = flag not in _BENCH_NO_VALUE and i + 1 < len(args)
        v = args[i + 1] if takes else ""
        if flag in ("-m", "--model"):
            model = v
        elif flag in ("-rpc", "--rpc"):
            rpc += [x for x in v.split(",") if x]
        elif flag in _BENCH_SETTINGS:
            attr = _BENCH_SETTINGS[flag]
            s = next(x for x in SETTINGS if x.attr == attr)
            if attr != "tensor_split" and "," in v and attr not in ("tensor_overrides", "fit_target", "devices"):
                raise ConfigError(f"llama-bench {flag} {v}: several tests; gpulab plans one at a time: give one value")
            if attr in ("offload_kqv", "op_offload"):        # -nkvo 1: offload off
                values[attr] = v in ("0", "false")
            elif attr in ("no_host", "use_extra_bufts"):
                values[attr] = v in ("1", "true")
            elif attr == "flash_attn":
                values[attr] = {"1": "on", "0": "off", "true": "on", "false": "off"}.get(v, v)
            elif attr == "tensor_split":
                values[attr] = parse_tensor_split(v.replace(",", "/") if ";" not in v else v)
            elif attr == "devices":
                values[attr] = tuple(x for x in v.replace("/", ",").split(",") if x)
            elif attr == "tensor_overrides":
                values[attr] = tuple(x for x in v.split(",") if x)
            else:
                values[attr] = value_from_text(s, v)
        elif flag in BENCH_TESTS:
            if flag == "-pg":
                raise ConfigError("llama-bench -pg: plan its context with -p and -n instead")
            if "," in v:
                raise ConfigError(f"llama-bench {flag} {v}: several tests; gpulab plans one at a time: give one value")
            tests[BENCH_TESTS[flag]] = v
        elif flag in BENCH_IGNORED:
            ignored.append(f"{flag} {v}".strip())
        elif flag in BENCH_UNMODELLED:
            unmodelled.append(f"{flag} {v}: {BENCH_UNMODELLED[flag]}".replace(" :", ":"))
        else:
            raise ConfigError(f"{flag}: not a flag of the vendored llama-bench (tools/llama-bench/llama-bench.cpp)")
        i += 2 if takes else 1
    if not model:
        raise ConfigError("the pasted llama-bench command has no -m MODEL")
    p, n, d = (int(tests[k]) for k in ("n_prompt", "n_gen", "n_depth"))
    # test_params: cparams.n_ctx = n_prompt + n_gen + n_depth, one context per test (pp: n_gen 0,
    # tg: n_prompt 0): the larger test's context is planned
    run = [f"pp{p}"] * bool(p) + [f"tg{n}"] * bool(n)
    n_ctx = max(p, n) + d
    values.setdefault("n_ctx", n_ctx)
    config = SplitConfig(**{**values, "fit": "off"})
    return Command(program="llama-bench", model=model, config=config, given=frozenset(values), rpc=tuple(rpc),
                   ignored=tuple(ignored), unmodelled=tuple(unmodelled), bench_tests=tuple(run))

