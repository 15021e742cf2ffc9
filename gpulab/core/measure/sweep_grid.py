"""Sweep grids in llama-bench's syntax: each flag takes a list of values, the grid is their product.

    g = parse_grid(["-ngl", "10-40+10", "-ts", "1/1,3/1", "-fa", "on,off"])
    len(g)                       # 4 * 2 * 2
    g.configs(SplitConfig(n_ctx=1024))

The syntax is tools/llama-bench/llama-bench.cpp's (parse_cmd_params) of the vendored llama.cpp:
- ',' separates values: `-ctk f16,q8_0`; a flag given twice adds values: `-ngl 10 -ngl 20`;
- integers take ranges (parse_int_range): `first-last`, `first-last+step`, `first-last*factor`,
  as in `-ngl 10-40+10` (10,20,30,40) or `-ub 64-512*2`; -ngl alone accepts negative values;
- one -ts value lists the devices' shares separated by '/' (or ';'): `-ts 1/1,3/1`;
- one -dev value lists devices separated by '/': `-dev RPC0/RPC1,RPC1`;
- -fa takes on/off/auto (or 1/0/-1, true/false), -nkvo takes 0/1;
- -ncmoe takes integer ranges (the experts of the first N layers on the CPU);
- -ot: ',' separates variants, ';' the rules of one variant, and an empty variant is "no
  overrides": `-ot "blk\\.[0-3]\\.ffn_.*_exps=CPU;attn=RPC1,"` is two points.
`-c` is gpulab's own (llama-bench sizes the context from -p/-n/-d); it takes integer ranges.
The product runs in llama-bench's loop order (get_cmd_params_instances: ngl, ncmoe, sm, mg, dev,
ts, ot, then b, ub, ctk, ctv, nkvo, fa), -c placed with the load settings after -ot.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..config import SplitConfig, parse_tensor_split
from ..errors import ConfigError

__all__ = ["Grid", "parse_grid", "parse_int_range", "GRID_FLAGS", "LONG_FLAGS"]

# flag -> SplitConfig attribute, in llama-bench's loop order; long names as llama-bench's
GRID_FLAGS: dict[str, str] = {
    "-ngl": "n_gpu_layers", "-ncmoe": "n_cpu_moe", "-sm": "split_mode", "-mg": "main_gpu", "-dev": "devices",
    "-ts": "tensor_split", "-ot": "tensor_overrides", "-c": "n_ctx", "-b": "n_batch", "-ub": "n_ubatch",
    "-ctk": "type_k", "-ctv": "type_v",
    "-nkvo": "offload_kqv", "-fa": "flash_attn",
}
# long name -> short, as llama-bench spells them
LONG_FLAGS = {"--n-gpu-layers": "-ngl", "--n-cpu-moe": "-ncmoe", "--split-mode": "-sm", "--main-gpu": "-mg",
              "--device": "-dev", "--tensor-split": "-ts", "--override-tensor": "-ot", "--ctx-size": "-c",
              "--batch-size": "-b", "--ubatch-size": "-ub",
              "--cache-type-k": "-ctk", "--cache-type-v": "-ctv", "--no-kv-offload": "-nkvo", "--flash-attn": "-fa"}

# parse_int_range's regex; its character class [\+|\*] also admits '|', which it then rejects
_RANGE = re.compile(r"(-?\d+)(?:-(\d+)(?:([+|*])(\d+))?)?(?:,|$)")
_RANGE_POS = re.compile(r"(\d+)(?:-(\d+)(?:([+|*])(\d+))?)?(?:,|$)")

_TRUTHY = ("on", "enabled", "true", "1")     # common_arg_utils::is_truthy (common/arg.cpp)
_FALSEY = ("off", "disabled", "false", "0")
_AUTOY = ("auto", "-1")


def parse_int_range(text: str, allow_negative: bool = False, *, flag: str = "") -> list[int]:
    """llama-bench's parse_int_range: 'first[-last[(+|*)step]]', comma-separated."""
    rx = _RANGE if allow_negative else _RANGE_POS
    out: list[int] = []
    pos = 0
    where = f"{flag} {text!r}" if flag else repr(text)
    while pos < len(text):
        m = rx.match(text, pos)
        if m is None:
            raise ConfigError(f"{where}: invalid range format; use N, FIRST-LAST, FIRST-LAST+STEP or "
                              "FIRST-LAST*FACTOR, comma-separated")
        first = int(m.group(1))
        last = int(m.group(2)) if m.group(2) is not None else first
        op = m.group(3) or "+"
        step = int(m.group(4)) if m.group(4) is not None else 1
        if op == "|":
            raise ConfigError(f"{where}: invalid range format ('|' is not a step operator; use + or *)")
        if first > last:
            # llama-bench yields nothing here and falls back to its default: say it instead
            raise ConfigError(f"{where}: the range {first}-{last} is empty")
        i = first
        while i <= last:
            out.append(i)
            nxt = i + step if op == "+" else i * step
            if nxt <= i:
                raise ConfigError(f"{where}: invalid range (the step does not advance)")
            i = nxt
        pos = m.end()
    if not out:
        raise ConfigError(f"{where}: no values")
    return out


