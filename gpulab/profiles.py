"""Per-model allocation profiles: the placement chosen for one model on one set of devices,
remembered in a small TOML file and applied the next time that model is loaded there.

    save_profile("model.gguf", config, devices, measurement={"tg_tokens_per_s": 41.2})
    config = config_for("model.gguf", devices, default=SplitConfig())   # the profile's, if any

Files live in $GPULAB_CONFIG_DIR, else $XDG_CONFIG_HOME/gpulab, else ~/.config/gpulab, under
profiles/, one per (model, device set). A profile names its devices (name, total memory, UUID
or RPC endpoint where known) and stores the config with an explicit --device list, so a GPU
added later does not shift its tensor_split; a profile whose devices are gone is refused with
a ProfileMismatchError naming them, never applied to whatever devices are left.

The model is identified by `model_hash`, not by its path (files move and get renamed).
"""

from __future__ import annotations

import hashlib
import math
import os
try:
    import tomllib
except ImportError:          # Python 3.10: the same parser, from PyPI (pyproject.toml)
    import tomli as tomllib
from dataclasses import asdict, dataclass, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from .core.config import SplitConfig
from .sources.fingerprint import sampled_sha256
from .core.devices import Device
from .errors import ConfigError, GpulabError

__all__ = ["Profile", "ProfileDevice", "ProfileMismatchError", "config_dir", "profiles_dir", "model_hash",
           "save_profile", "find_profile", "profiles_for", "list_profiles", "delete_profile", "config_for",
           "to_toml"]

_VERSION = 1


class ProfileMismatchError(GpulabError):
    """A profile exists for this model, but for devices that are not all present now."""


def config_dir() -> Path:
    """$GPULAB_CONFIG_DIR, else $XDG_CONFIG_HOME/gpulab, else ~/.config/gpulab."""
    env = os.environ.get("GPULAB_CONFIG_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CONFIG_HOME")
    return (Path(xdg) if xdg else Path.home() / ".config") / "gpulab"


def profiles_dir() -> Path:
    return config_dir() / "profiles"


# -- the model ------------------------------------------------------------------------------------
_hash_cache: dict[tuple[str, int, int], str] = {}


def model_hash(path: str | os.PathLike) -> str:
    """A fingerprint of a GGUF file, cheap at any size: sha256 over the file size, the first and
    the last MiB, and the header as gpulab parses it (every tensor's name, type and shape, and
    the metadata).

    Why not the whole file: hashing 40 GB takes minutes, and a profile is looked up on every
    load. Why this is enough: placement depends only on what the header says (shapes, types,
    layer count), and the header is hashed in full even when it outgrows the first MiB (large
    vocabularies); size and the first and last MiB of weights tell apart re-quantizations and
    fine-tunes of the same shape in practice. Two files that still collide would get the same
    placement, which is what a profile is about.
    """
    from .sources.gguf_file import read_profile
    p = os.fspath(path)
    try:
        st = os.stat(p)
    except OSError as e:
        raise GpulabError(f"cannot read {p}: {e.strerror or e}") from None
    key = (os.path.realpath(p), st.st_size, st.st_mtime_ns)
    if key in _hash_cache:
        return _hash_cache[key]
    prof = read_profile(p)
    h = sampled_sha256(p, prefix=b"gpulab-model-hash-1\0")
    tensors = [*prof.input_tensors, *(t for layer in prof.layers for t in layer.tensors),
               *prof.output_tensors, *prof.other_tensors]
    for t in tensors:
        h.update(f"{t.name}|{t.ggml_type}|{','.join(map(str, t.shape))}\n".encode())
    h.update(repr(sorted((k, repr(v)) for k, v in prof.metadata.items())).encode())
    digest = h.hexdigest()
    _hash_cache[key] = digest
    return digest


# -- devices --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProfileDevice:
    name: str               # llama.cpp's name when saved: 'CUDA0', 'RPC1'
    total_bytes: int
    uuid: str = ""          # NVML UUID, where known: the identity that survives renumbering
    endpoint: str = ""      # RPC servers: host:port
    description: str = ""

    @classmethod
    def of(cls, d: Device) -> "ProfileDevice":
        return cls(d.name, int(d.total_bytes), d.uuid, d.endpoint, d.description)

    def matches(self, d: Device) -> bool:
        if self.uuid and d.uuid:
            return self.uuid == d.uuid and self.total_bytes == d.total_bytes
        if self.endpoint or d.endpoint:
            return self.endpoint == d.endpoint and self.total_bytes == d.total_bytes
        return self.name == d.name and self.total_bytes == d.total_bytes

    def describe(self) -> str:
        from .core.units import format_bytes
        extra = self.uuid or self.endpoint or self.description
        return f"{self.name} ({format_bytes(self.total_bytes)}{', ' + extra if extra else ''})"


