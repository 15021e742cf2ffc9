"""`%gpulab monitor [--interval S] [--fleet FLEET]`: live GPU memory and utilisation (NVML); with a
fleet, each GPU process is attributed to the fleet model it serves."""

from __future__ import annotations

from .result import Result

__all__ = ["register", "run"]


def register(sub, frontend: str) -> None:
    p = sub.add_parser("monitor", help="live GPU memory and utilisation (NVML)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between samples")
    p.add_argument("--history", type=int, default=600, help="samples kept per GPU")
    p.add_argument("--fleet", help="a fleet (TOML, llama-swap config.yaml, router INI): name each process's model")
    p.set_defaults(run=run)


def run(a, session) -> Result:
    from ..ui.monitor import Monitor
    models = None
    if a.fleet:
        from pathlib import Path

        from ..sources.model_refs import resolve_model
        from ..storage.fleet_files import read_any_fleet
        fleet, _ = read_any_fleet(a.fleet)
        base = Path(a.fleet).resolve().parent
        models = {m.name: resolve_model(m.model, base=base) for m in fleet.models}
    m = Monitor(interval=a.interval, history=a.history, models=models)
    return Result(widget=m, objects={"monitor": m})
