"""Process helpers shared by tests (importable as `processes`: tests/ is on pythonpath)."""

from __future__ import annotations

import os
import subprocess
import time


def wait_gone(pid: int, timeout: float) -> bool:
    """True once no process has `pid` (polled every 50 ms), False after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def stop(proc: subprocess.Popen, timeout: float = 20) -> None:
    """Terminate a child (a server the test started), kill it if it has not ended after `timeout` s."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
