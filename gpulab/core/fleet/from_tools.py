"""A fleet's starting point read from what people already run: a llama-swap config.yaml (as a
parsed dict) or a llama-server --models-preset INI (as text).

Each model's llama-server arguments become a FleetModel: the model (-m, or -hf as a llama.cpp
cache entry) and every flag of the flag table (gpulab.core.settings: -c, -ctk, -np, --device as a
pin, -ot, -fa, -ngl, -b, -ub, -kvu, ...), the projector (--mmproj, --no-mmproj-offload), the draft
(-md and its flags: -ngld, -devd, -otd, -ctkd, ...) and --spec-type. The split (-ts, -sm, -mg)
and -fit are dropped: choosing them is the planner's job; every argument left out is named in
the notes, never dropped silently.

Which models run together:
- llama-swap: the members of a group with `swap: false` are resident (keep_loaded); every
  other model swaps (llama-swap's default group swaps: one model at a time);
- the router: a preset with load-on-startup is resident, the rest are loaded on demand.
The INI grammar is common/preset.cpp's parse_ini_from_file; `[*]` applies to every model.
"""

from __future__ import annotations

import re
import shlex

from ..command_line import PROCESS_FLAGS
from ..errors import ConfigError
from ..settings import SETTINGS, value_from_text
from .model import Fleet, fleet_from_dict, fleet_key

__all__ = ["fleet_from_llama_swap", "fleet_from_router_ini", "llama_swap_commands", "model_from_server_args",
           "parse_preset_ini"]

# llama-server spellings (common/arg.cpp) -> the fleet key: the model, and every row of the flag
# table (gpulab.core.settings) but the split, which the planner chooses
_PLANNED = {"-ts", "--tensor-split", "-sm", "--split-mode", "-mg", "--main-gpu", "-fit", "--fit"}
_SETTING = {flag: s for s in SETTINGS for flag in s.flags if flag not in _PLANNED}
_KEYS = {"-m": "model", "--model": "model", "-hf": "hf", "--hf-repo": "hf", "-hfr": "hf",
         "--gpu-layers": "n_gpu_layers", **{flag: fleet_key(s.attr) for flag, s in _SETTING.items()}}
_BY_KEY = {fleet_key(s.attr): s for s in SETTINGS}
# the projector and the draft: the fleet model's process keys (mmproj, draft, draft_flags, spec_type);
# -mmdev (the projector's own device) is left out: the fleet puts it where llama-server does by default
_PROCESS = {f for f in PROCESS_FLAGS if f not in ("-m", "--model", "--rpc", "-mmdev", "--mmproj-device")}
# flags without a value that a fleet model does not hold
_FLAGS = {"--jinja", "--no-webui", "--metrics", "--no-mmap", "--mlock", "-cb", "--cont-batching", "--verbose", "-v"}


def model_from_server_args(name: str, argv: list[str], *, keep_loaded: bool) -> tuple[dict, list[str]]:
    """([[models]] table, notes) for one model's llama-server arguments (argv[0] may be the program)."""
    doc: dict = {"name": name}
    notes: list[str] = []
    draft: list[str] = []
    args: list[str] = []
    for t in argv:                          # --ctx-size=8192 is --ctx-size 8192
        args += t.split("=", 1) if t.startswith("--") and "=" in t else [t]
    if args and not args[0].startswith("-"):
        args = args[1:]                     # the program: llama-server, or its path
    i = 0
    while i < len(args):
        flag = args[i]
        value = args[i + 1] if i + 1 < len(args) else None
        key = _KEYS.get(flag)
        setting = _SETTING.get(flag)
        if setting is not None and setting.kind in ("on", "off"):     # -kvu, -nkvo, ...: no value
            doc[key] = setting.kind == "on"
            i += 1
        elif key is not None:
            if value is None:
                raise ConfigError(f"{name}: {flag} needs a value")
            _put(doc, key, value, name)
            i += 2
        elif flag in _PROCESS:
            # the projector, the draft and the speculative mode: the fleet model's process keys
            takes = PROCESS_FLAGS[flag]
            if takes and value is None:
                raise ConfigError(f"{name}: {flag} needs a value")
            if flag in ("-mm", "--mmproj"):
                doc["mmproj"] = value
            elif flag == "--no-mmproj-offload":
                doc["mmproj_offload"] = False
            elif flag in ("--spec-draft-model", "-md", "--model-draft"):
                doc["draft"] = value
            elif flag == "--spec-type":
                doc["spec_type"] = value
            elif flag != "--mmproj-offload":       # the default
                draft += [flag, value] if takes and value is not None else [flag]
            i += 2 if takes else 1
        elif flag in _FLAGS or not flag.startswith("-"):
            notes.append(f"{name}: {flag} left out (not part of a fleet model)")
            i += 1
        else:
            why = "the planner chooses the split" if flag in _PLANNED else "not part of a fleet model"
            if value is not None and not value.startswith("-"):
                notes.append(f"{name}: {flag} {value} left out ({why})")
                i += 2
            else:
                notes.append(f"{name}: {flag} left out ({why})")
                i += 1
    if draft:
        doc["draft_flags"] = shlex.join(draft)
    if "model" not in doc:
        raise ConfigError(f"{name}: no -m MODEL or -hf REPO in its arguments")
    if not keep_loaded:
        doc["keep_loaded"] = False
    return doc, notes


