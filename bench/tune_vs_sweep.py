"""The optimiser against an exhaustive sweep, on CPU RPC devices.

One exhaustive sweep of a grid measures every configuration (one load each). Then `gpulab
tune`'s optimiser, for each objective (tg, pp, mixed), picks configurations to load itself,
with a budget of a quarter of the grid's loads. Target: its pick within 3% of the sweep's best.

Scoring has to survive noise: on a shared 2-core machine one measurement can be 20-30% off, so
the sweep's raw maximum is partly luck. Two scores, both from measurements of this run:
- table: configurations the planner places identically (same device for every layer, same
  other settings) are measurements of one thing, so the sweep's table averages them; the
  pick's value against the table's best;
- paired: the pick and the table's best measured again, alternately, PAIRS times each; the
  median of the per-pair ratios. The verdict uses this one.

    .venv/bin/python bench/tune_vs_sweep.py [--write]     # --write: replace our section of docs/BENCHMARKS.md

Devices: two llama.cpp RPC servers on this machine (1 thread each) plus the host CPU; the
model: the demo model (SmolLM2-135M Q4_1, 30 layers).

A second table runs the same optimiser on the same grid against simulated devices whose true
speeds are known (random per-device bandwidth, hop cost, prompt speed-up, -fa and -ub effects;
3% and 10% measurement noise; SIM_SEEDS draws): there "within 3% of the best" can be checked
against the truth, for the optimiser and for the exhaustive sweep's own pick under the same noise.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gpulab import read_profile  # noqa: E402
from gpulab.core.config import SplitConfig  # noqa: E402
from gpulab.core.measure.sweep_grid import parse_grid  # noqa: E402
from gpulab.core.measure.tune import Tuner, objective_value, run_tuner  # noqa: E402

GRID = ["-ngl", "0,8,16,24,31", "-ts", "1/1,3/1,1/3", "-fa", "on,off", "-ub", "32,128"]
N_PROMPT, N_GEN, REPS, THREADS = 64, 16, 3, 1
PAIRS = 5
SIM_SEEDS = 40
HEADING = "## Optimiser (issue 5)"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--write", action="store_true", help="append the results to docs/BENCHMARKS.md")
    ap.add_argument("--rounds", type=int, default=1, help="optimiser runs per objective")
    a = ap.parse_args()

    from gpulab.runtime.rpc import start_servers
    from gpulab.runtime.sweep import run_sweep
    from gpulab.runtime.worker import Worker
    from gpulab.sources.demo import demo_model_path
    from gpulab.storage.results import ResultsStore

    model = str(demo_model_path())
    prof = read_profile(model)
    grid = parse_grid(GRID)
    base = SplitConfig(n_ctx=N_PROMPT + N_GEN)
    configs = grid.configs(base)
    budget = len(configs) // 4
    tmp = Path(tempfile.mkdtemp(prefix="gpulab-tune-bench-"))
    lines = []

    def say(s: str = "") -> None:
        print(s, flush=True)
        lines.append(s)

    with start_servers(2, threads=1) as cluster, Worker(cluster.endpoints) as w:
        devices = [d for d in w.devices() if d.kind not in ("cpu", "accel")]

        def measure(path, config, *, n_prompt, n_gen, repetitions, n_threads, progress):
            return w.measure(path, config, n_prompt=n_prompt, n_gen=n_gen, repetitions=repetitions,
                             n_threads=n_threads, progress=progress)

        t0 = time.monotonic()
        sweep = run_sweep(model, grid, base=base, n_prompt=N_PROMPT, n_gen=N_GEN, repetitions=REPS, n_threads=THREADS,
                          store=ResultsStore(tmp / "sweep.jsonl"), measure=measure, progress=True)
        t_sweep = time.monotonic() - t0
        raw = {p.config: _pp_tg(p.records) for p in sweep.points}
        sweep_loads = sweep.n_measured
        # pool configurations the planner places identically (the tuner's own notion of "same")
        groups = Tuner(prof, devices, configs, objective="tg", n_prompt=N_PROMPT, n_gen=N_GEN).candidates
        table = {}
        for cand in groups:
            members = [cand.config, *cand.twins]
            pps = [raw[c][0] for c in members if raw[c][0]]
            tgs = [raw[c][1] for c in members if raw[c][1]]
            pooled = (sum(pps) / len(pps) if pps else None, sum(tgs) / len(tgs) if tgs else None)
            for c in members:
                table[c] = pooled

        def remeasure(config):
            r = measure(model, config, n_prompt=N_PROMPT, n_gen=N_GEN, repetitions=REPS, n_threads=THREADS,
                        progress=None)
            return (max(r.pp.samples_ts) if r.pp else None), (max(r.tg.samples_ts) if r.tg else None)

        say(f"{HEADING}")
        say()
        say(f"`bench/tune_vs_sweep.py`, {time.strftime('%Y-%m-%d')}: the demo model (SmolLM2-135M Q4_1, "
            f"{prof.n_layer} layers) on two CPU RPC servers (1 thread each) and the host CPU "
            f"(-t {THREADS}); grid `{' '.join(GRID)}` = {len(configs)} configurations; "
            f"-p {N_PROMPT} -n {N_GEN} -r {REPS}, each test's best repetition; 'mixed' = tokens/s over reading {N_PROMPT} and "
            f"generating {N_GEN} tokens. The exhaustive sweep loaded the model {sweep_loads} times "
            f"({t_sweep:.0f} s; {len(groups)} distinct placements); the optimiser's budget is {budget} loads "
            "(1/4). 'table': the pick's value in the sweep's table (identical placements averaged) over the "
            f"table's best; 'paired': pick and table's best measured again alternately, {PAIRS} times each, "
            "median ratio (the verdict). Other processes shared the 2 CPU cores throughout.")
        say()
        say(f"| objective | run | loads (sweep: {sweep_loads}) | optimiser's pick | table: pick / best | table ratio | paired ratio |")
        say("|---|---|---|---|---|---|---|")
        ok = True
        for objective in ("tg", "pp", "mixed"):
            vals = {c: objective_value(objective, pp, tg, N_PROMPT, N_GEN) for c, (pp, tg) in table.items()}
            best_c = max(vals, key=vals.get)
            for rnd in range(a.rounds):
                store = ResultsStore(tmp / f"tune-{objective}-{rnd}.jsonl")   # empty: every config costs a load
                tuner = Tuner(prof, devices, configs, objective=objective, n_prompt=N_PROMPT, n_gen=N_GEN)

                def one(config, store=store):
                    res = run_sweep(model, [config], n_prompt=N_PROMPT, n_gen=N_GEN, repetitions=REPS,
                                    n_threads=THREADS, store=store, measure=measure, progress=False)
                    return (*_pp_tg(res.points[0].records), True)

                pick, _ = run_tuner(tuner, one, budget)
                ratio = vals[pick] / vals[best_c]
                if table[pick] == table[best_c]:
                    paired = 1.0      # the same placement: nothing to compare
                else:
                    ratios = []
                    for _ in range(PAIRS):
                        a_ = objective_value(objective, *remeasure(pick), N_PROMPT, N_GEN)
                        b_ = objective_value(objective, *remeasure(best_c), N_PROMPT, N_GEN)
                        ratios.append(a_ / b_)
                    paired = sorted(ratios)[len(ratios) // 2] if len(ratios) % 2 else \
                        sum(sorted(ratios)[len(ratios) // 2 - 1:len(ratios) // 2 + 1]) / 2
                ok &= min(paired, 1.0) >= 0.97 and tuner.loads <= sweep_loads / 4
                say(f"| {objective} | {rnd + 1} | {tuner.loads} | {_desc(pick, grid)} | "
                    f"{vals[pick]:.2f} / {vals[best_c]:.2f} t/s ({_desc(best_c, grid)}) | {ratio:.3f} | {paired:.3f} |")
        say()
        say(f"Target (paired ratio >= 0.97 with <= 1/4 of the sweep's loads): {'met' if ok else 'MISSED'}.")
        spread = max((max(v) / min(v) for v in _twin_values(groups, raw) if len(v) > 1 and min(v) > 0), default=1.0)
        say()
        say(f"Noise floor of this run: configurations the planner places identically were measured up to "
            f"{spread:.2f}x apart in the sweep (tg, best of {REPS}), far above the 3% being judged; the paired "
            "ratios themselves move by ~10% between rounds for the same pick. The simulation below separates the "
            "optimiser from the machine's noise.")
    say()
    simulate(prof, grid, configs, budget, say)
    if a.write:
        doc = ROOT / "docs" / "BENCHMARKS.md"
        text = doc.read_text() if doc.exists() else "# Benchmarks\n"
        if HEADING in text:   # replace our section only
            start = text.index(HEADING)
            nxt = text.find("\n## ", start + len(HEADING))
            text = text[:start] + "\n".join(lines) + "\n" + (text[nxt + 1:] if nxt >= 0 else "")
        else:
            text = text.rstrip("\n") + "\n\n" + "\n".join(lines) + "\n"
        doc.parent.mkdir(parents=True, exist_ok=True)
        doc.write_text(text)
        print(f"wrote {doc}")
    return 0 if ok else 1


def simulate(prof, grid, configs, budget, say) -> None:
    import numpy as np

    from gpulab.core.devices import Device
    from gpulab.core.placement.planner import plan
    GiB = 1 << 30
    devices = [Device(f"RPC{i}", 16 * GiB, 16 * GiB, "rpc", "rpc", endpoint=f"h:{i}") for i in range(2)]
    host = Device("CPU", 64 * GiB, 64 * GiB, "host", "cpu")
    plans = {c: plan(prof, devices, c, host) for c in configs}
    say(f"Simulated devices, same grid and budget, {SIM_SEEDS} draws of the true speeds per row; 'hit' = share of "
        "draws whose pick is within 3% of the true best; the exhaustive sweep picks its best measurement.")
    say()
    say("| objective | noise | optimiser: hit, mean ratio, worst | loads (mean, max) | exhaustive sweep: hit, mean ratio, worst |")
    say("|---|---|---|---|---|")
    for noise in (0.03, 0.10):
        for objective in ("tg", "pp", "mixed"):
            tuned, swept, loads = [], [], []
            for seed in range(SIM_SEEDS):
                rng = np.random.default_rng(seed)
                names = ["RPC0", "RPC1", "CPU"]
                bw = {n: rng.uniform(0.3, 3.0) * 20e9 for n in names}
                hop = {n: (rng.uniform(0, 2e-3) if n != "CPU" else 0.0) for n in names}
                ppf = {n: rng.uniform(2, 10) for n in names}
                fa = {"on": 1.0, "off": rng.uniform(0.9, 1.2)}
                ub = {32: rng.uniform(0.9, 1.3), 128: 1.0}

                def truth(c, noisy=True):
                    t = tp = 0.0
                    for d in plans[c].devices:
                        b = d.weights_bytes + d.kv_bytes - (prof.input_weights_bytes if d.is_host else 0)
                        if b > 0:
                            t += b / bw[d.name] + hop[d.name]   # noqa: B023 - called in this iteration only
                            tp += b / (bw[d.name] * ppf[d.name]) + hop[d.name] / 20   # noqa: B023 - called in this iteration only
                    tp *= fa[c.flash_attn] * ub[c.n_ubatch]   # noqa: B023 - called in this iteration only
                    n = (lambda: rng.normal(1, noise)) if noisy else (lambda: 1.0)   # noqa: B023 - called in this iteration only
                    return 1 / (tp * n()), 1 / (t * n())

                def val(c, noisy=False):
                    return objective_value(objective, *truth(c, noisy), N_PROMPT, N_GEN)   # noqa: B023 - called in this iteration only
                best = max(val(c) for c in configs)
                tuner = Tuner(prof, devices, configs, objective=objective, host=host, n_prompt=N_PROMPT, n_gen=N_GEN)
                pick, _ = run_tuner(tuner, lambda c: (*truth(c), True), budget)
                tuned.append(val(pick) / best)
                loads.append(tuner.loads)
                swept.append(val(max(configs, key=lambda c: val(c, True))) / best)
            t, w = np.array(tuned), np.array(swept)
            say(f"| {objective} | {noise:.0%} | {np.mean(t >= 0.97):.2f}, {t.mean():.3f}, {t.min():.3f} | "
                f"{np.mean(loads):.1f}, {max(loads)} of {len(configs)} | {np.mean(w >= 0.97):.2f}, {w.mean():.3f}, "
                f"{w.min():.3f} |")


def _twin_values(groups, raw):
    for cand in groups:
        yield [raw[c][1] for c in (cand.config, *cand.twins) if raw[c][1]]


def _pp_tg(records) -> tuple[float | None, float | None]:
    """Best of the repetitions (max tokens/s), for the sweep, the optimiser and the paired check
    alike: other processes only ever slow a repetition down, so the fastest is the least disturbed."""
    pp = next((max(r["samples_ts"]) for r in records if r["n_prompt"] and not r["n_gen"]), None)
    tg = next((max(r["samples_ts"]) for r in records if r["n_gen"] and not r["n_prompt"]), None)
    return pp, tg


def _desc(c: SplitConfig, grid) -> str:
    parts = []
    for k in grid.varying():
        v = getattr(c, k)
        flag = {"n_gpu_layers": "-ngl", "tensor_split": "-ts", "flash_attn": "-fa", "n_ubatch": "-ub"}.get(k, k)
        parts.append(f"{flag} {'/'.join(f'{x:g}' for x in v) if isinstance(v, tuple) else v}")
    return "`" + " ".join(parts) + "`"


if __name__ == "__main__":
    sys.exit(main())