def _device_set_key(devs: Sequence[ProfileDevice]) -> str:
    text = "\n".join(f"{d.uuid or d.endpoint or d.name}|{d.total_bytes}" for d in devs)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


# -- the profile ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Profile:
    model_hash: str
    model_path: str                       # where the model was when saved (informational)
    model_bytes: int
    config: SplitConfig                   # with an explicit --device list (see save_profile)
    devices: tuple[ProfileDevice, ...]    # the devices the config uses, in llama.cpp's order
    measurement: dict                     # what justified it (tokens/s, objective, ...); may be {}
    created: str = ""
    source: str = ""                      # 'tune', 'cli', 'lab', ...
    path: Path | None = None              # the TOML file

    def missing_devices(self, present: Sequence[Device]) -> list[ProfileDevice]:
        return [d for d in self.devices if not any(d.matches(p) for p in present)]

    def config_for_devices(self, present: Sequence[Device]) -> SplitConfig:
        """The config with --device names as llama.cpp calls those devices now (an RPC server
        registered in another order, a GPU renumbered by CUDA_VISIBLE_DEVICES)."""
        names = []
        for d in self.devices:
            now = next((p for p in present if d.matches(p)), None)
            if now is None:
                raise ProfileMismatchError(self._mismatch_message([d], present))
            names.append(now.name)
        if self.config.devices == ("none",) or not self.devices:
            return self.config
        return self.config.replace(devices=tuple(names))

    def _mismatch_message(self, missing: Sequence[ProfileDevice], present: Sequence[Device]) -> str:
        have = ", ".join(ProfileDevice.of(p).describe() for p in present) or "none"
        return (f"the allocation profile for {Path(self.model_path).name} ({self.path or 'unsaved'}) was made "
                f"for {', '.join(d.describe() for d in missing)}, which "
                f"{'is' if len(missing) == 1 else 'are'} not present now (present: {have}); "
                "gpulab will not load it elsewhere silently: delete the profile "
                f"(`gpulab profile delete {self.model_path} --all`), or pass a config explicitly")


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _pinned(config: SplitConfig, devices: Sequence[Device]) -> tuple[SplitConfig, list[Device]]:
    """The config with an explicit --device list (same devices, same order as llama.cpp would
    choose them), and those devices."""
    from .core.planner import select_devices
    if config.devices == ("none",):
        return config, []
    probe = config.replace(split_mode="layer") if config.split_mode != "layer" else config
    try:
        chosen = select_devices(list(devices), probe)
    except ConfigError as e:
        raise ConfigError(f"cannot save a profile: {e}") from None
    return config.replace(devices=tuple(d.name for d in chosen)), chosen


def save_profile(model_path: str | os.PathLike, config: SplitConfig, devices: Sequence[Device],
                 measurement: dict | None = None, *, source: str = "api") -> Profile:
    """Write (or replace) the profile of this model on these devices; returns it.

    `devices` are the offload devices llama.cpp sees now (gpulab's Device list, as the planner
    takes them). `measurement` is what justified the choice, e.g. {'objective': 'tg',
    'tg_tokens_per_s': 41.2, 'n_gen': 128}: flat, with str/int/float/bool values.
    """
    pinned, used = _pinned(config, devices)
    prof = Profile(model_hash=model_hash(model_path), model_path=os.path.abspath(os.fspath(model_path)),
                   model_bytes=os.path.getsize(model_path), config=pinned,
                   devices=tuple(ProfileDevice.of(d) for d in used),
                   measurement=dict(measurement or {}), created=_now(), source=source)
    folder = profiles_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{prof.model_hash[:16]}-{_device_set_key(prof.devices)}.toml"
    tmp = path.with_suffix(".toml.tmp")
    tmp.write_text(to_toml(_profile_doc(prof)))
    os.replace(tmp, path)   # readers never see half a file
    return replace(prof, path=path)


