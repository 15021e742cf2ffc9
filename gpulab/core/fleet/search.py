"""The fleet search at cluster size (issue 28): device sets by class and free memory, a plan
cache, a bounded branch-and-bound, and what the search did.

Device classes. Devices that llama.cpp would treat alike (same kind, source, total memory,
runtime overhead, bandwidth, description, and host where a device names one) form a class.
Two devices of one class with the same memory left are interchangeable for the next model, so
16 idle equal cards offer one set of each size, not 65,535 subsets.

Candidate device sets of a model, given what each device has left:
- the devices sorted by memory left (most first; ties by class, then by name in natural order,
  so that the plan does not depend on the order devices are listed in), and the sets that are
  contiguous in that order (k devices with the most left, the next k, ...), within each host
  when devices name one and across all;
- a set whose memory left is below what the model needs at the least (its weights and KV on
  one device: a split adds compute buffers, never removes bytes) is cut without planning;
- sets equal by (class, memory left) in llama.cpp's order are planned once;
- on at most SMALL_DEVICES devices, every subset (deduplicated the same way).

Every model plan is exact: gpulab.core.fleet.placement.place_model on the concrete set, cached
by (model, settings, (class, memory left) per device of the set); a cached plan is never
reused across devices that differ in anything the plan reads. The chosen plans are planned
again on their own devices at the end.

Search (plan_fleet calls it when the full tree exceeds the exhaustive limit): greedy, largest
model first, each model where the objective prefers it, then (for 'fewest') a best-fit pass,
then a limited-discrepancy branch-and-bound over the best few sets of each model, cut by
bounds (fewest: device slots so far plus the least each model still to place needs; balanced:
headroom only shrinks as models are added; tg: the target's speed once placed), until it has
explored them all or spent its plan limit or time budget. The best complete plan so far is
always kept: the first greedy pass runs to its end whatever the budget.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from itertools import combinations

from ..devices import Device
from ..placement.plan import Plan
from ..profile import ModelProfile
from .model import FleetModel
from .placement import fits_budget, place_model

__all__ = ["PLAN_LIMIT", "SMALL_DEVICES", "SMALL_PLAN_LIMIT", "WIDTH", "Outcome", "Search", "Stop", "device_class",
           "natural_key", "take"]

SMALL_DEVICES = 5      # up to this many devices, every subset is a candidate (31 at most)
PLAN_LIMIT = 500       # model plans the improvement may compute after the first greedy pass,
SMALL_PLAN_LIMIT = 2000  # or on at most SMALL_DEVICES devices (cheap plans, a tree worth walking)
STEPS_PER_PLAN = 5     # and ask for, from the cache or not, five times as many
WIDTH = 3              # sets per model the branch-and-bound tries (the greedy's choice and two more),
                       # on more than SMALL_DEVICES devices

Progress = Callable[[float, str], None]


def natural_key(name: str) -> tuple:
    """'SIM10' after 'SIM9': names compared as text and numbers."""
    return tuple((0, int(t)) if t.isdigit() else (1, t) for t in re.split(r"(\d+)", name) if t)


def device_class(d: Device) -> tuple:
    """What a plan reads of a device besides its memory left; a 'host' attribute, where a device
    has one (a cluster description), keeps devices of different hosts in different classes."""
    return (str(getattr(d, "host", "") or ""), d.kind, d.source, d.total_bytes, d.overhead_bytes,
            d.bandwidth_bytes_per_s, d.description)


class Stop(Exception):
    """The plan limit or the time budget is spent."""


@dataclass
class Outcome:
    placed: dict[str, Plan] | None
    complete: bool          # the branch-and-bound explored its whole (pruned) tree
    stopped: str            # '' | 'plan limit' | 'time budget'


@dataclass
class Search:
    order: list[FleetModel]                       # resident models, largest first
    profiles: Mapping[str, ModelProfile]
    devices: list[Device]                         # offload devices, llama.cpp's order
    host: Device | None
    budgets: dict[str, int]
    score: Callable[[Mapping[str, Plan], Mapping[str, int]], tuple]
    objective: str
    counter: list
    time_budget: float | None = None
    plan_limit: int | None = None     # None: PLAN_LIMIT, or SMALL_PLAN_LIMIT on few devices
    progress: Progress | None = None
    started: float = field(default_factory=time.perf_counter)
    cache: dict = field(default_factory=dict)
    hits: int = 0
    configs: dict = field(default_factory=dict)
    steps: int = 0          # model plans asked for, from the cache or not

    def __post_init__(self) -> None:
        keys = [device_class(d) for d in self.devices]
        ranks = {k: i for i, k in enumerate(sorted(set(keys), key=repr))}
        self.cls = {d.name: ranks[k] for d, k in zip(self.devices, keys)}
        self.host_of = {d.name: str(getattr(d, "host", "") or "") for d in self.devices}
        self.index = {d.name: i for i, d in enumerate(self.devices)}
        self.nat = {d.name: natural_key(d.name) for d in self.devices}
        self.min_overhead = min((d.overhead_bytes for d in self.devices), default=0)
        self.target = self.objective[3:] if self.objective.startswith("tg:") else ""
        self.need = {m.name: self._least_bytes(m) for m in self.order}
        self.deadline = None if self.time_budget is None else self.started + self.time_budget
        default = SMALL_PLAN_LIMIT if len(self.devices) <= SMALL_DEVICES else PLAN_LIMIT
        self.limit_plans: int = default if self.plan_limit is None else self.plan_limit
        self.limit_at: int | None = None    # steps (model plans asked for, cached or not)
        self.plans_at = 0                   # model plans computed (the counter), once limit_at is set

    # -- plans -------------------------------------------------------------------------------
    def _least_bytes(self, m: FleetModel) -> int:
        """The bytes the model puts on devices at the least: its weights and KV on one device
        (a split moves them, and adds a compute buffer and runtime overhead per device)."""
        if m.n_gpu_layers == 0 or not self.devices:
            return 0
        big = replace(self.devices[0], free_bytes=1 << 62, total_bytes=1 << 62)
        p = place_model(m, self.profiles[m.name], (big.name,), [big], {big.name: 1 << 62}, self.host,
                        counter=self.counter)
        return sum(d.weights_bytes + d.kv_bytes for d in p.offload_devices)

    def least_slots(self, m: FleetModel) -> int:
        """The fewest devices `m` can take: the smallest k whose k largest budgets hold its least bytes."""
        if m.n_gpu_layers == 0:
            return 0
        if m.devices:
            return len(m.devices)
        total = 0
        for k, b in enumerate(sorted(self.budgets.values(), reverse=True), 1):
            total += max(0, b)
            if total >= self.need[m.name] + k * self.min_overhead:
                return k
        return len(self.budgets)

    def place(self, m: FleetModel, subset: tuple[str, ...], left: Mapping[str, int]) -> Plan:
        """The exact plan of `m` on `subset` given `left`, cached by what the plan reads."""
        cfg = self.configs.get(m.name)
        if cfg is None:
            cfg = self.configs[m.name] = m.config()
        key = (id(self.profiles[m.name]), cfg, tuple((self.cls[n], left[n]) for n in subset),
               subset if m.name == self.target else ())
        self.steps += 1
        if self.limit_at is not None:
            if self.steps >= self.limit_at:
                raise Stop("plan limit")
            if self.deadline is not None and time.perf_counter() >= self.deadline:
                raise Stop("time budget")
            if self.steps % 50 == 0:
                self._report(f"improving: {self.steps} model plans")
        hit = self.cache.get(key)
        if hit is not None and hit[0] == subset:
            self.hits += 1
            return hit[1]
        if hit is not None:
            self.hits += 1
            moved = self.cache.get((key, subset))
            if moved is None:
                moved = self.cache[(key, subset)] = (subset, _renamed(hit[1], hit[0], subset))
            return moved[1]
        if self.limit_at is not None and self.counter[0] >= self.plans_at:
            raise Stop("plan limit")
        p = place_model(m, self.profiles[m.name], subset, self.devices, left, self.host, counter=self.counter)
        self.cache[key] = (subset, p)
        return p

    # -- candidate device sets -------------------------------------------------------------------
    def candidates(self, m: FleetModel, left: Mapping[str, int], *, prune: bool = True,
                   tightest_first: bool = False) -> Iterator[tuple[str, ...]]:
        """The device sets worth planning `m` on, smallest first, lazily (the module's docstring
        says which); within a size, the most memory left first (tightest_first: the least)."""
        if m.n_gpu_layers == 0:
            yield ()
            return
        if m.devices:
            yield tuple(m.devices)
            return
        need = self.need.get(m.name, 0) if prune else 0
        names = sorted(left, key=lambda n: (-left[n], self.cls[n], self.nat[n]))
        seen: set = set()

        def ordered(group: Sequence[str]) -> tuple[str, ...]:
            return tuple(sorted(group, key=self.index.__getitem__))

        if len(names) <= SMALL_DEVICES:
            for k in range(1, len(names) + 1):
                for c in combinations(names, k):
                    multiset = tuple(sorted((self.cls[n], left[n]) for n in c))
                    if multiset not in seen and sum(max(0, left[n]) for n in c) >= need + k * self.min_overhead:
                        seen.add(multiset)
                        yield ordered(c)
            return
        hosts = sorted({self.host_of[n] for n in names})
        groups = [names] + ([[n for n in names if self.host_of[n] == h] for h in hosts] if len(hosts) > 1 else [])
        runs = []     # per group: prefix sums, and each position's run of equal (class, memory left)
        for g in groups:
            prefix = [0]
            for n in g:
                prefix.append(prefix[-1] + max(0, left[n]))
            run_of: list[int] = []
            start: list[int] = []
            for i, n in enumerate(g):
                if i and (self.cls[n], left[n]) == (self.cls[g[i - 1]], left[g[i - 1]]):
                    run_of.append(run_of[-1])
                else:
                    run_of.append(len(start))
                    start.append(i)
            runs.append((prefix, run_of, start))
        for k in range(1, len(names) + 1):
            size: list[tuple[str, ...]] = []
            for gi, g in enumerate(groups):
                prefix, run_of, start = runs[gi]
                for s in range(len(g) - k + 1):
                    if prefix[s + k] - prefix[s] < need + k * self.min_overhead:
                        break    # sorted by memory left: every later window has less
                    # the window's multiset of (class, memory left): its first and last runs, and
                    # how much of each it takes (the runs between are whole)
                    r1, r2 = run_of[s], run_of[s + k - 1]
                    end1 = start[r1 + 1] if r1 + 1 < len(start) else len(g)
                    key = (gi, r1, min(end1, s + k) - s, r2, s + k - start[r2])
                    if key not in seen:
                        seen.add(key)
                        size.append(ordered(g[s:s + k]))
            yield from (reversed(size) if tightest_first else size)

    def options(self, m: FleetModel, left: Mapping[str, int], placed: Mapping[str, Plan], *,
                best_fit: bool = False, all_sizes: bool = False, more_sizes: int = 0,
                per_size: int = 1, fewest_sizes: bool = False) -> list[tuple[tuple, Plan]]:
        """The fitting plans of `m`, best first by the objective (best_fit: the fewest devices,
        filled tightest). 'fewest' and best fit stop at the first size that fits (or more_sizes
        after it: a model on more devices may leave the room another needs); the others
        stop once two larger sizes in a row bring nothing better. On many devices, at most
        per_size fitting sets of a size (sets come most memory left first, or tightest first)."""
        found: list[tuple[tuple, Plan]] = []
        size_found = None
        stop_early = not all_sizes and (best_fit or fewest_sizes or self.objective == "fewest"
                                        or (self.target and m.name != self.target))
        best: tuple | None = None
        size, improved, flat = 0, False, 0
        capped = len(self.devices) > SMALL_DEVICES
        tries = fits = 0
        for subset in self.candidates(m, left, tightest_first=best_fit):
            k = len(subset)
            if stop_early and size_found is not None and k > size_found + more_sizes:
                break
            if k != size:
                flat = 0 if improved or best is None else flat + 1
                size, improved, tries, fits = k, False, 0, 0
                if not stop_early and not all_sizes and flat >= 2:
                    break    # two sizes in a row brought nothing better than a smaller one
            if capped and (fits >= per_size or tries >= 2 * per_size):
                continue     # enough sets of this size
            tries += 1
            p = self.place(m, subset, left)
            if not fits_budget(p):
                if capped:
                    tries = 2 * per_size    # the sets after it at this size have less memory left
                continue
            fits += 1
            size_found = k if size_found is None else size_found
            after = take(left, p)
            s = (k, sum(after[n] for n in subset)) if best_fit else self.score({**placed, m.name: p}, after)
            if best is None or s < best:
                best, improved = s, True
            found.append((s, p))
        found.sort(key=lambda x: x[0])
        return found

    # -- the search --------------------------------------------------------------------------
    def greedy(self, best_fit: bool = False, fewest_sizes: bool = False) -> dict[str, Plan] | None:
        left = dict(self.budgets)
        placed: dict[str, Plan] = {}
        for i, m in enumerate(self.order):
            opts = self.options(m, left, placed, best_fit=best_fit, fewest_sizes=fewest_sizes)
            if not opts:
                return None
            placed[m.name] = opts[0][1]
            left = take(left, opts[0][1])
            self._report(f"greedy {i + 1}/{len(self.order)} models")
        return placed

    def final_score(self, placed: Mapping[str, Plan]) -> tuple:
        left = dict(self.budgets)
        for p in placed.values():
            left = take(left, p)
        return self.score(placed, left)

    def run(self) -> Outcome:
        """Greedy passes, then the branch-and-bound until done or out of plans or time."""
        self.limit_at = None
        results = []
        first = self.greedy()
        if first is not None:
            results.append(first)
        # best fit keeps large holes open for the models after it: for 'fewest' a second pass
        # within the limits. For the others, when the objective's pass finds no fit (spreading
        # for headroom or speed can fragment a tight fleet), each model on the fewest devices
        # the objective prefers, then best fit, each run to its end
        if self.objective == "fewest":
            self._limit()
            try:
                r = self.greedy(best_fit=True)
            except Stop:
                r = None
            if r is not None:
                results.append(r)
        elif first is None:
            r = self.greedy(fewest_sizes=True)
            if r is None:
                r = self.greedy(best_fit=True)
            if r is not None:
                results.append(r)
        best: list = [None, None]
        for r in results:
            s = self.final_score(r)
            if best[0] is None or s < best[0]:
                best[0], best[1] = s, r
        if self.limit_at is None:
            self._limit()
        stopped = ""
        complete = False
        try:
            complete = self._branch_and_bound(best)
        except Stop as e:
            stopped = str(e)
        self.limit_at = None     # what plan_fleet asks after the search is not limited
        return Outcome(best[1], complete, stopped)

    def _limit(self) -> None:
        """From now on: at most plan_limit model plans computed, STEPS_PER_PLAN times that asked for."""
        self.limit_at = self.steps + STEPS_PER_PLAN * self.limit_plans
        self.plans_at = self.counter[0] + self.limit_plans

    def _branch_and_bound(self, best: list) -> bool:
        """Limited discrepancy: paths that leave the greedy's choice at most d times, d = 1, 2, ...
        True when a pass met no limit of width (every fitting set of every model tried)."""
        n = len(self.order)
        rest_need = [0] * (n + 1)
        for i in range(n - 1, -1, -1):
            m = self.order[i]
            rest_need[i] = rest_need[i + 1] + self.least_slots(m)
        narrowed = [False]
        width = WIDTH if len(self.devices) > SMALL_DEVICES else 1 << 30   # few devices: every fitting set

        def bound_cuts(i: int, left: Mapping[str, int], placed: Mapping[str, Plan]) -> bool:
            if best[0] is None:
                return False
            slots = sum(len(p.offload_devices) for p in placed.values())
            if self.objective == "fewest":
                return slots + rest_need[i] > best[0][0]
            if self.objective == "balanced":
                # headroom only shrinks as models are added
                return tuple(-v for v in sorted(left.values())) > best[0][0]
            if self.target in placed:
                return best[0][0] < self.score(placed, left)[0]
            return False

        def walk(i: int, left: dict[str, int], placed: dict[str, Plan], disc: int) -> None:
            if i == n:
                s = self.score(placed, left)
                if best[0] is None or s < best[0]:
                    best[0], best[1] = s, dict(placed)
                return
            if bound_cuts(i, left, placed):
                return
            m = self.order[i]
            opts = self.options(m, left, placed, more_sizes=1, per_size=WIDTH)
            if len(opts) > width:
                narrowed[0] = True
            branches = [p for _, p in opts[:width]]
            if len(self.devices) > SMALL_DEVICES:
                # and the set the model fills tightest, which keeps large holes for the others
                # (contiguous sets from the most memory left miss it on uneven devices)
                have = {tuple(d.name for d in p.offload_devices) for p in branches}
                for _, p in self.options(m, left, placed, best_fit=True, more_sizes=1):
                    if tuple(d.name for d in p.offload_devices) not in have:
                        branches.insert(1, p)
                        break
            for j, p in enumerate(branches):
                if j > 0 and disc == 0:
                    break
                placed[m.name] = p
                walk(i + 1, take(left, p), placed, disc - (1 if j > 0 else 0))
                del placed[m.name]

        for d in range(1, n + 1):
            narrowed[0] = False
            walk(0, dict(self.budgets), {}, d)
            self._report(f"branch and bound, {d} change(s) from greedy")
        return not narrowed[0]

    def _report(self, text: str) -> None:
        if self.progress is None:
            return
        used = 0.0
        if self.limit_at is not None:
            used = max(1 - max(0, self.limit_at - self.steps) / max(1, STEPS_PER_PLAN * self.limit_plans),
                       1 - max(0, self.plans_at - self.counter[0]) / max(1, self.limit_plans))
        if self.deadline is not None and self.time_budget:
            used = max(used, (time.perf_counter() - self.started) / self.time_budget)
        self.progress(min(1.0, used), text)


def take(left: Mapping[str, int], p: Plan) -> dict[str, int]:
    out = dict(left)
    for d in p.offload_devices:
        out[d.name] -= d.used_bytes
    return out


def _renamed(p: Plan, old: tuple[str, ...], new: tuple[str, ...]) -> Plan:
    """A cached plan moved onto devices that differ only by name (same class, same memory left,
    same llama.cpp order): the bytes are the planner's, only the names change. The plan kept in
    the fleet plan is planned again on its own devices (plan_fleet), so the search reads only
    the devices' names and bytes of this one."""
    names = dict(zip(old, new))
    return replace(p, devices=tuple(replace(d, name=names.get(d.name, d.name)) for d in p.devices))
