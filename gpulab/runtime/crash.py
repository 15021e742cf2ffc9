"""When llama.cpp kills a process: one line that names the signal, the likely cause and what to do.

Two users:
- `describe_death(returncode, what)` for a child that died (the worker, the set-up's smoke test):
  'signal 11 (SIGSEGV) during measure: <cause>; <what to do>'.
- `guard(what)` around in-process llama.cpp work (open_model, measure_loaded outside a worker).
  A process killed by SIGSEGV cannot run Python, so a small watcher process is started once: it
  reads what `faulthandler` writes on a fatal signal (through a pipe only this process holds)
  and, when the pipe closes, prints the one line on the shared stderr. Inside the gpulab worker
  (GPULAB_WORKER=1) the guard does nothing: the Worker client reports the death instead.

    python -m gpulab.runtime.crash --watch FD PID     (the watcher; started by guard())
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

__all__ = ["describe_signal", "describe_death", "guard", "REBUILD_HINT", "PORTABLE_HINT"]

REBUILD_HINT = "GPULAB_REBUILD=1 scripts/setup.sh"
PORTABLE_HINT = "GPULAB_REBUILD=1 GPULAB_CMAKE_ARGS=-DGGML_NATIVE=OFF scripts/setup.sh"

# faulthandler's first line ('Fatal Python error: Segmentation fault') names the signal so
_FATAL_NAMES = {"Segmentation fault": signal.SIGSEGV, "Bus error": signal.SIGBUS,
                "Illegal instruction": signal.SIGILL, "Floating point exception": signal.SIGFPE,
                "Aborted": signal.SIGABRT}
_PHASE = "gpulab-phase "


def _amx_mismatch() -> bool:
    """True when the installed libggml-cpu has AMX instructions this host's kernel does not enable."""
    try:
        from ..sources.cpu_features import host_decision, library_has_amx
        from .llama_lib import lib_dir
        libs = sorted(lib_dir().glob("libggml-cpu*.so*"))
        return "AMX" in host_decision().off and any(library_has_amx(str(p)) for p in libs)
    except Exception:  # noqa: BLE001 - a hint must never fail the report
        return False


def describe_signal(signum: int) -> str:
    """'SIGSEGV: <likely cause>; <what to do>' for a signal that ended a llama.cpp process."""
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    if signum in (signal.SIGSEGV, signal.SIGILL, signal.SIGBUS) and _amx_mismatch():
        cause = ("this llama.cpp was built with AMX instructions, but this host's kernel does not enable AMX "
                 f"tile data, so they fault; rebuild it without them: {REBUILD_HINT}")
    elif signum == signal.SIGILL:
        cause = ("an instruction this CPU cannot run: the llama.cpp library was built for another CPU (a copied "
                 f"wheel cache or image?); rebuild it here: {REBUILD_HINT}")
    elif signum in (signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE):
        cause = ("a crash inside llama.cpp; if it happens again with the same settings, try a portable build "
                 f"({PORTABLE_HINT}) and report the model and flags")
    elif signum == signal.SIGABRT:
        cause = "llama.cpp aborted (GGML_ASSERT or GGML_ABORT: its own message is on stderr above)"
    elif signum == signal.SIGKILL:
        cause = ("killed from outside, most often by the kernel's out-of-memory killer: keep more on the GPUs "
                 "(-ngl) or use a smaller context (-c)")
    else:
        cause = "ended by a signal"
    return f"{name}: {cause}"


def describe_death(returncode: int | None, what: str) -> str:
    """One line for a child process that ended: 'signal 11 (SIGSEGV) during measure: ...'."""
    if returncode is not None and returncode < 0:
        sig = -returncode
        head, _, rest = describe_signal(sig).partition(": ")
        return f"signal {sig} ({head}) during {what}: {rest}"
    if returncode is not None and returncode > 128 and returncode - 128 in _signal_numbers():
        return describe_death(128 - returncode, what)      # a shell reports signal N as 128 + N
    return f"exit {returncode} during {what}"


def _signal_numbers() -> set[int]:
    return {int(s) for s in signal.Signals}


# --- the guard -----------------------------------------------------------------------------------

_lock = threading.Lock()
_pipe = None          # the write end faulthandler and the phase lines go to
_phases: list[str] = []


def _start_watcher():
    r, w = os.pipe()      # not inherited by exec'd children: only this process holds the write end
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        subprocess.Popen([sys.executable, "-m", "gpulab.runtime.crash", "--watch", str(r), str(os.getpid())],
                         pass_fds=(r,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=env)
    except OSError:
        os.close(r)
        os.close(w)
        return None
    os.close(r)
    f = os.fdopen(w, "w", buffering=1)
    faulthandler.enable(file=f, all_threads=False)
    return f


def _say(line: str) -> None:
    with _lock:
        if _pipe is None:
            return
        try:
            _pipe.write(line + "\n")
        except (OSError, ValueError):
            pass


@contextlib.contextmanager
def guard(what: str):
    """Report this process's death by a signal while `what` runs (see the module docstring)."""
    global _pipe
    if os.environ.get("GPULAB_WORKER") == "1" or os.environ.get("GPULAB_NO_CRASH_GUARD") == "1":
        yield
        return
    with _lock:
        if _pipe is None:
            _pipe = _start_watcher()
    _phases.append(what)
    _say(_PHASE + what)
    try:
        yield
    finally:
        _phases.pop()
        _say(_PHASE + (_phases[-1] if _phases else "-"))


def _watch(fd: int, pid: int) -> int:
    """The watcher: read until the guarded process closes the pipe, then report how it died."""
    phase, fatal, dump = "-", None, []
    with os.fdopen(fd, "r", errors="replace") as f:
        for line in f:
            if line.startswith(_PHASE):
                phase = line[len(_PHASE):].strip()
                continue
            if fatal is None and line.startswith("Fatal Python error: "):
                name = line.split(": ", 1)[1].strip()
                fatal = _FATAL_NAMES.get(name, -1)
            if fatal is not None:
                dump.append(line)
    if fatal is None and phase == "-":
        return 0          # the process ended normally, or outside llama.cpp work
    where = phase if phase != "-" else "llama.cpp work"
    if fatal is None:
        msg = (f"gpulab: this process ended during {where} without a word from Python: probably "
               + describe_signal(signal.SIGKILL).split(": ", 1)[1])
    else:
        text = describe_death(-fatal if fatal > 0 else None, where)
        path = Path(tempfile.gettempdir()) / f"gpulab-crash-{pid}.txt"
        try:
            path.write_text("".join(dump))
            stack = f" (Python stack: {path})"
        except OSError:
            stack = ""
        msg = f"gpulab: llama.cpp killed this process with {text}{stack}"
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--watch":
        sys.exit(_watch(int(sys.argv[2]), int(sys.argv[3])))
    sys.exit("usage: python -m gpulab.runtime.crash --watch FD PID")
