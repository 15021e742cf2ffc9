"""Tensor buffer overrides (-ot, --cpu-moe, --n-cpu-moe, --n-cpu-ffn): which tensors go where.

    rules = parse_override_text(r"blk\\.[0-2]\\.ffn_.*_exps=CPU,attn_q=RPC1")
    effective_rules(config)          # -ot first, then -cmoe, -ncmoe, -ncffn, in llama.cpp's spellings
    first_match(rules, "blk.1.ffn_up_exps.weight")   # the rule that decides this tensor, or None

What llama.cpp does (the vendored llama.cpp, common/arg.cpp and src/llama-model-loader.cpp):
- parse_tensor_buffer_overrides splits the value on ',' and each item on its first '=', with no
  trimming; the buffer type must be a device's default buffer type by its exact name ('CPU',
  'CUDA0', 'RPC0[127.0.0.1:50052]'), else "unknown buffer type". So a pattern can hold neither
  ',' nor '=' (nor ';', llama-bench's separator of -ot entries).
- --cpu-moe adds LLM_FFN_EXPS_REGEX -> CPU; --n-cpu-moe N adds one blk\\.<i>LLM_FFN_EXPS_REGEX
  rule per layer i < N, --n-cpu-ffn N the same with LLM_FFN_DENSE_REGEX (common/common.h
  llm_add_n_cpu_ffn_overrides); N < 0 is "invalid value".
- llama_model_loader::create_tensor (its buft_for_tensor lambda): for each tensor, the first rule
  whose std::regex (ECMAScript) `regex_search`es the tensor's full name decides its buffer.

gpulab evaluates patterns with Python's `re` (ASCII mode), which gives std::regex_search's
answer for the subset `check_pattern` admits; what it cannot mirror it refuses, with the reason.
Rules are gpulab's own order: the -ot rules as given, then --cpu-moe, --n-cpu-moe, --n-cpu-ffn,
which is the order gpulab's exports write them in (and llama-bench's: -ot first, then -ncmoe).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from .errors import ConfigError

__all__ = ["OverrideRule", "parse_override_text", "check_pattern", "effective_rules", "first_match",
           "FFN_EXPS_REGEX", "FFN_DENSE_REGEX", "cpu_moe_rule", "n_cpu_ffn_rules", "rule_text",
           "llama_buffer_type_name", "REFUSED_BUFFER_TYPES"]

# common/common.h
FFN_EXPS_REGEX = r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"
FFN_DENSE_REGEX = r"\.ffn_(up|down|gate)\."

# host buffer types llama.cpp prints but -ot does not take (not a device's default buffer type)
REFUSED_BUFFER_TYPES = ("CUDA_Host", "CPU_Mapped", "CPU_REPACK", "AMX", "CUDA_Split")


@dataclass(frozen=True)
class OverrideRule:
    pattern: str        # as llama.cpp gets it (a std::regex, ECMAScript)
    target: str         # a device as gpulab names it ('CPU', 'CUDA0', 'RPC1', 'SIM0'), or llama.cpp's buft name
    source: str = "-ot"  # which flag made it: '-ot', '-cmoe', '-ncmoe', '-ncffn'

    @property
    def text(self) -> str:
        return f"{self.pattern}={self.target}"


def rule_text(rules) -> str:
    return ",".join(r.text for r in rules)


# -- what std::regex (ECMAScript, libstdc++) and Python's re agree on ------------------------------
_REFUSED = (
    (re.compile(r"\(\?(?![:=!])"), "groups '(?...' other than (?:...), (?=...) and (?!...): std::regex has "
                                   "no lookbehind, named groups, inline flags or atomic groups"),
    (re.compile(r"(?<!\\)[*+?}]\+"), "possessive quantifiers (a++, a*+): std::regex reads them as plain ones"),
    (re.compile(r"\\[1-9]"), "backreferences (\\1)"),
    (re.compile(r"\\0|\\c"), "\\0 and \\c escapes"),
    (re.compile(r"(?<!\\)\{,"), "'{,n}': std::regex has no open lower bound; write {0,n}"),
    (re.compile(r"(?<!\\)\[\^?\]"), "'[]' or '[^]' first in a class: std::regex reads an empty class there"),
    (re.compile(r"\[:"), "POSIX classes [[:alpha:]]: Python's re does not have them"),
)
_OK_ESCAPES = set("dDwWsSbBxu") | set(r".\-_[](){}*+?|^$/=,;:!#&%@'\"<>~` ")


def check_pattern(pattern: str) -> re.Pattern:
    """The compiled pattern, or ConfigError saying what llama.cpp would do differently."""
    for ch, why in ((",", "',' separates -ot items (common/arg.cpp), so a pattern cannot contain it"),
                    ("=", "'=' separates a pattern from its buffer type, so a pattern cannot contain it"),
                    (";", "';' separates llama-bench's -ot entries, so a pattern cannot contain it")):
        if ch in pattern:
            raise ConfigError(f"tensor override pattern {pattern!r}: {why}")
    for rx, why in _REFUSED:
        if rx.search(pattern):
            raise ConfigError(f"tensor override pattern {pattern!r}: gpulab cannot mirror {why}")
    i = 0
    while i < len(pattern):
        if pattern[i] == "\\":
            nxt = pattern[i + 1:i + 2]
            if not nxt:
                raise ConfigError(f"tensor override pattern {pattern!r} ends with a lone backslash")
            if nxt.isalpha() and nxt not in _OK_ESCAPES:
                raise ConfigError(f"tensor override pattern {pattern!r}: \\{nxt} means a literal '{nxt}' to "
                                  "std::regex and something else (or nothing) to Python's re; write the letter")
            i += 2
            continue
        i += 1
    # a '{' that is not a quantifier: std::regex refuses it, Python reads it literally
    for m in re.finditer(r"(?<!\\)\{", pattern):
        if not re.match(r"\{\d+(,\d*)?\}", pattern[m.start():]):
            raise ConfigError(f"tensor override pattern {pattern!r}: a '{{' that is not a quantifier {{n}} or "
                              "{n,m} is an error to std::regex; escape it as \\{")
    return _compile(pattern)


@lru_cache(maxsize=4096)
def _compile(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern, re.ASCII)
    except re.error as e:
        raise ConfigError(f"tensor override pattern {pattern!r} does not compile: {e}") from None


# -- parsing and expanding --------------------------------------------------------------------------
@lru_cache(maxsize=8192)   # fit re-plans the same rules many times (gpulab.core.policies.server_fit)
@lru_cache(maxsize=8192)     # fit writes the same rules into dry run after dry run
def parse_override_text(text: str, source: str = "-ot") -> tuple[OverrideRule, ...]:
    """One -ot value ('PAT=BUFT,PAT=BUFT'), as parse_tensor_buffer_overrides splits it."""
    rules = []
    for item in text.split(","):
        pattern, sep, target = item.partition("=")
        if not sep:
            raise ConfigError(f"-ot item {item!r} has no '=': write PATTERN=BUFFER_TYPE, e.g. "
                              r"'blk\.[0-3]\.ffn_.*_exps=CPU'")
        if not target:
            raise ConfigError(f"-ot item {item!r} names no buffer type after '='")
        if target in REFUSED_BUFFER_TYPES:
            raise ConfigError(f"-ot {item!r}: llama.cpp does not take {target} as a buffer type (it is not a "
                              "device's own); write CPU, and llama.cpp chooses the host buffer itself")
        check_pattern(pattern)
        rules.append(OverrideRule(pattern, target, source))
    return tuple(rules)


def cpu_moe_rule() -> OverrideRule:
    """--cpu-moe: llm_ffn_exps_cpu_override()."""
    return OverrideRule(FFN_EXPS_REGEX, "CPU", "-cmoe")


def n_cpu_ffn_rules(n: int, regex: str, source: str) -> tuple[OverrideRule, ...]:
    """llm_add_n_cpu_ffn_overrides: blk\\.<i><regex> -> CPU for i in 0..n-1."""
    if n < 0:
        flag = "--n-cpu-moe" if source == "-ncmoe" else "--n-cpu-ffn"
        raise ConfigError(f"{flag} {n}: llama.cpp takes a count from 0 (invalid value)")
    return tuple(OverrideRule(rf"blk\.{i}{regex}", "CPU", source) for i in range(n))


def effective_rules(config) -> tuple[OverrideRule, ...]:
    """Every rule a SplitConfig gives llama.cpp, in the order they are tried."""
    key = (config.tensor_overrides, config.cpu_moe, config.n_cpu_moe, config.n_cpu_ffn)
    got = _EFFECTIVE.get(key)
    if got is None:
        if len(_EFFECTIVE) >= 1024:
            _EFFECTIVE.clear()
        got = _EFFECTIVE[key] = _effective_rules(config)
    return got


_EFFECTIVE: dict[tuple, tuple[OverrideRule, ...]] = {}     # plan asks once per dry run of fit's


def _effective_rules(config) -> tuple[OverrideRule, ...]:
    rules: list[OverrideRule] = []
    for text in config.tensor_overrides:
        rules.extend(parse_override_text(text))
    if config.cpu_moe:
        rules.append(cpu_moe_rule())
    rules.extend(n_cpu_ffn_rules(config.n_cpu_moe, FFN_EXPS_REGEX, "-ncmoe"))
    rules.extend(n_cpu_ffn_rules(config.n_cpu_ffn, FFN_DENSE_REGEX, "-ncffn"))
    return tuple(rules)


def first_match(rules, name: str) -> OverrideRule | None:
    """The rule that decides `name` (std::regex_search, first match wins), or None."""
    for r in rules:
        if _compile(r.pattern).search(name):
            return r
    return None


_LLAMA_RPC = re.compile(r"^RPC(\d+)\[(.+)\]$")


def llama_buffer_type_name(device) -> str:
    """A device's default buffer type as llama.cpp names it, what -ot takes: 'CPU', 'CUDA0', and
    for an RPC server's device 'RPC<index within its server>[<endpoint>]' (ggml-rpc.cpp
    ggml_backend_rpc_buffer_type). `device` is a gpulab Device; RPC devices need their endpoint
    and `server_index`."""
    if device.kind == "rpc" and device.endpoint:
        return f"RPC{device.server_index}[{device.endpoint}]"
    return device.name


def parse_llama_rpc_buffer_type(name: str) -> tuple[int, str] | None:
    """'RPC1[127.0.0.1:50053]' -> (1, '127.0.0.1:50053'); None for other names."""
    m = _LLAMA_RPC.match(name)
    return (int(m.group(1)), m.group(2)) if m else None
