"""What the tests against real llama.cpp share: three CPU RPC servers and a worker that sees them, and
the models each module declares (its MODELS: name -> SynthSpec) written once. The bar their figures
meet is builders.close_to_llama."""

from __future__ import annotations

import pytest

from gpulab.sources.synth import write_model


@pytest.fixture(scope="module")
def worker():
    """A gpulab worker with three CPU RPC servers registered (RPC0..RPC2)."""
    from gpulab.runtime.rpc import start_servers
    from gpulab.runtime.worker import Worker
    with start_servers(3) as cluster, Worker(cluster.endpoints) as w:
        yield w


@pytest.fixture(scope="module")
def model_paths(request, tmp_path_factory):
    """The module's MODELS, written as GGUF files: name -> path."""
    root = tmp_path_factory.mktemp("models")
    return {name: write_model(root / f"{name}.gguf", spec) for name, spec in request.module.MODELS.items()}
