"""gpulab's in-process pp/tg against llama-bench, same llama.cpp, same model, same settings, one run.

    .venv/bin/python bench/llama_bench_compare.py                 # demo model + synthetic 1B Q4_0
    .venv/bin/python bench/llama_bench_compare.py --rounds 3 --models demo
    .venv/bin/python bench/llama_bench_compare.py --build-only    # just build llama-bench

llama-bench is built by scripts/llama-tools.sh from the llama.cpp vendored in the pinned
llama-cpp-python sdist (the same source as the installed wheel's libllama), with the same
CPU-feature decision as the wheel (gpulab/sources/cpu_features.py), once per build key.

Each round runs llama-bench, gpulab.runtime.bench.measure in this process, and the same through a
gpulab worker process (what `gpulab bench`, `sweep` and `tune` use) on the same model with the
same -t/-b/-ub/-p/-n/-r, rotating which goes first, and the table gives each gpulab side /
llama-bench for pp and tg per round, then over all rounds two ways: the ratio of the means, and the ratio of
the best single repetitions (the fastest of rounds x -r samples per side: on a shared machine
the least disturbed one, and so the steadiest figure of what each loop can do). A benchmark,
not a test: the ratios are what matter (target >= 0.97 on CPU), and other work on the machine
moves both sides; /proc/loadavg is printed with every round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchkit import loadavg  # noqa: E402 (after the path set-up)


def cache_dir() -> Path:
    """Where the synthetic models live between runs."""
    return Path(os.environ.get("GPULAB_BENCH_CACHE", Path.home() / ".cache" / "gpulab" / "llama-bench"))


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def loadavg1() -> str:
    return loadavg().split(" ")[0]


# --- building llama-bench ---------------------------------------------------------------------

def build_llama_bench() -> tuple[Path, float | None]:
    """(path of llama-bench, seconds the build took or None when reused), from scripts/llama-tools.sh:
    the vendored source, built with the same CPU-feature decision as the installed wheel."""
    tools = REPO / "scripts" / "llama-tools.sh"
    env = dict(os.environ, PY=sys.executable)
    found = subprocess.run([str(tools), "--find-only", "llama-bench"], capture_output=True, text=True, env=env)
    if found.returncode == 0:
        return Path(found.stdout.strip()) / "llama-bench", None
    t0 = time.perf_counter()
    out = subprocess.run([str(tools), "llama-bench"], stdout=subprocess.PIPE, text=True, env=env, check=True)
    return Path(out.stdout.strip()) / "llama-bench", time.perf_counter() - t0


# --- models -------------------------------------------------------------------------------------

def synth_1b(root: Path) -> Path:
    """A Llama-3.2-1B-shaped model with random Q4_0 weights (16 layers, n_embd 2048, vocab 128256)."""
    from gpulab.sources.synth import SynthSpec, write_model
    spec = SynthSpec(arch="llama", n_layer=16, n_embd=2048, n_ff=8192, n_head=32, n_head_kv=8,
                     n_vocab=128256, n_ctx_train=8192, tied_output=True, weight_type="Q4_0",
                     name="llama-1b-q4_0-synth")
    path = root / "models" / "llama-1b-q4_0-synth.gguf"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        log(f"writing {path.name}")
        write_model(path.with_suffix(".tmp"), spec)
        path.with_suffix(".tmp").rename(path)
    return path


# --- one side each --------------------------------------------------------------------------------

def run_llama_bench(exe: Path, model: Path, a, libs: str) -> dict:
    cmd = [str(exe), "-m", str(model), "-p", str(a.p), "-n", str(a.n), "-r", str(a.r), "-t", str(a.t),
           "-b", str(a.b), "-ub", str(a.ub), "-o", "json"]
    env = dict(os.environ)
    if libs == "wheel":   # LD_LIBRARY_PATH is searched before the build tree's RUNPATH
        from gpulab.runtime.llama_lib import lib_dir
        env["LD_LIBRARY_PATH"] = str(lib_dir())
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    recs = json.loads(out)
    return {("pp" if r["n_prompt"] else "tg"): (r["avg_ts"], max(r["samples_ts"])) for r in recs}


def run_gpulab(model: Path, a) -> dict:
    from gpulab.core.config import SplitConfig
    from gpulab.runtime.bench import measure
    # llama-bench's context: n_ctx = n_prompt + n_gen (to_llama_cparams), batch sizes as given
    cfg = SplitConfig(n_ctx=a.p + a.n, n_batch=a.b, n_ubatch=a.ub)
    run = measure(model, cfg, n_prompt=a.p, n_gen=a.n, repetitions=a.r, n_threads=a.t)
    return {"pp": (run.pp.avg_ts, max(run.pp.samples_ts)), "tg": (run.tg.avg_ts, max(run.tg.samples_ts))}


def run_gpulab_worker(model: Path, a, worker) -> dict:
    from gpulab.core.config import SplitConfig
    cfg = SplitConfig(n_ctx=a.p + a.n, n_batch=a.b, n_ubatch=a.ub)
    run = worker.measure(model, cfg, n_prompt=a.p, n_gen=a.n, repetitions=a.r, n_threads=a.t)
    return {"pp": (run.pp.avg_ts, max(run.pp.samples_ts)), "tg": (run.tg.avg_ts, max(run.tg.samples_ts))}


def in_loop_share(model: Path, a) -> dict:
    """The share of gpulab's timed wall time that llama.cpp itself accounts for.

    With llama_context_params.no_perf off, llama.cpp times each decode from its start to the
    llama_synchronize that ends it (t_p_eval for batches, t_eval for single tokens): the same
    intervals gpulab's loop times, less the Python between the calls. Other work on the machine
    slows both alike, so this ratio stays put where the ratios to llama-bench wander."""
    from gpulab.core.config import SplitConfig
    from gpulab.runtime import llama_lib
    from gpulab.runtime.bench import measure_loaded
    from gpulab.runtime.model import open_model
    lc = llama_lib.llama_cpp()
    cfg = SplitConfig(n_ctx=a.p + a.n, n_batch=a.b, n_ubatch=a.ub)
    with open_model(model, cfg, context_params={"no_perf": False}) as m:
        measure_loaded(m, n_prompt=a.p, n_gen=a.n, repetitions=1, n_threads=a.t, nvml=False)   # warm-up
        lc.llama_perf_context_reset(m.ctx)
        run = measure_loaded(m, n_prompt=a.p, n_gen=a.n, repetitions=a.r, n_threads=a.t, warmup=False, nvml=False)
        perf = lc.llama_perf_context(m.ctx)
    return {"pp": perf.t_p_eval_ms * 1e6 / sum(run.pp.samples_ns),
            "tg": perf.t_eval_ms * 1e6 / sum(run.tg.samples_ns),
            "n": (perf.n_p_eval, perf.n_eval)}


# --- main -----------------------------------------------------------------------------------------

def main(argv=None) -> int:
    from gpulab.runtime.bench import default_threads
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="demo,synth-1b", help="comma list of: demo, synth-1b, or GGUF paths")
    ap.add_argument("--rounds", type=int, default=4, help="alternating rounds (ABBA order)")
    ap.add_argument("-p", type=int, default=None, help="prompt tokens (default 512; 128 for synth-1b)")
    ap.add_argument("-n", type=int, default=None, help="generated tokens (default 128; 32 for synth-1b)")
    ap.add_argument("-r", type=int, default=None, help="repetitions (default 5; 3 for synth-1b)")
    ap.add_argument("-t", type=int, default=default_threads(), help="threads (default: llama-bench's)")
    ap.add_argument("-b", type=int, default=2048)
    ap.add_argument("-ub", type=int, default=512)
    ap.add_argument("--libs", choices=("own", "wheel"), default="own",
                    help="llama-bench with its own build's libraries (default), or the wheel's libllama")
    ap.add_argument("--nice", type=int, default=0,
                    help="change this process's niceness first (both sides inherit it; negative needs root): "
                         "on a machine others use, both loops then get a steadier share of the CPU")
    ap.add_argument("--build-only", action="store_true")
    a = ap.parse_args(argv)
    if a.nice:
        os.nice(a.nice)

    exe, build_s = build_llama_bench()
    build_note = f"built in {build_s:.0f} s" if build_s is not None else "reused"
    log(f"llama-bench: {exe} ({build_note})")
    if a.build_only:
        return 0

    from gpulab.sources.demo import demo_model_path
    models = []
    for m in a.models.split(","):
        m = m.strip()
        if m == "demo":
            models.append(("SmolLM2-135M Q4_1 (demo)", Path(demo_model_path()), (512, 128, 5)))
        elif m == "synth-1b":
            models.append(("synthetic Llama 1B Q4_0", synth_1b(cache_dir()), (128, 32, 3)))
        elif m:
            models.append((Path(m).name, Path(m), (512, 128, 5)))

    print(f"loadavg at start: {loadavg()}; threads {a.t}; n_batch {a.b}; n_ubatch {a.ub}; "
          f"llama-bench libs: {a.libs}; niceness {os.nice(0)}; python {sys.version.split()[0]}")
    print()
    print("| model | test | round | loadavg | llama-bench t/s | gpulab t/s | gpulab worker t/s "
          "| gpulab / llama-bench | worker / llama-bench |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|")
    from gpulab.runtime.worker import Worker
    summary = []
    with Worker() as worker:
        for label, path, (dp, dn, dr) in models:
            ma = argparse.Namespace(**vars(a))
            ma.p, ma.n, ma.r = a.p or dp, a.n or dn, a.r or dr
            sides = [("lb", lambda path=path, ma=ma: run_llama_bench(exe, path, ma, a.libs)),
                     ("gl", lambda path=path, ma=ma: run_gpulab(path, ma)),
                     ("wk", lambda path=path, ma=ma: run_gpulab_worker(path, ma, worker))]
            per: dict[str, list[dict]] = {"pp": [], "tg": []}
            for k in range(a.rounds):
                load = loadavg1()
                got = {}
                for name, fn in sides[k % 3:] + sides[:k % 3]:     # each side goes first in turn
                    got[name] = fn()
                for test in ("pp", "tg"):
                    row = {side: got[side][test] for side in got}
                    per[test].append(row)
                    tname = f"pp{ma.p}" if test == "pp" else f"tg{ma.n}"
                    print(f"| {label} | {tname} | {k + 1} | {load} | {row['lb'][0]:.2f} | {row['gl'][0]:.2f} | "
                          f"{row['wk'][0]:.2f} | {row['gl'][0] / row['lb'][0]:.3f} | "
                          f"{row['wk'][0] / row['lb'][0]:.3f} |", flush=True)
            for test in ("pp", "tg"):
                tname = f"pp{ma.p}" if test == "pp" else f"tg{ma.n}"
                mean = {side: statistics.fmean(r[side][0] for r in per[test]) for side in ("lb", "gl", "wk")}
                best = {side: max(r[side][1] for r in per[test]) for side in ("lb", "gl", "wk")}
                summary.append((label, tname, mean, best))
                for how, v in (("mean of all", mean), ("best repetition", best)):
                    print(f"| {label} | {tname} | {how} | | {v['lb']:.2f} | {v['gl']:.2f} | {v['wk']:.2f} | "
                          f"**{v['gl'] / v['lb']:.3f}** | **{v['wk'] / v['lb']:.3f}** |", flush=True)
    print()
    print("In-loop share: of gpulab's timed wall time, the part llama.cpp's own decode timers account for")
    print("(llama_perf_context with no_perf off; the rest is the Python loop between calls):")
    print()
    print("| model | pp | tg |")
    print("|---|---:|---:|")
    for label, path, (dp, dn, dr) in models:
        ma = argparse.Namespace(**vars(a))
        ma.p, ma.n, ma.r = a.p or dp, a.n or dn, a.r or dr
        sh = in_loop_share(path, ma)
        print(f"| {label} | {100 * sh['pp']:.2f}% (pp{ma.p}) | {100 * sh['tg']:.2f}% (tg{ma.n}) |", flush=True)
    print()
    print(f"loadavg at end: {loadavg()}")
    for side, what in (("gl", "in-process"), ("wk", "worker")):
        worst_mean = min(m[side] / m["lb"] for _, _, m, _ in summary)
        worst_best = min(b[side] / b["lb"] for _, _, _, b in summary)
        print(f"{what}: lowest ratio, means: {worst_mean:.3f}; best repetitions: {worst_best:.3f} "
              f"(target >= 0.97: {'met' if worst_best >= 0.97 else 'MISSED'} on the best repetitions)")
    print("command: " + " ".join([Path(sys.executable).name, *sys.argv]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
