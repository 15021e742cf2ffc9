"""The fleet planner: a device set and a split for every model of a Fleet, so that on every
device the models loaded together fit in its free memory less its margin (keep_free).

Each model is planned by gpulab.core.placement.planner.plan, as llama.cpp would place it with its own
`--device` set and `-ts`: weights, KV and compute per device, the model's compute buffers its
own (every model runs in its own llama-server process, as llama-swap, llama-server's router and
one `ollama serve` per device set do). The fleet planner only chooses the device set and split
of each model and adds up what every device holds.

What is loaded together. Models with keep_loaded = true (the default) are resident: they must
all fit at once. A swappable model (keep_loaded = false) is loaded beside the resident ones,
one swappable model at a time (a llama-swap group with swap: true), so a device must hold the
resident models plus the largest swappable model it hosts.

The split on a device set is explicit (-ts), chosen from what each device has left once the
models placed before are counted (gpulab.core.fleet.placement says how).

Search. Resident models are placed largest first (weight bytes). Where the product of the
candidate device sets over the models is at most `exhaustive_limit`, every assignment of
device sets is tried (depth first, an infeasible prefix cut off), and the best by the
objective is kept: EXHAUSTIVE over device subsets (the split on each subset is the one above,
chosen given the models before it, not searched). Otherwise the HEURISTIC of
gpulab.core.fleet.search (issue 28): device sets contiguous by memory left, equal devices as one
class, a plan cache, greedy passes and a bounded branch and bound, limited by `plan_limit` and
`time_budget`; the plan says what limited it (search_limit), its objective value, a bound on
the best value any plan could reach, and the gap between the two. Its loss against the
exhaustive search is measured by bench/fleet_speed.py (docs/BENCHMARKS.md) and asserted by
tests/core/fleet/test_search.py.

Objectives:
- fewest     (default) the fewest devices per model: no split when one device holds a model;
             ties: the most memory left on the tightest device, then the next tightest (leximin);
- balanced   the most memory left on the tightest device, then the next (equal headroom
             everywhere); ties: fewer devices;
- tg:NAME    the best predicted tg tokens/s of model NAME (gpulab.core.measure.speed), others fewest.

When nothing fits, no model is dropped: every model still gets the placement that leaves the
least memory missing, each short device is named with the exact bytes it lacks, and the
advice says what would fit, with the planner's bytes: which model to make swappable, shrink
(context, KV type) or move.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from ..devices import Device
from ..errors import ConfigError
from ..placement.plan import Plan
from ..profile import ModelProfile
from .advice import Advice
from .advice import advise as advice_for
from .model import Fleet, FleetModel
from .placement import fits_budget, place_model, subsets
from .search import SMALL_DEVICES, WIDTH, Search

__all__ = ["OBJECTIVES", "ModelPlacement", "FleetDevice", "Advice", "FleetPlan", "plan_fleet", "host_spans",
           "spanning"]

OBJECTIVES = ("fewest", "balanced", "tg:NAME")
EXHAUSTIVE_LIMIT = 20000     # assignments of device sets; beyond this, the heuristic (search.py)
VALUE_IS = {"fewest": "device slots (bound: the fewest any plan needs)",
            "balanced": "bytes left on the tightest device (bound: the average left, the most it can be)",
            "tg:": "predicted tg tokens/s of the target (bound: the target alone on the empty devices)"}


@dataclass(frozen=True)
class ModelPlacement:
    name: str
    resident: bool                    # keep_loaded: loaded with every other resident model
    plan: Plan                        # the model's plan on its devices (free_bytes: the budget it was given)

    @property
    def devices(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.plan.offload_devices)

    def bytes_on(self, device: str) -> int:
        for d in self.plan.offload_devices:
            if d.name == device:
                return d.used_bytes
        return 0


@dataclass(frozen=True)
class FleetDevice:
    name: str
    free_bytes: int
    keep_free_bytes: int
    used_bytes: int                               # resident models + the largest swappable one here
    by_model: tuple[tuple[str, int], ...] = ()    # (model, bytes) of every model with bytes here

    @property
    def budget_bytes(self) -> int:
        return self.free_bytes - self.keep_free_bytes

    @property
    def fits(self) -> bool:
        return self.used_bytes <= self.budget_bytes

    @property
    def deficit_bytes(self) -> int:
        return max(0, self.used_bytes - self.budget_bytes)


@dataclass(frozen=True)
class FleetPlan:
    fleet: Fleet
    placements: tuple[ModelPlacement, ...]   # in the fleet's order
    devices: tuple[FleetDevice, ...]         # every offload device, in llama.cpp's order
    objective: str
    search: str                              # 'exhaustive' | 'heuristic'
    evaluated: int                           # model plans computed (a balanced-policy split counted as 7)
    advice: tuple[Advice, ...] = ()
    # what the search did (issue 28): the heuristic's limit, the plan's objective value, the
    # bound on the best value any plan could reach, and the relative gap between the two
    search_limit: str = ""
    value: float | None = None               # fewest: device slots; balanced: bytes left on the tightest
    bound: float | None = None               # device; tg: tokens/s of the target. fewest: a lower bound;
    gap: float | None = None                 # balanced, tg: an upper bound. gap = |value - bound| / bound

    @property
    def fits(self) -> bool:
        return all(d.fits for d in self.devices)

    def placement(self, name: str) -> ModelPlacement:
        for p in self.placements:
            if p.name == name:
                return p
        raise KeyError(name)

    def device(self, name: str) -> FleetDevice:
        for d in self.devices:
            if d.name == name:
                return d
        raise KeyError(name)

    def to_dict(self) -> dict:
        """The `gpulab fleet plan --json` object (issue 15's spelling, plus objective, search, advice)."""
        return {
            "models": [{
                "name": p.name, "devices": list(p.devices), "keep_loaded": p.resident,
                "config": p.plan.to_dict()["config"],
                "per_device": [{"name": d.name, "weights_bytes": d.weights_bytes, "kv_bytes": d.kv_bytes,
                                "compute_bytes": d.compute_bytes, "overhead_bytes": d.overhead_bytes,
                                # its process's draft, projector and MTP context here
                                "process_bytes": d.process_bytes, "used_bytes": d.used_bytes}
                               for d in p.plan.offload_devices],
            } for p in self.placements],
            "devices": [{"name": d.name, "free_bytes": d.free_bytes, "keep_free_bytes": d.keep_free_bytes,
                         "used_bytes": d.used_bytes, "fits": d.fits,
                         "models": [{"name": n, "used_bytes": b} for n, b in d.by_model]} for d in self.devices],
            "fits": self.fits,
            "objective": self.objective,
            "search": self.search,
            "search_detail": {"limit": self.search_limit, "value": self.value, "bound": self.bound, "gap": self.gap,
                              "value_is": VALUE_IS["tg:" if self.objective.startswith("tg:") else self.objective]},
            "advice": [a.to_dict() for a in self.advice],
        }


# -- the fleet -----------------------------------------------------------------------------------
@dataclass
class _Problem:
    fleet: Fleet
    profiles: Mapping[str, ModelProfile]
    devices: list[Device]
    host: Device | None
    objective: str
    speed: Callable[[Plan], float] | None
    budgets: dict[str, int]
    order: list[FleetModel]              # the resident models, largest first
    candidates: dict[str, list[tuple[str, ...]]]
    counter: list = field(default_factory=lambda: [0])

    def place(self, m: FleetModel, subset, left) -> Plan:
        return place_model(m, self.profiles[m.name], subset, self.devices, left, self.host, counter=self.counter)


def _check(fleet: Fleet, profiles: Mapping[str, ModelProfile], devices: Sequence[Device], objective: str) -> None:
    names = [d.name for d in devices]
    for dev in fleet.keep_free:
        if dev not in names:
            raise ConfigError(f"[devices.{dev}]: no such device; the devices are {', '.join(names) or 'none'}")
    for m in fleet.models:
        bad = [d for d in m.devices if d not in names]
        if bad:
            raise ConfigError(f"model {m.name!r} is pinned to {', '.join(bad)}, which is not a device here "
                              f"({', '.join(names) or 'none'})")
        if m.name not in profiles:
            raise ConfigError(f"no profile for model {m.name!r}")
    if objective.startswith("tg:"):
        if objective[3:] not in [m.name for m in fleet.models]:
            raise ConfigError(f"objective {objective!r} names no model of the fleet")
    elif objective not in ("fewest", "balanced"):
        raise ConfigError(f"objective {objective!r} is not one of fewest, balanced, tg:NAME")


def _score(pr: _Problem, placed: Mapping[str, Plan], left: Mapping[str, int]) -> tuple:
    """Smaller is better. Headroom is compared leximin: the memory left on the tightest device,
    then on the next tightest, and so on (so spare devices are used rather than piled on). On
    devices that name their hosts (a cluster), each host spanned beyond one per model weighs more
    than anything else in the first element, whatever the objective: a model stays within one
    host unless it must span. (Folded into the first element, not put before it, so the search's
    bounds on that element hold as they are: the penalty only grows as models are added.)"""
    n_devices = sum(len(p.offload_devices) for p in placed.values())
    headroom = tuple(-v for v in sorted(left.values()))
    spans = host_spans(pr.devices, placed)
    penalty = spans * _SPAN_WEIGHT
    if pr.objective == "balanced":
        return (tuple(h + penalty for h in headroom), n_devices)
    if pr.objective.startswith("tg:"):
        target = placed.get(pr.objective[3:])
        tg = pr.speed(target) if target is not None and pr.speed is not None else 0.0
        return (-tg + spans * _SPAN_WEIGHT_TG, n_devices, headroom)
    return (n_devices + penalty, headroom)


_SPAN_WEIGHT = 1 << 62   # more than any device count or byte count (ints: exact)
_SPAN_WEIGHT_TG = 1e9    # more than any tokens/s, small enough that a float keeps tg's differences


def host_spans(devices: Sequence[Device], placed: Mapping[str, Plan]) -> int:
    """Hosts beyond the first that the placed models use, summed (0 where devices name no host)."""
    host_of = {d.name: d.host for d in devices if d.host}
    if not host_of:
        return 0
    return sum(max(0, len({host_of.get(d.name, "") for d in p.offload_devices}) - 1) for p in placed.values())


def spanning(fplan: FleetPlan, devices: Sequence[Device]) -> dict[str, str]:
    """{model: why it spans} for each model placed on devices of more than one host."""
    host_of = {d.name: d.host for d in devices if d.host}
    out = {}
    for pl in fplan.placements:
        hosts = list(dict.fromkeys(host_of[d] for d in pl.devices if d in host_of))
        if len(hosts) > 1:
            how = "no plan within one host holds it" if fplan.search == "exhaustive" else \
                "the search found no plan within one host that holds it"
            out[pl.name] = f"{pl.name} spans hosts {' + '.join(hosts)}: {how} (spanning is the last resort)"
    return out


def _take(left: dict[str, int], p: Plan) -> dict[str, int]:
    out = dict(left)
    for d in p.offload_devices:
        out[d.name] -= d.used_bytes
    return out


def _exhaustive(pr: _Problem) -> dict[str, Plan] | None:
    best: list = [None, None]

    def walk(i: int, left: dict[str, int], placed: dict[str, Plan]) -> None:
        if i == len(pr.order):
            s = _score(pr, placed, left)
            if best[0] is None or s < best[0]:
                best[0], best[1] = s, dict(placed)
            return
        m = pr.order[i]
        if pr.objective == "fewest" and best[0] is not None:
            # every model still to place takes at least one device (a CPU-only one none)
            still = sum(1 for x in pr.order[i:] if pr.candidates[x.name] != [()])
            if sum(len(p.offload_devices) for p in placed.values()) + still > best[0][0]:
                return
        for subset in pr.candidates[m.name]:
            p = pr.place(m, subset, left)
            if not fits_budget(p):
                continue
            placed[m.name] = p
            walk(i + 1, _take(left, p), placed)
            del placed[m.name]

    walk(0, dict(pr.budgets), {})
    return best[1]


def _least_short(sr: Search, models: Sequence[FleetModel], left: dict[str, int]) -> dict[str, Plan]:
    """When nothing fits: each model, largest first, where it leaves the least memory missing."""
    placed: dict[str, Plan] = {}
    few = len(sr.devices) <= SMALL_DEVICES
    for m in models:
        best: tuple[tuple[int, int, int], Plan] | None = None
        sizes: set[int] = set()
        for subset in sr.candidates(m, left, prune=False):
            if not few and len(subset) in sizes:
                continue    # a cluster: the set with the most memory left of each size
            sizes.add(len(subset))
            p = sr.place(m, subset, left)
            after = _take(left, p)
            missing = sum(max(0, -after[d.name]) - max(0, -left[d.name]) for d in p.offload_devices)
            key = (missing, len(subset), -min(after.values(), default=0))
            if best is None or key < best[0]:
                best = (key, p)
        assert best is not None   # every model has at least one candidate set
        placed[m.name] = best[1]
        left = _take(left, best[1])
    return placed


def _tree_size(pr: _Problem, n_devices: int) -> int:
    """Assignments of device sets the exhaustive search would walk (without listing them)."""
    every = (1 << n_devices) - 1
    return math.prod(1 if (m.n_gpu_layers == 0 or m.devices) else every for m in pr.order)


def _place_swappable(sr: Search, swappable: Sequence[FleetModel], left: dict[str, int]) -> dict[str, Plan]:
    """Each swappable model beside the resident ones, on its own (one is loaded at a time)."""
    placed = {}
    for m in swappable:
        opts = sr.options(m, left, {})
        placed[m.name] = opts[0][1] if opts else _least_short(sr, [m], dict(left))[m.name]
    return placed


def _devices_use(pr: _Problem, resident: Mapping[str, Plan], swappable: Mapping[str, Plan]) -> tuple[FleetDevice, ...]:
    rows = []
    for d in pr.devices:
        mine = [(n, _on(p, d.name)) for n, p in {**resident, **swappable}.items() if _on(p, d.name)]
        fixed = sum(_on(p, d.name) for p in resident.values())
        swap = max((_on(p, d.name) for p in swappable.values()), default=0)
        order = [m.name for m in pr.fleet.models]
        mine.sort(key=lambda x: order.index(x[0]))
        rows.append(FleetDevice(d.name, d.free_bytes, pr.fleet.keep_free_bytes(d.name), fixed + swap, tuple(mine)))
    return tuple(rows)


def _on(p: Plan, device: str) -> int:
    for d in p.offload_devices:
        if d.name == device:
            return d.used_bytes
    return 0


def _value(pr: _Problem, placed: Mapping[str, Plan]) -> float:
    """The objective's value of the resident models' plans (VALUE_IS says what it is)."""
    left = dict(pr.budgets)
    for p in placed.values():
        left = _take(left, p)
    if pr.objective == "balanced":
        return float(min(left.values(), default=0))
    if pr.objective.startswith("tg:"):
        target = placed.get(pr.objective[3:])
        return float(pr.speed(target)) if target is not None and pr.speed is not None else 0.0
    return float(sum(len(p.offload_devices) for p in placed.values()))


def _bound(pr: _Problem, sr: Search) -> float:
    """The best value any plan could reach (VALUE_IS), without searching."""
    if pr.objective == "balanced":
        n = max(1, len(pr.budgets))
        need = sum(sr.need[m.name] for m in pr.order)
        return float((sum(pr.budgets.values()) - need) // n)
    if pr.objective.startswith("tg:"):
        target = [m for m in pr.order if m.name == pr.objective[3:]]
        if not target or pr.speed is None:
            return 0.0
        opts = sr.options(target[0], dict(pr.budgets), {}, all_sizes=True)
        return max((float(pr.speed(p)) for _, p in opts), default=0.0)
    return float(sum(sr.least_slots(m) for m in pr.order))


def _memo(speed: Callable[[Plan], float]) -> Callable[[Plan], float]:
    """The speed of a plan computed once: the search scores the same cached plans many times."""
    seen: dict[int, tuple[Plan, float]] = {}

    def f(p: Plan) -> float:
        hit = seen.get(id(p))
        if hit is None or hit[0] is not p:
            hit = seen[id(p)] = (p, speed(p))
        return hit[1]
    return f


def _gap(objective: str, value: float, bound: float) -> float | None:
    if bound <= 0:
        return None if value else 0.0
    return (value - bound) / bound if objective == "fewest" else (bound - value) / bound


def plan_fleet(fleet: Fleet, profiles: Mapping[str, ModelProfile], devices: Sequence[Device],
               host: Device | None = None, *, objective: str = "fewest",
               speed: Callable[[Plan], float] | None = None,
               exhaustive_limit: int = EXHAUSTIVE_LIMIT, advise: bool = True,
               time_budget: float | None = None, plan_limit: int | None = None,
               progress: Callable[[float, str], None] | None = None) -> FleetPlan:
    """Plan every model of `fleet` (profiles by model name) on the offload `devices`.

    speed: plan -> predicted tg tokens/s, for objective 'tg:NAME' (gpulab.core.measure.speed.predict_speed
    with a SpeedModel; the command passes the calibrated one).
    time_budget (seconds) and plan_limit bound the heuristic's improvement after its first greedy
    pass (which always completes: the best plan so far is returned, never nothing); progress(fraction,
    text) is called as it goes."""
    result = _plan_fleet(fleet, profiles, devices, host, objective=objective, speed=speed,
                         exhaustive_limit=exhaustive_limit, advise=advise, time_budget=time_budget,
                         plan_limit=plan_limit, progress=progress, fit_only=False)
    assert result is not None   # fit_only=False: a fleet that does not fit is planned as least short
    return result


def _plan_fleet(fleet: Fleet, profiles: Mapping[str, ModelProfile], devices: Sequence[Device],
                host: Device | None, *, objective: str, speed: Callable[[Plan], float] | None,
                exhaustive_limit: int, advise: bool, time_budget: float | None, plan_limit: int | None,
                progress: Callable[[float, str], None] | None, fit_only: bool) -> FleetPlan | None:
    """plan_fleet; fit_only: None when no fit is found (what advice asks of each change it tries:
    placing every model of a fleet that does not fit where it is least short costs more than the
    search on a cluster)."""
    devices = [d for d in devices if d.is_offload]
    _check(fleet, profiles, devices, objective)
    if objective.startswith("tg:") and speed is None:
        from ..measure.speed import predict_speed
        hints = {d.name: d.bandwidth_bytes_per_s for d in devices if d.bandwidth_bytes_per_s}
        # gpulab's default device speeds, or the bandwidth a device spec gives
        speed = lambda p: predict_speed(p, bandwidth_hints=hints).tg_tokens_per_s   # noqa: E731
    if speed is not None:
        speed = _memo(speed)
    names = [d.name for d in devices]
    budgets = {d.name: d.free_bytes - fleet.keep_free_bytes(d.name) for d in devices}
    resident = [m for m in fleet.models if m.keep_loaded]
    swappable = [m for m in fleet.models if not m.keep_loaded]
    by_size = lambda ms: sorted(ms, key=lambda m: (-profiles[m.name].weights_bytes, m.name))   # noqa: E731
    pr = _Problem(fleet, profiles, devices, host, objective, speed, budgets, by_size(resident), {})
    sr = Search(pr.order, profiles, devices, host, budgets, lambda placed, left: _score(pr, placed, left),
                objective, pr.counter, time_budget=time_budget, plan_limit=plan_limit, progress=progress)

    limit, bound, gap = "", None, None
    if _tree_size(pr, len(devices)) <= exhaustive_limit:
        everything = subsets(names)
        pr.candidates = {m.name: [()] if m.n_gpu_layers == 0 else [m.devices] if m.devices else everything
                         for m in pr.order}
        placed, search = _exhaustive(pr), "exhaustive"
    else:
        out = sr.run()
        placed, search = out.placed, "heuristic"
        how = (f"greedy, then branch and bound over the {WIDTH} best device sets per model "
               "(contiguous by memory left, equal devices as one class)")
        if out.stopped == "time budget":
            limit = f"{how}: stopped at the time budget ({time_budget:g} s)"
        elif out.stopped:
            limit = f"{how}: stopped at the plan limit ({sr.limit_plans} model plans)"
        else:
            limit = f"{how}: explored" + ("" if out.complete else " (within that width)")
    if placed is None:
        if fit_only:
            return None
        placed = _least_short(sr, pr.order, dict(budgets))
    # every kept plan planned again on its own devices, in the order it was placed (the cache may
    # have lent it from equal devices)
    left = dict(budgets)
    exact: dict[str, Plan] = {}
    for m in pr.order:
        subset = tuple(d.name for d in placed[m.name].offload_devices)
        exact[m.name] = place_model(m, profiles[m.name], subset, devices, left, host, counter=pr.counter)
        left = _take(left, exact[m.name])
    placed = exact
    swapped = _place_swappable(sr, by_size(swappable), left)
    swapped = {n: place_model(fleet.model(n), profiles[n], tuple(d.name for d in p.offload_devices), devices,
                              left, host, counter=pr.counter) for n, p in swapped.items()}
    value = _value(pr, placed)
    if search == "heuristic":
        bound = _bound(pr, sr)
        gap = _gap(objective, value, bound)

    placements = tuple(ModelPlacement(m.name, m.keep_loaded, (placed if m.keep_loaded else swapped)[m.name])
                       for m in fleet.models)
    rows = _devices_use(pr, placed, swapped)
    result = FleetPlan(fleet, placements, rows, objective, search, pr.counter[0], search_limit=limit,
                       value=value, bound=bound, gap=gap)
    if advise and not result.fits:
        def replan(other: Fleet) -> FleetPlan | None:
            # the greedy passes only, and None for no fit: advice re-plans the fleet once per change it tries
            return _plan_fleet(other, profiles, devices, host, objective=objective, speed=speed,
                               exhaustive_limit=exhaustive_limit, advise=False, time_budget=None, plan_limit=0,
                               progress=None, fit_only=True)
        result = replace(result, advice=tuple(advice_for(result, profiles, devices, host, replan)))
    return result