def _fa(v: str) -> str:
    if v in _TRUTHY:
        return "on"
    if v in _FALSEY:
        return "off"
    if v in _AUTOY:
        return "auto"
    raise ConfigError(f"-fa {v!r}: use on, off or auto")


def _values(flag: str, text: str) -> list:
    if flag == "-ngl":
        return parse_int_range(text, allow_negative=True, flag=flag)
    if flag in ("-mg", "-c", "-b", "-ub", "-ncmoe"):
        return parse_int_range(text, flag=flag)
    if flag == "-ot":
        return [_ot_variant(x) for x in text.split(",")]
    items = text.split(",")
    if any(not x.strip() for x in items):
        raise ConfigError(f"{flag} {text!r}: an empty value")
    if flag == "-ts":
        # llama-bench splits one value on [;/]+; gpulab's parse_tensor_split reads '/' lists
        return [parse_tensor_split(re.sub(r"[;/]+", "/", x)) for x in items]
    if flag == "-dev":
        return [("none",) if x.strip() == "none" else tuple(d.strip() for d in x.split("/")) for x in items]
    if flag == "-fa":
        return [_fa(x.strip()) for x in items]
    if flag == "-nkvo":   # string_split<bool>: 0/1; stored as SplitConfig.offload_kqv, its inverse
        out = []
        for x in items:
            if x.strip() not in ("0", "1"):
                raise ConfigError(f"-nkvo {x!r}: use 0 or 1")
            out.append(x.strip() == "0")
        return out
    return [x.strip() for x in items]   # -sm, -ctk, -ctv: checked by SplitConfig


def _ot_variant(text: str) -> tuple[str, ...]:
    """One -ot variant of llama-bench ('PAT=BUFT;PAT=BUFT', '' for none) as SplitConfig.tensor_overrides,
    each rule checked as llama.cpp would parse it."""
    from ..overrides import parse_override_text
    rules = [r for r in text.split(";") if r]
    for r in rules:
        parse_override_text(r)
    return tuple(rules)


@dataclass(frozen=True)
class Grid:
    """Values per SplitConfig attribute, in llama-bench's loop order."""

    axes: tuple[tuple[str, tuple], ...]

    def __len__(self) -> int:
        n = 1
        for _, values in self.axes:
            n *= len(values)
        return n

    def varying(self) -> list[str]:
        """Attributes with more than one value (the columns that tell points apart)."""
        return [a for a, v in self.axes if len(v) > 1]

    def points(self, base: SplitConfig | None = None) -> Iterable[tuple[SplitConfig | None, dict, str]]:
        """(config or None, {attr: value}, why invalid) for every point of the product."""
        base = base or SplitConfig()
        names = [a for a, _ in self.axes]
        for combo in itertools.product(*(v for _, v in self.axes)):
            values = dict(zip(names, combo))
            try:
                yield base.replace(**values), values, ""
            except ConfigError as e:   # e.g. a quantized V cache with -fa off
                yield None, values, str(e)

    def configs(self, base: SplitConfig | None = None) -> list[SplitConfig]:
        """The valid configs of the product (points SplitConfig refuses are left out; see points)."""
        return [c for c, _, _ in self.points(base) if c is not None]


def parse_grid(argv: Sequence[str] | dict[str, str | Sequence[str]]) -> Grid:
    """A Grid from llama-bench style arguments: ['-ngl', '10-40+10', '-ts', '1/1,3/1'], or a dict
    {'-ngl': '10-40+10', '-ts': ['1/1', '3/1']} (a list: the flag given once per item)."""
    given: list[tuple[str, str]] = []
    if isinstance(argv, dict):
        for k, v in argv.items():
            for item in ([v] if isinstance(v, str) else list(v)):
                given.append((k, str(item)))
    else:
        args = list(argv)
        if len(args) % 2:
            raise ConfigError(f"{args[-1]} needs a value")
        given = list(zip(args[::2], args[1::2]))
    collected: dict[str, list] = {}
    for flag, text in given:
        flag = LONG_FLAGS.get(flag, flag)
        if flag not in GRID_FLAGS:
            raise ConfigError(f"{flag}: not a sweep flag; use {' '.join(GRID_FLAGS)}")
        collected.setdefault(flag, []).extend(_values(flag, text))   # repeated flags add values
    axes = tuple((GRID_FLAGS[f], tuple(dict.fromkeys(collected[f]))) for f in GRID_FLAGS if f in collected)
    return Grid(axes)
