"""The planner installs without a compiler and without llama-cpp-python (pyproject.toml: the `run`
extra holds it): a wheel built from this tree, installed into a fresh virtual environment, plans
the demo model on simulated GPUs, and a command that measures says in one line how to get the
extra and exits 2."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from gpulab.core.errors import GpulabError

REPO = Path(__file__).resolve().parents[1]


def _run(cmd: list, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    # no PYTHONPATH: the commands must run the installed gpulab, not this checkout
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def planner_venv(tmp_path_factory) -> Path:
    """bin/ of a fresh virtual environment with only the wheel of this tree and its base dependencies."""
    root = tmp_path_factory.mktemp("planner-install")
    src = root / "src"     # a copy: the build's build/ and egg-info stay out of the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "gpulab", src / "gpulab", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    built = _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", root / "dist", src], root, 300)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (root / "dist").glob("gpulab-*.whl")
    assert wheel.name.endswith("-py3-none-any.whl")      # pure Python: nothing to compile
    with zipfile.ZipFile(wheel) as z:
        assert "gpulab/py.typed" in z.namelist()
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    requires = [ln for ln in meta.splitlines() if ln.startswith("Requires-Dist:")]
    assert [ln for ln in requires if "llama-cpp-python" in ln] == \
        ['Requires-Dist: llama-cpp-python==0.3.36; extra == "run"']
    venv = root / "venv"
    made = _run([sys.executable, "-m", "venv", venv], root, 120)
    assert made.returncode == 0, made.stderr[-3000:]
    # a plain install, as a user types it: pip resolves the base dependencies (from its cache here)
    inst = _run([venv / "bin" / "python", "-m", "pip", "install", "-q", "--disable-pip-version-check", wheel],
                root, 300)
    assert inst.returncode == 0, inst.stderr[-3000:]
    return venv / "bin"


@pytest.fixture(scope="module")
def demo() -> str:
    from gpulab.sources.demo import demo_model_path
    try:
        return str(demo_model_path())
    except GpulabError as e:
        pytest.skip(str(e))


@pytest.mark.slow
def test_the_wheel_installs_without_llama_cpp_python(planner_venv, tmp_path):
    got = _run([planner_venv / "python", "-c", "import llama_cpp"], tmp_path, 60)
    assert got.returncode == 1 and "No module named 'llama_cpp'" in got.stderr


@pytest.mark.slow
def test_the_installed_planner_plans_the_demo_model_on_two_simulated_gpus(planner_venv, demo, tmp_path):
    got = _run([planner_venv / "gpulab", "plan", demo, "--sim", "2x24GiB"], tmp_path, 120)
    assert got.returncode == 0, got.stderr
    # SmolLM2-135M's 30 layers by free memory, as llama.cpp splits them (the same plan as in this checkout)
    assert _layers(got.stdout) == {"SIM0": "0-15", "SIM1": "16-29,out", "CPU": "input"}
    assert got.stdout.rstrip().endswith("fits")
    fit = _run([planner_venv / "gpulab", "plan", demo, "--sim", "2x24GiB", "--policy", "fit"], tmp_path, 120)
    assert fit.returncode == 0, fit.stderr
    # llama-server's -fit on two free 24 GiB GPUs: full offload, its default 8192-token context
    assert _layers(fit.stdout) == {"SIM0": "0-15", "SIM1": "16-29,out", "CPU": "input"}
    assert "flags: -ngl all -sm layer -mg 0 -c 8192 " in fit.stdout


def _layers(text: str) -> dict[str, str]:
    """{device: its layers column} of the last plan table in `gpulab plan`'s text."""
    rows = [ln.split() for ln in text.splitlines() if ln.split()[:1] in (["SIM0"], ["SIM1"], ["CPU"])]
    return {r[0]: r[1] for r in rows}


@pytest.mark.slow
def test_bench_without_the_run_extra_says_how_to_get_it_in_one_line(planner_venv, demo, tmp_path):
    got = _run([planner_venv / "gpulab", "bench", demo], tmp_path, 120)
    assert got.returncode == 2
    assert got.stdout == ""
    lines = got.stderr.strip().splitlines()
    assert len(lines) == 1, got.stderr
    assert "llama-cpp-python is not installed" in lines[0]
    assert "pip install 'gpulab[run]'" in lines[0] and 'CMAKE_ARGS="-DGGML_RPC=ON"' in lines[0]
