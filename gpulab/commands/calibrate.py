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

from .flags import add_json_flag
from .result import Result

__all__ = ["register", "run"]


def register(sub, frontend: str) -> None:
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
    add_json_flag(p, frontend, help="print the cache as JSON")
    p.set_defaults(run=run)


def run(a: argparse.Namespace, session) -> Result:
    from ..runtime.llama_lib import require
    require()   # llama-cpp-python: the `run` extra
    from ..core.devices import parse_endpoints
    from ..core.errors import ConfigError
    from ..runtime.calibrate import calibrate
    from ..sources.host import default_threads
    from ..storage.speed_cache import SpeedCache
    from ..ui.text import calibration_text, speed_cache_text
    cache = SpeedCache(a.cache)
    if a.show or getattr(a, "json", False):
        return Result(text=json.dumps(cache.data, indent=1) if getattr(a, "json", False) else
                      speed_cache_text(cache.path, cache.devices, cache.data.get("links", {}), len(cache.observations)),
                      data=cache.data)
    if a.rounds < 1 or a.repetitions < 1:
        raise ConfigError("--rounds and -r must be at least 1")
    endpoints = list(parse_endpoints(a.rpc))
    devices = [x.strip() for x in a.device.split(",") if x.strip()] or None
    threads = a.threads if a.threads is not None else default_threads()
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
    return Result(text=calibration_text(cal), objects={"calibration": cal})
