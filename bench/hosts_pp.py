"""Why pp over the fast emulated link missed its prediction (issue 24): what crosses the link per
prompt, counted on the shaping proxies (bytes each way, the server's answers after the head spoke,
RPC commands by kind) against network_cost, and the prompt's time at loopback and at a profile
measured alternately, many times, so that the machine's noise shows beside the link's cost.

    PYTHONPATH=$PWD .venv/bin/python bench/hosts_pp.py [--rounds 8] [--profile fast] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchkit import loadavg
from hosts import cluster_at

from gpulab.core.config import SplitConfig
from gpulab.core.measure.network import network_cost
from gpulab.core.placement.planner import plan
from gpulab.netem import PROFILES, ShapingProxy
from gpulab.runtime.rpc import start_servers
from gpulab.runtime.worker import Worker
from gpulab.sources.demo import demo_model_path
from gpulab.sources.host import host_device
from gpulab.sources.read import read_profile

CMD = {6: "SET_TENSOR", 8: "GET_TENSOR", 9: "COPY_TENSOR", 10: "GRAPH_COMPUTE", 16: "GRAPH_RECOMPUTE",
       5: "BUFFER_CLEAR", 17: "MEMSET_TENSOR"}


def _snap(proxies) -> list:
    return [(p.bytes_up[0], p.bytes_down[0], p.turns[0],
             {**p.commands, **{k + 100: v for k, v in p.command_bytes.items()}}) for p in proxies]


def _per_prompt(a: list, b: list, n: int) -> list:
    out = []
    for (u0, d0, t0, c0), (u1, d1, t1, c1) in zip(a, b):
        cmds = {CMD.get(k, str(k)) if k < 100 else CMD.get(k - 100, str(k - 100)) + " B": (c1.get(k, 0) - c0.get(k, 0)) / n for k in set(c0) | set(c1)}
        out.append({"up": (u1 - u0) / n, "down": (d1 - d0) / n, "turns": (t1 - t0) / n,
                    "commands": {k: v for k, v in sorted(cmds.items()) if v}})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--repetitions", type=int, default=5)
    ap.add_argument("--n-prompt", type=int, default=64)
    ap.add_argument("--profile", default="fast")
    ap.add_argument("--json")
    ap.add_argument("--verbose", action="store_true")
    a = ap.parse_args(argv)
    t_start, load_before = time.monotonic(), loadavg()
    path = demo_model_path()
    prof = read_profile(path)
    base = SplitConfig(n_ctx=256, n_batch=a.n_prompt, n_ubatch=a.n_prompt, flash_attn="off")
    placements = {"one host": base.replace(devices=("RPC0",)), "two hosts 1/1": base.replace(tensor_split=(1.0, 1.0))}
    shaped = PROFILES[a.profile]
    out: dict = {"args": vars(a), "placements": {}}
    with start_servers(2, threads=1) as servers:
        proxies = [ShapingProxy(("127.0.0.1", s.port), bytes_per_s=None, lifetime_s=1800,
                                count_commands=True).start() for s in servers]
        try:
            ports = [p.port for p in proxies]
            with Worker([p.endpoint for p in proxies]) as w:
                devices = [d for d in w.devices() if d.kind == "rpc"]
                for label, cfg in placements.items():
                    p = plan(prof, devices, cfg, host_device())
                    host_of = {d.name: f"h{i}" for i, d in enumerate(devices)}
                    endpoint_of = {d.name: d.endpoint for d in devices}
                    net = network_cost(p, cluster_at(ports, shaped), host_of, endpoint_of, n_prompt=a.n_prompt, n_gen=1)
                    m = w.open(path, cfg)
                    try:
                        # counts per prompt: 6 prompts (warm-up + 5) less 2 (warm-up + 1)
                        s0 = _snap(proxies)
                        m.measure(n_prompt=a.n_prompt, n_gen=0, repetitions=1, n_threads=1)
                        s1 = _snap(proxies)
                        m.measure(n_prompt=a.n_prompt, n_gen=0, repetitions=5, n_threads=1)
                        s2 = _snap(proxies)
                        one, six = _per_prompt(s0, s1, 1), _per_prompt(s1, s2, 1)
                        if a.verbose:
                            print(f"  raw, 2 prompts: {one}\n  raw, 6 prompts: {six}")
                        counted = [{k: (six[i][k] - one[i][k]) / 4 for k in ("up", "down", "turns")}
                                   | {"commands": {c: (six[i]["commands"].get(c, 0) - one[i]["commands"].get(c, 0)) / 4
                                                   for c in six[i]["commands"]}} for i in range(len(proxies))]
                        model = {h: {"up": u.bytes_up, "down": u.bytes_down, "round_trips": u.round_trips,
                                     "seconds": u.total_seconds} for h, u in net.pp.items()}
                        times: dict = {"loopback": [], a.profile: []}
                        for r in range(a.rounds):
                            order = ("loopback", a.profile) if r % 2 == 0 else (a.profile, "loopback")
                            for n in order:
                                for px in proxies:
                                    px.shape_as(PROFILES.get(n))
                                run = m.measure(n_prompt=a.n_prompt, n_gen=0, repetitions=a.repetitions, n_threads=1)
                                times[n].append([x / 1e9 for x in run.pp.samples_ns])
                    finally:
                        for px in proxies:
                            px.shape_as(None)
                        m.close()
                    res = {"counted": counted, "model": model, "times": times, "predicted_link_s": net.pp_seconds}
                    out["placements"][label] = res
                    print(f"\n{label}: per prompt (pp{a.n_prompt}, one ubatch)")
                    for i, c in enumerate(counted):
                        mm = model.get(f"h{i}")
                        if not c["up"] and not mm:
                            continue
                        print(f"  h{i} counted: up {c['up']:.0f} B, down {c['down']:.0f} B, answers {c['turns']:.1f}, "
                              f"commands {c['commands']}")
                        if mm:
                            print(f"  h{i} model:   up {mm['up']:.0f} B, down {mm['down']:.0f} B, round trips "
                                  f"{mm['round_trips']:.1f}, {mm['seconds'] * 1e3:.2f} ms at {a.profile}")
                    if not a.rounds:
                        continue
                    flat = {n: [x for rr in v for x in rr] for n, v in times.items()}
                    for n, v in flat.items():
                        q = statistics.quantiles(v, n=4)
                        print(f"  {n:9} prompt s: min {min(v):.3f}  q1 {q[0]:.3f}  median {q[1]:.3f}  q3 {q[2]:.3f}  "
                              f"max {max(v):.3f}  (n={len(v)}); best-round mean t/s {max(a.n_prompt / statistics.mean(r) for r in times[n]):.1f}")
                    paired = [statistics.median(x) - statistics.median(y) for x, y in zip(times[a.profile], times["loopback"])]
                    print(f"  link cost per prompt: predicted {net.pp_seconds * 1e3:.1f} ms; measured min-min "
                          f"{(min(flat[a.profile]) - min(flat['loopback'])) * 1e3:+.1f} ms, median-median "
                          f"{(statistics.median(flat[a.profile]) - statistics.median(flat['loopback'])) * 1e3:+.1f} ms, "
                          f"paired rounds {', '.join(f'{x * 1e3:+.0f}' for x in paired)} ms")
        finally:
            for px in proxies:
                px.stop()
    out.update(load_before=load_before, load_after=loadavg())
    print(f"load average before {load_before}, after {out['load_after']}; {time.monotonic() - t_start:.0f} s")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
