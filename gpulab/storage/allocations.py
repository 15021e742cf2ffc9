"""Saved allocations: which llama.cpp settings to load a model with on a given set of devices.

    save_allocation("model.gguf", config, devices, {"objective": "tg", "tg_tokens_per_s": 41.2})
    config_for("model.gguf", devices)      # the saved config for the devices present, else the default
    list_allocations(), find_allocation(model, devices), delete_allocation(a)

One TOML file per model and device set in <config dir>/allocations/ (gpulab.storage.paths),
named <model fingerprint>-<device set>.toml: the model by gpulab.sources.fingerprint (the same
identity the results store keys runs by, so results and allocations join), the devices by what
identifies them across renumbering (NVML UUID, RPC endpoint, else name) and their size. Written
atomically with tomli-w, read with tomllib."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from ..core.config import SplitConfig, config_from_dict, config_to_dict
from ..core.devices import Device
from ..core.errors import AllocationMismatchError, ConfigError, GpulabError
from ..core.units import format_bytes
from ..sources.fingerprint import model_fingerprint
from .files import TOMLDecodeError, atomic_write_text, read_toml, to_toml
from .paths import config_dir

__all__ = ["Allocation", "AllocationDevice", "allocations_dir", "save_allocation", "find_allocation",
           "allocations_for", "list_allocations", "delete_allocation", "config_for"]

_VERSION = 2


def allocations_dir() -> Path:
    return config_dir() / "allocations"


# -- devices --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AllocationDevice:
    name: str               # llama.cpp's name when saved: 'CUDA0', 'RPC1'
    total_bytes: int
    uuid: str = ""          # NVML UUID, where known: the identity that survives renumbering
    endpoint: str = ""      # RPC servers: host:port
    description: str = ""

    @classmethod
    def of(cls, d: Device) -> AllocationDevice:
        return cls(d.name, int(d.total_bytes), d.uuid, d.endpoint, d.description)

    def matches(self, d: Device) -> bool:
        if self.uuid and d.uuid:
            return self.uuid == d.uuid and self.total_bytes == d.total_bytes
        if self.endpoint or d.endpoint:
            return self.endpoint == d.endpoint and self.total_bytes == d.total_bytes
        return self.name == d.name and self.total_bytes == d.total_bytes

    def describe(self) -> str:
        extra = self.uuid or self.endpoint or self.description
        return f"{self.name} ({format_bytes(self.total_bytes)}{', ' + extra if extra else ''})"


def _device_set_key(devs: Sequence[AllocationDevice]) -> str:
    text = "\n".join(f"{d.uuid or d.endpoint or d.name}|{d.total_bytes}" for d in devs)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


# -- the allocation -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Allocation:
    model_fingerprint: str
    model_path: str                       # where the model was when saved (informational)
    model_bytes: int
    config: SplitConfig                   # with an explicit --device list (see save_allocation)
    devices: tuple[AllocationDevice, ...]  # the devices the config uses, in llama.cpp's order
    measurement: dict                     # what justified it (tokens/s, objective, ...); may be {}
    created: str = ""
    source: str = ""                      # 'tune', 'cli', 'lab', ...
    path: Path | None = None              # the TOML file
    version: int = _VERSION

    def missing_devices(self, present: Sequence[Device]) -> list[AllocationDevice]:
        return [d for d in self.devices if not any(d.matches(p) for p in present)]

    def config_for_devices(self, present: Sequence[Device]) -> SplitConfig:
        """The config with --device names as llama.cpp calls those devices now (an RPC server
        registered in another order, a GPU renumbered by CUDA_VISIBLE_DEVICES)."""
        names = []
        for d in self.devices:
            now = next((p for p in present if d.matches(p)), None)
            if now is None:
                raise AllocationMismatchError(self.mismatch_message([d], present))
            names.append(now.name)
        if self.config.devices == ("none",) or not self.devices:
            return self.config
        return self.config.replace(devices=tuple(names))

    def mismatch_message(self, missing: Sequence[AllocationDevice], present: Sequence[Device]) -> str:
        have = ", ".join(AllocationDevice.of(p).describe() for p in present) or "none"
        return (f"the saved allocation for {Path(self.model_path).name} ({self.path or 'unsaved'}) was made "
                f"for {', '.join(d.describe() for d in missing)}, which "
                f"{'is' if len(missing) == 1 else 'are'} not present now (present: {have}); "
                "gpulab will not load it elsewhere silently: delete it "
                f"(`gpulab alloc delete {self.model_path} --all`), or pass a config explicitly")


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _pinned(config: SplitConfig, devices: Sequence[Device]) -> tuple[SplitConfig, list[Device]]:
    """The config with an explicit --device list (same devices, same order as llama.cpp would
    choose them), and those devices."""
    from ..core.placement.planner import select_devices
    if config.devices == ("none",):
        return config, []
    probe = config.replace(split_mode="layer") if config.split_mode != "layer" else config
    try:
        chosen = select_devices(list(devices), probe)
    except ConfigError as e:
        raise ConfigError(f"cannot save an allocation: {e}") from None
    return config.replace(devices=tuple(d.name for d in chosen)), chosen


def save_allocation(model_path: str | os.PathLike, config: SplitConfig, devices: Sequence[Device],
                    measurement: dict | None = None, *, source: str = "api") -> Allocation:
    """Write (or replace) the allocation of this model on these devices; returns it.

    `devices` are the offload devices llama.cpp sees now (gpulab's Device list, as the planner
    takes them). `measurement` is what justified the choice, e.g. {'objective': 'tg',
    'tg_tokens_per_s': 41.2, 'n_gen': 128}: flat, with str/int/float/bool values.
    """
    pinned, used = _pinned(config, devices)
    a = Allocation(model_fingerprint=_fingerprint(model_path),
                   model_path=os.path.abspath(os.fspath(model_path)), model_bytes=os.path.getsize(model_path),
                   config=pinned, devices=tuple(AllocationDevice.of(d) for d in used),
                   measurement=dict(measurement or {}), created=_now(), source=source)
    path = allocations_dir() / f"{a.model_fingerprint}-{_device_set_key(a.devices)}.toml"
    atomic_write_text(path, to_toml(_doc(a)))
    return replace(a, path=path)


def _fingerprint(model_path) -> str:
    try:
        return model_fingerprint(model_path)
    except OSError as e:
        raise GpulabError(f"cannot read {os.fspath(model_path)}: {e.strerror or e}") from None


def _doc(a: Allocation) -> dict:
    cfg = config_to_dict(a.config)
    return {"version": _VERSION, "model_fingerprint": a.model_fingerprint, "model_path": a.model_path,
            "model_bytes": a.model_bytes, "created": a.created, "source": a.source,
            "config": cfg, "devices": [asdict(d) for d in a.devices], "measurement": a.measurement}


def _load(path: Path) -> Allocation:
    try:
        doc = read_toml(path)
        version = int(doc.get("version", _VERSION))
        return Allocation(model_fingerprint=doc["model_fingerprint"],
                          model_path=doc.get("model_path", ""), model_bytes=int(doc.get("model_bytes", 0)),
                          config=config_from_dict(doc["config"]),
                          devices=tuple(AllocationDevice(**d) for d in doc.get("devices", [])),
                          measurement=dict(doc.get("measurement", {})), created=doc.get("created", ""),
                          source=doc.get("source", ""), path=path, version=version)
    except (OSError, TOMLDecodeError, KeyError, TypeError, ValueError, GpulabError) as e:
        raise GpulabError(f"cannot read the saved allocation {path}: {e}") from None


def list_allocations() -> list[Allocation]:
    folder = allocations_dir()
    return [_load(p) for p in sorted(folder.glob("*.toml"))] if folder.is_dir() else []


def allocations_for(model_path: str | os.PathLike) -> list[Allocation]:
    fp = _fingerprint(model_path)
    return [a for a in list_allocations() if a.model_fingerprint == fp]


def find_allocation(model_path: str | os.PathLike, devices: Sequence[Device]) -> Allocation | None:
    """The allocation of this model whose devices are all present, or None (the newest wins)."""
    found = [a for a in allocations_for(model_path) if not a.missing_devices(devices)]
    return max(found, key=lambda a: a.created) if found else None


def config_for(model_path: str | os.PathLike, devices: Sequence[Device], default: SplitConfig | None = None, *,
               on_mismatch: str = "raise") -> SplitConfig:
    """The config to load `model_path` with on `devices`: the matching allocation's, else `default`.

    When allocations exist for this model but every one of them names a device that is not
    present, raise AllocationMismatchError naming it (on_mismatch='raise'), rather than load the
    model on whatever devices are left; on_mismatch='default' returns `default` instead.
    """
    default = default or SplitConfig()
    a = find_allocation(model_path, devices)
    if a is not None:
        return a.config_for_devices(devices)
    stale = allocations_for(model_path)
    if stale and on_mismatch == "raise":
        newest = max(stale, key=lambda x: x.created)
        raise AllocationMismatchError(newest.mismatch_message(newest.missing_devices(devices), devices))
    return default


def delete_allocation(allocation: Allocation) -> None:
    if allocation.path is not None:
        allocation.path.unlink(missing_ok=True)
