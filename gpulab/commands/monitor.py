"""`%gpulab monitor [--interval S]`: live GPU memory and utilisation (NVML)."""

from __future__ import annotations

from .result import Result

__all__ = ["register", "run"]


def register(sub, frontend: str) -> None:
    p = sub.add_parser("monitor", help="live GPU memory and utilisation (NVML)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between samples")
    p.add_argument("--history", type=int, default=600, help="samples kept per GPU")
    p.set_defaults(run=run)


def run(a, session) -> Result:
    from ..ui.monitor import Monitor
    m = Monitor(interval=a.interval, history=a.history)
    return Result(widget=m, objects={"monitor": m})
