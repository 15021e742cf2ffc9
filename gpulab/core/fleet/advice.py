"""What would make a fleet fit, with the planner's exact bytes (gpulab.core.fleet.planner).

For a fleet plan with short devices:
- short      each device that lacks memory: by how many bytes, and who holds what there;
- swappable  a resident model whose swapping out (keep_loaded = false) lets everything fit,
             re-planned as such;
- shrink     a change to one model that makes the whole fleet fit, re-planned (a q8_0 KV cache,
             the context halved up to three times); and per short device, for each model on it,
             the largest context (a multiple of 256, llama.cpp's KV padding) whose bytes saved
             there cover that device's deficit, and what a q8_0 KV cache saves there;
- move       a model on a short device that fits elsewhere, on devices that are not short.

The split of a model on a device set is chosen as gpulab.core.fleet.placement chooses it.
Every number is a plan of gpulab.core.placement.planner, never an estimate of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from ..config import SplitConfig
from ..devices import Device
from ..errors import ConfigError
from ..placement.planner import plan
from ..profile import ModelProfile
from ..units import format_bytes
from .placement import contiguous_sets, fits_budget, place_model, subsets

__all__ = ["Advice", "advise"]


@dataclass(frozen=True)
class Advice:
    kind: str          # 'short' | 'swappable' | 'shrink' | 'move'
    text: str
    model: str = ""
    device: str = ""
    bytes: int = 0     # short: bytes missing; shrink: bytes saved on the device; move/swappable: bytes moved

    def to_dict(self) -> dict:
        return {"kind": self.kind, "model": self.model, "device": self.device, "bytes": self.bytes, "text": self.text}


@dataclass(frozen=True)
class _Ctx:
    profiles: Mapping[str, ModelProfile]
    devices: Sequence[Device]
    host: Device | None
    replan: Callable     # Fleet -> FleetPlan without advice, or None where it finds no fit

_STEP = 256   # llama_context pads n_ctx to 256


def _bytes_on(pr, name: str, config: SplitConfig, device: str) -> int:
    p = plan(pr.profiles[name], pr.devices, config, pr.host)
    for d in p.offload_devices:
        if d.name == device:
            return d.used_bytes
    return 0


def _short(result) -> list:
    out = []
    for d in result.devices:
        if d.fits:
            continue
        who = ", ".join(f"{n} {format_bytes(b)}" for n, b in d.by_model) or "nothing"
        out.append(Advice("short", f"{d.name} is short by {format_bytes(d.deficit_bytes)}: "
                                   f"the models need {format_bytes(d.used_bytes)} of its "
                                   f"{format_bytes(d.budget_bytes)} "
                                   f"({format_bytes(d.free_bytes)} free less keep_free "
                                   f"{format_bytes(d.keep_free_bytes)}); on it: {who}",
                          device=d.name, bytes=d.deficit_bytes))
    return out


def _swappable(result, pr) -> list:
    resident = [m for m in result.fleet.models if m.keep_loaded]
    out: list[Advice] = []
    if len(resident) < 2:
        return out
    for m in resident:
        models = tuple(replace(x, keep_loaded=False) if x.name == m.name else x for x in result.fleet.models)
        alt = pr.replan(replace(result.fleet, models=models))
        if alt is not None and alt.fits:
            p = alt.placement(m.name)
            where = ", ".join(f"{d.name} {format_bytes(d.used_bytes)}" for d in p.plan.offload_devices) or "the CPU"
            out.append(Advice("swappable", f"make {m.name!r} swappable (keep_loaded = false): the resident models "
                                           f"then fit, and {m.name!r} fits beside them when loaded ({where})",
                              model=m.name, bytes=sum(d.used_bytes for d in p.plan.offload_devices)))
    return out


def _shrink(result, pr) -> list:
    out = []
    for d in result.devices:
        if d.fits:
            continue
        for name, now in d.by_model:
            cfg = result.placement(name).plan.config
            if cfg.n_ctx > _STEP:
                lo, hi, best = 1, cfg.n_ctx // _STEP, None   # ctx = k * 256
                while lo <= hi:
                    k = (lo + hi) // 2
                    saved = now - _bytes_on(pr, name, cfg.replace(n_ctx=k * _STEP), d.name)
                    if saved >= d.deficit_bytes:
                        best, lo = (k * _STEP, saved), k + 1
                    else:
                        hi = k - 1
                if best is not None and best[0] < cfg.n_ctx:
                    out.append(Advice("shrink", f"shrink {name!r} to ctx = {best[0]} (from {cfg.n_ctx}): saves "
                                                f"{format_bytes(best[1])} on {d.name}, which is short by "
                                                f"{format_bytes(d.deficit_bytes)}",
                                      model=name, device=d.name, bytes=best[1]))
            if cfg.type_k == "f16" and cfg.type_v == "f16" and cfg.flash_attn != "off":
                try:
                    saved = now - _bytes_on(pr, name, cfg.replace(type_k="q8_0", type_v="q8_0"), d.name)
                except ConfigError:
                    continue
                enough = ("enough" if saved >= d.deficit_bytes
                          else f"not enough alone: it is short by {format_bytes(d.deficit_bytes)}")
                out.append(Advice("shrink", f"give {name!r} a q8_0 KV cache (type_k = type_v = \"q8_0\"): saves "
                                            f"{format_bytes(saved)} on {d.name} ({enough})", model=name,
                                  device=d.name, bytes=saved))
    return out


def _shrink_fleet(result, pr) -> list:
    """Changes to one model that make the whole fleet fit, re-planned as such: a q8_0 KV cache,
    or the context halved (up to three times)."""
    out = []
    for m in result.fleet.models:
        now = sum(d.used_bytes for d in result.placement(m.name).plan.offload_devices)
        tries = []
        if m.type_k == "f16" and m.type_v == "f16" and m.flash_attn != "off":
            tries.append((dict(type_k="q8_0", type_v="q8_0"), 'a q8_0 KV cache (type_k = type_v = "q8_0")'))
        for k in (2, 4, 8):
            ctx = max(_STEP, m.ctx // k // _STEP * _STEP)
            if ctx < m.ctx and all(c.get("ctx") != ctx for c, _ in tries):
                tries.append((dict(ctx=ctx), f"ctx = {ctx} (from {m.ctx})"))
        for change, words in tries:
            models = tuple(replace(x, **change) if x.name == m.name else x for x in result.fleet.models)
            try:
                alt = pr.replan(replace(result.fleet, models=models))
            except ConfigError:
                continue
            if alt is not None and alt.fits:
                after = sum(d.used_bytes for d in alt.placement(m.name).plan.offload_devices)
                out.append(Advice("shrink", f"give {m.name!r} {words}: then the whole fleet fits (re-planned; "
                                            f"{m.name!r} takes {format_bytes(now - after)} less)", model=m.name,
                                  bytes=now - after))
                break
    return out


def _move(result, pr) -> list:
    out: list[Advice] = []
    short = {d.name for d in result.devices if not d.fits}
    free_names = [d.name for d in pr.devices if d.name not in short]
    if not free_names:
        return out
    seen = set()
    for d in result.devices:
        if d.fits:
            continue
        for name, _ in d.by_model:
            if name in seen:
                continue
            seen.add(name)
            m = result.fleet.model(name)
            mine = result.placement(name)
            left = {x.name: x.budget_bytes - x.used_bytes + mine.bytes_on(x.name) for x in result.devices}
            names = [x.name for x in pr.devices]
            sets = subsets(free_names) if len(free_names) <= 8 else contiguous_sets(free_names, left, names)
            for subset in sets:
                p = place_model(m, pr.profiles[name], subset, pr.devices, left, pr.host)
                if fits_budget(p):
                    need = ", ".join(f"{x.name} {format_bytes(x.used_bytes)} of {format_bytes(left[x.name])} left"
                                     for x in p.offload_devices)
                    pin = " (unpin it: devices = [...])" if m.devices else ""
                    out.append(Advice("move", f"move {name!r} from {', '.join(mine.devices)} to {', '.join(subset)}"
                                              f"{pin}: it needs {need}", model=name, device=",".join(subset),
                                      bytes=sum(x.used_bytes for x in p.offload_devices)))
                    break
    return out


def advise(result, profiles: Mapping[str, ModelProfile], devices: Sequence[Device], host: Device | None,
           replan: Callable) -> list[Advice]:
    """Advice for a FleetPlan with short devices. replan(fleet) plans another fleet on the same
    devices (without advice; None where it finds no fit): how 'make it swappable' is checked."""
    pr = _Ctx(profiles, devices, host, replan)
    return _short(result) + _swappable(result, pr) + _shrink_fleet(result, pr) + _shrink(result, pr) + _move(result, pr)
