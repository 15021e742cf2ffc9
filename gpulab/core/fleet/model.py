"""A fleet: several models served at once on one box, each with its own llama.cpp settings.

The description (a TOML document, read and written by gpulab.storage.fleet_files) is, at its
minimum, spelled as issue 15 fixes it so that scripts can rely on it:

    version = 1                      # optional on reading, always written
    [[models]]
    name = "chat"
    model = "path, URL, ollama:qwen3:30b or hf:user/repo:Q4_K_M"
    ctx = 8192
    # optional: type_k, type_v, parallel, devices = ["CUDA0"], overrides = ["PATTERN=CPU"],
    #           keep_loaded (default true), flash_attn, n_gpu_layers
    # what else the model's llama-server process loads (as a pasted command spells it):
    #           mmproj = "P.gguf", mmproj_offload = false (--no-mmproj-offload),
    #           draft = "D.gguf" (-md), draft_flags = "-ngld 99 -devd CUDA1 -ctkd q8_0",
    #           spec_type = "draft-mtp" (the model's own MTP heads)
    # and every other llama.cpp setting of the flag table (gpulab.core.settings.SETTINGS) by its
    # SplitConfig name: n_batch = 1024, n_ubatch = 256, kv_unified = true, swa_full, op_offload,
    # offload_kqv, cpu_moe, n_cpu_moe, n_cpu_ffn, no_host, use_extra_bufts, split_mode, main_gpu,
    # fit, fit_target = [1024], fit_ctx (all but tensor_split: the fleet planner chooses the split)
    [devices.CUDA0]
    keep_free = "2GiB"

This module is pure: it turns the parsed document (a dict) into a `Fleet` and back, checking
every value, and says what a model reference is (`ModelRef`); finding the file behind an
Ollama name or a llama.cpp cache entry is gpulab.sources.model_refs.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from typing import Any

from ..command_line import Command, parse_command
from ..config import FLASH_ATTN_MODES, SplitConfig
from ..errors import ConfigError
from ..placement.process import ProjectorProfile
from ..profile import ModelProfile
from ..settings import SETTINGS, Setting
from ..units import GiB, KiB, MiB, parse_bytes

__all__ = ["FLEET_VERSION", "Companions", "Fleet", "FleetModel", "ModelRef", "parse_model_ref", "fleet_from_dict",
           "fleet_key", "fleet_to_dict", "format_keep_free"]

FLEET_VERSION = 1
# A fleet spells a setting by its SplitConfig name, except the three names issue 15 fixed
_FLEET_NAMES = {"n_ctx": "ctx", "n_seq_max": "parallel", "tensor_overrides": "overrides"}
_NOT_IN_FLEETS = ("tensor_split",)    # the fleet planner chooses each model's split
# the settings FleetModel has a field of its own for; every other row of SETTINGS goes in `settings`
_FIELDS = ("ctx", "type_k", "type_v", "parallel", "devices", "overrides", "flash_attn", "n_gpu_layers")


def fleet_key(attr: str) -> str:
    """The fleet TOML's key for a SplitConfig field."""
    return _FLEET_NAMES.get(attr, attr)


_OTHER_SETTINGS = {fleet_key(s.attr): s for s in SETTINGS
                   if s.attr not in _NOT_IN_FLEETS and fleet_key(s.attr) not in _FIELDS}
# the process's other models (gpulab.core.command_line spells them; gpulab.core.policies.process plans them)
_PROCESS_KEYS = ("mmproj", "mmproj_offload", "draft", "draft_flags", "spec_type")
_MODEL_KEYS = ("name", "model", *_FIELDS[:6], "keep_loaded", *_FIELDS[6:], *_PROCESS_KEYS, *_OTHER_SETTINGS)
_DEVICE_KEYS = ("keep_free",)
_TOP_KEYS = ("version", "models", "devices")
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:-]*$")   # a llama-swap model id, an INI section, a file name


@dataclass(frozen=True)
class ModelRef:
    """What `model = "..."` names: kind is 'path', 'url', 'ollama' (name, tag) or 'hf' (repo, tag:
    an entry of llama.cpp's model cache, as `llama-server -hf user/repo:TAG` names it)."""
    kind: str
    text: str            # as written
    name: str = ""       # ollama: 'qwen3' or 'user/model'; hf: 'user/repo'
    tag: str = ""        # ollama: 'latest' when omitted; hf: the quantization tag, '' for the default


