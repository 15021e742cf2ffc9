"""Fixtures for the Jupyter front end: hand-built profiles, fake workers and probes.

Widgets are tested through their Python state (ipywidgets and FigureWidget work without a
frontend); the real-browser test lives in tests/browser/.
"""

from __future__ import annotations

import pytest

from gpulab.core.errors import LoadError
from gpulab.testing import FakeWorker

pytest.importorskip("ipywidgets")
pytest.importorskip("plotly")

GiB = 1024**3


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
