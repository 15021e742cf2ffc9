"""Run a sweep: measure every point of a grid, store each result as it arrives, resume.

    df = sweep("model.gguf", parse_grid(["-ts", "1/1,3/1", "-fa", "on,off"]), rpc=endpoints,
               n_prompt=128, n_gen=32, repetitions=3)        # a pandas DataFrame, one row per test
    res = run_sweep(...); print(res.format("md"))            # llama-bench's table

Each measured run goes to the results store (gpulab.storage.results) before the next point
starts. A point counts as done when the store holds its tests (pp and/or tg) for the same model
fingerprint, config, n_prompt, n_gen and repetitions; a rerun of an interrupted sweep measures
only the rest. The measuring function is injected (`measure`), so the resume logic is tested
with a fake one; by default every point is measured in a gpulab worker process (with the `rpc`
endpoints registered there), so that llama.cpp dying, as it does when an RPC server goes away,
fails that point instead of killing the caller (a notebook kernel, the CLI).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ..core.config import SplitConfig, config_from_dict, config_to_dict
from ..core.errors import GpulabError
from ..core.measure.llama_bench import format_results
from ..core.measure.results import BenchRun
from ..core.measure.sweep_grid import Grid
from ..core.run import Run

__all__ = ["run_sweep", "sweep", "SweepResult", "SweepPoint", "sweep_key", "ProgressBar", "pareto_front"]

# measure(path, config, *, n_prompt, n_gen, repetitions, n_threads, progress) -> Run
Measure = Callable[..., Run]
_KEY_NOTE = "gpulab-sweep-key="


def sweep_key(model_fingerprint: str, config: SplitConfig, n_prompt: int, n_gen: int, repetitions: int) -> str:
    """What makes two measurements the same point: model, config, tests, repetitions."""
    text = json.dumps([model_fingerprint, config_to_dict(config), n_prompt, n_gen, repetitions], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


@dataclass
class SweepPoint:
    index: int
    config: SplitConfig | None
    values: dict                        # the grid's values at this point
    status: str = "pending"             # 'stored' (found), 'measured', 'failed', 'invalid', 'skipped'
    error: str = ""
    records: list = field(default_factory=list)   # llama-bench records of this point
    seconds: float = 0.0


@dataclass
class SweepResult:
    model_path: str
    points: list[SweepPoint]
    n_prompt: int
    n_gen: int
    repetitions: int

    @property
    def records(self) -> list[dict]:
        return [r for p in self.points for r in p.records]

    @property
    def n_measured(self) -> int:
        return sum(p.status == "measured" for p in self.points)

    def format(self, fmt: str = "md") -> str:
        """llama-bench's output formats: md, csv, json, jsonl, sql."""
        return format_results(self.records, fmt)

    def to_frame(self):
        """One row per test (pp, tg) of every finished point: the grid's values, llama-bench's
        fields, and the memory the plan left on the fullest device (for a headroom/speed Pareto)."""
        import pandas as pd  # lazily: pandas is an optional (jupyter) dependency
        rows = []
        for p in self.points:
            for r in p.records:
                g = r.get("gpulab") or {}
                plan = g.get("plan") or {}
                offload = [d for d in plan.get("devices", []) if d.get("name") != "CPU"]
                headroom = min((d["free_bytes"] - d["used_bytes"] for d in offload), default=None)
                row = {"point": p.index, "status": p.status, **{k: _cell(v) for k, v in p.values.items()},
                       "test": g.get("test") or (f"pp{r['n_prompt']}" if r["n_prompt"] else f"tg{r['n_gen']}"),
                       "avg_ts": r["avg_ts"], "stddev_ts": r["stddev_ts"],
                       "min_headroom_bytes": headroom, "fits": plan.get("fits"),
                       "load_seconds": g.get("load_seconds")}
                row.update({k: r[k] for k in ("n_gpu_layers", "split_mode", "main_gpu", "tensor_split", "n_batch",
                                              "n_ubatch", "type_k", "type_v", "flash_attn", "no_kv_offload",
                                              "devices", "n_prompt", "n_gen") if k not in row})
                rows.append(row)
        return pd.DataFrame(rows)


