"""One model of a fleet on one device set: its plan with the split the fleet gives it.

The split is explicit (-ts), never llama.cpp's default: with no -ts llama.cpp splits by the
free memory at load time, which in a fleet depends on which model loaded first. It is the split
proportional to what each device has left once the models placed before this one are counted;
if that does not fit, the `balanced` policy's split over the same budgets
(gpulab.core.policies.apply), which equalises the headroom the planner actually leaves.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import replace

from ..config import SplitConfig
from ..devices import Device
from ..errors import ConfigError
from ..placement.mtp import with_mtp
from ..placement.plan import Plan
from ..placement.planner import plan
from ..policies.apply import policy_split
from ..policies.process import with_process
from ..profile import ModelProfile
from .model import Companions, FleetModel

__all__ = ["place_model", "subsets", "contiguous_sets", "fits_budget", "deficit_bytes"]


def _budget_devices(devices: Sequence[Device], left: Mapping[str, int]) -> list[Device]:
    """The devices with free_bytes = what the fleet leaves this model, at least 1 byte: a device
    with nothing left still has a share by free memory when it is the only one (split_points),
    and whatever the model puts there is then over the budget."""
    out = []
    for d in devices:
        b = max(1, left.get(d.name, 0))
        out.append(replace(d, free_bytes=b, total_bytes=max(d.total_bytes, b)))
    return out


def _readable(split: Sequence[float]) -> tuple[float, ...]:
    top = max(split, default=0.0)
    return tuple(round(x / top, 4) for x in split) if top > 0 else tuple(1.0 for _ in split)


def fits_budget(p: Plan) -> bool:
    return all(d.fits for d in p.offload_devices)


def place_model(m: FleetModel, profile: ModelProfile, subset: Sequence[str], devices: Sequence[Device],
                left: Mapping[str, int], host: Device | None = None, *, counter: list | None = None,
                config: SplitConfig | None = None) -> Plan:
    """The model's plan on `subset` (device names, llama.cpp's order) with the split the fleet
    gives it, each device's free_bytes being `left[name]` (its budget once the others are counted)."""
    base = (config or m.config()).replace(devices=tuple(subset) if subset else ("none",), tensor_split=())
    # the planner reads the devices of the set only, and every device where a tensor override may
    # name one (tensors.place_tensors' all_devices): the others need no budget copy (a cluster has many)
    chosen = set(subset)
    budget = _budget_devices(devices if base.tensor_overrides else [d for d in devices if d.name in chosen], left)

    if m.has_process and "draft-mtp" in m.command().spec_types:
        profile = with_mtp(profile)      # load_mtp: the nextn layers' tensors load

    def attempt(cfg: SplitConfig) -> Plan:
        if counter is not None:
            counter[0] += 1
        p = plan(profile, budget, cfg, host)
        return _with_process(m, p, budget, host) if m.has_process else p

    if len(subset) <= 1:
        return attempt(base)
    shares = [float(max(0, left.get(n, 0))) for n in subset]
    first = attempt(base.replace(tensor_split=_readable(shares)))
    if fits_budget(first) or not any(shares):
        return first
    ts = _readable(policy_split("balanced", profile, budget, base, host))
    if counter is not None:
        counter[0] += 7   # the balanced policy plans about seven splits
    second = attempt(base.replace(tensor_split=ts))
    return second if fits_budget(second) or deficit_bytes(second) < deficit_bytes(first) else first


def _with_process(m: FleetModel, p: Plan, devices: list[Device], host: Device | None) -> Plan:
    """The plan with its process's draft, projector and MTP context on its devices
    (gpulab.core.policies.process.with_process)."""
    c = m.companions or Companions()
    missing = [what for what, path, prof in (("draft", m.draft, c.draft), ("projector", m.mmproj, c.projector))
               if path and prof is None]
    if missing:
        raise ConfigError(f"{m.name}: the fleet counts its {' and '.join(missing)} from the file(s): read them "
                          "(FleetModel.companions; gpulab fleet does)")
    try:
        return with_process(m.command(), p, devices, host, draft=c.draft, projector=c.projector)
    except ConfigError as e:
        raise ConfigError(f"{m.name}: {e} (pin devices = [...] to include them)") from None


def deficit_bytes(p: Plan) -> int:
    return sum(d.deficit_bytes for d in p.offload_devices)


def subsets(names: Sequence[str]) -> list[tuple[str, ...]]:
    out = []
    for k in range(1, len(names) + 1):
        out += list(itertools.combinations(names, k))   # keeps llama.cpp's device order within a set
    return out




def contiguous_sets(names: Sequence[str], left: Mapping[str, int], order: Sequence[str]) -> list[tuple[str, ...]]:
    """Device sets of `names` contiguous when sorted by memory left (most first), smallest sets
    first, each in llama.cpp's `order`: what a cluster offers instead of every subset."""
    ranked = sorted(names, key=lambda n: (-left.get(n, 0), order.index(n)))
    out: list[tuple[str, ...]] = []
    for k in range(1, len(ranked) + 1):
        for s in range(len(ranked) - k + 1):
            w = tuple(sorted(ranked[s:s + k], key=order.index))
            if w not in out:
                out.append(w)
    return out
