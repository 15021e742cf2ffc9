"""GPU truth in one prepared run: placement, memory, throughput, re-split and the monitor on a real
GPU, against llama.cpp itself, inside one device call (issue 17).

    bench/gpu_truth.sh            # on the GPU machine: builds llama.cpp with CUDA, then runs this
    bench/gpu_truth.sh --quick    # anywhere: the same tables on CPU RPC devices with tiny models

Sections (each one timed, each one's failure recorded and the next one run; results written to
OUT/gpu_truth.json after every section, so a run cut short still leaves what it measured):

  facts      the GPU, driver, llama.cpp build, CPU-feature decision
  fidelity   gpulab's in-process pp/tg against llama-bench from the same build, A B A B; roofline:
             tg x bytes read per token against a device-to-device copy measured in this run
  memory     predicted weights/KV/compute per device against llama.cpp's buffers, and against NVML's
             per-process memory once the overhead learned from the first config is counted
  two        CUDA0 plus an RPC server on CUDA0 at -ts 1/1, 3/1, 1/3: placement against the plan,
             pp/tg against one device, and the speed model's prediction calibrated on the one device
  resplit    "new split" to "ready to measure" in a worker against a fresh process's load
  monitor    NVML samples during a measured run, by phase (load, warm-up, pp, tg)
  oom        a context too large for the GPU (fit check off): a clear error, and the worker lives on

In --quick mode the "GPU" is a CPU RPC server (and the second device another one), the models are
tiny and the repetitions few: the script runs in the test suite (tests/test_gpu_truth.py) so it
cannot rot; its numbers mean nothing there. The last thing printed is a markdown summary.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

MiB = 1024**2
GiB = 1024**3


def log(msg: str) -> None:
    print(f"[gpu-truth] {msg}", file=sys.stderr, flush=True)


# --- models -----------------------------------------------------------------------------------------

def model_specs(quick: bool) -> dict:
    from gpulab.sources.synth import PRESETS, SynthSpec
    if quick:
        return {"dense": SynthSpec(arch="llama", n_layer=8, n_embd=512, n_ff=1536, n_head=8, n_head_kv=2,
                                   n_vocab=4096, weight_type="Q4_0", name="truth-dense-quick"),
                "moe": SynthSpec(arch="qwen3moe", n_layer=6, n_embd=512, n_ff=512, n_head=8, n_head_kv=2,
                                 n_vocab=4096, n_expert=8, n_expert_used=2, n_ff_exp=256, weight_type="Q4_0",
                                 name="truth-moe-quick")}
    return {"dense": PRESETS["llama3-8b"],   # Llama-3-8B shape, Q4_0, 4.21 GiB
            # Qwen3-30B-A3B's layer shape with half its layers and experts: 24 x 64 experts of 768, Q4_0 (~4 GiB)
            "moe": SynthSpec(arch="qwen3moe", n_layer=24, n_embd=2048, n_ff=6144, n_head=32, n_head_kv=4,
                             head_dim=128, n_vocab=151936, n_expert=64, n_expert_used=8, n_ff_exp=768,
                             n_ctx_train=32768, weight_type="Q4_0", name="qwen3moe-24l-synth")}


def write_models(root: Path, quick: bool) -> dict[str, Path]:
    from gpulab.sources.synth import write_model
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for key, spec in model_specs(quick).items():
        path = root / f"{spec.name}.gguf"
        if not path.exists():
            t0 = time.perf_counter()
            tmp = path.with_suffix(".part")
            write_model(tmp, spec)
            tmp.rename(path)
            log(f"wrote {path.name} ({path.stat().st_size / GiB:.2f} GiB) in {time.perf_counter() - t0:.1f} s")
        out[key] = path
    return out


# --- the run -----------------------------------------------------------------------------------------

class Truth:
    """Holds the results, writes them after every section, and runs sections against a deadline."""

    def __init__(self, args):
        self.args = args
        self.quick = args.quick
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.deadline = time.monotonic() + args.budget_s
        self.results: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                              "mode": "quick (CPU RPC devices)" if self.quick else "gpu", "sections": {}}
        self.servers = []

    def save(self) -> None:
        (self.out / "gpu_truth.json").write_text(json.dumps(self.results, indent=1, default=str))

    def section(self, name: str, fn) -> None:
        left = self.deadline - time.monotonic()
        if left < 10:
            self.results["sections"][name] = {"skipped": f"out of time ({left:.0f} s left of the budget)"}
            log(f"{name}: skipped, out of time")
            self.save()
            return
        log(f"{name} ...")
        t0 = time.perf_counter()
        try:
            res = fn()
        except (Exception, SystemExit) as e:   # noqa: BLE001 - a section that fails is recorded; the next one still runs
            res = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=6)}
            log(f"{name} failed: {type(e).__name__}: {e}")
        res["seconds"] = round(time.perf_counter() - t0, 1)
        self.results["sections"][name] = res
        self.save()
        log(f"{name} done in {res['seconds']} s")

    # -- devices: the "GPU" and the second device --------------------------------------------------
    def endpoints(self, n: int) -> list[str]:
        """n RPC servers: CPU ones in quick mode, ones serving CUDA0 otherwise (started once)."""
        from gpulab.runtime.rpc import start_servers
        while len(self.servers) < n:
            device = "CPU" if self.quick else "CUDA0"
            cluster = start_servers(1, device=device, threads=1 if self.quick else 4)
            self.servers.append(cluster)
        return [ep for c in self.servers[:n] for ep in c.endpoints]

    def primary_worker(self):
        """A worker whose first device is the device under test: CUDA0, or RPC0 in quick mode."""
        from gpulab.runtime.worker import Worker
        return Worker(self.endpoints(1) if self.quick else [])

    def gpu_name(self) -> str:
        return "RPC0" if self.quick else "CUDA0"

    def stop(self) -> None:
        for c in self.servers:
            c.stop()


def facts(t: Truth) -> dict:
    from gpulab.sources import cpu_features
    from gpulab.sources.nvml import NvmlProbe
    out = {"cpu_decision": cpu_features.host_decision().summary()}
    probe = NvmlProbe()
    if probe.available():
        gpus = probe.devices()
        out["gpus"] = [{"name": g.name, "total_gib": round((g.total_bytes or 0) / GiB, 1)} for g in gpus]
        try:
            out["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError) as e:
            out["driver"] = f"unknown ({e})"
    else:
        out["gpus"] = []
        out["nvml"] = probe.unavailable_reason
    with t.primary_worker() as w:
        out["llama_devices"] = [{"name": dv.name, "kind": dv.kind, "free_gib": round(dv.free_bytes / GiB, 2)}
                                for dv in w.devices()]
    from gpulab.runtime.bench import system_facts
    sf = system_facts()
    out.update({"build": sf["build"], "backends": sf["backends"], "gpu_info": sf["gpu_info"]})
    return out


# --- 1. throughput fidelity ----------------------------------------------------------------------

_TORCH_COPY = r"""
import statistics, torch
n = 2 << 30
a = torch.empty(n, dtype=torch.uint8, device="cuda").random_(0, 255)
b = torch.empty_like(a)
for _ in range(3):
    b.copy_(a)
