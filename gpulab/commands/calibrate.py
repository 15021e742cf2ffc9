"""`gpulab calibrate [--rpc HOST:PORT,...] [-t THREADS] [--rounds N]`: measure the devices for the
throughput model and cache what was measured (gpulab.runtime.calibrate explains what and how).

    gpulab calibrate --rpc 127.0.0.1:50052,127.0.0.1:50053 -t 1     # two RPC servers and the host
    gpulab calibrate --device CUDA0 --no-host                          # one GPU only
    gpulab calibrate --show                                            # what the cache knows

`gpulab plan` then predicts tokens/s from these figures, and says which device's speed comes
from a calibration, a spec, NVML or a default. Runs on RPC devices go through a worker process.
"""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["register"]


def register(sub) -> None:
    p = sub.add_parser("calibrate", help="measure device speeds for the throughput model and cache them",
                       description="Measure every device llama.cpp sees (and the host) with two small synthetic "
                                   "models and a 1/1 split per device pair, fit bandwidth, FLOP rate, overheads "
                                   "and the hop cost, and cache them for `gpulab plan` and the lab.")
    p.add_argument("--rpc", metavar="HOST:PORT,...", help="llama.cpp RPC servers to calibrate too")
    p.add_argument("--device", default="", metavar="NAME,...", help="calibrate only these offload devices")
    p.add_argument("-t", "--threads", type=int, default=None,
                   help="host threads (default: llama-bench's); the host is cached per thread count")
    p.add_argument("--no-host", action="store_true", help="do not calibrate the host CPU")
    p.add_argument("--no-hops", action="store_true", help="do not measure splits between devices")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure every config N times, interleaved, and take the median (busy machines)")
    p.add_argument("-r", "--repetitions", type=int, default=2)
    p.add_argument("--cache", metavar="PATH", help="cache file (default: <data dir>/speed.json)")
    p.add_argument("--show", action="store_true", help="print the cached figures, measure nothing")
    p.add_argument("--json", action="store_true", help="print the cache as JSON")
    p.set_defaults(func=_cmd_calibrate)


def _show(cache) -> str:
    from ..ui.text import render_table
    rows = []
    for key, e in cache.devices.items():
        fit = e.get("fit") or {}
        rows.append({"key": key, "name": e.get("name", ""),
                     "bandwidth": f"{fit['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s" if fit else "-",
                     "FLOP rate": f"{fit['flops_per_s'] / 1e9:.0f} GFLOP/s" if fit else "-",
                     "overhead": f"{fit['overhead_s'] * 1e6:.0f} us" if fit else "-",
                     "measurements": e.get("n_observations", 0), "updated": e.get("updated", "")})
    lines = [f"{cache.path}: {len(cache.observations)} measurements"]
    lines.append(render_table(rows, right=("bandwidth", "FLOP rate", "overhead", "measurements")) if rows
                 else "(no device calibrated yet: run `gpulab calibrate`)")
    for cls, ln in cache.data.get("links", {}).items():
        if "latency_s" in ln:
            lines.append(f"hop ({cls}): {ln['latency_s'] * 1e6:.0f} us + {ln['bytes_per_s'] / 1e9:.2f} GB/s")
    return "\n".join(lines)


def _cmd_calibrate(a: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..runtime.calibrate import SpeedCache, calibrate
    cache = SpeedCache(a.cache)
    if a.show or a.json:
        print(json.dumps(cache.data, indent=1) if a.json else _show(cache))
        return 0
    if a.rounds < 1 or a.repetitions < 1:
        raise ConfigError("--rounds and -r must be at least 1")
    endpoints = [x.strip() for x in a.rpc.split(",") if x.strip()] if a.rpc else []
    devices = [x.strip() for x in a.device.split(",") if x.strip()] or None
    threads = a.threads
    if threads is None:
        from ..runtime.bench import default_threads
        threads = default_threads()
    if endpoints:
        from ..runtime.rpc import probe
        for ep in endpoints:
            probe(ep)   # a clear error now, rather than a worker that llama.cpp aborts

    shown = [False]

    def progress(what: str, fraction: float) -> None:
        if sys.stderr.isatty():
            sys.stderr.write(f"\rcalibrating {what:<24} {100 * fraction:3.0f}%")
            sys.stderr.flush()
            shown[0] = True

    try:
        cal = calibrate(endpoints, devices=devices, n_threads=threads, host=not a.no_host, hops=not a.no_hops,
                        rounds=a.rounds, repetitions=a.repetitions, cache=cache, progress=progress)
    finally:
        if shown[0]:
            sys.stderr.write("\r" + " " * 60 + "\r")
    print(cal.text())
    return 0
