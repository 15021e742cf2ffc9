"""`gpulab fleet plan|export FLEET.toml`: several models on several devices at once.

    gpulab fleet plan fleet.toml --sim 2x24GiB,12GiB            # a table; --json: one object
    gpulab fleet plan fleet.toml --rpc 127.0.0.1:50052,... --objective balanced
    gpulab fleet plan fleet.toml --sim 32x24GiB --time-budget 2    # a cluster: the best plan after 2 s
    gpulab fleet export fleet.toml --sim 2x24GiB,12GiB --to llama-swap > config.yaml
    gpulab fleet import config.yaml -o fleet.toml       # a llama-swap config or a router INI as a start

FLEET may also be a llama-swap config.yaml or a llama-server --models-preset INI, read as the
fleet's starting point (gpulab.core.fleet.from_tools); what it leaves out is said on stderr.

The fleet description is gpulab.core.fleet.model's TOML; the planner gpulab.core.fleet.planner; the
exports gpulab.core.exports.fleet. Exit status (CLI): 0 when the fleet fits, 1 when it does not
(the table says why and what would fit), 2 on bad input.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from ..core.exports.fleet import FLEET_TARGETS
from .flags import add_device_flags, add_json_flag
from .result import Result

__all__ = ["register", "run", "planned_fleet"]


def register(sub, frontend: str) -> None:
    p = sub.add_parser("fleet", help="several models at once: plan a fleet, export it to llama-swap, "
                                     "llama-server's router, Ollama")
    psub = p.add_subparsers(dest="fleet_command", required=True, metavar="ACTION", parser_class=type(p))

    q = psub.add_parser("plan", help="a device set and split for every model so that all fit together")
    _common(q)
    add_json_flag(q, frontend)
    if frontend == "magic":
        q.add_argument("--no-figures", action="store_true", help="the table only")
    q.set_defaults(run=run, action=_plan, figures=frontend == "magic")

    q = psub.add_parser("export", help="the fleet plan as llama-swap config.yaml, a llama-server --models-preset "
                                       "INI, or `ollama serve` instances")
    _common(q)
    q.add_argument("--to", required=True, choices=FLEET_TARGETS, help="the program to write for")
    add_json_flag(q, frontend, help="{text, data, gaps}")
    q.set_defaults(run=run, action=_export)

    if frontend == "magic":
        q = psub.add_parser("lab", help="the fleet's plan as a widget: pin, move, change a context, re-plan at once")
        _common(q)
        q.set_defaults(run=run, action=_lab)

    q = psub.add_parser("import", help="a llama-swap config.yaml or llama-server --models-preset INI as a fleet TOML")
    q.add_argument("source", help="config.yaml (llama-swap) or presets .ini (llama-server router)")
    q.add_argument("-o", "--output", help="write the fleet TOML here (default: print it)")
    q.set_defaults(run=run, action=_import)


def _common(q) -> None:
    q.add_argument("fleet", help="the fleet description (TOML: [[models]] name, model, ctx, ...)")
    add_device_flags(q)
    q.add_argument("--objective", default="fewest", metavar="{fewest,balanced,tg:NAME}",
                   help="fewest devices per model (default), balanced headroom, or the best predicted tg of model NAME")
    q.add_argument("--time-budget", default=None, metavar="SECONDS",
                   help="stop improving the plan after this long and keep the best so far (large fleets; "
                        "the first greedy plan is always completed)")
    q.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    q.add_argument("--cluster", metavar="FILE",
                   help="the devices of a cluster description (TOML) instead: a model stays within one host "
                        "unless it must span")


def _seconds(text: str | None) -> float | None:
    if text is None:
        return None
    from ..core.errors import ConfigError
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not (v > 0 and math.isfinite(v)):
        raise ConfigError(f"--time-budget takes seconds > 0, e.g. 2 or 0.5, got {text!r}")
    return v


class _Progress:
    """A `\\r`-updated line on stderr while the search runs (only when stderr is a terminal, or
    always with force), cleared at the end."""

    def __init__(self, enabled: bool, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.shown = False

    def __call__(self, fraction: float, text: str) -> None:
        if not self.enabled:
            return
        done = int(round(max(0.0, min(1.0, fraction)) * 20))
        self.stream.write(f"\rfleet plan [{'#' * done}{'.' * (20 - done)}] {100 * fraction:3.0f}% {text[:50]:<50}")
        self.stream.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r" + " " * 90 + "\r")
            self.stream.flush()
            self.shown = False


def run(a, session) -> Result:
    return a.action(a, session)


def planned_fleet(a, session):
    """(Fleet, {name: path}, DeviceChoice, FleetPlan, notes) for the fleet file and device flags."""
    from ..core.fleet.planner import plan_fleet
    from ..sources.model_refs import resolve_model
    from ..sources.read import read_profile
    from ..storage.fleet_files import read_any_fleet, with_companions
    from .flags import devices_from_args
    budget = _seconds(getattr(a, "time_budget", None))
    fleet, read_notes = read_any_fleet(a.fleet)
    base = Path(a.fleet).resolve().parent
    fleet = with_companions(fleet, base)     # drafts and projectors, counted per device
    paths = {m.name: resolve_model(m.model, base=base) for m in fleet.models}
    profiles = {name: read_profile(path) for name, path in paths.items()}
    choice = _cluster_choice(a.cluster) if getattr(a, "cluster", None) else devices_from_args(a, session)
    speed = None
    if a.objective.startswith("tg:"):
        from ..core.measure.speed import predict_speed
        from ..storage.speed_cache import speed_model_for
        model = speed_model_for(choice.all_devices)
        speed = lambda p: predict_speed(p, model).tg_tokens_per_s   # noqa: E731
    stream = getattr(a, "progress_stream", None) or sys.stderr
    bar = _Progress(not getattr(a, "no_progress", False) and hasattr(stream, "isatty") and stream.isatty(), stream)
    try:
        fplan = plan_fleet(fleet, profiles, list(choice.devices), choice.host, objective=a.objective, speed=speed,
                           time_budget=budget, progress=bar)
    finally:
        bar.clear()
    from ..core.fleet.planner import spanning
    spans = [f"note: {why}" for why in spanning(fplan, list(choice.devices)).values()]
    return fleet, paths, choice, fplan, [f"note: {n}" for n in read_notes] + spans


def _cluster_choice(path: str):
    """A DeviceChoice of a cluster file's devices (llama.cpp's order, each naming its host); the head's
    system memory is this machine's."""
    from ..runtime.session import DeviceChoice
    from ..sources.host import host_device
    from ..storage.cluster_files import read_cluster
    devices, _ = read_cluster(path).devices()
    return DeviceChoice(tuple(devices), host_device(), f"devices of the cluster {path}", (), None, False,
                        "a cluster description plans only")