def parse_model_ref(text: str) -> ModelRef:
    """'ollama:qwen3:30b' -> ModelRef('ollama', name='qwen3', tag='30b'); 'hf:org/repo:Q4_K_M',
    'https://...', anything else is a path."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"model must be a path, a URL, 'ollama:NAME[:TAG]' or 'hf:USER/REPO[:TAG]', got {text!r}")
    text = text.strip()
    if text.startswith("ollama:"):
        rest = text[len("ollama:"):]
        # Ollama's ParseNameBare (types/model/name.go): a tag only after a ':' that follows the last '/'
        name, tag = rest, ""
        if rest.rfind(":") > rest.rfind("/"):
            name, _, tag = rest.rpartition(":")
        tag = tag or "latest"
        if not name or not re.fullmatch(r"[A-Za-z0-9._/:-]+", name) or not re.fullmatch(r"[A-Za-z0-9._-]+", tag):
            raise ConfigError(f"{text!r} is not an Ollama name: write ollama:NAME[:TAG], e.g. ollama:qwen3:30b")
        return ModelRef("ollama", text, name, tag)
    if text.startswith("hf:"):
        rest = text[len("hf:"):]
        repo, _, tag = rest.partition(":")
        if not re.fullmatch(r"[A-Za-z0-9._-]+/[A-Za-z0-9._-]+", repo):
            raise ConfigError(f"{text!r} is not a llama.cpp cache entry: write hf:USER/REPO[:TAG], "
                              "e.g. hf:ggml-org/gemma-3-1b-it-GGUF:Q4_K_M")
        return ModelRef("hf", text, repo, tag.upper())
    if text.startswith(("http://", "https://")):
        return ModelRef("url", text)
    return ModelRef("path", text)


@dataclass(frozen=True)
class Companions:
    """The profiles of what a model's process loads beside it (-md, --mmproj)."""
    draft: ModelProfile | None = None
    projector: ProjectorProfile | None = None


@dataclass(frozen=True)
class FleetModel:
    name: str
    model: str                         # the reference as written (see ModelRef)
    ctx: int = 4096                    # -c (all slots together, as llama-server counts it)
    type_k: str = "f16"                # -ctk
    type_v: str = "f16"                # -ctv
    parallel: int = 1                  # -np
    devices: tuple[str, ...] = ()      # pinned devices (--device), in llama.cpp's order; () = the planner chooses
    overrides: tuple[str, ...] = ()    # -ot items, PATTERN=BUFFER_TYPE
    keep_loaded: bool = True           # False: may be swapped out (one swappable model at a time)
    flash_attn: str = "auto"           # -fa
    n_gpu_layers: int = -1             # -ngl; negative: all
    # every other setting the TOML gives other than its default, (SplitConfig field, value) in SETTINGS' order
    settings: tuple[tuple[str, Any], ...] = ()
    mmproj: str = ""                   # --mmproj
    mmproj_offload: bool = True        # False: --no-mmproj-offload
    draft: str = ""                    # -md
    draft_flags: tuple[str, ...] = ()  # the draft's flags as llama-server spells them (-ngld 99 -devd CUDA1 ...)
    spec_type: str = ""                # --spec-type (draft-mtp: the model's MTP heads)
    # the draft's and the projector's profiles, read by whoever reads the model files (not in the TOML)
    companions: Companions | None = field(default=None, compare=False, repr=False)

    @property
    def has_process(self) -> bool:
        """Whether its llama-server process loads more than the model."""
        return bool(self.mmproj or self.draft or self.spec_type)

    def command(self) -> Command:
        """The model's process as a pasted llama-server command (the one flag table's reading)."""
        argv = ["llama-server", "-m", self.model]
        if self.mmproj:
            argv += ["--mmproj", self.mmproj] + ([] if self.mmproj_offload else ["--no-mmproj-offload"])
        if self.draft:
            argv += ["-md", self.draft]
        argv += list(self.draft_flags)
        if self.spec_type:
            argv += ["--spec-type", self.spec_type]
        return parse_command(argv)

    @property
    def ref(self) -> ModelRef:
        return parse_model_ref(self.model)

    def config(self) -> SplitConfig:
        """The model's llama.cpp settings before the planner chooses devices and split."""
        return SplitConfig(n_ctx=self.ctx, type_k=self.type_k, type_v=self.type_v, n_seq_max=self.parallel,
                           tensor_overrides=self.overrides, flash_attn=self.flash_attn,
                           n_gpu_layers=self.n_gpu_layers, devices=self.devices, **dict(self.settings))


@dataclass(frozen=True)
class Fleet:
    models: tuple[FleetModel, ...]
    keep_free: dict[str, int] = field(default_factory=dict)   # device name -> bytes to leave free
    version: int = FLEET_VERSION

    def model(self, name: str) -> FleetModel:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)

    def keep_free_bytes(self, device: str) -> int:
        return self.keep_free.get(device, 0)


