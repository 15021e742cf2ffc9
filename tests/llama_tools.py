"""Where the tests find llama.cpp's own tools and source (importable as `llama_tools`).

scripts/llama-tools.sh builds llama-server, llama-bench and llama-fit-params from the source the
pinned llama-cpp-python vendors, with the wheel's CPU-feature decision; `make test` runs it first,
so in CI these are always present. GPULAB_LLAMA_BIN / GPULAB_LLAMA_CPP_SRC point elsewhere.
Tests that need them skip, saying so, where neither is at hand (a bare `pytest` on a new machine).
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGETS = ("llama-server", "llama-bench", "llama-fit-params")


@functools.lru_cache(maxsize=1)
def tools_bin() -> Path | None:
    """The folder with llama-server, llama-bench and llama-fit-params, or None."""
    given = os.environ.get("GPULAB_LLAMA_BIN")
    if given:
        return Path(given) if (Path(given) / "llama-server").is_file() else None
    out = subprocess.run([str(REPO / "scripts" / "llama-tools.sh"), "--find-only", *TARGETS], capture_output=True,
                         text=True, env=dict(os.environ, PY=sys.executable))
    return Path(out.stdout.strip()) if out.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def vendored_src() -> Path | None:
    """vendor/llama.cpp of the pinned llama-cpp-python sdist, or None."""
    given = os.environ.get("GPULAB_LLAMA_CPP_SRC")
    candidates = [Path(given)] if given else []
    b = tools_bin()
    if b is not None:
        candidates.append(b.parents[1] / "src" / "vendor" / "llama.cpp")
    return next((p for p in candidates if (p / "common" / "arg.cpp").is_file()), None)


NOT_BUILT = "llama.cpp's tools are not built here (scripts/llama-tools.sh; `make test` builds them)"
