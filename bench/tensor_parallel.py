"""Layer split against tensor split (-sm tensor) on CPU RPC devices, measured and predicted (issue 16).

    .venv/bin/python bench/tensor_parallel.py [--rounds 3] [--threads 1] [--nice -5] [--json out.json]

Starts two RPC servers (T threads each), calibrates them and the host (gpulab.runtime.calibrate,
its own cache in a temporary folder: per-device bandwidth, FLOP rate, overheads and the link's
round trip), then measures, interleaved over rounds, for test-written Q4_0 models:
  RPC0 only; layer split -ts 1/1; tensor split (equal shares); tensor split -ts 3/1
and prints measured pp/tg beside gpulab.core.measure.speed.predict_speed's prediction from the calibrated
model (the tensor split: slowest member + two all-reduces per layer, each allreduce_stages
copies over the link), and the ratio tensor / layer, measured and predicted.
Measured: each round's fastest repetition, median over rounds (as calibration measures).
Two predictions for the tensor splits: "cal" with the calibration as is (its all-reduce stage
fitted on its own tensor-split run of a calibration model: gpulab.runtime.calibrate), and "fit"
with the stage fitted instead on ONE of this bench's runs (the first model's equal tensor split,
tg) and used for every other config. Over RPC a stage is several round trips through the client
(copies both ways, an ADD graph per device), far more than a layer split's hop.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchkit import add_rpc_run_args, loadavg

from gpulab import read_profile
from gpulab.core.config import SplitConfig
from gpulab.core.measure.speed import fit_allreduce_stage, predict_speed
from gpulab.core.placement.planner import plan
from gpulab.runtime.calibrate import _spec, calibrate, measure_best
from gpulab.runtime.rpc import start_servers
from gpulab.runtime.worker import Worker
from gpulab.sources.host import host_device
from gpulab.sources.synth import write_model
from gpulab.storage.speed_cache import SpeedCache
from gpulab.ui.text import calibration_text

# (n_layer, n_embd), Q4_0: 12x1024 is 82 MB (bandwidth-bound tg), 8x2048 is 220 MB (wider layers:
# the same all-reduce count per layer moves twice the activations, against four times the bytes)
MODELS = ((12, 1024), (8, 2048))
CONFIGS = (
    ("RPC0 only", SplitConfig(devices=("RPC0",))),
    ("layer -ts 1/1", SplitConfig(devices=("RPC0", "RPC1"), tensor_split=(1.0, 1.0))),
    ("tensor", SplitConfig(devices=("RPC0", "RPC1"), split_mode="tensor")),
    ("tensor -ts 3/1", SplitConfig(devices=("RPC0", "RPC1"), split_mode="tensor", tensor_split=(3.0, 1.0))),
)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_rpc_run_args(ap)
    a = ap.parse_args(argv)
    if a.nice:
        os.nice(a.nice)
    t_start, load_before = time.monotonic(), loadavg()
    n_prompt, n_gen = a.n_prompt, a.n_gen
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpulab-tensor-bench-") as tmp, \
            start_servers(2, threads=a.threads) as cluster:
        cache_path = Path(tmp) / "speed.json"
        cal = calibrate(cluster.endpoints, n_threads=a.threads, rounds=a.rounds, n_prompt=n_prompt, n_gen=n_gen,
                        cache=SpeedCache(cache_path))
        print(calibration_text(cal))
        print()
        base = SplitConfig(n_ctx=max(n_prompt, n_gen) + 16, n_batch=n_prompt, n_ubatch=n_prompt)
        items, profiles = [], {}
        for nl, ne in MODELS:
            path = write_model(Path(tmp) / f"m-{nl}x{ne}.gguf", _spec(nl, ne, "Q4_0"))
            profiles[f"{nl}x{ne}"] = read_profile(path)
            for label, cfg in CONFIGS:
                items.append((f"{nl}x{ne} {label}", str(path),
                              base.replace(**{k: getattr(cfg, k) for k in ("devices", "tensor_split", "split_mode")})))
        with Worker(cluster.endpoints) as w:
            devices = [d for d in w.devices() if d.kind not in ("cpu", "accel")]
            measured = measure_best(w, items, rounds=a.rounds, n_prompt=n_prompt, n_gen=n_gen, n_threads=a.threads)
        host = host_device()
        model = SpeedCache(cache_path).model_for(devices + ([host] if host else []), a.threads)
        plans = {label: plan(profiles[label.split()[0]], devices, cfg, host) for label, _, cfg in items}
        # the all-reduce stage's cost, from one run: measured tg seconds less the prediction without it
        ref = f"{MODELS[0][0]}x{MODELS[0][1]} tensor"
        stage_s = fit_allreduce_stage(plans[ref], model, 1 / measured[ref].tg_ts, n_gen=n_gen)
        fitted = replace(model, link=replace(model.link, allreduce_latency_s=stage_s))
        print(f"all-reduce stage fitted on {ref} tg: {stage_s * 1e6:.0f} us (calibration's: "
              f"{model.link.allreduce_stage_s * 1e6:.0f} us; its hop latency {model.link.latency_s * 1e6:.0f} us)")
        for label, _, _cfg in items:
            s = predict_speed(plans[label], model, n_prompt=n_prompt, n_gen=n_gen)
            f = predict_speed(plans[label], fitted, n_prompt=n_prompt, n_gen=n_gen)
            b = measured[label]
            rows.append({"config": label, "tg_measured": b.tg_ts, "tg_predicted": s.tg_tokens_per_s,
                         "tg_fit": f.tg_tokens_per_s, "pp_measured": b.pp_ts, "pp_predicted": s.pp_tokens_per_s,
                         "pp_fit": f.pp_tokens_per_s, "fitted_on": label == ref,
                         "layers": "".join("C" if d == "CPU" else ("M" if d == "Meta()" else d[-1])
                                           for d in b.run.report.layer_devices)})
    load_after = loadavg()

    print(f"pp{n_prompt} / tg{n_gen}, 2 RPC servers x {a.threads} thread(s), {a.rounds} rounds, niceness {os.nice(0)}")
    head = (f"{'config':<24} {'tg meas':>8} {'cal':>7} {'err':>6} {'fit':>7} {'err':>6}   {'pp meas':>8} {'cal':>7} "
            f"{'err':>6} {'fit':>7} {'err':>6}")
    print(head)
    print("-" * len(head))
    for r in rows:
        e = {k: 100 * (r[k] / r[k[:2] + "_measured"] - 1) for k in ("tg_predicted", "tg_fit", "pp_predicted", "pp_fit")}
        print(f"{r['config']:<24} {r['tg_measured']:8.1f} {r['tg_predicted']:7.1f} {e['tg_predicted']:+5.0f}% "
              f"{r['tg_fit']:7.1f} {e['tg_fit']:+5.0f}%{'*' if r['fitted_on'] else ' '}  {r['pp_measured']:8.1f} "
              f"{r['pp_predicted']:7.1f} {e['pp_predicted']:+5.0f}% {r['pp_fit']:7.1f} {e['pp_fit']:+5.0f}%")
    print("* the run the all-reduce stage was fitted on")
    print()
    by = {r["config"]: r for r in rows}
    for nl, ne in MODELS:
        m = f"{nl}x{ne}"
        for t in ("tensor", "tensor -ts 3/1"):
            lay, ten = by[f"{m} layer -ts 1/1"], by[f"{m} {t}"]
            print(f"{m} {t} / layer -ts 1/1: tg measured {ten['tg_measured'] / lay['tg_measured']:.2f}, "
                  f"cal {ten['tg_predicted'] / lay['tg_predicted']:.2f}, fit {ten['tg_fit'] / lay['tg_fit']:.2f}; "
                  f"pp measured {ten['pp_measured'] / lay['pp_measured']:.2f}, cal "
                  f"{ten['pp_predicted'] / lay['pp_predicted']:.2f}, fit {ten['pp_fit'] / lay['pp_fit']:.2f}")
    print(f"load average before {load_before}, after {load_after}; {time.monotonic() - t_start:.0f} s")
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": rows, "calibration": calibration_text(cal),
                                            "allreduce_stage_s": stage_s,
                                            "load_before": load_before, "load_after": load_after, "args": vars(a)},
                                           indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
