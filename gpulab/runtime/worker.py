"""llama.cpp work in a worker process that reports back, for what can kill a process.

Two llama.cpp behaviours make this necessary: ggml cannot unregister a backend, so RPC devices
registered in a process stay there for its lifetime; and llama.cpp's RPC client calls
GGML_ABORT (RPC_STATUS_ASSERT in ggml-rpc.cpp) when a registered server is gone or answers
garbage. In the notebook kernel that would end hours of work. In a worker, the worker dies,
`Worker` raises LoadError, and the next call starts a fresh worker.

Protocol (no pickle): one JSON request per line on the worker's stdin
{"op": ..., "args": {...}}, one JSON answer per line on its original stdout, {"ok": result} or
{"error": class name, "message": ..., "traceback": ...}. Before its answer an op may send any
number of {"progress": [phase, fraction]} lines (measure does: load, warmup, pp, tg). Whatever
C code prints goes to stderr.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import IO, TYPE_CHECKING

from ..core import errors as gerrors
from ..core.config import SplitConfig, config_to_dict
from ..core.devices import Device
from ..core.errors import GpulabError, LoadError
from ..core.memory import PlannedMemory
from ..core.report import LoadReport
from ..core.run import Run
from .crash import describe_death

if TYPE_CHECKING:
    from .model import LoadedModel

__all__ = ["Worker", "RemoteModel"]


class Worker:
    """Client of a `python -m gpulab.runtime.worker` process.

    `call(op, **args)` returns the raw JSON result or raises the GpulabError the worker raised
    (same class and message). If the worker dies (llama.cpp aborted it), the call raises
    LoadError with the end of its stderr, and the next call starts a new worker, registering
    the same RPC endpoints again.

    timeout_s: the longest the worker may stay silent (no answer and no progress line) during
    a request; then it is killed and the call raises LoadError saying so. For an RPC server
    that stops answering without closing its connection (llama.cpp's client waits on it
    forever). None (the default): wait as long as it takes.
    """

    def __init__(self, rpc_endpoints: list[str] | tuple[str, ...] = (), *, timeout_s: float | None = None):
        if timeout_s is not None and not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive or None, got {timeout_s!r}")
        self.rpc_endpoints = tuple(rpc_endpoints)
        self.timeout_s = timeout_s
        self.proc: subprocess.Popen[str] | None = None
        self._err: IO[bytes] | None = None
        self._timed_out = False
        # the pipe carries one request at a time: every call holds this (a lab's measurement in
        # a thread, the monitor polling devices)
        self._lock = threading.RLock()

    # -- process -----------------------------------------------------------------------------
    def _start(self) -> None:
        self._err = tempfile.TemporaryFile()
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])   # this checkout, for editable and plain runs
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["GPULAB_WORKER"] = "1"   # its deaths are reported here (crash.guard stays quiet in it)
        self.proc = subprocess.Popen([sys.executable, "-m", "gpulab.runtime.worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._err, text=True, env=env)
        if self.rpc_endpoints:
            try:
                self._request("register", {"endpoints": list(self.rpc_endpoints)})
            except BaseException:
                # a worker without its RPC devices must not serve the next call
                if self.proc is not None:
                    self.proc.kill()
                self.close()
                raise

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stderr(self) -> str:
        if self._err is None:
            return ""
        self._err.seek(0)
        return self._err.read().decode(errors="replace")

    def close(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            if proc.stdin is not None:
                proc.stdin.close()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if self._err is not None:
            self._err.close()
        self.proc, self._err = None, None

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- requests ----------------------------------------------------------------------------
    def _started(self) -> subprocess.Popen[str]:
        # requests and deaths only come between _start and close
        assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
        return self.proc

    def _request(self, op: str, args: dict, on_progress=None):
        proc = self._started()
        assert proc.stdin is not None and proc.stdout is not None   # started with pipes
        try:
            proc.stdin.write(json.dumps({"op": op, "args": args}) + "\n")
            proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass   # the worker is gone; reading its stdout below says so
        self._timed_out = False
        while True:
            watchdog = self._watchdog()
            try:
                line = proc.stdout.readline()
            finally:
                if watchdog is not None:
                    watchdog.cancel()
            if not line:
                self._died(op)
            answer = json.loads(line)
            if "progress" not in answer:
                break
            if on_progress is not None:
                try:
                    on_progress(*answer["progress"])
                except BaseException:
                    # the caller gave up: the worker's answer never comes, so it cannot be reused
                    proc.kill()
                    self.close()
                    raise
        if "error" in answer:
            cls = getattr(gerrors, answer["error"], None)
            if isinstance(cls, type) and issubclass(cls, GpulabError):
                raise cls(answer["message"])
            raise RuntimeError(f"{answer['error']} in the gpulab worker: {answer['message']}\n{answer['traceback']}")
        return answer["ok"]

    def _watchdog(self) -> threading.Timer | None:
        if self.timeout_s is None:
            return None
        proc = self._started()

        def expire() -> None:
            self._timed_out = True
            proc.kill()

        t = threading.Timer(self.timeout_s, expire)
        t.daemon = True
        t.start()
        return t

    def _died(self, op: str):
        proc = self._started()
        if self._timed_out:
            proc.wait(10)
            raise LoadError(f"the gpulab worker gave no answer within {self.timeout_s:g} s during {op}"
                            + (" (an RPC server it used stopped answering?)" if self.rpc_endpoints else "")
                            + "; it was killed. This process is fine; the next call starts a new worker.")
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        code = proc.returncode
        lines = [ln for ln in self.stderr().strip().splitlines() if ln.strip()]
        # llama.cpp's own reason (GGML_ABORT prints 'file:line: message' before the backtrace)
        reason = [ln.strip() for ln in lines if "GGML_ABORT" in ln or "error" in ln.lower()
                  or "failed" in ln.lower() or ": " in ln and ".cpp:" in ln][-2:]
        tail = reason or [ln.strip() for ln in lines[-3:]]
        rpc = " (an RPC server it used stopped answering?)" if self.rpc_endpoints else ""
        said = " | ".join(tail) or "it wrote nothing"
        raise LoadError(f"llama.cpp ended the worker process with {describe_death(code, op)}{rpc}. "
                        f"Its last words: {said}. This process is fine; the next call starts a new worker.")

    def call(self, op: str, _on_progress=None, **args):
        with self._lock:
            if not self.alive:
                self.close()
                self._start()
            return self._request(op, args, _on_progress)

    def devices(self) -> list[Device]:
        """The devices llama.cpp sees in the worker (RPC endpoints registered)."""
        return [Device(**d) for d in self.call("devices")]

    def try_devices(self) -> list[Device] | None:
        """devices(), or None at once when another request holds the worker (a load running)."""
        if not self._lock.acquire(blocking=False):
            return None
        try:
            return self.devices()
        finally:
            self._lock.release()

    def load(self, path: str | os.PathLike, config: SplitConfig, *, dry_run: bool = False,
             use_devices: bool = True, check_fit: bool = True) -> tuple[LoadReport, dict]:
        """Load, report, close. Returns the LoadReport and the raw answer (notes, timings).
        check_fit: refuse (DoesNotFitError) what the plan says cannot fit, before loading."""
        raw = self.call("load", path=str(path), config=config_to_dict(config), dry_run=dry_run, use_devices=use_devices,
                        check_fit=check_fit)
        return LoadReport.from_dict(raw["report"]), raw

    def measure(self, path: str | os.PathLike, config: SplitConfig | None = None, *, n_prompt: int = 512,
                n_gen: int = 128, repetitions: int = 5, n_threads: int | None = None, warmup: bool = True,
                progress=None, seed: int | None = None, nvml: bool = True,
                plan: PlannedMemory | None = None) -> Run:
        """gpulab.runtime.bench.measure in the worker; the Run (a BenchRun) comes back as JSON.

        If llama.cpp aborts the worker (an RPC server died mid-run), this raises LoadError and
        the calling process carries on; the next call starts a fresh worker.
        progress(phase, fraction) is called here as the worker reports it.
        plan: this process's prediction for the load (Plan.memory()): the worker checks the load
        against it and keeps it in the Run instead of reading the header and planning again."""
        from ..core.config import config_to_dict
        from ..core.measure.results import run_from_dict
        cfg = config_to_dict(config) if config is not None else None
        raw = self.call("measure", _on_progress=progress, path=str(path), config=cfg, n_prompt=n_prompt,
                        n_gen=n_gen, repetitions=repetitions, n_threads=n_threads, warmup=warmup, seed=seed,
                        nvml=nvml, plan=plan.to_dict() if plan is not None else None)
        return run_from_dict(raw)

    def open(self, path: str | os.PathLike, config: SplitConfig | None = None) -> RemoteModel:
        """Load a model in the worker and keep it open there: measure it, re-split it, close it.

        The in-worker counterpart of open_model + measure_loaded + resplit, for RPC devices."""
        from ..core.config import config_to_dict
        raw = self.call("open", path=str(path), config=config_to_dict(config or SplitConfig()))
        return RemoteModel(self, raw)


class RemoteModel:
    """A model loaded and kept open in a Worker (see Worker.open). Close it (or use `with`)."""

    def __init__(self, worker: Worker, raw: dict):
        self.worker = worker
        self._pid = worker.proc.pid if worker.proc else None
        self._update(raw)

    def _update(self, raw: dict) -> None:
        from ..core.config import config_from_dict
        self.id = raw["id"]
        self.path = raw["path"]
        self.config = config_from_dict(raw["config"])
        self.report = LoadReport.from_dict(raw["report"])
        self.load_seconds = raw["load_seconds"]
        self.context_seconds = raw["context_seconds"]
        self.ready_seconds = raw["ready_seconds"]
        self.notes = tuple(raw.get("notes", ()))
        self.closed = False

    def _same_worker(self) -> bool:
        proc = self.worker.proc
        return self.worker.alive and proc is not None and proc.pid == self._pid

    def _call(self, op: str, _on_progress=None, **args):
        if self.closed:
            raise LoadError(f"{Path(self.path).name} is closed in the worker; open it again")
        if not self._same_worker():
            self.closed = True
            raise LoadError(f"the worker that held {Path(self.path).name} has ended (llama.cpp aborted it?); "
                            "open the model again")
        return self.worker.call(op, _on_progress=_on_progress, id=self.id, **args)

    def measure(self, *, n_prompt: int = 512, n_gen: int = 128, repetitions: int = 5, n_threads: int | None = None,
                warmup: bool = True, progress=None, seed: int | None = None, nvml: bool = True) -> Run:
        """gpulab.runtime.bench.measure_loaded on the open model, in the worker."""
        from ..core.measure.results import run_from_dict
        raw = self._call("measure_loaded", _on_progress=progress, n_prompt=n_prompt, n_gen=n_gen,
                         repetitions=repetitions, n_threads=n_threads, warmup=warmup, seed=seed, nvml=nvml)
        return run_from_dict(raw)

    def resplit(self, config: SplitConfig) -> RemoteModel:
        """Close and reload with `config` in the worker (gpulab.runtime.bench.resplit); `ready_seconds`
        is then the time from this call's start in the worker to a context ready to measure."""
        from ..core.config import config_to_dict
        self._update(self._call("resplit", config=config_to_dict(config)))
        return self

    owns_worker = False   # set by gpulab.load(isolate=True): the worker ends with the model

    def close(self) -> None:
        if not self.closed and self._same_worker():
            self.worker.call("close", id=self.id)
        self.closed = True
        if self.owns_worker:
            self.worker.close()

    def __enter__(self) -> RemoteModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RemoteModel({Path(self.path).name!r}, id={self.id}, closed={self.closed})"


