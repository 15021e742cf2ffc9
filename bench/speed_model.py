"""Throughput model against measured llama.cpp on CPU RPC devices (issue 8).

    .venv/bin/python bench/speed_model.py [--rounds 3] [--servers 2] [--threads 1] [--nice -5] [--json out.json]

Starts N RPC servers (T threads each), calibrates them and the host with T threads
(gpulab.runtime.calibrate, with its own cache in a temporary folder), then measures splits of
test-written models that calibration never saw (other shapes), interleaved over rounds, and
prints predicted against measured pp and tg per config:
- before: the speed model without calibration (defaults; what `gpulab plan` shows for an
  RPC device nobody calibrated);
- after: after calibration;
- +runs: after calibration plus update_from_run with every *other* config's runs (leave one out),
  i.e. what the lab predicts for a config once it has measured the rest.
Measured: each round's fastest repetition, median over rounds, as calibration measures; llama-
bench's mean (averaged over rounds) is printed alongside. Error = predicted / measured - 1.
Prints /proc/loadavg before and after: on a shared machine the timings depend on it. --nice
changes this process's niceness first (servers and worker inherit it; negative needs root), as
bench/llama_bench_compare.py does, so that other benchmarks at raised priority do not starve it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchkit import add_rpc_run_args, loadavg

from gpulab import read_profile
from gpulab.core.config import SplitConfig
from gpulab.core.measure.speed import predict_speed
from gpulab.core.placement.planner import plan
from gpulab.runtime.calibrate import _spec, calibrate, measure_best, update_from_run
from gpulab.runtime.rpc import start_servers
from gpulab.runtime.worker import Worker
from gpulab.sources.host import host_device
from gpulab.sources.synth import write_model
from gpulab.storage.speed_cache import SpeedCache
from gpulab.ui.text import calibration_text

# (n_layer, n_embd): calibration uses 6x1024 and 8x1536; these are other shapes
VALIDATION_MODELS = ((12, 1024), (16, 768))


def configs_for(n_layer: int, n_servers: int) -> list[tuple[str, SplitConfig]]:
    names = tuple(f"RPC{i}" for i in range(n_servers))
    out = [("RPC0 only", SplitConfig(devices=("RPC0",))), ("host only (-ngl 0)", SplitConfig(n_gpu_layers=0))]
    out.append(("-ts " + "/".join(["1"] * n_servers), SplitConfig(tensor_split=(1.0,) * n_servers)))
    if n_servers >= 2:
        out.append(("-ts 3/1", SplitConfig(devices=names[:2], tensor_split=(3.0, 1.0))))
        out.append(("-ts 1/3", SplitConfig(devices=names[:2], tensor_split=(1.0, 3.0))))
    half = n_layer // 2 + 1
    out.append((f"-ngl {half} -ts " + "/".join(["1"] * n_servers),
                SplitConfig(n_gpu_layers=half, tensor_split=(1.0,) * n_servers)))
    if n_servers >= 2:   # four ubatches per llama_decode: llama.cpp's pipeline parallelism
        out.append(("-ts " + "/".join(["1"] * n_servers) + " -ub 8", SplitConfig(tensor_split=(1.0,) * n_servers,
                                                                           n_ubatch=8)))
    return out


def summary(errors: list[float]) -> str:
    if not errors:
        return "-"
    a = sorted(abs(e) for e in errors)
    p90 = a[min(len(a) - 1, int(round(0.9 * (len(a) - 1))))]
    within = lambda x: 100 * sum(1 for e in a if e <= x) / len(a)  # noqa: E731
    return (f"median {100 * a[len(a) // 2]:.0f}%, p90 {100 * p90:.0f}%, max {100 * a[-1]:.0f}%, "
            f"within 15%: {within(0.15):.0f}%, within 25%: {within(0.25):.0f}%")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_rpc_run_args(ap)
    ap.add_argument("--servers", type=int, default=2)
    a = ap.parse_args(argv)
    if a.nice:
        os.nice(a.nice)
    t_start = time.monotonic()
    load_before = loadavg()
    n_prompt, n_gen = a.n_prompt, a.n_gen
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpulab-speed-bench-") as tmp, \
            start_servers(a.servers, threads=a.threads) as cluster:
        cache_path = Path(tmp) / "speed.json"
        cal = calibrate(cluster.endpoints, n_threads=a.threads, rounds=a.rounds, n_prompt=n_prompt, n_gen=n_gen,
                        cache=SpeedCache(cache_path))
        print(calibration_text(cal))
        print()
        paths = [write_model(Path(tmp) / f"val-{nl}x{ne}.gguf", _spec(nl, ne, "Q4_0")) for nl, ne in VALIDATION_MODELS]
        profiles = [read_profile(p) for p in paths]
        items, meta = [], []
        base = SplitConfig(n_ctx=max(n_prompt, n_gen) + 16, n_batch=n_prompt, n_ubatch=n_prompt)
        for (nl, ne), path, prof in zip(VALIDATION_MODELS, paths, profiles):
            for label, cfg in configs_for(nl, a.servers):
                cfg = base.replace(**{k: getattr(cfg, k) for k in ("devices", "tensor_split", "n_gpu_layers")},
                                   n_ubatch=min(base.n_ubatch, cfg.n_ubatch))
                items.append((f"{nl}x{ne} {label}", str(path), cfg))
                meta.append(prof)
        with Worker(cluster.endpoints) as w:
            devices = [d for d in w.devices() if d.kind not in ("cpu", "accel")]
            measured = measure_best(w, items, rounds=a.rounds, n_prompt=n_prompt, n_gen=n_gen, n_threads=a.threads)
        host = host_device()
        all_devices = devices + ([host] if host else [])
        before = SpeedCache(Path(tmp) / "empty.json").model_for(all_devices, a.threads)
        after = SpeedCache(cache_path).model_for(all_devices, a.threads)

        def plan_of(prof, cfg, run):
            from dataclasses import replace
            p = plan(prof, devices, cfg, host)
            return replace(p, layer_devices=tuple(run.report.layer_devices))

        plans = {label: plan_of(prof, cfg, measured[label].run) for (label, _, cfg), prof in zip(items, meta)}
        for label, _, _cfg in items:
            # leave one out: the calibration plus every other config's runs
            loo = SpeedCache(Path(tmp) / "loo.json")
            loo.data = json.loads(cache_path.read_text())
            for other, _, _ in items:
                if other == label:
                    continue
                for run in measured[other].runs:
                    update_from_run(run, plans[other], cache=loo, save=False)
            plus = loo.model_for(all_devices, a.threads)
            b = measured[label]
            row = {"config": label, "tg_measured": b.tg_ts, "tg_llama_bench_mean": b.tg_mean_ts,
                   "pp_measured": b.pp_ts, "pp_llama_bench_mean": b.pp_mean_ts,
                   "layers": "".join("C" if d == "CPU" else d[-1] for d in b.run.report.layer_devices)}
            for name, model in (("before", before), ("after", after), ("+runs", plus)):
                s = predict_speed(plans[label], model, n_prompt=n_prompt, n_gen=n_gen)
                row[f"tg_{name}"], row[f"pp_{name}"] = s.tg_tokens_per_s, s.pp_tokens_per_s
            rows.append(row)
    load_after = loadavg()

    def err(r, kind, name):
        return r[f"{kind}_{name}"] / r[f"{kind}_measured"] - 1

    print(f"pp{n_prompt} / tg{n_gen}, {a.servers} RPC servers x {a.threads} thread(s), host {a.threads} thread(s), "
          f"{a.rounds} rounds, niceness {os.nice(0)}")
    head = (f"{'config':<26} {'layers':<18} {'tg meas':>8} {'(mean)':>7} {'before':>7} {'after':>7} {'+runs':>7}"
            f"   {'pp meas':>8} {'(mean)':>7} {'before':>7} {'after':>7} {'+runs':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['config']:<26} {r['layers']:<18} {r['tg_measured']:8.1f} {r['tg_llama_bench_mean']:7.1f} "
              f"{100 * err(r, 'tg', 'before'):+6.0f}% {100 * err(r, 'tg', 'after'):+6.0f}% "
              f"{100 * err(r, 'tg', '+runs'):+6.0f}%   {r['pp_measured']:8.1f} {r['pp_llama_bench_mean']:7.1f} "
              f"{100 * err(r, 'pp', 'before'):+6.0f}% {100 * err(r, 'pp', 'after'):+6.0f}% "
              f"{100 * err(r, 'pp', '+runs'):+6.0f}%")
    print()
    for name in ("before", "after", "+runs"):
        for kind in ("tg", "pp"):
            print(f"{kind} {name:>6}: {summary([err(r, kind, name) for r in rows])}")
    mean_err = [r[f"{k}_after"] / r[f"{k}_llama_bench_mean"] - 1 for r in rows for k in ("tg", "pp")
                if r[f"{k}_llama_bench_mean"]]
    print(f"after, against llama-bench's mean instead (tg and pp): {summary(mean_err)}")
    print(f"load average before {load_before}, after {load_after}; {time.monotonic() - t_start:.0f} s")
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": rows, "calibration": calibration_text(cal), "load_before": load_before,
                                            "load_after": load_after, "args": vars(a)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
