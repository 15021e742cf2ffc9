"""scripts/llama-wheel.sh: a cached llama-cpp-python wheel is reused only for the same flags and
CPU features, and a build never takes pip's own (unkeyed) wheel cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "llama-wheel.sh"
WHEEL = "llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl"


def _wheel(path: Path, rpc: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("llama_cpp/__init__.py", "")
        if rpc:
            z.writestr("llama_cpp/lib/libggml-rpc.so", b"\x7fELF")
    return path


def _run(cache: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("GPULAB_")}
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=120,
                          env={**base, "PY": sys.executable, "GPULAB_WHEEL_CACHE": str(cache), **env})


def _key_dir(cache: Path, **env: str) -> Path:
    base = {k: v for k, v in os.environ.items() if not k.startswith("GPULAB_")}
    extra = env.get("GPULAB_CMAKE_ARGS")
    out = subprocess.run([sys.executable, str(REPO / "gpulab/sources/cpu_features.py"), "--shell",
                          "--lcp-version=0.3.36",
                          "--cmake-args=-DGGML_RPC=ON -DLLAVA_BUILD=OFF" + (f" {extra}" if extra else "")],
                         capture_output=True, text=True, env={**base, **env}, check=True).stdout
    key = next(ln.split("=", 1)[1] for ln in out.splitlines() if ln.startswith("GPULAB_BUILD_KEY="))
    return cache / f"0.3.36-{key}"


def test_wheels_of_other_keys_or_the_old_layout_are_not_reused(tmp_path):
    cache = tmp_path / "cache"
    _wheel(cache / WHEEL)                                   # the unkeyed layout of earlier set-ups
    _wheel(cache / "0.3.36-0123456789abcdef" / WHEEL)       # another build's key
    got = _run(cache, "--find-only")
    assert got.returncode == 1 and got.stdout == "", got
    assert "CPU features:" in got.stderr                    # the one line on what was decided

    mine = _wheel(_key_dir(cache) / WHEEL)
    got = _run(cache, "--find-only")
    assert got.returncode == 0 and got.stdout.strip() == str(mine), got


@pytest.mark.parametrize("env", [{"GPULAB_CPU_OFF": "AVX"}, {"GPULAB_CMAKE_ARGS": "-DGGML_NATIVE=OFF"}])
def test_other_flags_make_another_key(tmp_path, env):
    cache = tmp_path / "cache"
    _wheel(_key_dir(cache) / WHEEL)
    assert _key_dir(cache, **env) != _key_dir(cache)
    got = _run(cache, "--find-only", **env)
    assert got.returncode == 1 and got.stdout == "", got
    assert _run(cache, "--find-only").returncode == 0


def test_a_cached_wheel_without_rpc_is_not_used(tmp_path):
    cache = tmp_path / "cache"
    _wheel(_key_dir(cache) / WHEEL, rpc=False)
    got = _run(cache, "--find-only")
    assert got.returncode == 1 and "lacks RPC" in got.stderr


def test_a_build_uses_no_pip_cache_and_the_decided_flags(tmp_path):
    """PY is a stand-in that records the pip call and writes a wheel where it was asked to."""
    log = tmp_path / "pip-call.json"
    fake = tmp_path / "python"
    fake.write_text(f"""#!{sys.executable}
import json, os, sys, zipfile
args = sys.argv[1:]
if args[:2] == ["-m", "pip"]:
    json.dump({{"args": args, "CMAKE_ARGS": os.environ.get("CMAKE_ARGS")}}, open({str(log)!r}, "w"))
    out = args[args.index("-w") + 1]
    with zipfile.ZipFile(os.path.join(out, {WHEEL!r}), "w") as z:
        z.writestr("llama_cpp/lib/libggml-rpc.so", b"")
    sys.exit(0)
os.execv({sys.executable!r}, [{sys.executable!r}, *args])
""")
    fake.chmod(0o755)
    cache = tmp_path / "cache"
    got = subprocess.run([str(SCRIPT)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PY": str(fake), "GPULAB_WHEEL_CACHE": str(cache), "GPULAB_CPU_OFF": "AMX"})
    assert got.returncode == 0, got.stderr
    want = _key_dir(cache, GPULAB_CPU_OFF="AMX") / WHEEL
    assert got.stdout.strip() == str(want)
    call = json.loads(log.read_text())
    assert "--no-cache-dir" in call["args"] and "llama-cpp-python==0.3.36" in call["args"]
    assert "'-DCMAKE_C_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'" in call["CMAKE_ARGS"]
    assert call["CMAKE_ARGS"].startswith("-DGGML_RPC=ON")
    build = json.loads((want.parent / "build.json").read_text())
    assert build["off"] == ["AMX"] and want.parent.name.endswith(build["build_key"])


def _setup_inputs_key(cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """scripts/setup.sh's inputs_key, run as the script runs it (set -euo pipefail)."""
    body = (REPO / "scripts" / "setup.sh").read_text()
    fn = body[body.index("inputs_key() {"):]
    fn = fn[: fn.index("\n}\n") + 3]
    base = {k: v for k, v in os.environ.items() if not k.startswith("GPULAB_")}
    return subprocess.run(["bash", "-c", f"set -euo pipefail\nVENV=.venv\n{fn}\ninputs_key"], cwd=cwd,
                          capture_output=True, text=True, timeout=60, env={**base, **env})


def test_the_set_up_stamp_is_written_when_no_build_flag_is_set():
    """With no GPULAB_ build flag in the environment (CI's case) the key must still come out: a grep
    that matches nothing once failed the whole set-up after its last step under pipefail."""
    plain = _setup_inputs_key(REPO)
    assert plain.returncode == 0, plain.stderr
    assert len(plain.stdout.strip()) == 64
    other = _setup_inputs_key(REPO, GPULAB_CPU_OFF="AMX")
    assert other.returncode == 0 and other.stdout.strip() != plain.stdout.strip()
