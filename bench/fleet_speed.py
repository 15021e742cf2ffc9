"""Fleet planner speed at cluster size, before and after issue 28, and the heuristic's gap.

1. The table: models x devices up to 32 x 32 (the 8-model set below repeated; 24 GiB simulated
   cards, 2 GiB kept free on the first), for each objective (fewest, balanced, tg:chat70-0): the
   time of one plan_fleet now ("after") and with the planner of --before (default: main's,
   extracted with `git archive` into a temporary folder and run in a subprocess capped at --cap
   seconds and 3 GiB of memory: with 32 devices the old planner lists 2^32 - 1 subsets per model).
   A cell whose smaller neighbour (fewer models or devices) already hit the cap is not run
   ("> cap", implied). The growth from 8 to 32 devices is the ratio of the times (same models).
2. The gap: random fleets small enough for the exhaustive search (2-3 models, 3-4 devices of
   mixed sizes, tight), planned exhaustively and by the heuristic (exhaustive_limit=0), per
   objective: how often the heuristic misses a fit, and the distribution of how much worse its
   objective value is (tests/core/fleet/test_search.py asserts the same on fewer fleets); then
   again with only the candidate sets of a cluster (SMALL_DEVICES = 0), as on more than 5 devices.

The load average is printed with each part (2 shared CPUs: timings are noisy).

    PYTHONPATH=$PWD .venv/bin/python bench/fleet_speed.py [--before main] [--cap 15] [--instances 40]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MiB = 1024**2
GiB = 1024**3

# (name, blocks, MiB per block, ctx): a 70B-class chat model, a 32B coder, two 8B, a 14B, a 3B,
# a draft and an embedding model
EIGHT = [("chat70", 80, 500, 8192), ("coder32", 64, 250, 16384), ("general8", 32, 120, 8192),
         ("vision8", 32, 120, 4096), ("reason14", 48, 150, 8192), ("small3", 28, 60, 4096),
         ("draft1", 16, 30, 4096), ("embed", 12, 25, 2048)]
CELLS = [(8, 8), (16, 8), (8, 16), (16, 16), (8, 32), (16, 32), (32, 16), (32, 32)]
OBJECTIVES = ("fewest", "balanced", "tg:chat70-0")


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def cell(n_models: int, n_devices: int, objective: str) -> dict:
    """One plan_fleet of the table, timed; works with the planner before issue 28 too."""
    from gpulab.core.devices import parse_sim_spec
    from gpulab.core.fleet.model import Fleet, FleetModel
    from gpulab.core.fleet.planner import plan_fleet
    from gpulab.testing import make_profile
    profs, models = {}, []
    for r in range(n_models // 8):
        for n, blocks, mib, ctx in EIGHT:
            profs[f"{n}-{r}"] = make_profile(n_layer=blocks, layer_bytes=mib * MiB)
            models.append(FleetModel(f"{n}-{r}", f"{n}.gguf", ctx=ctx))
    fleet = Fleet(tuple(models), keep_free={"SIM0": 2 * GiB})
    devices = parse_sim_spec(f"{n_devices}x24GiB")
    t0 = time.perf_counter()
    fp = plan_fleet(fleet, profs, devices, objective=objective)
    t = time.perf_counter() - t0
    return {"s": t, "plans": fp.evaluated, "search": fp.search, "fits": fp.fits,
            "slots": sum(len(p.devices) for p in fp.placements), "gap": getattr(fp, "gap", None),
            "planner": sys.modules[plan_fleet.__module__].__file__}


def before_tree(ref: str) -> str:
    d = tempfile.mkdtemp(prefix="fleet-before-")
    tar = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "gpulab"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", d], input=tar, check=True)
    return d


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (3 * GiB, 3 * GiB))


def run_before(tree: str, n_models: int, n_devices: int, objective: str, cap: float) -> dict | str:
    env = dict(os.environ, PYTHONPATH=tree)
    try:
        r = subprocess.run([sys.executable, __file__, "--cell", str(n_models), str(n_devices), objective],
                           env=env, capture_output=True, text=True, timeout=cap, preexec_fn=_limit_memory,
                           check=False)
    except subprocess.TimeoutExpired:
        return f"> {cap:g} s"
    if r.returncode != 0:
        return "out of memory" if "MemoryError" in r.stderr else f"failed: {r.stderr.strip().splitlines()[-1:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


def table(ref: str, cap: float) -> None:
    tree = before_tree(ref)
    print(f"load average at the start: {load()}")
    print("| models x devices | objective | before | after | after: model plans, search, fits, device slots, gap |")
    print("|---|---|---|---|---|")
    capped: set = set()
    after_s: dict = {}
    for nm, nd in CELLS:
        for obj in OBJECTIVES:
            implied = any(o == obj and m <= nm and d <= nd for m, d, o in capped)
            if implied:
                before = f"> {cap:g} s (implied)"
            else:
                b = run_before(tree, nm, nd, obj, cap)
                if isinstance(b, str):
                    capped.add((nm, nd, obj))
                    before = b
                else:
                    before = f"{b['s']:.2f} s ({b['plans']} plans)"
            a = min((cell(nm, nd, obj) for _ in range(2)), key=lambda x: x["s"])
            after_s[nm, nd, obj] = a["s"], a["plans"]
            gap = "-" if a["gap"] is None else f"{100 * a['gap']:.1f}%"
            print(f"| {nm} x {nd} | {obj} | {before} | {a['s']:.2f} s | {a['plans']}, {a['search']}, "
                  f"{'fits' if a['fits'] else 'DOES NOT FIT'}, {a['slots']}, {gap} |", flush=True)
    print(f"load average at the end: {load()}")
    print()
    print("growth from 8 to 32 devices (after, the same models; time at 32 / time at 8, and model plans,")
    print("which the load does not change):")
    for nm in (8, 16):
        print("  " + ", ".join(f"{nm} models {obj}: {after_s[nm, 32, obj][0] / after_s[nm, 8, obj][0]:.1f}x "
                               f"({after_s[nm, 32, obj][1] / after_s[nm, 8, obj][1]:.1f}x plans)"
                               for obj in OBJECTIVES))


def gaps(n: int) -> None:
    import gpulab.core.fleet.search as search
    from gpulab.testing import heuristic_vs_exhaustive
    print()
    print(f"heuristic vs exhaustive, {n} random small fleets per objective (2-3 models, 3-4 devices, seed 28); "
          f"load average {load()}:")
    print("| objective | exhaustive fits | heuristic misses | loss = 0 | 0 < loss <= 1% | 1% < loss <= 5% | > 5% | max loss |")
    print("|---|---|---|---|---|---|---|---|")
    small = search.SMALL_DEVICES
    for obj, every in [(o, e) for e in (True, False) for o in ("fewest", "balanced", "tg")]:
        # every=False: the candidate sets of a cluster (contiguous by memory left, WIDTH per model)
        # even on these few devices, which the planner would search more widely
        search.SMALL_DEVICES = small if every else 0
        try:
            fits, missed, losses = heuristic_vs_exhaustive(obj, n, seed=28)
        finally:
            search.SMALL_DEVICES = small
        obj = obj if every else f"{obj}, cluster sets only"
        b = [sum(1 for x in losses if x <= 0), sum(1 for x in losses if 0 < x <= 0.01),
             sum(1 for x in losses if 0.01 < x <= 0.05), sum(1 for x in losses if x > 0.05)]
        print(f"| {obj} | {fits} of {n} | {missed} | {b[0]} | {b[1]} | {b[2]} | {b[3]} | "
              f"{100 * max(losses, default=0):.2f}% |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", default="main", help="the git ref whose planner is 'before'")
    ap.add_argument("--cap", type=float, default=15.0, help="seconds a 'before' cell may take")
    ap.add_argument("--instances", type=int, default=40)
    ap.add_argument("--cell", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--skip-table", action="store_true")
    a = ap.parse_args()
    if a.cell:   # the gpulab on PYTHONPATH: 'before' runs here with the old planner
        print(json.dumps(cell(int(a.cell[0]), int(a.cell[1]), a.cell[2])))
        return
    sys.path.insert(0, str(ROOT))   # this checkout's gpulab
    if not a.skip_table:
        table(a.before, a.cap)
    gaps(a.instances)
    print(f"python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
