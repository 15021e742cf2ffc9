"""`gpulab bench MODEL [llama flags] [-p 512 -n 128 -r 5] [-t T] [-o md|json|jsonl|csv|sql]`

Measures pp and tg as llama-bench does (gpulab.runtime.bench) and prints the results as
llama-bench prints them; every result is appended to the results store as soon as it is
measured (the CLI's default; `--store` in a notebook). The run happens in a worker process, so
that llama.cpp dying (an RPC server that goes away, a crash) ends the worker and this command
says why; the measured loop is the same code as in-process (bench/llama_bench_compare.py
measures both against llama-bench). The progress bar goes to stderr when it is a terminal.
"""

from __future__ import annotations

import sys

from ..core.measure.llama_bench import OUTPUT_FORMATS
from .flags import add_bench_flags, add_config_flags, add_device_flags, add_model_arg, add_policy_flag
from .result import Result

__all__ = ["register", "run"]


def register(sub, frontend: str) -> None:
    magic = frontend == "magic"
    p = sub.add_parser("bench", help="measure pp/tg tokens per second as llama-bench does",
                       description="Measure prompt processing (pp) and generation (tg) speed the way llama-bench "
                                   "does, with gpulab's split settings, in a worker process.")
    add_model_arg(p, optional=magic)
    add_config_flags(p, n_ctx=None)     # default: n_prompt + n_gen, llama-bench's context
    add_device_flags(p, sim=False, virtual=magic)
    add_policy_flag(p)
    if magic:
        add_bench_flags(p, n_prompt=128, n_gen=32, repetitions=2)
    else:
        add_bench_flags(p)
    g = p.add_argument_group("output")
    g.add_argument("-o", "--output", choices=OUTPUT_FORMATS, default="md")
    g.add_argument("--no-warmup", action="store_true", help="skip the warm-up runs")
    if magic:
        g.add_argument("--store", nargs="?", const="", default=None, metavar="PATH",
                       help="append the results to the results store (PATH, or the user's)")
    else:
        g.add_argument("--no-store", action="store_true", help="do not append the results to the results store")
        g.add_argument("--store", metavar="PATH", help="results store file (default: <data dir>/results.jsonl)")
    g.add_argument("--reconcile", action="store_true",
                   help="also print predicted vs llama.cpp vs NVML memory per device and term")
    g.add_argument("-v", "--verbose", action="store_true", help="print llama.cpp's load log (stderr) after the run")
    p.set_defaults(run=run, frontend=frontend)


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


def run(a, session) -> Result:
    from ..runtime.llama_lib import require
    require()   # llama-cpp-python: the `run` extra
    from dataclasses import replace

    from ..core.errors import ConfigError
    from ..core.measure.llama_bench import format_results
    from ..core.measure.reconcile import comparison_rows, reconcile
    from ..core.measure.results import to_llama_bench_records
    from ..sources.host import default_threads
    from ..storage.results import ResultsStore
    from ..ui.html import run_rows, table_html
    from .plan import planned

    if a.ctx_size is None:
        a.ctx_size = max(1, a.n_prompt + a.n_gen)
    if a.repetitions < 1:
        raise ConfigError("-r must be at least 1")
    path, prof, choice, config, p = planned(a, session, for_load=True, virtual_if_no_gpu=a.frontend == "magic")
    bar = _Bar()
    try:
        run = choice.worker.measure(path, config, n_prompt=a.n_prompt, n_gen=a.n_gen, repetitions=a.repetitions,
                                    n_threads=a.threads, warmup=not a.no_warmup, progress=bar, plan=p.memory())
    finally:
        bar.clear()
    if run.plan is None:
        run = replace(run, plan=p.memory())
    notes = list(getattr(run, "notes", ()))
    from ..core.policies.server_fit import server_fit, server_would_fit
    if not getattr(a, "policy", None) and server_would_fit(config, list(choice.devices)):
        # llama-bench and llama-cpp-python load the settings as given; llama-server fits first
        fitted = server_fit(prof, list(choice.devices), config.replace(n_ctx=0), choice.host)
        if fitted.ok and fitted.changed != ("n_ctx",):
            notes.append(f"note: measured without -fit, as llama-bench does; llama-server would load "
                         f"{fitted.flags(list(choice.devices))} (gpulab plan shows why; --policy fit measures it)")
    records = to_llama_bench_records(run)
    store_path = a.store if a.frontend == "magic" else (None if a.no_store else (a.store or ""))
    if store_path is not None:
        store = ResultsStore(store_path or None)
        store.append_run(run)
        notes.append(f"{len(records)} result(s) appended to {store.path}")
    if a.verbose:
        sys.stderr.write(run.report.log)
    text = format_results(records, a.output, default_threads=default_threads())
    extra = ""
    if a.reconcile:   # with the table on stdout; beside machine-readable output, on stderr
        if a.output == "md":
            text += "\n" + reconcile(run).text() + "\n"
        else:
            extra = reconcile(run).text() + "\n"
    rows = run_rows([run])
    html = table_html(rows, caption=choice.note or None) + table_html(comparison_rows(p, run),
                                                                      caption="predicted vs llama.cpp")
    return Result(text=text.rstrip("\n"), data=records, html=html, rows=rows, notes=notes, stderr=extra,
                  objects={"run": run, "plan": p, "records": records})
