"""Replay speed: plan() and server_fit() on architectures whose compute buffers are replayed op by op
(gpulab.core.placement.ggml_replay through recurrent.py, dense.py, compute_encoder.py), at realistic
layer counts, against a llama-architecture reference of the same depth (closed forms) in the same run.

The models are gpulab.sources.arch_models' (the matrix's) with their blocks repeated to N layers
(`scaled_model`: the layer pattern's last period repeated, per-layer keys with it), written as sparse
GGUFs to a temporary folder and read back with read_profile.

Three times per model and depth, best of a few rounds, each over distinct settings (nothing remembered
from an earlier call: every call is a new -ts, as a slider drag makes):
- plan(): one plan on 4 devices, a new -ts each call;
- fit: server_fit() on 4 devices too small for the whole model (its dry runs are plans);
- the ratio of each to the llama reference's, so the load of the machine mostly cancels.

    .venv/bin/python bench/replay_speed.py [--layers 32,64,128] [--arch qwen3next,dbrx] [--profile]
    GPULAB_BENCH_SRC=/tmp/before .venv/bin/python bench/replay_speed.py   # another checkout's gpulab
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, os.environ.get("GPULAB_BENCH_SRC") or str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parent))
from benchkit import loadavg

from gpulab import SplitConfig, parse_sim_spec, plan, read_profile
from gpulab.core.policies.server_fit import server_fit
from gpulab.sources.arch_models import _model, write_gguf

# architecture -> the period of its layer pattern (attention every 4th layer for qwen3next, ...)
ARCHS = {"llama": 1, "qwen3next": 4, "mamba2": 1, "lfm2": 3, "falcon": 1, "dbrx": 1, "dots1": 1, "bert": 1}
REPLAYED = {"qwen3next": "recurrent", "mamba2": "recurrent", "lfm2": "recurrent", "falcon": "dense",
            "dbrx": "dense MoE", "dots1": "dense MoE", "bert": "encoder", "llama": "closed form"}
_BLK = re.compile(r"^blk\.(\d+)\.")


def scaled_model(arch: str, n_layer: int, path: Path) -> Path:
    """`arch`'s matrix model with n_layer blocks: layer i >= the original count copies the layer at the same
    place in the pattern's last period."""
    kv, tensors = _model(arch)
    n_old = next(int(v) for k, (_, v) in kv.items() if k.endswith(".block_count"))
    period = ARCHS[arch]

    def src(i: int) -> int:
        return i if i < n_old else n_old - period + (i - n_old) % period

    new_kv: dict = {}
    for k, (t, v) in kv.items():
        if k.endswith(".block_count"):
            v = n_layer
        elif isinstance(v, list) and len(v) == n_old:
            v = [v[src(i)] for i in range(n_layer)]
        new_kv[k] = (t, v)
    head = [x for x in tensors[:next(j for j, x in enumerate(tensors) if _BLK.match(x[0]))] if not _BLK.match(x[0])]
    tail = [x for x in tensors[len(head):] if not _BLK.match(x[0])]
    per_layer: dict[int, list] = {}
    for name, shape, gtype in tensors:
        m = _BLK.match(name)
        if m:
            per_layer.setdefault(int(m.group(1)), []).append((name[m.end():], shape, gtype))
    body = [(f"blk.{i}.{rest}", shape, gtype) for i in range(n_layer) for rest, shape, gtype in per_layer[src(i)]]
    return write_gguf(path, arch, new_kv, head + body + tail)


def moves() -> Iterator[tuple[int, ...]]:
    """Boundary moves of up to 3 layers (343), each used once per profile."""
    return itertools.product(range(-3, 4), repeat=3)


def _configs(n_layer: int, n: int, mv: Iterator[tuple[int, ...]]) -> list[SplitConfig]:
    """n 4-device splits by layer counts (as the lab's strip sends), each a placement not seen before for this
    profile: no call finds its answer remembered from an earlier one."""
    q = (n_layer + 1) // 4
    out = []
    for d1, d2, d3 in itertools.islice(mv, n):
        counts = (q + d1, q - d1 + d2, q - d2 + d3, n_layer + 1 - 3 * q - d3)
        out.append(SplitConfig(tensor_split=tuple(float(c) for c in counts), n_ctx=8192))
    return out


def time_plans(prof, devices, n: int, mv: Iterator[tuple[int, ...]]) -> float:
    cfgs = _configs(prof.n_layer, n, mv)
    assert len(cfgs) == n
    t = time.perf_counter()
    for c in cfgs:
        plan(prof, devices, c)
    return (time.perf_counter() - t) / n


def time_fit(prof, k0: int) -> tuple[float, str]:
    """server_fit on 4 devices whose room beyond fit's 1 GiB margin holds about 60% of the weights: a new -c
    each call."""
    devices = parse_sim_spec(f"4x{1024 + int(prof.weights_bytes * 0.6 / 4 / 2**20)}MiB")
    t = time.perf_counter()
    r = server_fit(prof, devices, SplitConfig(n_ctx=4096 + 256 * k0))
    return time.perf_counter() - t, f"{r.status} -ngl {r.config.n_gpu_layers}, {len(r.overrides)} -ot"


