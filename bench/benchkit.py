"""What the benchmark scripts share (importable as `benchkit`: a script's own folder is on sys.path)."""

from __future__ import annotations

import argparse
from pathlib import Path


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages, printed beside every figure: other work moves them."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def add_rpc_run_args(ap: argparse.ArgumentParser) -> None:
    """The flags of the scripts that measure on CPU RPC servers: rounds, threads, test sizes, nice, JSON."""
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="threads of the RPC servers and of the host")
    ap.add_argument("--n-prompt", type=int, default=32)
    ap.add_argument("--n-gen", type=int, default=16)
    ap.add_argument("--nice", type=int, default=0, help="change this process's niceness first")
    ap.add_argument("--json", help="write every figure to this file")