def _where(i: int, doc: dict) -> str:
    name = doc.get("name") if isinstance(doc, dict) else None
    return f"models[{i}]" + (f" ({name!r})" if isinstance(name, str) else "")


def _int(value, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return value


def _strings(value, what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(x, str) and x for x in value):
        raise ConfigError(f"{what} must be a list of strings, got {value!r}")
    return tuple(value)


def _setting_value(s: Setting, value, what: str):
    """A TOML value of a flag table row, checked by the row's kind (SplitConfig checks the rest)."""
    if s.kind in ("on", "off"):
        if not isinstance(value, bool):
            raise ConfigError(f"{what} must be true or false, got {value!r}")
        return value
    if s.kind in ("int", "ngl"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{what} must be an integer, got {value!r}")
        return value
    if s.kind == "choice":
        if value not in s.choices:
            raise ConfigError(f"{what} must be one of {', '.join(s.choices)}, got {value!r}")
        return value
    if s.kind == "mibs":
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in values):
            raise ConfigError(f"{what} must be MiB as an integer or a list of integers, got {value!r}")
        return tuple(values)
    return _strings(value, what)       # names, rules


def _model_from_dict(i: int, doc) -> FleetModel:
    if not isinstance(doc, dict):
        raise ConfigError(f"models[{i}] must be a table ([[models]]), got {doc!r}")
    where = _where(i, doc)
    unknown = sorted(set(doc) - set(_MODEL_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; a model takes {', '.join(_MODEL_KEYS)}")
    for key in ("name", "model"):
        if key not in doc:
            raise ConfigError(f"{where}: '{key}' is required")
    name = doc["name"]
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"{where}: name must be letters, digits and _.:- (it becomes a llama-swap model id "
                          f"and an INI section), got {name!r}")
    parse_model_ref(doc["model"])
    kw: dict = {"name": name, "model": doc["model"].strip()}
    if "ctx" in doc:
        kw["ctx"] = _int(doc["ctx"], f"{where}: ctx", 1)
    if "parallel" in doc:
        kw["parallel"] = _int(doc["parallel"], f"{where}: parallel", 1)
    if "n_gpu_layers" in doc:
        v = doc["n_gpu_layers"]
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{where}: n_gpu_layers must be an integer (negative: all), got {v!r}")
        kw["n_gpu_layers"] = v
    for key in ("type_k", "type_v", "flash_attn"):
        if key in doc:
            if not isinstance(doc[key], str):
                raise ConfigError(f"{where}: {key} must be a string, got {doc[key]!r}")
            kw[key] = doc[key]
    if "flash_attn" in kw and kw["flash_attn"] not in FLASH_ATTN_MODES:
        raise ConfigError(f"{where}: flash_attn must be one of {', '.join(FLASH_ATTN_MODES)}, got {kw['flash_attn']!r}")
    if "devices" in doc:
        kw["devices"] = _strings(doc["devices"], f"{where}: devices")
        if len(set(kw["devices"])) != len(kw["devices"]):
            raise ConfigError(f"{where}: devices lists a device twice: {list(kw['devices'])}")
        if "none" in kw["devices"]:
            raise ConfigError(f"{where}: devices = ['none'] keeps the model off every device; a fleet plans "
                              "models on devices (use n_gpu_layers = 0 for a CPU-only model)")
    if "overrides" in doc:
        kw["overrides"] = _strings(doc["overrides"], f"{where}: overrides")
    if "keep_loaded" in doc:
        if not isinstance(doc["keep_loaded"], bool):
            raise ConfigError(f"{where}: keep_loaded must be true or false, got {doc['keep_loaded']!r}")
        kw["keep_loaded"] = doc["keep_loaded"]
    for key in ("mmproj", "draft", "spec_type"):
        if key in doc:
            if not isinstance(doc[key], str):
                raise ConfigError(f"{where}: {key} must be a string, got {doc[key]!r}")
            kw[key] = doc[key].strip()
    if "mmproj_offload" in doc:
        if not isinstance(doc["mmproj_offload"], bool):
            raise ConfigError(f"{where}: mmproj_offload must be true or false, got {doc['mmproj_offload']!r}")
        kw["mmproj_offload"] = doc["mmproj_offload"]
    if "draft_flags" in doc:
        v = doc["draft_flags"]
        kw["draft_flags"] = tuple(shlex.split(v)) if isinstance(v, str) else _strings(v, f"{where}: draft_flags")
    given = [(s, _setting_value(s, doc[key], f"{where}: {key}")) for key, s in _OTHER_SETTINGS.items()
             if key in doc]
    kw["settings"] = tuple((s.attr, v) for s, v in given if v != s.default)   # as the fields: defaults unwritten
    m = FleetModel(**kw)
    try:
        m.config()    # every llama.cpp value checked where SplitConfig checks it
        if m.has_process or m.draft_flags:
            _check_process(m)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return m


def _check_process(m: FleetModel) -> None:
    """draft_flags and spec_type read as llama-server reads them; the main model's settings have
    keys of their own."""
    if m.draft_flags and not m.draft and any(f in m.draft_flags for f in ("-ngld", "-devd", "-otd", "-md")):
        raise ConfigError("draft_flags without draft: llama-server loads no draft model; give draft = \"D.gguf\"")
    cmd = m.command()
    if cmd.given:
        flags = [s.flags[0] for s in SETTINGS if s.attr in cmd.given]
        raise ConfigError(f"draft_flags: {', '.join(flags)} set(s) the main model; give it as its own key")
    if cmd.unmodelled:
        raise ConfigError(f"draft_flags: {cmd.unmodelled[0]}")


def fleet_from_dict(doc) -> Fleet:
    """The Fleet a parsed TOML document describes; ConfigError naming the bad key otherwise."""
    if not isinstance(doc, dict):
        raise ConfigError("a fleet is a TOML document with [[models]] tables")
    unknown = sorted(set(doc) - set(_TOP_KEYS))
    if unknown:
        raise ConfigError(f"unknown top-level key(s) {', '.join(unknown)}; a fleet has {', '.join(_TOP_KEYS)}")
    version = doc.get("version", FLEET_VERSION)
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= FLEET_VERSION:
        raise ConfigError(f"fleet version {version!r} is not one this gpulab reads (1..{FLEET_VERSION})")
    models_doc = doc.get("models")
    if not isinstance(models_doc, list) or not models_doc:
        raise ConfigError("a fleet needs at least one [[models]] table")
    models = tuple(_model_from_dict(i, m) for i, m in enumerate(models_doc))
    names = [m.name for m in models]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"model name(s) {', '.join(dup)} appear more than once; names must be unique")
    devices_doc = doc.get("devices", {})
    if not isinstance(devices_doc, dict):
        raise ConfigError("devices must be tables: [devices.CUDA0] keep_free = \"2GiB\"")
    keep_free: dict[str, int] = {}
    for dev, d in devices_doc.items():
        if not isinstance(d, dict):
            raise ConfigError(f"devices.{dev} must be a table with keep_free, got {d!r}")
        bad = sorted(set(d) - set(_DEVICE_KEYS))
        if bad:
            raise ConfigError(f"devices.{dev}: unknown key(s) {', '.join(bad)}; "
                              f"a device takes {', '.join(_DEVICE_KEYS)}")
        if "keep_free" in d:
            v = d["keep_free"]
            try:
                keep_free[dev] = _int(v, "", 0) if isinstance(v, int) else parse_bytes(v)
            except (ValueError, TypeError, ConfigError):
                raise ConfigError(f"devices.{dev}.keep_free must be bytes or a size like '2GiB', got {v!r}") from None
    return Fleet(models=models, keep_free=keep_free, version=version)


def format_keep_free(n: int) -> str | int:
    """2147483648 -> '2GiB'; a size that is not a whole number of KiB stays an integer of bytes."""
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n and n % size == 0:
            return f"{n // size}{unit}"
    return n


def fleet_to_dict(fleet: Fleet) -> dict:
    """The TOML document for `fleet`: only what differs from the defaults, so a file written by
    hand reads back as it was written (fleet_from_dict(fleet_to_dict(f)) == f)."""
    default = FleetModel(name="", model="")
    models = []
    for m in fleet.models:
        d: dict = {"name": m.name, "model": m.model, "ctx": m.ctx}
        for key in _MODEL_KEYS[3:]:
            if key in _OTHER_SETTINGS:
                continue
            v = getattr(m, key)
            if v != getattr(default, key):
                d[key] = list(v) if isinstance(v, tuple) else v
        for attr, v in m.settings:
            d[attr] = list(v) if isinstance(v, tuple) else v
        for key in _PROCESS_KEYS:
            v = getattr(m, key)
            if v != getattr(default, key):
                d[key] = shlex.join(v) if key == "draft_flags" else v
        models.append(d)
    doc: dict = {"version": fleet.version, "models": models}
    if fleet.keep_free:
        doc["devices"] = {name: {"keep_free": format_keep_free(n)} for name, n in fleet.keep_free.items()}
    return doc