def measure(layers: list[int], archs: list[str], rounds: int, n_plans: int) -> dict[str, list]:
    """{"arch/n": [plan s, fit s, fit's answer]}, best of `rounds`, the llama reference first at each depth."""
    tmp = Path(tempfile.mkdtemp(prefix="gpulab-replay-bench-"))
    devices = parse_sim_spec("4x80GiB")
    out: dict[str, list] = {}
    for n in layers:
        for arch in ["llama"] + [x for x in archs if x != "llama"]:
            prof = read_profile(scaled_model(arch, n, tmp / f"{arch}-{n}.gguf"))
            mv = moves()
            tp = min(time_plans(prof, devices, n_plans, mv) for _ in range(rounds))
            fits = [time_fit(prof, r + 1) for r in range(rounds)]
            out[f"{arch}/{n}"] = [tp, min(f[0] for f in fits), fits[0][1]]
    return out


def run_pair(a: argparse.Namespace) -> None:
    """This checkout and --ref's, alternately, each in a fresh process; best of the repeats."""
    import json
    import subprocess
    best: dict[str, dict[str, list]] = {"ref": {}, "here": {}}
    here = str(Path(__file__).resolve().parents[1])
    loads = [loadavg()]
    for _ in range(a.repeats):
        for side, src in (("ref", a.ref), ("here", here)):
            env = dict(os.environ, GPULAB_BENCH_SRC=src)
            r = subprocess.run([sys.executable, __file__, "--layers", a.layers, "--arch", a.arch, "--rounds",
                                str(a.rounds), "--plans", str(a.plans), "--json", "-"], env=env,
                               capture_output=True, text=True)
            if r.returncode:
                raise SystemExit(f"{side} ({src}) failed:\n{r.stderr[-3000:]}")
            for k, v in json.loads(r.stdout).items():
                old = best[side].get(k)
                best[side][k] = v if old is None else [min(old[0], v[0]), min(old[1], v[1]), v[2]]
    loads.append(loadavg())
    print(f"load average {loads[0]} (before), {loads[1]} (after); python {sys.version.split()[0]}; "
          f"{os.cpu_count()} CPUs; best of {a.repeats} fresh processes each, alternating")
    print("| model | layers | compute by | plan() before | plan() after | speed-up | after / llama "
          "| fit before | fit after | speed-up | after / llama | fit's answer (same both) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for k, (tp, tf, ans) in best["here"].items():
        arch, n = k.split("/")
        rp, rf, rans = best["ref"][k]
        lp, lf, _ = best["here"][f"llama/{n}"]
        same = ans if ans == rans else f"DIFFERENT: {rans} / {ans}"
        print(f"| {arch} | {n} | {REPLAYED[arch]} | {rp * 1e3:.2f} ms | {tp * 1e3:.2f} ms | {rp / tp:.1f}x "
              f"| {tp / lp:.1f}x | {rf * 1e3:.0f} ms | {tf * 1e3:.0f} ms | {rf / tf:.1f}x | {tf / lf:.1f}x | {same} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", default="32,64,128")
    ap.add_argument("--arch", default=",".join(ARCHS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--plans", type=int, default=8)
    ap.add_argument("--ref", help="another checkout: before/after, alternately, in fresh processes")
    ap.add_argument("--repeats", type=int, default=2, help="with --ref: processes per side")
    ap.add_argument("--json", help="write the figures to this file ('-': stdout, nothing else)")
    ap.add_argument("--profile", help="cProfile one arch:layers plan series and print the top functions")
    a = ap.parse_args()
    if a.ref:
        run_pair(a)
        return
    if a.profile:
        import cProfile
        import pstats
        tmp = Path(tempfile.mkdtemp(prefix="gpulab-replay-bench-"))
        arch, n = a.profile.split(":")
        prof = read_profile(scaled_model(arch, int(n), tmp / "m.gguf"))
        devices = parse_sim_spec("4x80GiB")
        cProfile.runctx("time_plans(prof, devices, a.plans, moves())", globals(), locals(), str(tmp / "p.out"))
        pstats.Stats(str(tmp / "p.out")).sort_stats("tottime").print_stats(25)
        return
    layers = [int(x) for x in a.layers.split(",")]
    if a.json:
        import json
        res = measure(layers, a.arch.split(","), a.rounds, a.plans)
        text = json.dumps(res)
        print(text) if a.json == "-" else Path(a.json).write_text(text)
        return
    print(f"load average {loadavg()} (before)")
    print("| model | layers | compute by | plan() | ratio to llama | fit | ratio to llama | fit's answer |")
    print("|---|---|---|---|---|---|---|---|")
    for n in layers:
        res = measure([n], a.arch.split(","), a.rounds, a.plans)
        lp, lf, _ = res[f"llama/{n}"]
        for k, (tp, tf, ans) in res.items():
            arch = k.split("/")[0]
            print(f"| {arch} | {n} | {REPLAYED[arch]} | {tp * 1e3:.2f} ms | {tp / lp:.1f}x "
                  f"| {tf * 1e3:.0f} ms | {tf / lf:.1f}x | {ans} |", flush=True)
    print(f"load average {loadavg()} (after); python {sys.version.split()[0]}; {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
