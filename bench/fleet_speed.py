"""Fleet planner speed and the greedy heuristic's gap (issue 15).

1. 8 models on 8 simulated 24 GiB devices (255 device subsets per model, so 255^8 assignments:
   the greedy search): the time of one plan_fleet, against one plan() of the largest model
   measured in the same run, and the number of model plans it made.
2. The gap of the greedy heuristic: random fleets small enough for the exhaustive search
   (3-4 models on 3-4 devices of mixed sizes), planned both ways: how often greedy finds no fit
   where one exists, and how many more devices it uses when both fit.

    .venv/bin/python bench/fleet_speed.py [--instances N]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # this checkout's gpulab
from gpulab import SplitConfig, parse_sim_spec, plan
from gpulab.core.devices import Device
from gpulab.core.fleet.model import Fleet, FleetModel
from gpulab.core.fleet.planner import plan_fleet
from gpulab.testing import make_profile

MiB = 1024**2
GiB = 1024**3

# (name, blocks, MiB per block, ctx): a 70B-class chat model, a 32B coder, two 8B, a 14B, a 3B,
# a draft and an embedding model
EIGHT = [("chat70", 80, 500, 8192), ("coder32", 64, 250, 16384), ("general8", 32, 120, 8192),
         ("vision8", 32, 120, 4096), ("reason14", 48, 150, 8192), ("small3", 28, 60, 4096),
         ("draft1", 16, 30, 4096), ("embed", 12, 25, 2048)]


def best_s(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def eight_on_eight() -> None:
    profs = {n: make_profile(n_layer=L, layer_bytes=b * MiB) for n, L, b, _ in EIGHT}
    fleet = Fleet(tuple(FleetModel(n, f"{n}.gguf", ctx=c) for n, _, _, c in EIGHT), keep_free={"SIM0": 2 * GiB})
    devices = parse_sim_spec("8x24GiB")
    big = profs["chat70"]
    t_one = best_s(lambda: plan(big, devices, SplitConfig(n_ctx=8192, tensor_split=(1, 1))), 20)
    print("| case | time | model plans | ratio to one plan() of chat70 |")
    print("|---|---|---|---|")
    for objective in ("fewest", "balanced"):
        fp = plan_fleet(fleet, profs, devices, objective=objective)
        t = best_s(lambda o=objective: plan_fleet(fleet, profs, devices, objective=o), 3)
        used = sum(len(p.devices) for p in fp.placements)
        print(f"| 8 models x 8 devices, {objective} ({fp.search}; fits: {fp.fits}, {used} device slots) "
              f"| {t * 1e3:.0f} ms | {fp.evaluated} | {t / t_one:.0f}x |")
    print(f"| reference: one plan() of chat70 (81 layers, 2 devices) | {t_one * 1e6:.0f} µs | 1 | 1x |")


def random_fleet(rng: random.Random) -> tuple[Fleet, dict, list[Device]]:
    n_models, n_dev = rng.randint(3, 4), rng.randint(3, 4)
    profs, models = {}, []
    for i in range(n_models):
        name = f"m{i}"
        profs[name] = make_profile(n_layer=rng.randint(8, 40), layer_bytes=rng.randint(40, 400) * MiB)
        models.append(FleetModel(name, f"{name}.gguf", ctx=rng.choice((2048, 4096, 8192))))
    total = sum(plan(p, parse_sim_spec("1TiB"), SplitConfig(n_ctx=4096)).offload_devices[0].used_bytes
                for p in profs.values())
    # devices sized so that the fleet is tight: the sum of free memory 1.0-1.4x what is needed
    shares = [rng.uniform(0.5, 1.5) for _ in range(n_dev)]
    scale = rng.uniform(1.0, 1.4) * total / sum(shares)
    devices = [Device(f"SIM{i}", int(s * scale), int(s * scale), "sim") for i, s in enumerate(shares)]
    return Fleet(tuple(models)), profs, devices


def greedy_gap(n: int) -> None:
    rng = random.Random(15)
    both = greedy_missed = neither = extra = 0
    t_ex = t_gr = 0.0
    for _ in range(n):
        fleet, profs, devices = random_fleet(rng)
        t0 = time.perf_counter()
        ex = plan_fleet(fleet, profs, devices, exhaustive_limit=10**5, advise=False)
        t1 = time.perf_counter()
        gr = plan_fleet(fleet, profs, devices, exhaustive_limit=0, advise=False)
        t2 = time.perf_counter()
        t_ex += t1 - t0
        t_gr += t2 - t1
        assert ex.search == "exhaustive" and gr.search == "greedy"
        assert not (gr.fits and not ex.fits), "greedy found a fit the exhaustive search missed"
        if ex.fits and gr.fits:
            both += 1
            extra += sum(len(p.devices) for p in gr.placements) - sum(len(p.devices) for p in ex.placements)
        elif ex.fits:
            greedy_missed += 1
        else:
            neither += 1
    fits = both + greedy_missed
    print()
    print(f"greedy vs exhaustive, {n} random tight fleets (3-4 models, 3-4 devices, seed 15):")
    print("| fleets | exhaustive fits | greedy misses a fit | extra devices (greedy, when both fit) | time exhaustive / greedy |")
    print("|---|---|---|---|---|")
    print(f"| {n} | {fits} | {greedy_missed} ({100 * greedy_missed / max(1, fits):.1f}% of those that fit) "
          f"| {extra} over {both} fleets | {t_ex / n * 1e3:.0f} ms / {t_gr / n * 1e3:.0f} ms |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--instances", type=int, default=200)
    a = ap.parse_args()
    eight_on_eight()
    greedy_gap(a.instances)
    print(f"python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
