"""Fit speed: gpulab's `fit` policy (common_params_fit mirrored, gpulab.core.policies.server_fit) for a 128-layer
MoE model on 8 devices, the lab's case: the budget is 20 ms per call on a -c change.

The sizes make fit take its longest path: the whole model does not fit, the dense-only layers do
(a surplus), so it fills dense-only layers back to front and then converts them to full layers front
to back with overflow layers (about 45 dry runs, each one gpulab plan with up to a hundred -ot
rules). Two measurements:
- a -c drag: 21 fits at -c 512, 1280, ... 15872 in that order, every one new (as the lab's live fit
  sees a -c drag), after one fit at -c 4096 (the lab's start); median and max;
- the same fit again (best of 7): fit's dry runs are then all looked up (gpulab.core.placement.tensors
  place_layers), so this is the floor, not what a drag costs.
The reference, measured in the same run, is one plain plan of the same model (no rules). llama.cpp's
own fit makes the same dry runs as no_alloc model loads, about a second for a 30B model
(tools/fit-params/README.md).

    .venv/bin/python bench/fit_speed.py
    .venv/bin/python bench/fit_speed.py --ref /path/to/other/checkout   # before/after in one run

--ref runs the -c drag with another checkout's gpulab (e.g. `git worktree add /tmp/before main`)
and with this one, alternately, 3 times each, each in a fresh process; the flags of every fit are
hashed, so the two versions are seen to give the same results.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
import timeit
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
sys.path.insert(0, os.environ.get("GPULAB_BENCH_SRC") or str(HERE))   # this checkout's gpulab, or --ref's
CTX = list(range(512, 16000, 768))


def _setup():
    from gpulab import SplitConfig, parse_sim_spec
    from gpulab.testing import MiB, make_hand_moe_profile
    prof = make_hand_moe_profile(n_layer=127, expert_bytes=600 * MiB, dense_bytes=50 * MiB, n_embd=4096)
    return prof, parse_sim_spec("8x10GiB"), SplitConfig


def drag() -> dict:
    """The -c drag: times (s) of each fit and a hash of their results."""
    from gpulab.core.policies.server_fit import server_fit
    prof, devices, SplitConfig = _setup()
    server_fit(prof, devices, SplitConfig(n_ctx=4096))
    times, h = [], hashlib.sha256()
    for c in CTX:
        t0 = time.perf_counter()
        r = server_fit(prof, devices, SplitConfig(n_ctx=c))
        times.append(time.perf_counter() - t0)
        h.update(repr((r.status, r.flags(), r.projected_used_bytes, r.n_dry_runs)).encode())
    return {"times": times, "hash": h.hexdigest()[:12]}


def _drag_in(src: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--drag-json"], env=dict(os.environ, GPULAB_BENCH_SRC=str(src)),
                         capture_output=True, text=True, check=True, timeout=600)
    return json.loads(out.stdout)


def main() -> None:
    if "--drag-json" in sys.argv:
        print(json.dumps(drag()))
        return
    from gpulab import plan
    from gpulab.core.policies.server_fit import server_fit
    prof, devices, SplitConfig = _setup()
    config = SplitConfig(n_ctx=0)
    r = server_fit(prof, devices, config)
    assert r.ok and r.overrides, r.reasons          # the long path: MoE with overflow layers
    t_plan = min(timeit.repeat(lambda: plan(prof, devices, SplitConfig(n_ctx=4096)), number=50, repeat=7)) / 50
    d = drag()
    t_again = min(timeit.repeat(lambda: server_fit(prof, devices, config), number=3, repeat=7)) / 3
    ms = 1e3
    med = statistics.median(d["times"])
    print("| case | time per call | ratio to one plain plan |")
    print("|---|---|---|")
    print(f"| server_fit() on a -c drag, 128-layer MoE x 8 devices, median of {len(CTX)} new -c "
          f"(max {max(d['times']) * ms:.1f} ms; {r.n_dry_runs} dry runs, {len(r.overrides)} -ot rules at -c 0) "
          f"| {med * ms:.1f} ms | {med / t_plan:.0f}x |")
    print(f"| server_fit(), the same fit again (best of 7: every dry run looked up) | {t_again * ms:.1f} ms "
          f"| {t_again / t_plan:.0f}x |")
    print(f"| reference: plan(), same model, no rules | {t_plan * ms:.2f} ms | 1x |")
    if "--ref" in sys.argv:
        ref = Path(sys.argv[sys.argv.index("--ref") + 1]).resolve()
        rows: dict[str, list[float]] = {"ref": [], "this": []}
        hashes = {"ref": set(), "this": set()}
        for _ in range(3):
            for name, src in (("ref", ref), ("this", HERE)):
                got = _drag_in(src)
                rows[name].append(statistics.median(got["times"]))
                hashes[name].add(got["hash"])
        print()
        print("| -c drag, fresh process each | medians of 3 runs (each the median of 21 fits) | results hash |")
        print("|---|---|---|")
        for name, label in (("ref", f"--ref {ref}"), ("this", f"this checkout {HERE}")):
            print(f"| {label} | {', '.join(f'{x * ms:.1f}' for x in rows[name])} ms | {', '.join(sorted(hashes[name]))} |")
    load = os.getloadavg()
    print(f"python {sys.version.split()[0]}; {os.cpu_count()} CPUs; load average {load[0]:.1f} {load[1]:.1f} "
          f"{load[2]:.1f}; budget: 20 ms per fit on a -c change ({'met' if med * ms <= 20 else 'MISSED'})")


if __name__ == "__main__":
    main()
