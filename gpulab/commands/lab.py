"""`%gpulab lab [MODEL] [llama flags] [device flags] [--policy P] [--monitor]`: the SplitLab widget."""

from __future__ import annotations

from ..core.policies.apply import ALL_POLICIES
from .flags import add_config_flags, add_device_flags, add_model_arg, config_from_args, devices_from_args, model_path
from .result import Result

__all__ = ["register", "run"]


def register(sub, frontend: str) -> None:
    p = sub.add_parser("lab", help="the SplitLab widget: layer strip, figures, load & measure")
    add_model_arg(p, optional=True)
    add_config_flags(p)
    add_device_flags(p, virtual=True)
    p.add_argument("--policy", choices=ALL_POLICIES, help="set the controls by a policy first")
    p.add_argument("--monitor", action="store_true", help="add the live GPU monitor under the lab")
    p.set_defaults(run=run)


def run(a, session) -> Result:
    from ..ui.lab import SplitLab
    sim = getattr(a, "sim", None)
    choice = devices_from_args(a, session, for_load=sim is None, virtual_if_no_gpu=sim is None)
    lab = SplitLab(model_path(a.model), config=config_from_args(a), choice=choice)
    if a.policy:
        lab.apply_policy(a.policy)
    if a.monitor:
        from ..ui.monitor import Monitor
        lab.attach_monitor(Monitor(worker=lab.worker))
    return Result(widget=lab, objects={"lab": lab})
