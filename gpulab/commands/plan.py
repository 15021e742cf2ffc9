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

import os
import shlex
from html import escape as _escape

from .flags import (
    add_config_flags,
    add_device_flags,
    add_json_flag,
    add_model_arg,
    add_policy_flag,
    add_process_flags,
    config_from_args,
    devices_from_args,
    model_path,
    process_argv,
)
from .result import Result

__all__ = ["planned", "register", "run"]


def register(sub, frontend: str) -> None:
    p = sub.add_parser("plan", help="predict llama.cpp's placement and per-device memory",
                       epilog="paste a command: gpulab plan [device flags] -- llama-server -m A.gguf --mmproj P.gguf "
                              "-md D.gguf -ngl 99 ... (llama-server, llama-cli, llama-bench): the whole process, "
                              "every flag read as that program reads it")
    add_model_arg(p)
    p.add_argument("pasted", nargs="*", metavar="ARG", help="after `--`: the rest of a pasted command")
    add_process_flags(p)
    p.add_argument("--llama-swap", metavar="CONFIG", default=None,
                   help="plan the cmd of the llama-swap model named MODEL in this config.yaml (the whole process)")
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
        config = fit_as_server(a, prof, choice, config, path).config
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


def fit_as_server(a, prof, choice, config, path=None):
    """common_fit_params as llama-server runs it on these flags, with its defaults for what was not
    given (gpulab.core.policies.server_fit.server_config)."""
    from ..core.policies.server_fit import server_config, server_fit
    server, n_ctx_min = server_config(config, ctx_given=getattr(a, "ctx_size", None) is not None,
                                      parallel_given=getattr(a, "parallel", 1) is not None)
    measure = None
    if getattr(a, "fit_dry_run", False):
        if choice.worker is None or not choice.can_load or path is None:
            from ..core.errors import GpulabError
            raise GpulabError("--fit-dry-run loads the model with llama.cpp: it needs devices llama.cpp can load on "
                              f"(--rpc, --llama-devices){': ' + choice.why_not if choice.why_not else ''}")
        from ..runtime.fit_dry_run import dry_run_measure
        measure = dry_run_measure(choice.worker, path, prof, list(choice.devices), choice.host)
    from ..core.command_line import server_n_outputs
    return server_fit(prof, list(choice.devices), server, choice.host, n_ctx_min=n_ctx_min, measure=measure,
                      n_outputs=server_n_outputs(server))


def _is_program(name: str) -> bool:
    from ..core.command_line import PROGRAMS
    base = os.path.basename(str(name))
    return any(base == p or base.startswith(p + ".") for p in PROGRAMS)


def run(a, session) -> Result:
    if getattr(a, "cluster", None):
        from .cluster_plan import run as cluster_run
        return cluster_run(a, config_from_args(_with_ctx(a)))
    if getattr(a, "llama_swap", None):
        from argparse import Namespace

        from ..core.fleet.from_tools import llama_swap_commands
        from ..storage.fleet_files import read_yaml
        cmds = llama_swap_commands(read_yaml(a.llama_swap))
        if a.model not in cmds:
            from ..core.errors import ConfigError
            raise ConfigError(f"{a.llama_swap} has no model {a.model!r}; its models: {', '.join(cmds)}")
        argv = cmds[a.model]
        return run_pasted(Namespace(**{**vars(a), "model": argv[0], "pasted": argv[1:]}), session)
    if _is_program(a.model):
        return run_pasted(a, session)
    if process_argv(a):
        return run_pasted(a, session, command=command_from_args(a))
    if getattr(a, "pasted", None):
        from ..core.errors import ConfigError
        raise ConfigError(f"unexpected arguments {' '.join(a.pasted)}: to paste a command, write "
                          "`gpulab plan -- llama-server -m MODEL ...`")
    from ..core.measure.speed import predict_speed
    from ..storage.speed_cache import speed_model_for
    from ..ui.html import plan_frame_rows, plan_html, pre_html
    from ..ui.text import PLAIN_HEAD, plan_text, rules_text, speed_text
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
    want_figures = a.figures and not getattr(a, "no_figures", False)
    # the notebook's HTML carries the CLI text's sections, in its order
    html = plan_html(p)
    if p.rule_matches:
        html += pre_html(rules_text(p.rule_matches))
    if speed is not None:
        html += pre_html(speed_text(speed))
    elif speed_error:
        html += pre_html(f"speed: not predicted ({speed_error})")
    if flags:
        html += pre_html(f"flags: {flags}")
    text, data, objects = plan_text(p, speed, speed_error=speed_error, flags=flags), p.to_dict(), {}
    figures = []
    if want_figures:
        from ..ui import figures as F
        figures = [F.layer_map(p), F.memory_bars(p)]
    if flags:
        data["flags"] = flags
    from ..core.policies.server_fit import server_would_fit
    if not getattr(a, "policy", None) and server_would_fit(config, list(choice.devices)):
        from ..core.command_line import server_n_outputs
        from ..core.placement.planner import plan as make_plan
        from ..core.policies.context import largest_ctx
        from ..ui.text import FIT_HEAD, fit_lines, fit_text
        fitted = fit_as_server(a, prof, choice, config, path)
        # llama-server's context: n_outputs_max = its slots (server_output_limits)
        fitted_plan = make_plan(prof, list(choice.devices), fitted.config, choice.host,
                                n_outputs=server_n_outputs(fitted.config))
        most = (largest_ctx(prof, list(choice.devices), fitted.config, choice.host)
                if fitted.ok and fitted.device_names else None)
        text = fit_text(fitted, fitted_plan, list(choice.devices), most) + "\n\n" + PLAIN_HEAD + "\n" + text
        log = "\n".join(x.removeprefix("  ") for x in fit_lines(fitted, list(choice.devices), most))
        html = _section(FIT_HEAD) + pre_html(log) + plan_html(fitted_plan) + _section(PLAIN_HEAD) + html
        if want_figures:
            from ..ui import figures as F
            figures = [_titled(F.memory_bars(fitted_plan), "llama-server (fit)"), *figures]
        data["fit"] = {**fit_data(fitted, fitted_plan, list(choice.devices)), "largest_ctx": most}
        objects = {"fit": fitted, "fitted_plan": fitted_plan}
    if getattr(a, "ctx_table", False):
        from ..core.policies.context import ctx_table
        from ..ui.html import table_html
        from ..ui.text import ctx_table_text
        rows = ctx_table(prof, list(choice.devices), config, choice.host)
        table = ctx_table_text(rows, config)
        text += "\n\n" + table
        html += table_html([{"-ctk/-ctv": r.type_k, "largest -c": r.n_ctx} for r in rows], right=("largest -c",),
                           caption=table.split("\n", 1)[0])
        data["ctx_table"] = [{"type_k": r.type_k, "type_v": r.type_v, "n_ctx": r.n_ctx} for r in rows]
    return Result(text=text, data=data, html=html,
                  rows=plan_frame_rows(p), notes=notes, exit_code=0 if p.fits else 1, figures=figures,
                  objects={"plan": p, "profile": prof, "note": choice.note, "speed": speed, **objects})


