"""No silent death (issue 11): when llama.cpp kills a process, one line says which signal, the
likely cause and what to do; `gpulab bench` measures in a worker and says why it died."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpulab.runtime import crash
from gpulab.runtime.smoke import _paragraph

REPO = Path(__file__).resolve().parents[2]
GPULAB = [sys.executable, "-m", "gpulab.cli"]

# a measurement in this (child) process, killed by SIGSEGV while llama.cpp generates tokens
_KILLED_IN_PROCESS = r"""
import os, signal, sys, threading, time
from gpulab.core.config import SplitConfig
from gpulab.runtime.bench import measure

def progress(phase, fraction):
    if phase == "tg" and fraction == 0.0:
        # from another thread, 50 ms on: the main thread is inside llama_decode then
        threading.Thread(target=lambda: (time.sleep(0.05), os.kill(os.getpid(), signal.SIGSEGV))).start()

measure(sys.argv[1], SplitConfig(devices=("none",), n_ctx=1024), n_prompt=8, n_gen=1000, repetitions=1,
        progress=progress, nvml=False, warmup=False)
print("not reached")
"""


def test_in_process_measurement_killed_by_sigsegv_prints_one_line(smollm2_path):
    out = subprocess.run([sys.executable, "-c", _KILLED_IN_PROCESS, smollm2_path], capture_output=True,
                         text=True, timeout=120, cwd=REPO)
    assert out.returncode == -signal.SIGSEGV, out
    assert "not reached" not in out.stdout
    ours = [ln for ln in out.stderr.splitlines() if ln.startswith("gpulab:")]
    assert len(ours) == 1, out.stderr
    line = ours[0]
    assert "killed this process with signal 11 (SIGSEGV) during the measurement of" in line, line
    assert Path(smollm2_path).name in line and "scripts/setup.sh" in line, line
    assert "Fatal Python error" not in out.stderr      # the Python stack goes to a file, named in the line
    stack = Path(line.rsplit("(Python stack: ", 1)[1].rstrip(")"))
    assert "Segmentation fault" in stack.read_text()
    stack.unlink()


def test_a_normal_exit_after_guarded_work_prints_nothing(smollm2_path):
    code = ("import sys\nfrom gpulab.core.config import SplitConfig\nfrom gpulab.runtime.bench import measure\n"
            "r = measure(sys.argv[1], SplitConfig(devices=('none',), n_ctx=64), n_prompt=8, n_gen=4, repetitions=1,"
            " nvml=False)\nprint('ok', r.tg.n_gen)")
    out = subprocess.run([sys.executable, "-c", code, smollm2_path], capture_output=True, text=True, timeout=120,
                         cwd=REPO)
    assert out.returncode == 0 and out.stdout.strip() == "ok 4", out
    assert "gpulab:" not in out.stderr


def _worker_pid(parent: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                cmd = (d / "cmdline").read_bytes()
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == parent and b"gpulab.runtime.worker" in cmd:
                return int(d.name)
        time.sleep(0.1)
    raise AssertionError("no worker process appeared")


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to find the worker")
def test_gpulab_bench_never_dies_silently(smollm2_path, tmp_path):
    """The worker dies by SIGSEGV mid-measurement; `gpulab bench` exits 2 with one line saying so."""
    proc = subprocess.Popen([*GPULAB, "bench", smollm2_path, "-p", "16", "-n", "3000", "-r", "1", "--no-store",
                             "-t", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        pid = _worker_pid(proc.pid)
        time.sleep(3)                      # loaded and generating (3000 tokens take far longer)
        os.kill(pid, signal.SIGSEGV)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, (out, err)
    lines = [ln for ln in err.splitlines() if ln.startswith("gpulab: error:")]
    assert len(lines) == 1, err
    assert "ended the worker process with signal 11 (SIGSEGV) during measure" in lines[0], lines[0]
    assert "scripts/setup.sh" in lines[0] and "This process is fine" in lines[0]


def test_the_amx_cause_is_named_when_the_library_has_amx_and_the_kernel_lacks_tile_data(monkeypatch):
    from gpulab.sources import cpu_features as cf
    monkeypatch.setattr(cf, "host_decision", lambda: cf.BuildDecision(off=("AMX",)))
    monkeypatch.setattr(cf, "library_has_amx", lambda path: True)
    line = crash.describe_death(-signal.SIGSEGV, "measure")
    assert line.startswith("signal 11 (SIGSEGV) during measure: this llama.cpp was built with AMX instructions")
    assert crash.REBUILD_HINT in line
    monkeypatch.setattr(cf, "library_has_amx", lambda path: False)
    assert "AMX" not in crash.describe_death(-signal.SIGSEGV, "measure")


@pytest.mark.parametrize("code,expect", [(-signal.SIGILL, "SIGILL) during load: an instruction this CPU cannot run"),
                                         (-signal.SIGKILL, "out-of-memory killer"),
                                         (-signal.SIGABRT, "GGML_ASSERT"),
                                         (139, "signal 11 (SIGSEGV)"), (1, "exit 1 during load")])
def test_describe_death(code, expect):
    assert expect in crash.describe_death(code, "load")


def test_the_smoke_test_passes_on_this_host():
    out = subprocess.run([sys.executable, "-m", "gpulab.runtime.smoke"], capture_output=True, text=True,
                         timeout=180, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("smoke test passed: 64-token prompt at ")


def test_the_smoke_test_failure_says_how_to_rebuild(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    out = subprocess.run([sys.executable, "-m", "gpulab.runtime.smoke", str(bad)], capture_output=True, text=True,
                         timeout=180, cwd=REPO)
    assert out.returncode == 1
    assert "The smoke test of llama.cpp failed: exit 1" in out.stderr and crash.REBUILD_HINT in out.stderr
    text = _paragraph(-signal.SIGSEGV, "")
    assert "signal 11 (SIGSEGV)" in text
    assert crash.PORTABLE_HINT.replace(" ", "") in text.replace("\n", "").replace(" ", "")
