"""llama.cpp's own option definitions, read from the vendored source (importable as `llama_args`):
common/arg.cpp's common_arg(...) calls, with their value hints, handlers and the tools they are
for, and its KV cache types. Used by the export tests to check what gpulab writes for llama.cpp."""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["server_options_from_source", "kv_cache_types_from_source", "preset_only_keys_from_source"]


def _split_args(text: str, start: int) -> tuple[list[str], int]:
    """Top-level comma-separated arguments of the C++ call whose '(' is at text[start - 1];
    aware of nesting, string/char literals and raw strings. Returns (args, index after ')')."""
    args, depth, i, cur = [], 0, start, start
    while True:
        ch = text[i]
        if text.startswith("//", i):
            i = text.index("\n", i)
            continue
        if text.startswith("/*", i):
            i = text.index("*/", i) + 2
            continue
        if text.startswith('R"', i) and not text[i - 1].isalnum():
            delim = text[i + 2:text.index("(", i)]
            i = text.index(")" + delim + '"', i) + len(delim) + 2
            continue
        if ch in "\"'":
            j = i + 1
            while text[j] != ch:
                j += 2 if text[j] == "\\" else 1
            i = j + 1
            continue
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            if depth == 0:
                args.append(text[cur:i].strip())
                return args, i + 1
            depth -= 1
        elif ch == "," and depth == 0:
            args.append(text[cur:i].strip())
            cur = i + 1
        i += 1


def _strings(expr: str) -> list[str]:
    return re.findall(r'"((?:[^"\\]|\\.)*)"', expr)


def server_options_from_source(src: Path, example: str = "LLAMA_EXAMPLE_SERVER") -> dict[str, dict]:
    """{flag: {"hint": value hint or None, "handler": handler source}} for one llama.cpp tool,
    from common/arg.cpp's common_arg(...) definitions and the add_opt filter (in_example)."""
    text = (src / "common" / "arg.cpp").read_text()
    out: dict[str, dict] = {}
    for m in re.finditer(r"\bcommon_arg\(", text):
        args, end = _split_args(text, m.end())
        if not args[0].startswith("{"):
            continue   # the constructor definitions themselves
        names = _strings(args[0])
        rest = args[1:]
        if rest and rest[0].startswith("{"):   # {"-kvo", ...}, {"-nkvo", ...}: a boolean pair
            names += _strings(rest[0])
            rest = rest[1:]
        handler = rest[-1]
        hint = _strings(rest[0])[0] if len(rest) >= 3 and rest[0].startswith('"') else None
        # chained .set_examples(...) / .set_excludes(...) up to the end of add_opt(...)
        tail = text[end:text.index(";", end)]
        ex = re.search(r"set_examples\(\{([^}]*)\}", tail)
        examples = set(re.findall(r"LLAMA_EXAMPLE_\w+", ex.group(1))) if ex else {"LLAMA_EXAMPLE_COMMON"}
        exc = re.search(r"set_excludes\(\{([^}]*)\}", tail)
        excludes = set(re.findall(r"LLAMA_EXAMPLE_\w+", exc.group(1))) if exc else set()
        if (example in examples or "LLAMA_EXAMPLE_COMMON" in examples) and example not in excludes:
            for n in names:
                out[n] = {"hint": hint, "handler": handler}
    return out


def kv_cache_types_from_source(src: Path) -> list[str]:
    text = (src / "common" / "arg.cpp").read_text()
    block = text[text.index("kv_cache_types = {"):]
    block = block[:block.index("};")]
    return [t.lower() for t in re.findall(r"GGML_TYPE_(\w+)", block)]


def preset_only_keys_from_source(src: Path) -> list[str]:
    """The keys only a --models-preset INI takes (common_params_add_preset_options in common/arg.cpp)."""
    text = (src / "common" / "arg.cpp").read_text()
    body = text[text.index("void common_params_add_preset_options"):]
    body = body[:body.index("\n}\n")]
    body = "\n".join(ln for ln in body.splitlines() if not ln.strip().startswith("//"))
    return re.findall(r'common_arg\(\s*\{"([^"]+)"\}', body)
