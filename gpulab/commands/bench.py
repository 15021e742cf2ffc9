"""`gpulab bench MODEL [llama flags] [-p 512 -n 128 -r 5] [-t T] [-o md|json|jsonl|csv|sql]`

Measures pp and tg as llama-bench does (gpulab.runtime.bench) and prints the results as
llama-bench prints them; every result is appended to the results store as soon as it is
measured. The run happens in a worker process, so that llama.cpp dying (an RPC server that
goes away, a crash) ends the worker and this command says why; the measured loop is the same
code as in-process (bench/llama_bench_compare.py measures the two against llama-bench). The
progress bar goes to stderr, only when stderr is a terminal.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["register", "run_bench"]


def register(subparsers) -> None:
    from ..cli import add_config_flags
    from ..core.results import OUTPUT_FORMATS
    p = subparsers.add_parser("bench", help="measure pp/tg tokens per second as llama-bench does",
                              description="Measure prompt processing (pp) and generation (tg) speed the way "
                                          "llama-bench does, with gpulab's split settings; results go to the "
                                          "results store too.")
    p.add_argument("model", help="path of a .gguf")
    add_config_flags(p)
    p.set_defaults(ctx_size=None)   # default: n_prompt + n_gen, llama-bench's context
    g = p.add_argument_group("benchmark (llama-bench's flags)")
    g.add_argument("-p", "--n-prompt", type=int, default=512, help="prompt tokens (0: no pp test)")
    g.add_argument("-n", "--n-gen", type=int, default=128, help="generated tokens (0: no tg test)")
    g.add_argument("-r", "--repetitions", type=int, default=5)
    g.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: llama-bench's)")
    g.add_argument("-o", "--output", choices=OUTPUT_FORMATS, default="md")
    g.add_argument("--no-warmup", action="store_true", help="skip the warm-up runs")
    g.add_argument("--rpc", metavar="HOST:PORT,...", help="llama.cpp RPC servers to use")
    g.add_argument("--no-store", action="store_true", help="do not append the results to the results store")
    g.add_argument("--store", metavar="PATH", help="results store file (default: <data dir>/results.jsonl)")
    g.add_argument("--reconcile", action="store_true",
                   help="also print predicted vs llama.cpp vs NVML memory per device and term")
    g.add_argument("-v", "--verbose", action="store_true", help="print llama.cpp's load log (stderr) after the run")
    p.set_defaults(func=run_bench)


class _Bar:
    """`\\r`-updated plain text progress on stderr, only when stderr is a terminal."""

    _LABEL = {"load": "loading", "warmup": "warm-up", "pp": "prompt", "tg": "generation"}

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.shown = False

    def __call__(self, phase: str, fraction: float) -> None:
        if not self.enabled:
            return
        width = 30
        done = int(round(max(0.0, min(1.0, fraction)) * width))
        self.stream.write(f"\r{self._LABEL.get(phase, phase):<10} [{'#' * done}{'.' * (width - done)}] "
                          f"{100 * fraction:3.0f}%")
        self.stream.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r" + " " * 60 + "\r")
            self.stream.flush()
            self.shown = False


def run_bench(a: argparse.Namespace) -> int:
    from ..cli import config_from_args
    from ..core.results import format_results, to_llama_bench_records
    from ..errors import ConfigError
    from ..runtime.bench import default_threads
    from ..runtime.store import ResultsStore

    if a.ctx_size is None:
        a.ctx_size = max(1, a.n_prompt + a.n_gen)
    config = config_from_args(a)
    if a.repetitions < 1:
        raise ConfigError("-r must be at least 1")
    endpoints = [x.strip() for x in a.rpc.split(",") if x.strip()] if a.rpc else []
    bar = _Bar()
    kw = dict(n_prompt=a.n_prompt, n_gen=a.n_gen, repetitions=a.repetitions, n_threads=a.threads,
              warmup=not a.no_warmup, progress=bar)
    from ..runtime.worker import Worker
    try:
        # always in a worker process: whatever kills llama.cpp (a dying RPC server, a CPU build
        # this host cannot run) ends the worker, and this process says why in one line
        with Worker(endpoints) as w:
            run = w.measure(a.model, config, **kw)
    finally:
        bar.clear()
    if a.verbose:
        sys.stderr.write(run.report.log)
    records = to_llama_bench_records(run)
    if not a.no_store:
        store = ResultsStore(a.store)
        store.append_run(run)
        print(f"gpulab: {len(records)} result(s) appended to {store.path}", file=sys.stderr)
    for note in getattr(run, "notes", ()):
        print(f"gpulab: note: {note}", file=sys.stderr)
    sys.stdout.write(format_results(records, a.output, default_threads=default_threads()))
    if a.reconcile:
        from ..core.reconcile import reconcile
        out = sys.stdout if a.output == "md" else sys.stderr
        print("\n" + reconcile(run).text(), file=out)
    return 0