def _notes(choice, more=()) -> list[str]:
    notes = list(more) + [f"warning: {w}" for w in choice.warnings]
    if choice.note and not choice.devices:
        notes.append(choice.note)
    return notes


def _plan(a, session) -> Result:
    from ..ui.text import fleet_text
    _, _, choice, fplan, read_notes = planned_fleet(a, session)
    if "time budget" in fplan.search_limit:
        gap = "" if fplan.gap is None else f" (gap to the bound {100 * fplan.gap:.1f}%)"
        read_notes = read_notes + [f"note: the time budget ended the search; this is the best plan found{gap}"]
    rows = [{"device": d.name, "model": n, "used_bytes": b} for d in fplan.devices for n, b in d.by_model]
    figures = []
    if getattr(a, "figures", False) and not getattr(a, "no_figures", False):
        from ..ui import figures as F
        figures = [F.fleet_bars(fplan)]
    return Result(text=fleet_text(fplan), data=fplan.to_dict(), rows=rows, notes=_notes(choice, read_notes),
                  exit_code=0 if fplan.fits else 1, figures=figures, objects={"plan": fplan})


def _export(a, session) -> Result:
    from ..core.exports.fleet import render_fleet
    from ..storage.fleet_files import llama_swap_yaml
    _, paths, choice, fplan, read_notes = planned_fleet(a, session)
    exp = render_fleet(fplan, a.to, paths, list(choice.devices), yaml_dump=llama_swap_yaml)
    notes = _notes(choice, read_notes) + [f"note: {a.to}: {g}" for g in exp.gaps]
    return Result(text=exp.text.rstrip("\n"), data={"text": exp.text, "data": exp.data, "gaps": list(exp.gaps)},
                  notes=notes, exit_code=0 if fplan.fits else 1, objects={"export": exp, "plan": fplan})


def _lab(a, session) -> Result:
    from ..ui.fleet_lab import FleetLab
    fleet, _, choice, fplan, read_notes = planned_fleet(a, session)
    profiles = {p.name: p.plan.profile for p in fplan.placements}
    lab = FleetLab(fleet, profiles, list(choice.devices), choice.host, objective=a.objective,
                   time_budget=_seconds(getattr(a, "time_budget", None)))
    return Result(widget=lab, notes=_notes(choice, read_notes), objects={"lab": lab})


def _import(a, session) -> Result:
    from ..storage.fleet_files import fleet_text, read_any_fleet, write_fleet
    fleet, notes = read_any_fleet(a.source)
    text = fleet_text(fleet)
    if a.output:
        write_fleet(a.output, fleet)
        notes = notes + [f"wrote {a.output}"]
    return Result(text="" if a.output else text.rstrip("\n"), data=None,
                  notes=[f"note: {n}" for n in notes], objects={"fleet": fleet, "toml": text})