torch.cuda.synchronize()
start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
times = []
for _ in range(10):
    start.record(); b.copy_(a); end.record(); end.synchronize()
    times.append(start.elapsed_time(end) / 1e3)
print(2 * n / statistics.median(times))
"""


def copy_bandwidth(quick: bool) -> tuple[float, str]:
    """Bytes read plus written per second by a large device-to-device copy (the roofline's ceiling).
    On the GPU through PyTorch in a child process, so that its CUDA runtime and llama.cpp's never share one."""
    if not quick:
        try:
            out = subprocess.run([sys.executable, "-c", _TORCH_COPY], capture_output=True, text=True, timeout=120)
            return float(out.stdout.strip().splitlines()[-1]), "torch device-to-device copy, 2 GiB, median of 10"
        except Exception as e:   # noqa: BLE001 - no torch: say so, keep the rest
            return 0.0, f"no copy measured ({type(e).__name__}: {e})"
    import numpy as np
    a = np.ones(256 * MiB, dtype=np.uint8)
    b = np.empty_like(a)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        np.copyto(b, a)
        times.append(time.perf_counter() - t0)
    return 2 * a.nbytes / min(times), "numpy host copy, 256 MiB (quick mode: no GPU)"


def fidelity(t: Truth, models: dict) -> dict:
    from llama_bench_compare import run_gpulab, run_llama_bench
    a = t.args
    p, n, r = (32, 8, 1) if t.quick else (512, 128, 3)
    bench_args = SimpleNamespace(p=p, n=n, r=r, t=a.threads, b=2048, ub=512)
    model = models["dense"]
    if not a.llama_bench:
        return {"skipped": "no llama-bench binary given (--llama-bench)"}
    rounds = []
    for i in range(2):   # A B A B
        lb = run_llama_bench(Path(a.llama_bench), model, bench_args, libs="own")
        gl = run_gpulab(model, bench_args)
        rounds.append({"llama_bench": lb, "gpulab": gl})
        log(f"fidelity round {i + 1}: llama-bench pp {lb['pp'][0]:.0f} tg {lb['tg'][0]:.1f}; "
            f"gpulab pp {gl['pp'][0]:.0f} tg {gl['tg'][0]:.1f} t/s")
    out = {"model": model.name, "p": p, "n": n, "r": r, "rounds": rounds}
    for k in ("pp", "tg"):
        lb_mean = statistics.mean(x["llama_bench"][k][0] for x in rounds)
        gl_mean = statistics.mean(x["gpulab"][k][0] for x in rounds)
        lb_best = max(x["llama_bench"][k][1] for x in rounds)
        gl_best = max(x["gpulab"][k][1] for x in rounds)
        out[k] = {"llama_bench_ts": lb_mean, "gpulab_ts": gl_mean, "ratio_of_means": gl_mean / lb_mean,
                  "ratio_of_best": gl_best / lb_best}
    # roofline: each generated token reads every offloaded weight once, plus the KV in use
    from gpulab import read_profile
    from gpulab.core.config import SplitConfig
    from gpulab.core.placement.planner import plan
    with t.primary_worker() as w:
        devs = [d for d in w.devices() if d.name == t.gpu_name()]
    pl = plan(read_profile(model), devs, SplitConfig(n_ctx=p + n))
    bytes_per_token = sum(d.weights_bytes for d in pl.devices if not d.is_host)
    bw, how = copy_bandwidth(t.quick)
    out["roofline"] = {"bytes_per_token": bytes_per_token, "copy_bytes_per_s": bw, "copy": how,
                       "tg_bytes_per_s": out["tg"]["gpulab_ts"] * bytes_per_token,
                       "fraction": (out["tg"]["gpulab_ts"] * bytes_per_token / bw) if bw else None}
    return out


# --- 2. memory ---------------------------------------------------------------------------------------

def memory_configs(quick: bool) -> list[tuple[str, str, object]]:
    from gpulab.core.config import SplitConfig
    ctx_small, ctx_big = (512, 2048) if quick else (4096, 32768)
    half = 4 if quick else 16
    return [
        ("full offload", "dense", SplitConfig(n_ctx=ctx_small)),
        (f"-ngl {half}", "dense", SplitConfig(n_gpu_layers=half, n_ctx=ctx_small)),
        (f"-ngl {half // 2}", "dense", SplitConfig(n_gpu_layers=half // 2, n_ctx=ctx_small)),
        ("-sm none", "dense", SplitConfig(split_mode="none", n_ctx=ctx_small)),
        (f"-c {ctx_big}", "dense", SplitConfig(n_ctx=ctx_big)),
        (f"-c {ctx_big} q8_0 KV", "dense", SplitConfig(n_ctx=ctx_big, type_k="q8_0", type_v="q8_0", flash_attn="on")),
        ("MoE full offload", "moe", SplitConfig(n_ctx=ctx_small)),
        ("MoE --n-cpu-moe " + str(3 if quick else 12), "moe", SplitConfig(n_ctx=ctx_small, n_cpu_moe=3 if quick else 12)),
    ]


def _rel(pred: int, actual: int) -> float | None:
    return (pred - actual) / actual if actual else None


def _nvml_bytes(pid: int) -> tuple[int | None, int | None]:
    """(this process's GPU memory, the first GPU's used memory) by NVML; None where it cannot say."""
    from gpulab.sources.nvml import NvmlProbe
    probe = NvmlProbe()
    if not probe.available():
        return None, None
    gpus = probe.devices()
    own = [p.used_bytes for g in gpus for p in g.processes if p.pid == pid and p.used_bytes is not None]
    return (sum(own) if own else None), (gpus[0].used_bytes if gpus else None)


def memory(t: Truth, models: dict) -> dict:
    from gpulab import read_profile
    from gpulab.core.placement.planner import plan
    from gpulab.sources.host import host_device
    rows = []
    overhead = None
    gpu = t.gpu_name()
    with t.primary_worker() as w:
        devices = [d for d in w.devices() if d.is_offload]
        _, device_baseline = _nvml_bytes(w.proc.pid)   # the GPU's used memory before any load
        for label, key, cfg in memory_configs(t.quick):
            row = {"config": label}
            try:
                pl = plan(read_profile(models[key]), devices, cfg, host_device())
                with w.open(models[key], cfg) as rm:
                    rep = rm.report
                    nvml_bytes, device_used = _nvml_bytes(w.proc.pid)
                row["placement_exact"] = list(rep.layer_devices) == list(pl.layer_devices)
                d = next(x for x in pl.devices if x.name == gpu)
                for term, pred in (("model", d.weights_bytes), ("kv", d.kv_bytes), ("compute", d.compute_bytes)):
                    act = rep.bytes_on(gpu, term)
                    row[term] = {"predicted": pred, "llama_cpp": act, "rel_error": _rel(pred, act)}
                host = next(x for x in pl.devices if x.is_host)
                row["host_weights"] = {"predicted": host.weights_bytes, "llama_cpp": rep.bytes_on("CPU", "model"),
                                       "rel_error": _rel(host.weights_bytes, rep.bytes_on("CPU", "model"))}
                llama_total = sum(rep.bytes_on(gpu, k) for k in ("model", "kv", "compute"))
                predicted_total = d.weights_bytes + d.kv_bytes + d.compute_bytes
                if nvml_bytes is not None:
                    if overhead is None:   # learned once, from the first config, then applied to the others
                        overhead = nvml_bytes - llama_total
                        row["overhead_learned_bytes"] = overhead
                    row["nvml"] = {"process_bytes": nvml_bytes, "predicted_plus_overhead": predicted_total + overhead,
                                   "rel_error": _rel(predicted_total + overhead, nvml_bytes),
                                   "llama_cpp_buffers": llama_total}
                if device_used is not None and device_baseline is not None:
                    row["nvml_device_delta_bytes"] = device_used - device_baseline
            except Exception as e:   # noqa: BLE001 - recorded in the row; the bench goes on
                row["error"] = f"{type(e).__name__}: {e}"
            rows.append(row)
            log(f"memory {label}: {_memory_line(row)}")
    return {"device": gpu, "rows": rows}


def _memory_line(row: dict) -> str:
    if "error" in row:
        return row["error"]
    parts = [f"placement {'exact' if row['placement_exact'] else 'DIFFERS'}"]
    for term in ("model", "kv", "compute"):
        e = row[term]["rel_error"]
        parts.append(f"{term} {e * 100:+.2f}%" if e is not None else f"{term} -")
    if "nvml" in row:
        parts.append(f"NVML {row['nvml']['rel_error'] * 100:+.2f}%")
    return ", ".join(parts)


# --- 3. two devices on one GPU ----------------------------------------------------------------------

def two_devices(t: Truth, models: dict) -> dict:
    from gpulab import read_profile
    from gpulab.core.config import SplitConfig
    from gpulab.core.measure.speed import predict_speed
    from gpulab.core.placement.planner import plan
    from gpulab.runtime.worker import Worker
    from gpulab.sources.host import host_device
    model = models["dense"]
    p, n, r = (32, 8, 1) if t.quick else (512, 128, 3)
    ctx = p + n
    eps = t.endpoints(2) if t.quick else t.endpoints(1)
    rows = []
    with Worker(eps) as w:
        devices = [d for d in w.devices() if d.is_offload]
        names = [d.name for d in devices]
        # the device itself: CUDA0 (llama.cpp lists RPC devices first), or RPC0 in quick mode
        single = names[0] if t.quick else next(nm for nm in names if not nm.startswith("RPC"))
        profile = read_profile(model)
        cases = [("one device", SplitConfig(n_ctx=ctx, devices=(single,)))]
        cases += [(f"-ts {a}/{b}", SplitConfig(n_ctx=ctx, tensor_split=(a, b))) for a, b in ((1, 1), (3, 1), (1, 3))]
        base = None
        for label, cfg in cases:
            pl = plan(profile, devices, cfg, host_device())
            with w.open(model, cfg) as rm:   # one load: its report, then its measurement
                rep = rm.report
                run = rm.measure(n_prompt=p, n_gen=n, repetitions=r)
            row = {"config": label, "devices": names, "placement_exact": list(rep.layer_devices) == list(pl.layer_devices),
                   "layers": {d.name: d.n_layers for d in pl.devices}, "pp_ts": run.pp.avg_ts, "tg_ts": run.tg.avg_ts}
            if base is None:
                base = row
            row["pp_vs_one"] = row["pp_ts"] / base["pp_ts"]
            row["tg_vs_one"] = row["tg_ts"] / base["tg_ts"]
            try:
                pred = predict_speed(pl, n_prompt=p, n_gen=n)
                row["predicted_uncalibrated"] = {"pp_ts": pred.pp_tokens_per_s, "tg_ts": pred.tg_tokens_per_s}
            except Exception as e:   # noqa: BLE001 - recorded in the row; the bench goes on
                row["predicted_uncalibrated"] = {"error": str(e)}
            row["_run"], row["_plan"] = run, pl
            rows.append(row)
            log(f"two devices {label}: placement {'exact' if row['placement_exact'] else 'DIFFERS'}, "
                f"pp {row['pp_ts']:.0f} t/s ({row['pp_vs_one']:.2f}x), tg {row['tg_ts']:.1f} t/s ({row['tg_vs_one']:.2f}x)")
    calibrated_prediction(rows, devices, t.out, p, n)
    for row in rows:
        del row["_run"], row["_plan"]
    return {"rows": rows}


def calibrated_prediction(rows: list[dict], devices, out: Path, p: int, n: int) -> None:
    """The speed model calibrated in this run on the one-device and -ts 1/1 runs (device speed and
    link cost), then asked for the held-out splits: predicted against measured t/s."""
    from gpulab.core.measure.speed import predict_speed
    from gpulab.runtime.calibrate import update_from_run
    from gpulab.storage.speed_cache import SpeedCache
    cache = SpeedCache(out / "speed-calibration.json")
    model = None
    for row in rows[:2]:
        model = update_from_run(row["_run"], row["_plan"], devices=devices, cache=cache, save=False)
    for row in rows:
        try:
            pred = predict_speed(row["_plan"], cache.model_for(devices, None) if model is not None else None,
                                 n_prompt=p, n_gen=n)
            row["predicted_calibrated"] = {"pp_ts": pred.pp_tokens_per_s, "tg_ts": pred.tg_tokens_per_s,
                                           "pp_error": pred.pp_tokens_per_s / row["pp_ts"] - 1,
                                           "tg_error": pred.tg_tokens_per_s / row["tg_ts"] - 1,
                                           "held_out": row is not rows[0] and row is not rows[1]}
        except Exception as e:   # noqa: BLE001 - recorded in the row; the bench goes on
            row["predicted_calibrated"] = {"error": f"{type(e).__name__}: {e}"}


# --- 4. re-split latency ----------------------------------------------------------------------------

def resplit_latency(t: Truth, models: dict) -> dict:
    from resplit import fresh_process_seconds

    from gpulab.core.config import SplitConfig
    model = models["dense"]
    half = 4 if t.quick else 16
    a, b = SplitConfig(n_ctx=512), SplitConfig(n_ctx=512, n_gpu_layers=half)
    # an RPC server serves one client at a time: the fresh process gets a server of its own
    eps = t.endpoints(2)[1:] if t.quick else []
    resplits, fresh = [], []
    with t.primary_worker() as w:
        rm = w.open(model, a)
        try:
            for i in range(3):
                rm.resplit(b if i % 2 == 0 else a)
                resplits.append(rm.ready_seconds)
                fresh.append(fresh_process_seconds(str(model), b if i % 2 == 0 else a, eps))
        finally:
            rm.close()
    out = {"resplit_s": resplits, "fresh_process_s": fresh,
           "ratio_median": statistics.median(resplits) / statistics.median(fresh)}
    if t.args.llama_bench:
        t0 = time.perf_counter()
        subprocess.run([t.args.llama_bench, "-m", str(model), "-p", "0", "-n", "1", "-r", "1", "-ngl", str(half)],
                       check=True, capture_output=True)
        out["fresh_llama_bench_s"] = time.perf_counter() - t0
    return out


# --- 5. the monitor on NVML, and a CUDA out-of-memory -------------------------------------------------

def monitor(t: Truth, models: dict) -> dict:
    from gpulab.sources.nvml import NvmlProbe
    probe = NvmlProbe()
    if not probe.available():
        return {"skipped": f"no NVML here ({probe.unavailable_reason})"}
    phase = {"name": "idle"}
    samples: list[tuple[float, str, int | None, int | None]] = []
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            g = probe.devices()[0]
            samples.append((time.monotonic(), phase["name"], g.utilization_gpu_percent, g.used_bytes))
            stop.wait(0.02)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    try:
        time.sleep(0.3)
        with t.primary_worker() as w:
            w.measure(models["dense"], None, n_prompt=512, n_gen=256, repetitions=3,
                      progress=lambda ph, f: phase.update(name=ph))
        phase["name"] = "after"
        time.sleep(0.3)
    finally:
        stop.set()
        th.join()
    by_phase: dict[str, dict] = {}
    for name in dict.fromkeys(s[1] for s in samples):
        ss = [s for s in samples if s[1] == name]
        util = [s[2] for s in ss if s[2] is not None]
        by_phase[name] = {"n": len(ss), "util_mean": statistics.mean(util) if util else None,
                          "used_max_gib": max((s[3] or 0) for s in ss) / GiB}
    return {"interval_s": 0.02, "n_samples": len(samples), "phases": by_phase}


def oom(t: Truth, models: dict) -> dict:
    from gpulab.core.config import SplitConfig
    from gpulab.core.errors import LoadError
    if t.quick:
        return {"skipped": "CPU RPC devices have no allocation limit that fails cleanly (quick mode)"}
    cfg = SplitConfig(n_ctx=1_400_000)   # 8B f16 KV: 128 KiB per token, ~171 GiB > the H200's 141 GB
    with t.primary_worker() as w:
        try:
            w.load(models["dense"], cfg, check_fit=False)
            return {"error": "the load succeeded: no out-of-memory to report"}
        except LoadError as e:
            msg = str(e)
        alive = w.alive
        # the next load in the same worker works
        rep, _ = w.load(models["dense"], SplitConfig(n_ctx=512))
    return {"message": msg[:600], "worker_alive_after": alive, "next_load_layers": len(rep.layer_devices)}


# --- summary -----------------------------------------------------------------------------------------

def summary(results: dict) -> str:
    s = results["sections"]
    lines = [f"## GPU truth ({results['mode']}), {results['date']}", ""]
    f = s.get("facts", {})
    if f and "error" not in f:
        gpus = ", ".join(g["name"] for g in f.get("gpus", [])) or "none"
        lines += [f"GPU: {gpus}; driver {f.get('driver', '-')}; llama.cpp {f.get('build')}; {f.get('cpu_decision')}", ""]
    fi = s.get("fidelity", {})
    if "pp" in fi:
        lines += ["| fidelity | llama-bench t/s | gpulab t/s | ratio of means | ratio of best |", "|---|---|---|---|---|"]
        for k in ("pp", "tg"):
            x = fi[k]
            lines.append(f"| {k}{fi['p'] if k == 'pp' else fi['n']} | {x['llama_bench_ts']:.1f} | {x['gpulab_ts']:.1f} | "
                         f"{x['ratio_of_means']:.3f} | {x['ratio_of_best']:.3f} |")
        ro = fi.get("roofline", {})
        if ro.get("fraction"):
            lines.append(f"\nroofline: tg reads {ro['bytes_per_token'] / GiB:.2f} GiB/token -> "
                         f"{ro['tg_bytes_per_s'] / 1e12:.2f} TB/s of {ro['copy_bytes_per_s'] / 1e12:.2f} TB/s copy "
                         f"({ro['fraction'] * 100:.0f}%)")
        lines.append("")
    me = s.get("memory", {})
    if "rows" in me:
        lines += ["| memory config | placement | weights | KV | compute | NVML (with learned overhead) |",
                  "|---|---|---|---|---|---|"]
        for row in me["rows"]:
            if "error" in row:
                lines.append(f"| {row['config']} | error: {row['error'][:80]} | | | | |")
                continue

            def pct(x):
                return f"{x * 100:+.2f}%" if x is not None else "-"
            nv = pct(row["nvml"]["rel_error"]) if "nvml" in row else "-"
            lines.append(f"| {row['config']} | {'exact' if row['placement_exact'] else 'DIFFERS'} | "
                         f"{pct(row['model']['rel_error'])} | {pct(row['kv']['rel_error'])} | "
                         f"{pct(row['compute']['rel_error'])} | {nv} |")
        lines.append("")
    tw = s.get("two_devices", {})
    if "rows" in tw:
        lines += ["| two devices | placement | pp t/s | tg t/s | pp vs one | tg vs one | predicted pp / tg (calibrated) |",
                  "|---|---|---|---|---|---|---|"]
        for row in tw["rows"]:
            pc = row.get("predicted_calibrated", {})
            pred = (f"{pc['pp_ts']:.0f} / {pc['tg_ts']:.1f} ({pc['pp_error'] * 100:+.0f}% / {pc['tg_error'] * 100:+.0f}%"
                    f"{', held out' if pc['held_out'] else ''})") if "pp_ts" in pc else pc.get("error", "-")[:60]
            lines.append(f"| {row['config']} | {'exact' if row['placement_exact'] else 'DIFFERS'} | {row['pp_ts']:.0f} | "
                         f"{row['tg_ts']:.1f} | {row['pp_vs_one']:.2f} | {row['tg_vs_one']:.2f} | {pred} |")
        lines.append("")
    rs = s.get("resplit", {})
    if "ratio_median" in rs:
        lines.append(f"re-split: median {statistics.median(rs['resplit_s']):.2f} s vs fresh process "
                     f"{statistics.median(rs['fresh_process_s']):.2f} s (ratio {rs['ratio_median']:.2f})"
                     + (f"; fresh llama-bench load+1 token {rs['fresh_llama_bench_s']:.2f} s" if "fresh_llama_bench_s" in rs else ""))
    mo = s.get("monitor", {})
    if "phases" in mo:
        lines.append("monitor: " + "; ".join(f"{k} util {v['util_mean']:.0f}% ({v['n']} samples)"
                                             for k, v in mo["phases"].items() if v["util_mean"] is not None))
    oo = s.get("oom", {})
    if "message" in oo:
        lines.append(f"OOM: worker alive after: {oo['worker_alive_after']}; message: {oo['message'][:200]}")
    for name, sec in s.items():
        if "error" in sec:
            lines.append(f"{name}: ERROR {sec['error'][:300]}")
        elif "skipped" in sec:
            lines.append(f"{name}: skipped ({sec['skipped']})")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="CPU RPC devices and tiny models (the test suite's run)")
    ap.add_argument("--out", default=str(REPO / "test-artifacts" / "gpu-truth"))
    ap.add_argument("--models-dir", default=None, help="where the synthetic models are written (default OUT/../models)")
    ap.add_argument("--write-models", action="store_true", help="only write the models, then exit")
    ap.add_argument("--llama-bench", default=None, help="llama-bench from the same build")
    ap.add_argument("--threads", type=int, default=None, help="-t for both sides (default: llama-bench's)")
    ap.add_argument("--budget-s", type=float, default=420, help="stop starting sections after this many seconds")
    ap.add_argument("--sections", default="facts,fidelity,memory,two_devices,resplit,monitor,oom")
    a = ap.parse_args(argv)
    if a.threads is None:
        from gpulab.sources.host import default_threads
        a.threads = default_threads()
    models_dir = Path(a.models_dir) if a.models_dir else Path(a.out).parent / "truth-models"
    models = write_models(models_dir, a.quick)
    if a.write_models:
        return 0
    t = Truth(a)
    steps = {"facts": lambda: facts(t), "fidelity": lambda: fidelity(t, models), "memory": lambda: memory(t, models),
             "two_devices": lambda: two_devices(t, models), "resplit": lambda: resplit_latency(t, models),
             "monitor": lambda: monitor(t, models), "oom": lambda: oom(t, models)}
    try:
        for name in a.sections.split(","):
            t.section(name, steps[name])
    finally:
        t.stop()
    text = summary(t.results)
    (Path(a.out) / "gpu_truth.md").write_text(text + "\n")
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
