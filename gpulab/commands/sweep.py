"""`gpulab sweep MODEL [llama-bench grid flags]`: measure a grid of placements, resumably.

    gpulab sweep model.gguf --rpc 127.0.0.1:50052,127.0.0.1:50053 -ts 1/1,3/1 -fa on,off -ub 64,128 \\
        -p 128 -n 32 -r 3 -o md

Grid flags take llama-bench's lists and ranges (-ngl 10-40+10, -ts 1/1,3/1; see
gpulab.core.measure.sweep_grid). Results go to the results store as each point finishes; running the
same command again measures only the points not stored yet (--fresh: all of them). Points the
planner says cannot fit are skipped, not loaded. Output: llama-bench's md, csv, json, jsonl or sql
on stdout; progress with an ETA on stderr. Exit 0 when every point has its result, 1 when some
failed or were skipped, 130 when interrupted (what finished is stored).
"""

from __future__ import annotations

import argparse

from ..core.measure.llama_bench import OUTPUT_FORMATS
from ..core.measure.sweep_grid import GRID_FLAGS, LONG_FLAGS
from .flags import add_bench_flags, add_device_flags, add_model_arg, devices_from_args, model_path
from .result import Result

__all__ = ["register", "run", "add_grid_flags", "grid_from_args", "planner_check", "measuring_setup"]



_LONG = {short: long for long, short in LONG_FLAGS.items()}


def add_grid_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("grid (llama-bench syntax: lists a,b and ranges first-last+step or *factor)")
    for flag in GRID_FLAGS:
        g.add_argument(flag, _LONG[flag], dest="grid_" + flag[1:], action="append", metavar="VALUES")


def grid_from_args(a: argparse.Namespace):
    from ..core.measure.sweep_grid import parse_grid
    given = {flag: getattr(a, "grid_" + flag[1:]) for flag in GRID_FLAGS}
    return parse_grid({f: v for f, v in given.items() if v})


def register(sub, frontend: str) -> None:
    p = sub.add_parser("sweep", help="measure a grid of settings (llama-bench syntax); resumable")
    add_model_arg(p)
    add_grid_flags(p)
    add_bench_flags(p)
    add_device_flags(p, sim=False)
    p.add_argument("-o", "--output", choices=OUTPUT_FORMATS, default="md", help="output format (llama-bench's)")
    p.add_argument("--fresh", action="store_true", help="measure every point again, even those stored")
    p.add_argument("--store", default=None, metavar="PATH", help="results store (default: the user's)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=run)


def planner_check(model: str, devices, host=None):
    """fits(config) -> '' or the planner's reason the config cannot be loaded on `devices`."""
    from ..core.errors import GpulabError
    from ..core.placement.planner import plan
    from ..sources.read import read_profile
    prof = read_profile(model)

    def fits(config) -> str:
        try:
            p = plan(prof, list(devices), config, host)
        except GpulabError as e:
            return str(e)
        return "" if p.fits else "does not fit: " + "; ".join(p.deficits())
    return fits


def measuring_setup(a: argparse.Namespace, session):
    """(measure function, offload devices), measuring in the session's worker: RPC servers serve
    one client at a time and abort the client that loses them, and a llama.cpp crash must end
    the worker, not this command (which then says why)."""
    from ..runtime.sweep import worker_measure
    choice = devices_from_args(a, session, for_load=True)
    return worker_measure(choice.worker), list(choice.devices)


def run(a, session) -> Result:
    from ..runtime.llama_lib import require
    require()   # llama-cpp-python: the `run` extra
    from ..core.config import SplitConfig
    from ..runtime.sweep import run_sweep
    from ..storage.results import ResultsStore
    path = model_path(a.model)
    grid = grid_from_args(a)
    measure, devices = measuring_setup(a, session)
    res = run_sweep(path, grid, base=SplitConfig(n_ctx=max(1, a.n_prompt + a.n_gen)), n_prompt=a.n_prompt,
                    n_gen=a.n_gen, repetitions=a.repetitions, n_threads=a.threads,
                    store=ResultsStore(a.store) if a.store else None, measure=measure,
                    progress=not a.no_progress, resume=not a.fresh, fits=planner_check(path, devices))
    bad = [p for p in res.points if p.status in ("failed", "skipped", "invalid")]
    return Result(text=res.format(a.output).rstrip("\n"), data=res.records, rows=res.records,
                  notes=[f"point {p.index} {p.values}: {p.status}: {p.error}" for p in bad],
                  exit_code=1 if bad else 0, objects={"sweep": res})
