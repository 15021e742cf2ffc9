"""llama.cpp work in a worker process that reports back, for what can kill a process.

Two llama.cpp behaviours make this necessary: ggml cannot unregister a backend, so RPC devices
registered in a process stay there for its lifetime; and llama.cpp's RPC client calls
GGML_ABORT (RPC_STATUS_ASSERT in ggml-rpc.cpp) when a registered server is gone or answers
garbage. In the notebook kernel that would end hours of work. In a worker, the worker dies,
`Worker` raises LoadError, and the next call starts a fresh worker.

Protocol (no pickle): one JSON request per line on the worker's stdin
{"op": ..., "args": {...}}, one JSON answer per line on its original stdout, {"ok": result} or
{"error": class name, "message": ..., "traceback": ...}. Whatever C code prints goes to stderr.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import traceback
from dataclasses import asdict
from pathlib import Path

from .. import errors as gerrors
from ..core.config import SplitConfig
from ..core.devices import Device
from ..core.report import LoadReport
from ..errors import GpulabError, LoadError

__all__ = ["Worker"]


class Worker:
    """Client of a `python -m gpulab.runtime.worker` process.

    `call(op, **args)` returns the raw JSON result or raises the GpulabError the worker raised
    (same class and message). If the worker dies (llama.cpp aborted it), the call raises
    LoadError with the end of its stderr, and the next call starts a new worker, registering
    the same RPC endpoints again.
    """

    def __init__(self, rpc_endpoints: list[str] | tuple[str, ...] = ()):
        self.rpc_endpoints = tuple(rpc_endpoints)
        self.proc: subprocess.Popen | None = None
        self._err = None

    # -- process -----------------------------------------------------------------------------
    def _start(self) -> None:
        self._err = tempfile.TemporaryFile()
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])   # this checkout, for editable and plain runs
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.proc = subprocess.Popen([sys.executable, "-m", "gpulab.runtime.worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._err, text=True, env=env)
        if self.rpc_endpoints:
            self._request("register", {"endpoints": list(self.rpc_endpoints)})

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stderr(self) -> str:
        if self._err is None:
            return ""
        self._err.seek(0)
        return self._err.read().decode(errors="replace")

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._err is not None:
            self._err.close()
        self.proc, self._err = None, None

    def __enter__(self) -> "Worker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- requests ----------------------------------------------------------------------------
    def _request(self, op: str, args: dict):
        self.proc.stdin.write(json.dumps({"op": op, "args": args}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(10)
            tail = self.stderr().strip().splitlines()[-3:]
            code = self.proc.returncode
            raise LoadError(f"llama.cpp ended the worker process (exit {code}) during {op}: "
                            + (" | ".join(tail) or "no message"))
        answer = json.loads(line)
        if "error" in answer:
            cls = getattr(gerrors, answer["error"], None)
            if isinstance(cls, type) and issubclass(cls, GpulabError):
                raise cls(answer["message"])
            raise RuntimeError(f"{answer['error']} in the gpulab worker: {answer['message']}\n{answer['traceback']}")
        return answer["ok"]

    def call(self, op: str, **args):
        if not self.alive:
            self.close()
            self._start()
        return self._request(op, args)

    def devices(self) -> list[Device]:
        """The devices llama.cpp sees in the worker (RPC endpoints registered)."""
        return [Device(**d) for d in self.call("devices")]

    def load(self, path: str | os.PathLike, config: SplitConfig, *, dry_run: bool = False,
             use_devices: bool = True) -> tuple[LoadReport, dict]:
        """Load, report, close. Returns the LoadReport and the raw answer (notes, timings)."""
        raw = self.call("load", path=str(path), config=asdict(config), dry_run=dry_run, use_devices=use_devices)
        return LoadReport.from_dict(raw["report"]), raw


# -- the worker side -----------------------------------------------------------------------------
def _serve() -> None:
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)   # llama.cpp/ggml printf must not corrupt the answers

    from . import llama_lib, rpc
    from .model import open_model

    def op_register(endpoints):
        return [asdict(d) for d in rpc.register(endpoints)]

    def op_devices():
        return [asdict(d) for d in llama_lib.llama_devices()]

    def op_dev_count():
        return int(llama_lib.ggml().ggml_backend_dev_count())

    def op_default_device_names():
        return llama_lib.default_device_names()

    def op_load(path, config, dry_run=False, use_devices=True):
        devices = llama_lib.llama_devices() if use_devices else None
        fractions: list[float] = []
        with open_model(path, SplitConfig(**config), devices=devices, dry_run=dry_run,
                        progress=fractions.append) as m:
            return {"report": m.report.to_dict(), "notes": list(m.notes),
                    "effective_devices": list(m.effective_config.devices),
                    "load_seconds": m.load_seconds, "context_seconds": m.context_seconds,
                    "n_progress": len(fractions), "last_progress": fractions[-1] if fractions else None}

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


if __name__ == "__main__":
    _serve()