def _cell(v):
    if isinstance(v, tuple):
        return "/".join(f"{x:g}" if isinstance(x, float) else str(x) for x in v)
    return v


def pareto_front(df, speed: str = "avg_ts", headroom: str = "min_headroom_bytes"):
    """The rows no other row beats on both tokens/s and memory headroom (for one test)."""
    pts = df.dropna(subset=[speed, headroom])
    keep = [i for i, a in pts.iterrows()
            if not any((b[speed] >= a[speed] and b[headroom] >= a[headroom]) and
                       (b[speed] > a[speed] or b[headroom] > a[headroom]) for _, b in pts.iterrows())]
    return pts.loc[keep].sort_values(speed)


# -- progress --------------------------------------------------------------------------------------
class ProgressBar:
    """A one-line bar with an ETA on a stream: `[3/8] ████░░░░ 37%  0:42 elapsed, ETA 1:10  ts=3/1 fa=on`.

    The ETA is the mean time of the points measured so far times the points left (points found
    in the store cost nothing and do not count)."""

    def __init__(self, total: int, stream=None, width: int = 24):
        self.total, self.width = total, width
        self.stream = stream if stream is not None else sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.monotonic()
        self.done = 0
        self.measured_seconds: list[float] = []
        self._last = 0.0

    @staticmethod
    def _clock(s: float) -> str:
        s = int(round(s))
        return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"

    def eta(self, fraction_of_current: float = 0.0) -> float | None:
        if not self.measured_seconds:
            return None
        per = sum(self.measured_seconds) / len(self.measured_seconds)
        return max(0.0, (self.total - self.done - fraction_of_current) * per)

    def line(self, label: str = "", fraction_of_current: float = 0.0) -> str:
        frac = (self.done + fraction_of_current) / self.total if self.total else 1.0
        full = int(frac * self.width)
        eta = self.eta(fraction_of_current)
        when = f"{self._clock(time.monotonic() - self.t0)} elapsed" + (
            f", ETA {self._clock(eta)}" if eta is not None else "")
        return (f"[{min(self.done + 1, self.total)}/{self.total}] {'█' * full}{'░' * (self.width - full)} "
                f"{frac * 100:3.0f}%  {when}  {label}")

    def show(self, label: str = "", fraction_of_current: float = 0.0, force: bool = False) -> None:
        now = time.monotonic()
        if not self.tty and not force:
            return       # a log gets one line per point (see point_done), not a redraw per update
        if not force and now - self._last < 0.2:
            return
        self._last = now
        self.stream.write(("\r\x1b[K" if self.tty else "") + self.line(label, fraction_of_current)
                          + ("" if self.tty else "\n"))
        self.stream.flush()

    def point_done(self, label: str, status: str, seconds: float | None) -> None:
        self.done += 1
        if seconds is not None:
            self.measured_seconds.append(seconds)
        if not self.tty:
            self.stream.write(self.line(f"{label}: {status}") + "\n")
            self.stream.flush()
        else:
            self.show(f"{label}: {status}", force=True)

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


# -- running ---------------------------------------------------------------------------------------
def _label(values: dict) -> str:
    short = {"n_gpu_layers": "ngl", "split_mode": "sm", "main_gpu": "mg", "tensor_split": "ts", "devices": "dev",
             "n_ctx": "c", "n_batch": "b", "n_ubatch": "ub", "type_k": "ctk", "type_v": "ctv",
             "offload_kqv": "kvo", "flash_attn": "fa"}
    return " ".join(f"{short.get(k, k)}={_cell(v)}" for k, v in values.items())