# -- the worker side -----------------------------------------------------------------------------
def _serve() -> None:
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)   # llama.cpp/ggml printf must not corrupt the answers

    from . import ggml, llama_lib, rpc
    from .model import open_model

    def op_register(endpoints):
        return [asdict(d) for d in rpc.register(endpoints)]

    def op_devices():
        return [asdict(d) for d in llama_lib.llama_devices()]

    def op_dev_count():
        return len(ggml.device_handles(llama_lib.ggml()))

    def op_default_device_names():
        return llama_lib.default_device_names()

    def op_load(path, config, dry_run=False, use_devices=True, check_fit=True):
        devices = llama_lib.llama_devices() if use_devices else None
        fractions: list[float] = []
        from ..core.config import config_from_dict
        with open_model(path, config_from_dict(config), devices=devices, dry_run=dry_run,
                        progress=fractions.append, check_fit=check_fit) as m:
            return {"report": m.report.to_dict(), "notes": list(m.notes),
                    "effective_devices": list(m.effective_config.devices),
                    "load_seconds": m.load_seconds, "context_seconds": m.context_seconds,
                    "n_progress": len(fractions), "last_progress": fractions[-1] if fractions else None}

    def op_measure(path, config=None, plan=None, **kw):
        from ..core.config import config_from_dict
        from ..core.measure.results import run_to_dict
        from .bench import measure

        last: dict[str, float] = {}

        def progress(phase: str, fraction: float) -> None:
            # llama.cpp reports load progress hundreds of times: pass on whole percents
            if fraction < 1.0 and fraction - last.get(phase, -1.0) < 0.01:
                return
            last[phase] = fraction
            out.write(json.dumps({"progress": [phase, fraction]}) + "\n")

        cfg = config_from_dict(config) if config is not None else None
        planned = PlannedMemory.from_dict(plan) if plan is not None else None
        return run_to_dict(measure(path, cfg, progress=progress, plan=planned, **kw))

    models: dict[int, LoadedModel] = {}    # open models by id (Worker.open)

    def _answer(mid, m):
        from ..core.config import config_to_dict
        return {"id": mid, "path": m.path, "config": config_to_dict(m.config), "report": m.report.to_dict(),
                "load_seconds": m.load_seconds, "context_seconds": m.context_seconds,
                "ready_seconds": m.ready_seconds, "notes": list(m.notes)}

    def _model(mid):
        m = models.get(mid)
        if m is None:
            raise LoadError(f"no open model {mid} in this worker")
        return m

    def op_open(path, config):
        from ..core.config import config_from_dict
        m = open_model(path, config_from_dict(config), devices=llama_lib.llama_devices())
        mid = max(models, default=0) + 1
        models[mid] = m
        return _answer(mid, m)

    def op_measure_loaded(id, **kw):
        from ..core.measure.results import run_to_dict
        from .bench import measure_loaded

        def progress(phase: str, fraction: float) -> None:
            out.write(json.dumps({"progress": [phase, fraction]}) + "\n")
        return run_to_dict(measure_loaded(_model(id), progress=progress, **kw))

    def op_resplit(id, config):
        from ..core.config import config_from_dict
        from .bench import resplit
        old = _model(id)
        try:
            models[id] = m = resplit(old, config_from_dict(config), devices=llama_lib.llama_devices())
        except BaseException:
            models.pop(id, None)   # the old model is closed already
            raise
        return _answer(id, m)

    def op_close(id):
        m = models.pop(id, None)
        if m is not None:
            m.close()
        return None

    ops = {name[3:]: fn for name, fn in locals().items() if name.startswith("op_")}
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        try:
            answer = {"ok": ops[req["op"]](**req.get("args", {}))}
        except Exception as e:  # noqa: BLE001 - every failure is answered, the loop goes on
            answer = {"error": type(e).__name__, "message": str(e), "traceback": traceback.format_exc()}
        out.write(json.dumps(answer) + "\n")
    for m in models.values():   # stdin closed: Worker.close()
        m.close()


if __name__ == "__main__":
    _serve()
