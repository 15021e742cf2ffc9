"""Fixtures for the Jupyter front end: hand-built profiles, fake workers and probes.

Widgets are tested through their Python state (ipywidgets and FigureWidget work without a
frontend); the real-browser test lives in tests/browser/.
"""

from __future__ import annotations

import pytest

from gpulab.core.devices import Device
from gpulab.core.errors import LoadError
from gpulab.core.report import BufferReport, LoadReport

pytest.importorskip("ipywidgets")
pytest.importorskip("plotly")

GiB = 1024**3


class FakeWorker:
    """A gpulab.core.protocols.Runtime for UI tests: canned answers, no llama.cpp, no planner.

    Its "llama.cpp" places layers as `placement` says (default: the tiny model's 7 layers and the
    output split 1/1 over RPC0/RPC1 as llama.cpp's upper_bound rule does by hand: layers 0-3 on
    RPC0, 4-6 and the output on RPC1) and reports fixed buffer sizes; `measure` returns fixed
    tokens/s after reporting each phase. `fail_with` is raised instead, as the real worker
    raises LoadError when llama.cpp aborted it; `busy` makes try_devices() answer None.
    """

    PP_TS, TG_TS = 123.0, 45.0

    def __init__(self, n: int = 2, free: int = 8 * GiB):
        self._devices = [Device(f"RPC{i}", free, free, "rpc", "rpc", description=f"127.0.0.1:{5000 + i}",
                                endpoint=f"127.0.0.1:{5000 + i}") for i in range(n)]
        self.placement: tuple[str, ...] = ("RPC0",) * 4 + ("RPC1",) * 4
        self.fail_with: Exception | None = None
        self.busy = False
        self.loads: list = []
        self.closed = False

    def devices(self):
        return list(self._devices) + [Device("CPU", 16 * GiB, 12 * GiB, "llama", "cpu")]

    def try_devices(self):
        return None if self.busy else self.devices()

    def _report(self) -> LoadReport:
        used = list(dict.fromkeys(self.placement))
        bufs = tuple(b for name in used for b in (BufferReport(name, name, "model", 3 << 20),
                                                  BufferReport(name, name, "kv", 1 << 20)))
        return LoadReport(layer_devices=self.placement, buffers=bufs, devices=tuple(d.name for d in self._devices))

    def load(self, path, config, **_):
        self.loads.append(config)
        if self.fail_with is not None:
            raise self.fail_with
        return self._report(), {"load_seconds": 0.01}

    def measure(self, path, config=None, *, n_prompt=512, n_gen=128, repetitions=5, progress=None, **_):
        from gpulab.core.run import Run, Throughput
        report, _ = self.load(path, config)
        for phase in ("load", "warmup", "pp", "tg"):
            if progress is not None:
                progress(phase, 0.5)
        pp = Throughput(n_prompt, 0, (1,), (self.PP_TS,), self.PP_TS, 1.0)
        tg = Throughput(0, n_gen, (1,), (self.TG_TS,), self.TG_TS, 0.5)
        return Run(str(path), 1, config, report, pp=pp, tg=tg)

    def close(self):
        self.closed = True


@pytest.fixture
def fake_worker():
    return FakeWorker()


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory):
    """A small random-weight llama GGUF (7 layers) written by the test."""
    from gpulab.sources.synth import SynthSpec, write_model
    path = tmp_path_factory.mktemp("models") / "tiny.gguf"
    return str(write_model(path, SynthSpec(n_layer=7, n_embd=256, n_ff=512, n_vocab=512)))


__all__ = ["FakeWorker", "LoadError"]
