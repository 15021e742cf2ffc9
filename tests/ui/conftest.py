"""Fixtures for the Jupyter front end: hand-built profiles, fake workers and probes.

Widgets are tested through their Python state (ipywidgets and FigureWidget work without a
frontend); the real-browser test lives in tests/browser/.
"""

from __future__ import annotations

import pytest

from gpulab.core.devices import Device
from gpulab.core.report import BufferReport, LoadReport
from gpulab.errors import LoadError

pytest.importorskip("ipywidgets")
pytest.importorskip("plotly")

GiB = 1024**3


class FakeWorker:
    """Stands in for gpulab.runtime.worker.Worker: devices() and load(), no llama.cpp.

    load() answers with the planner's own placement (so placement 'matches'), or raises what
    `fail_with` holds, as the real worker raises LoadError when llama.cpp aborted it.
    """

    def __init__(self, n: int = 2, free: int = 8 * GiB):
        self._devices = [Device(f"RPC{i}", free, free, "rpc", "rpc", description=f"127.0.0.1:{5000 + i}",
                                endpoint=f"127.0.0.1:{5000 + i}") for i in range(n)]
        self.fail_with: Exception | None = None
        self.loads: list = []
        self.closed = False

    def devices(self):
        return list(self._devices) + [Device("CPU", 16 * GiB, 12 * GiB, "llama", "cpu")]

    def load(self, path, config):
        from gpulab import plan, read_profile
        self.loads.append(config)
        if self.fail_with is not None:
            raise self.fail_with
        p = plan(read_profile(path), self._devices, config)
        bufs = []
        for d in p.devices:
            bufs.append(BufferReport(d.name, d.name, "model", d.weights_bytes))
            bufs.append(BufferReport(d.name, d.name, "kv", d.kv_bytes))
        rep = LoadReport(layer_devices=p.layer_devices, buffers=tuple(bufs),
                         devices=tuple(d.name for d in p.offload_devices))
        return rep, {"load_seconds": 0.01}

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
