"""`gpulab plan MODEL [llama.cpp flags] [device flags] [--policy P] [--json]`: llama.cpp's placement
and per-device memory, predicted, and the predicted speed.

Exit status (CLI): 0 when the plan fits, 1 when it does not, 2 on bad input.
"""

from __future__ import annotations

import shlex
from html import escape as _escape

from ..core.policies import POLICIES
from .flags import (add_config_flags, add_device_flags, add_json_flag, add_model_arg, config_from_args,
                    devices_from_args, model_path)
from .result import Result

__all__ = ["register", "run", "planned"]


def register(sub, frontend: str) -> None:
    p = sub.add_parser("plan", help="predict llama.cpp's placement and per-device memory")
    add_model_arg(p)
    add_config_flags(p)
    add_device_flags(p)
    p.add_argument("--policy", choices=POLICIES,
                   help="choose -ts by a policy (moe-balance: -ts and -ot rules for a MoE model); prints the flags")
    add_json_flag(p, frontend)
    if frontend == "magic":
        p.add_argument("--no-figures", action="store_true", help="the table only")
    p.set_defaults(run=run, figures=frontend == "magic")


def planned(a, session, *, for_load: bool = False, virtual_if_no_gpu: bool = False):
    """(path, profile, DeviceChoice, config, Plan) for the model, config and device flags."""
    from ..core.planner import plan
    from ..core.policies import apply_policy
    from ..sources.read import read_profile
    path = model_path(a.model)
    prof = read_profile(path)
    choice = devices_from_args(a, session, for_load=for_load, virtual_if_no_gpu=virtual_if_no_gpu)
    config = config_from_args(a)
    if getattr(a, "policy", None):
        config = apply_policy(a.policy, prof, list(choice.devices), config, choice.host)
    return path, prof, choice, config, plan(prof, list(choice.devices), config, choice.host)


def policy_flags(path, config, devices) -> str:
    """The llama-server flags (less the model and -fit off) that give a policy's plan."""
    from ..core.exports import render
    argv = render(config, "llama-server", model_path=str(path), devices=devices).data
    return shlex.join(argv[3:-2] if argv[-2:] == ["-fit", "off"] else argv[3:])


def run(a, session) -> Result:
    from ..core.speed import predict_speed
    from ..storage.speed_cache import speed_model_for
    from ..ui.html import plan_frame_rows, plan_html
    from ..ui.text import plan_text, rules_text
    path, prof, choice, config, p = planned(a, session)
    flags = policy_flags(path, config, list(choice.devices)) if getattr(a, "policy", None) else ""
    speed, speed_error = None, ""
    try:
        speed = predict_speed(p, speed_model_for(choice.all_devices))
    except Exception as e:  # noqa: BLE001 - the memory plan stands without a speed
        speed_error = f"{type(e).__name__}: {e}"
    notes = [f"warning: {w}" for w in (*choice.warnings, *p.notes)]
    if choice.note and not choice.devices:
        notes.append(choice.note)
    figures = []
    if a.figures and not getattr(a, "no_figures", False):
        from ..ui import figures as F
        figures = [F.layer_map(p), F.memory_bars(p)]
    html = plan_html(p)
    if p.rule_matches:
        html += f"<pre>{_escape(rules_text(p.rule_matches))}</pre>"
    if flags:
        html += f"<pre>flags: {_escape(flags)}</pre>"
    data = p.to_dict()
    if flags:
        data["flags"] = flags
    return Result(text=plan_text(p, speed, speed_error=speed_error, flags=flags), data=data, html=html,
                  rows=plan_frame_rows(p), notes=notes, exit_code=0 if p.fits else 1, figures=figures,
                  objects={"plan": p, "profile": prof, "note": choice.note, "speed": speed})
