"""`gpulab plan MODEL [llama.cpp flags] [device flags] [--policy P] [--json]`: llama.cpp's placement
and per-device memory, predicted, and the predicted speed.

llama-server and llama-cli fit before they load (-fit on, their default: gpulab.core.policies.server_fit); llama-bench
and llama-cpp-python do not. So without -ts, -ngl and -ot (and -fit off), the plan shows first what
llama-server would load (its defaults -c 0 and -np 4 -kvu unless -c / -np are given), what fit
changed and why, and then
the plain layer split that llama-bench and llama-cpp-python load. `--policy fit` plans fit's choice
alone.

Exit status (CLI): 0 when the plain plan fits, 1 when it does not, 2 on bad input.
"""

from __future__ import annotations

import shlex
from html import escape as _escape

from .flags import (
    add_config_flags,
    add_device_flags,
    add_json_flag,
    add_model_arg,
    add_policy_flag,
    config_from_args,
    devices_from_args,
    model_path,
)
from .result import Result

__all__ = ["register", "run", "planned"]


def register(sub, frontend: str) -> None:
    p = sub.add_parser("plan", help="predict llama.cpp's placement and per-device memory")
    add_model_arg(p)
    # None: -c / -np not given (llama-server's defaults are -c 0 and -np auto: 4 slots, unified KV)
    add_config_flags(p, n_ctx=None, n_seq_max=None)
    add_device_flags(p)
    add_policy_flag(p)
    p.add_argument("--fit-dry-run", action="store_true",
                   help="make fit's dry runs with llama.cpp (no_alloc loads on the devices present, seconds) instead "
                        "of the planner (milliseconds), where gpulab's estimate is too close to call")
    p.add_argument("--ctx-table", action="store_true",
                   help="the largest context that leaves -fitt free on every device, for KV types f16, q8_0, q4_0 "
                        "(steps of 256 x streams; llama-server's defaults are -np 4 -kvu: one stream)")
    p.add_argument("--cluster", metavar="FILE",
                   help="cluster description (TOML): choose the hosts to span and compare them over their links")
    p.add_argument("--objective", choices=("tg", "hosts"), default="tg",
                   help="with --cluster: the best predicted tg (default) or the fewest hosts")
    p.add_argument("--commands", action="store_true",
                   help="with --cluster: the chosen option's rpc-server command per host, the head's llama-server "
                        "and a llama-swap entry")
    add_json_flag(p, frontend)
    if frontend == "magic":
        p.add_argument("--no-figures", action="store_true", help="the table only")
    p.set_defaults(run=run, figures=frontend == "magic")


def planned(a, session, *, for_load: bool = False, virtual_if_no_gpu: bool = False):
    """(path, profile, DeviceChoice, config, Plan) for the model, config and device flags."""
    from ..core.placement.planner import plan
    from ..core.policies.apply import apply_policy
    from ..sources.read import read_profile
    path = model_path(a.model)
    prof = read_profile(path)
    choice = devices_from_args(a, session, for_load=for_load, virtual_if_no_gpu=virtual_if_no_gpu)
    config = config_from_args(_with_ctx(a))
    if getattr(a, "policy", None) == "fit":
        config = server_fit(a, prof, choice, config, path).config
    elif getattr(a, "policy", None):
        config = apply_policy(a.policy, prof, list(choice.devices), config, choice.host)
    return path, prof, choice, config, plan(prof, list(choice.devices), config, choice.host)


def policy_flags(path, config, devices) -> str:
    """The llama-server flags (less the model and -fit off) that give a policy's plan."""
    from ..core.exports.render import render
    argv = render(config, "llama-server", model_path=str(path), devices=devices).data
    return shlex.join(argv[3:-2] if argv[-2:] == ["-fit", "off"] else argv[3:])


def _with_ctx(a):
    """The arguments with gpulab's defaults where -c or -np was not given (plan leaves them unset to
    know: llama-server's own defaults differ, see server_fit)."""
    from argparse import Namespace

    from ..core.config import SplitConfig
    missing = {k: getattr(SplitConfig(), attr) for k, attr in (("ctx_size", "n_ctx"), ("parallel", "n_seq_max"))
               if hasattr(a, k) and getattr(a, k) is None}
    return Namespace(**{**vars(a), **missing}) if missing else a