def _section(title: str) -> str:
    return f"<div style='font-weight:bold;margin:10px 0 2px 0'>{_escape(title)}</div>"


def _titled(fig, prefix: str):
    """The figure with `prefix: ` before its title: which section of the plan it belongs to."""
    fig.update_layout(title_text=f"{prefix}: {fig.layout.title.text}")
    return fig


def fit_data(r, fitted_plan, devices) -> dict:
    """The `fit` object of `gpulab plan --json`: what llama-server would load, and why."""
    return {"status": r.status, "flags": r.flags(devices), "changed": list(r.changed), "reasons": list(r.reasons),
            "near_boundary": list(r.near_boundary), "layers_per_device": list(r.layers_per_device),
            "overrides": [f"{p}={t}" for p, t in r.overrides], "plan": fitted_plan.to_dict()}


def command_from_args(a):
    """The llama-server Command of gpulab's own flags (plan MODEL ... --mmproj P -md D): the settings
    through the flag table, llama-server's defaults for -c and -np where they are not given."""
    from ..core.command_line import Command, parse_command, program_defaults
    given = {k: v for k, v in (("n_ctx", a.ctx_size), ("n_seq_max", a.parallel)) if v is not None}
    config = config_from_args(_with_ctx(a))
    config = config.replace(**{k: v for k, v in program_defaults("llama-server", given).items() if k not in given})
    # the projector and draft flags read as a pasted command reads them: one parser for both
    extras = parse_command(["llama-server", "-m", model_path(a.model), *process_argv(a)])
    draft = None
    if extras.draft is not None:
        from ..core.command_line import Draft, draft_config
        d = extras.draft.config
        draft = Draft(extras.draft.path, draft_config(config, {
            "devices": d.devices, "n_gpu_layers": d.n_gpu_layers, "rules": d.tensor_overrides,
            "type_k": d.type_k, "type_v": d.type_v} if a.device_draft else {
            "n_gpu_layers": d.n_gpu_layers, "rules": d.tensor_overrides, "type_k": d.type_k, "type_v": d.type_v}))
    return Command(program="llama-server", model=model_path(a.model), config=config, given=frozenset(given),
                   projector=extras.projector, draft=draft, spec_types=extras.spec_types,
                   draft_n_max=extras.draft_n_max)


def run_pasted(a, session, command=None) -> Result:
    """`gpulab plan -- llama-server ...`: the pasted command's whole process (gpulab.core.policies.process)."""
    from argparse import Namespace

    from ..core.command_line import parse_command
    from ..core.policies.process import plan_command
    from ..sources.projector import read_projector
    from ..sources.read import read_profile
    from ..ui.text import process_text
    cmd = command or parse_command([a.model, *a.pasted])
    if cmd.rpc and not a.rpc and not getattr(a, "sim", None):
        a = Namespace(**{**vars(a), "rpc": ",".join(cmd.rpc)})   # the devices the command itself adds
    choice = devices_from_args(a, session)
    prof = read_profile(model_path(cmd.model))
    draft = read_profile(cmd.draft.path) if cmd.draft is not None else None
    proj = read_projector(cmd.projector.path) if cmd.projector is not None else None
    cp = plan_command(cmd, prof, list(choice.devices), choice.host, draft=draft, projector=proj)
    notes = [*(f"ignored (no effect on memory): {x}" for x in cmd.ignored),
             *(f"not modelled: {x}" for x in cmd.unmodelled), *(f"warning: {w}" for w in choice.warnings)]
    data = {"command": {"program": cmd.program, "model": cmd.model, "ignored": list(cmd.ignored),
                        "unmodelled": list(cmd.unmodelled)},
            "plan": cp.process.main.to_dict(), "process": cp.process.to_dict(), "notes": list(cp.notes)}
    if cp.fit is not None:
        data["fit"] = {"status": cp.fit.status, "changed": list(cp.fit.changed)}
    return Result(text=process_text(cp), data=data, notes=notes, exit_code=0 if cp.process.fits else 1,
                  rows=[{"device": r.name, "main": r.main_bytes, "draft": r.draft_bytes, "mtp": r.mtp_bytes,
                         "projector": r.projector_bytes,
                         "base cost": r.overhead_bytes, "free": r.free_bytes, "fits": r.fits}
                        for r in cp.process.rows],
                  objects={"plan": cp.process.main, "process": cp.process, "command": cmd, "fit": cp.fit})