def _as_bench_run(run: Run, model_fingerprint: str, key: str) -> BenchRun:
    """The run as a BenchRun carrying the model fingerprint and the sweep key (a note), so the
    store can find it again whatever config llama.cpp finally got."""
    if not isinstance(run, BenchRun):
        base = {f.name: getattr(run, f.name) for f in fields(Run)}
        run = BenchRun(**base)
    notes = tuple(n for n in run.notes if not n.startswith(_KEY_NOTE)) + (_KEY_NOTE + key,)
    return replace(run, model_fingerprint=run.model_fingerprint or model_fingerprint,
                   run_id=run.run_id or uuid.uuid4().hex, notes=notes)


def _stored(records_by_key: dict, key: str, want_tests: set[str]) -> list[dict] | None:
    """The records of the most recent complete run stored under this key, or None."""
    runs: dict[str, list[dict]] = {}
    for r in records_by_key.get(key, []):
        runs.setdefault((r.get("gpulab") or {}).get("run_id", ""), []).append(r)
    for recs in reversed(list(runs.values())):
        if {(r.get("gpulab") or {}).get("test") for r in recs} >= want_tests:
            return recs
    return None


def _index_store(store, model_fingerprint: str, n_prompt: int, n_gen: int, repetitions: int) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in store.records(model_fingerprint=model_fingerprint):
        g = r.get("gpulab") or {}
        keys = [n[len(_KEY_NOTE):] for n in g.get("notes", []) if n.startswith(_KEY_NOTE)]
        if not keys:
            # measured outside a sweep: the same point if config, tests and repetitions agree
            if len(r.get("samples_ns", [])) != repetitions or not g.get("config"):
                continue
            if r["n_prompt"] not in (0, n_prompt) or r["n_gen"] not in (0, n_gen):
                continue
            try:
                cfg = config_from_dict(g["config"])
            except GpulabError:
                continue
            keys = [sweep_key(model_fingerprint, cfg, n_prompt, n_gen, repetitions)]
        for k in keys:
            out.setdefault(k, []).append(r)
    return out


def worker_measure(worker) -> Measure:
    """A Measure that runs each point in `worker` (a gpulab Worker): llama.cpp dying ends the
    worker, the point fails with the reason, and the next point starts a fresh worker."""
    def via_worker(path, config, *, n_prompt, n_gen, repetitions, n_threads, progress):
        return worker.measure(path, config, n_prompt=n_prompt, n_gen=n_gen, repetitions=repetitions,
                              n_threads=n_threads, progress=progress)
    return via_worker


def _default_measure(rpc: Sequence[str], keep: list) -> Measure:
    from .worker import Worker
    w = Worker(list(rpc))
    keep.append(w)
    return worker_measure(w)


_PHASE_WEIGHT = {"load": (0.0, 0.3), "warmup": (0.3, 0.05), "pp": (0.35, 0.35), "tg": (0.7, 0.3)}


