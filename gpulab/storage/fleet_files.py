"""Fleet files: the fleet description (TOML, through gpulab.storage.files' tomllib/tomli-w
helpers), llama-swap's config.yaml (PyYAML), and llama-server's --models-preset INI read as a
fleet's starting point."""

from __future__ import annotations

import os
from pathlib import Path

from ..core.errors import ConfigError
from ..core.fleet.model import Fleet, fleet_from_dict, fleet_to_dict
from .files import atomic_write_text, read_toml_as, to_toml

__all__ = ["read_fleet", "read_any_fleet", "write_fleet", "fleet_text", "llama_swap_yaml", "read_yaml",
           "with_companions"]


def read_fleet(path: str | os.PathLike) -> Fleet:
    """The Fleet in a TOML file; ConfigError naming the file for anything wrong with it."""
    return read_toml_as(path, "fleet", fleet_from_dict)


def fleet_text(fleet: Fleet) -> str:
    return to_toml(fleet_to_dict(fleet))


def write_fleet(path: str | os.PathLike, fleet: Fleet) -> Path:
    return atomic_write_text(path, fleet_text(fleet))


def llama_swap_yaml(doc: dict) -> str:
    """llama-swap's config.yaml for the dict gpulab.core.exports.fleet.llama_swap_doc returns.

    Written out in full: one list shared by two keys (a group's members, the preload hook) would
    otherwise become an anchor and an alias (&id001 / *id001), valid YAML that a person reads badly."""
    import yaml

    class _NoAliases(yaml.SafeDumper):
        def ignore_aliases(self, data) -> bool:
            return True

    return yaml.dump(doc, Dumper=_NoAliases, sort_keys=False, default_flow_style=False, width=1 << 16)


def read_yaml(path: str | os.PathLike):
    import yaml
    try:
        return yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None


def read_any_fleet(path: str | os.PathLike) -> tuple[Fleet, list[str]]:
    """(Fleet, notes) from a fleet TOML, a llama-swap config.yaml (.yaml, .yml) or a llama-server
    --models-preset INI (.ini): the last two as a fleet's starting point (gpulab.core.fleet.from_tools)."""
    from ..core.fleet.from_tools import fleet_from_llama_swap, fleet_from_router_ini
    suffix = Path(path).suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            return fleet_from_llama_swap(read_yaml(path))
        if suffix == ".ini":
            try:
                text = Path(path).read_text()
            except OSError as e:
                raise ConfigError(f"cannot read {path}: {e.strerror or e}") from None
            return fleet_from_router_ini(text)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return read_fleet(path), []


def with_companions(fleet: Fleet, base: str | os.PathLike | None = None) -> Fleet:
    """The fleet with each model's draft (-md) and projector (--mmproj) profiles read from their
    files (relative paths from `base`, and made absolute for the exports), which the fleet planner
    counts per device."""
    from dataclasses import replace

    from ..core.fleet.model import Companions
    from ..sources.projector import read_projector
    from ..sources.read import read_profile

    def path(p: str) -> str:
        return str(Path(base) / p) if base is not None and not os.path.isabs(p) and "://" not in p else p

    models = []
    for m in fleet.models:
        if m.draft or m.mmproj:
            try:
                c = Companions(draft=read_profile(path(m.draft)) if m.draft else None,
                               projector=read_projector(path(m.mmproj)) if m.mmproj else None)
            except (OSError, ValueError) as e:
                raise ConfigError(f"{m.name}: cannot read its draft or projector: {e}") from None
            # the paths as the process will open them (the exports write these)
            m = replace(m, companions=c, draft=path(m.draft) if m.draft else "",
                        mmproj=path(m.mmproj) if m.mmproj else "")
        models.append(m)
    return replace(fleet, models=tuple(models))