def server_fit(a, prof, choice, config, path=None):
    """common_fit_params as llama-server runs it on these flags, with its defaults for what was not
    given: -c 0 (an explicit -c 0 asks for the full context: fit's minimum becomes UINT32_MAX,
    common/arg.cpp) and -np auto, which is 4 slots sharing one unified KV cache (tools/server/server.cpp)."""
    from ..core.policies.server_fit import UINT32_MAX, fit
    ctx_given = getattr(a, "ctx_size", None) is not None
    server = config if ctx_given else config.replace(n_ctx=0)
    if getattr(a, "parallel", 1) is None:
        server = server.replace(n_seq_max=4, kv_unified=True)
    measure = None
    if getattr(a, "fit_dry_run", False):
        if choice.worker is None or not choice.can_load or path is None:
            from ..core.errors import GpulabError
            raise GpulabError("--fit-dry-run loads the model with llama.cpp: it needs devices llama.cpp can load on "
                              f"(--rpc, --llama-devices){': ' + choice.why_not if choice.why_not else ''}")
        from ..runtime.fit_dry_run import dry_run_measure
        measure = dry_run_measure(choice.worker, path, prof, list(choice.devices), choice.host)
    return fit(prof, list(choice.devices), server, choice.host,
               n_ctx_min=UINT32_MAX if ctx_given and config.n_ctx == 0 else None, measure=measure)


def server_would_fit(config) -> bool:
    """llama-server would choose something here: -fit on and -ngl, -ts and the overrides unset."""
    return (config.fit == "on" and config.n_gpu_layers == -1 and not any(config.tensor_split)
            and not config.has_tensor_overrides and config.split_mode == "layer")


def run(a, session) -> Result:
    if getattr(a, "cluster", None):
        from .cluster_plan import run as cluster_run
        return cluster_run(a, config_from_args(_with_ctx(a)))
    from ..core.measure.speed import predict_speed
    from ..storage.speed_cache import speed_model_for
    from ..ui.html import plan_frame_rows, plan_html
    from ..ui.text import plan_text, rules_text
    path, prof, choice, config, p = planned(a, session, for_load=getattr(a, "fit_dry_run", False))
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
    text, data, objects = plan_text(p, speed, speed_error=speed_error, flags=flags), p.to_dict(), {}
    if flags:
        data["flags"] = flags
    if not getattr(a, "policy", None) and server_would_fit(config):
        from ..core.placement.planner import plan as make_plan
        from ..ui.text import fit_text
        fitted = server_fit(a, prof, choice, config, path)
        fitted_plan = make_plan(prof, list(choice.devices), fitted.config, choice.host)
        from ..core.policies.context import largest_ctx
        most = (largest_ctx(prof, list(choice.devices), fitted.config, choice.host)
                if fitted.ok and fitted.device_names else None)
        text = (fit_text(fitted, fitted_plan, list(choice.devices), most) + "\n\n"
                + "plain layer split, no fit (llama-bench, llama-cpp-python, llama-server -fit off):\n" + text)
        data["fit"] = {**fit_data(fitted, fitted_plan, list(choice.devices)), "largest_ctx": most}
        objects = {"fit": fitted, "fitted_plan": fitted_plan}
    if getattr(a, "ctx_table", False):
        from ..core.policies.context import ctx_table
        from ..ui.text import ctx_table_text
        rows = ctx_table(prof, list(choice.devices), config, choice.host)
        text += "\n\n" + ctx_table_text(rows, config)
        data["ctx_table"] = [{"type_k": r.type_k, "type_v": r.type_v, "n_ctx": r.n_ctx} for r in rows]
    return Result(text=text, data=data, html=html,
                  rows=plan_frame_rows(p), notes=notes, exit_code=0 if p.fits else 1, figures=figures,
                  objects={"plan": p, "profile": prof, "note": choice.note, "speed": speed, **objects})


def fit_data(r, fitted_plan, devices) -> dict:
    """The `fit` object of `gpulab plan --json`: what llama-server would load, and why."""
    return {"status": r.status, "flags": r.flags(devices), "changed": list(r.changed), "reasons": list(r.reasons),
            "near_boundary": list(r.near_boundary), "layers_per_device": list(r.layers_per_device),
            "overrides": [f"{p}={t}" for p, t in r.overrides], "plan": fitted_plan.to_dict()}