def run_sweep(model_path: str | os.PathLike, grid: Grid | Sequence[SplitConfig], *, base: SplitConfig | None = None,
              n_prompt: int = 512, n_gen: int = 128, repetitions: int = 5, n_threads: int | None = None,
              rpc: Sequence[str] = (), store=None, measure: Measure | None = None,
              progress: bool | Callable[[dict], Any] = True, resume: bool = True,
              fits: Callable[[SplitConfig], str] | None = None) -> SweepResult:
    """Measure every point of `grid` (a Grid, or a list of SplitConfigs) on `model_path`.

    base: the config the grid's values are set on (default: n_ctx = n_prompt + n_gen, as llama-bench).
    store: a ResultsStore (default: the user's). resume=False measures every point again.
    measure: the measuring function (default: see the module docstring). rpc: RPC endpoints the
    default runs on, through a worker process. progress: True draws a bar with an ETA on stderr;
    a callable gets {'event': 'point'|'phase', ...} instead. fits(config) -> '' or why the config
    cannot be loaded (e.g. the planner's verdict): such points are 'skipped', not measured.
    A KeyboardInterrupt stops the sweep after what was stored; a point that fails is recorded
    as 'failed' and the sweep goes on.
    """
    from ..sources.fingerprint import model_fingerprint
    from ..storage.results import ResultsStore
    path = os.fspath(model_path)
    if not Path(path).is_file():
        raise GpulabError(f"no model file at {path}")
    base = base or SplitConfig(n_ctx=max(1, n_prompt + n_gen))
    if isinstance(grid, Grid):
        pts = [SweepPoint(i, c, v, "pending" if c is not None else "invalid", why)
               for i, (c, v, why) in enumerate(grid.points(base))]
    else:
        pts = [SweepPoint(i, c, {}) for i, c in enumerate(grid)]
    store = store if store is not None else ResultsStore()
    mhash = model_fingerprint(path)
    want = ({f"pp{n_prompt}"} if n_prompt else set()) | ({f"tg{n_gen}"} if n_gen else set())
    index = _index_store(store, mhash, n_prompt, n_gen, repetitions) if resume else {}
    keep: list = []
    bar = ProgressBar(len(pts)) if progress is True else None
    notify = progress if callable(progress) else (lambda ev: None)
    try:
        for p in pts:
            label = _label(p.values) or f"point {p.index}"
            if p.config is None:
                _finish(bar, notify, p, label, None)
                continue
            key = sweep_key(mhash, p.config, n_prompt, n_gen, repetitions)
            found = _stored(index, key, want)
            if found is not None:
                p.status, p.records = "stored", found
                _finish(bar, notify, p, label, None)
                continue
            why = fits(p.config) if fits is not None else ""
            if why:
                p.status, p.error = "skipped", why
                _finish(bar, notify, p, label, None)
                continue
            if measure is None:
                measure = _default_measure(rpc, keep)

            def on_phase(phase: str, fraction: float, _label=label, _p=p) -> None:
                start, width = _PHASE_WEIGHT.get(phase, (0.0, 1.0))
                if bar is not None:
                    bar.show(f"{_label} ({phase})", start + width * fraction)
                notify({"event": "phase", "point": _p.index, "phase": phase, "fraction": fraction})

            if bar is not None:
                bar.show(label, force=bar.tty)
            t0 = time.monotonic()
            try:
                run = measure(path, p.config, n_prompt=n_prompt, n_gen=n_gen, repetitions=repetitions,
                              n_threads=n_threads, progress=on_phase)
            except GpulabError as e:
                p.status, p.error, p.seconds = "failed", str(e), time.monotonic() - t0
                _finish(bar, notify, p, label, p.seconds)
                continue
            run = _as_bench_run(run, mhash, key)
            p.records = store.append_run(run)        # durable before the next point starts
            p.status, p.seconds = "measured", time.monotonic() - t0
            _finish(bar, notify, p, label, p.seconds)
    finally:
        if bar is not None:
            bar.close()
        for w in keep:
            w.close()
    return SweepResult(path, pts, n_prompt, n_gen, repetitions)


def _finish(bar, notify, p: SweepPoint, label: str, seconds: float | None) -> None:
    status = p.status + (f" ({p.error})" if p.error and p.status != "failed" else "")
    if p.status == "failed":
        status = f"failed: {p.error}"
    if p.status == "measured":
        ts = ", ".join(f"{(r.get('gpulab') or {}).get('test', '')} {r['avg_ts']:.2f} t/s" for r in p.records)
        status = f"{ts}"
    if bar is not None:
        bar.point_done(label, status, seconds if p.status == "measured" else None)
    notify({"event": "point", "point": p.index, "status": p.status, "error": p.error, "values": p.values,
            "seconds": p.seconds})


def sweep(model_path, grid, **kwargs):
    """run_sweep(...).to_frame(): a pandas DataFrame, one row per test; the SweepResult is in
    `df.attrs['sweep']`."""
    res = run_sweep(model_path, grid, **kwargs)
    df = res.to_frame()
    df.attrs["sweep"] = res
    return df