def _put(doc: dict, key: str, value: str, name: str) -> None:
    if key == "hf":
        doc["model"] = "hf:" + value
    elif key == "model":
        doc[key] = value
    elif key == "flash_attn":
        doc[key] = {"1": "on", "0": "off", "true": "on", "false": "off"}.get(value, value)
    else:
        s = _BY_KEY[key]
        try:
            v = value_from_text(s, value)
        except (ValueError, ConfigError):
            raise ConfigError(f"{name}: {s.flags[0]} {value!r} is not {s.metavar or 'a number'}") from None
        if key == "n_gpu_layers" and v < 0:
            doc.pop(key, None)      # all layers: the default
        elif s.kind == "rules":
            doc.setdefault(key, []).extend(x for x in v if x)
        else:
            doc[key] = list(v) if isinstance(v, tuple) else v


def llama_swap_commands(doc) -> dict[str, list[str]]:
    """{model name: its cmd as argv, macros expanded (${PORT} as 0)} of a parsed llama-swap config.yaml."""
    if not isinstance(doc, dict) or not isinstance(doc.get("models"), dict) or not doc["models"]:
        raise ConfigError("a llama-swap config needs a `models:` map with at least one model")
    macros = {k: str(v) for k, v in (doc.get("macros") or {}).items()}
    out = {}
    for name, m in doc["models"].items():
        cmd = m.get("cmd") if isinstance(m, dict) else None
        if not isinstance(cmd, str):
            raise ConfigError(f"llama-swap model {name!r} has no cmd")
        for k, v in macros.items():
            cmd = cmd.replace("${" + k + "}", v)
        cmd = cmd.replace("${PORT}", "0")
        left = re.findall(r"\$\{[^}]*\}", cmd)
        if left:
            raise ConfigError(f"llama-swap model {name!r}: unknown macro(s) {', '.join(left)} in its cmd")
        out[str(name)] = shlex.split(cmd)
    return out


def fleet_from_llama_swap(doc) -> tuple[Fleet, list[str]]:
    """(Fleet, notes) from a parsed llama-swap config.yaml: `models.NAME.cmd`, `groups`, `macros`."""
    if not isinstance(doc, dict) or not isinstance(doc.get("models"), dict) or not doc["models"]:
        raise ConfigError("a llama-swap config needs a `models:` map with at least one model")
    resident: set[str] = set()
    for g in (doc.get("groups") or {}).values():
        if isinstance(g, dict) and g.get("swap") is False:
            resident.update(g.get("members") or [])
    models, notes = [], []
    for name, argv in llama_swap_commands(doc).items():
        table, n = model_from_server_args(str(name), argv, keep_loaded=name in resident)
        models.append(table)
        notes += [x for x in n if not x.endswith("--port 0 left out (not part of a fleet model)")]
    return fleet_from_dict({"models": models}), notes


def parse_preset_ini(text: str) -> dict[str, dict[str, str]]:
    """{section: {key: value}} as common/preset.cpp's parse_ini_from_file reads it: keys before any
    section go to 'default'; ';' and '#' start comments; a line it would reject is a ConfigError."""
    ident = r"[a-zA-Z_][a-zA-Z0-9_.-]*"
    out: dict[str, dict[str, str]] = {}
    section = "default"
    for n, line in enumerate(text.splitlines(), 1):
        if re.fullmatch(r"[ \t]*([;#].*)?", line):
            continue
        m = re.fullmatch(r"\[[ \t]*([^\]]+?)[ \t]*\][ \t]*([;#].*)?", line)
        if m:
            section = m.group(1)
            out[section] = {}
            continue
        m = re.fullmatch(rf"({ident})[ \t]*=[ \t]*(.*?)[ \t]*([;#].*)?", line)
        if not m:
            raise ConfigError(f"line {n} of the preset INI is neither [section], key = value nor a comment: {line!r}")
        out.setdefault(section, {})[m.group(1)] = m.group(2)
    return out


def fleet_from_router_ini(text: str) -> tuple[Fleet, list[str]]:
    """(Fleet, notes) from a llama-server --models-preset INI."""
    sections = parse_preset_ini(text)
    sections.pop("default", None)     # 'version' and router-wide keys
    common = sections.pop("*", {})
    models, notes = [], []
    for name, keys in sections.items():
        keys = {**common, **keys}
        argv: list[str] = []
        start = keys.pop("load-on-startup", "false").lower() in ("1", "true", "on", "yes")
        for k, v in keys.items():
            short = len(k) <= 3 and f"-{k}" in _KEYS or f"-{k}" in _PROCESS or f"-{k}" in _PLANNED
            flag = ("-" if short else "--") + k
            if flag == "--model":
                flag = "-m"
            if v.lower() == "true" and flag not in _KEYS and not PROCESS_FLAGS.get(flag, False):
                argv.append(flag)
            else:
                argv += [flag, v]
        table, n = model_from_server_args(name, argv, keep_loaded=start)
        models.append(table)
        notes += n
    if not models:
        raise ConfigError("the preset INI has no [model] section")
    return fleet_from_dict({"models": models}), notes