def _profile_doc(p: Profile) -> dict:
    cfg = asdict(p.config)
    cfg["tensor_split"] = [float(x) for x in p.config.tensor_split]
    cfg["devices"] = list(p.config.devices)
    return {"version": _VERSION, "model_hash": p.model_hash, "model_path": p.model_path,
            "model_bytes": p.model_bytes, "created": p.created, "source": p.source,
            "config": cfg, "devices": [asdict(d) for d in p.devices], "measurement": p.measurement}


def _load(path: Path) -> Profile:
    try:
        doc = tomllib.loads(path.read_text())
        known = {f.name for f in fields(SplitConfig)}
        cfg = {k: (tuple(v) if isinstance(v, list) else v) for k, v in doc["config"].items() if k in known}
        return Profile(model_hash=doc["model_hash"], model_path=doc.get("model_path", ""),
                       model_bytes=int(doc.get("model_bytes", 0)), config=SplitConfig(**cfg),
                       devices=tuple(ProfileDevice(**d) for d in doc.get("devices", [])),
                       measurement=dict(doc.get("measurement", {})), created=doc.get("created", ""),
                       source=doc.get("source", ""), path=path)
    except (OSError, tomllib.TOMLDecodeError, KeyError, TypeError, ValueError, GpulabError) as e:
        raise GpulabError(f"cannot read the allocation profile {path}: {e}") from None


def list_profiles() -> list[Profile]:
    folder = profiles_dir()
    return [_load(p) for p in sorted(folder.glob("*.toml"))] if folder.is_dir() else []


def profiles_for(model_path: str | os.PathLike) -> list[Profile]:
    h = model_hash(model_path)
    folder = profiles_dir()
    if not folder.is_dir():
        return []
    return [p for p in (_load(f) for f in sorted(folder.glob(f"{h[:16]}-*.toml"))) if p.model_hash == h]


def find_profile(model_path: str | os.PathLike, devices: Sequence[Device]) -> Profile | None:
    """The profile of this model whose devices are all present, or None (the newest wins)."""
    found = [p for p in profiles_for(model_path) if not p.missing_devices(devices)]
    return max(found, key=lambda p: p.created) if found else None


def config_for(model_path: str | os.PathLike, devices: Sequence[Device], default: SplitConfig | None = None, *,
               on_mismatch: str = "raise") -> SplitConfig:
    """The config to load `model_path` with on `devices`: the matching profile's, else `default`.

    When profiles exist for this model but every one of them names a device that is not
    present, raise ProfileMismatchError naming it (on_mismatch='raise'), rather than load the
    model on whatever devices are left; on_mismatch='default' returns `default` instead.
    """
    default = default or SplitConfig()
    prof = find_profile(model_path, devices)
    if prof is not None:
        return prof.config_for_devices(devices)
    stale = profiles_for(model_path)
    if stale and on_mismatch == "raise":
        newest = max(stale, key=lambda p: p.created)
        raise ProfileMismatchError(newest._mismatch_message(newest.missing_devices(devices), devices))
    return default


def delete_profile(profile: Profile) -> None:
    if profile.path is not None:
        profile.path.unlink(missing_ok=True)


# -- a tiny TOML writer (tomllib reads; the standard library has no writer) -----------------------
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _str(s: str) -> str:
    out = []
    for ch in s:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)   # always has '.' or 'e', so it reads back as a float
    if isinstance(v, str):
        return _str(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _key(k: str) -> str:
    return k if k and all(c.isalnum() or c in "_-" for c in k) else _str(k)


def to_toml(doc: dict) -> str:
    """TOML for a dict of scalars and lists, one level of tables, and lists of tables."""
    scalars = [(k, v) for k, v in doc.items() if not isinstance(v, dict) and not _is_table_list(v)]
    lines = [f"{_key(k)} = {_value(v)}" for k, v in scalars]
    for k, v in doc.items():
        if isinstance(v, dict):
            lines += ["", f"[{_key(k)}]"]
            for kk, vv in v.items():
                if isinstance(vv, dict) or _is_table_list(vv):
                    raise TypeError("to_toml writes one level of tables")
                lines.append(f"{_key(kk)} = {_value(vv)}")
        elif _is_table_list(v):
            for item in v:
                lines += ["", f"[[{_key(k)}]]"] + [f"{_key(kk)} = {_value(vv)}" for kk, vv in item.items()]
    return "\n".join(lines) + "\n"


def _is_table_list(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)
