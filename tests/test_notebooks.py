"""Every notebook in notebooks/ runs top to bottom without error, with real llama.cpp on
virtual (RPC) devices and the demo model: what a user gets from `make lab`. Each runs in its own
folder, as JupyterLab runs it, and leaves nothing behind there for git to show."""

from __future__ import annotations

import subprocess
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def _git_status() -> str:
    """`git status --porcelain notebooks/`, or '' outside a git checkout."""
    try:
        return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "notebooks/"], cwd=REPO,
                              capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def test_notebooks_are_numbered_once_each():
    numbers = [p.name.split("-", 1)[0] for p in NOTEBOOKS]
    assert numbers == [f"{i:02d}" for i in range(1, len(NOTEBOOKS) + 1)], [p.name for p in NOTEBOOKS]


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path):
    before = _git_status()
    nb = nbformat.read(path, as_version=4)
    # errors are collected, not raised, so that the assertion below names every failing cell
    NotebookClient(nb, timeout=300, kernel_name="python3", allow_errors=True,
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    errors = [f"cell {i}: {o.ename}: {o.evalue}" for i, c in enumerate(nb.cells) if c.cell_type == "code"
              for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    assert _git_status() == before, "the notebook left files in notebooks/"
