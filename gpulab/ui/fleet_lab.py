"""FleetLab: a fleet's plan in a notebook, one bar per device stacked by model, with a row of
controls per model: pin it to devices (none selected: the planner chooses), its context, whether
it stays loaded; and the objective. Every change re-plans the whole fleet at once
(gpulab.core.fleet.planner.plan_fleet) and redraws the figure (gpulab.ui.figures.fleet_bars).

    lab = FleetLab(fleet, profiles, devices)        # a Fleet, {name: ModelProfile}, offload devices
    lab.set_ctx("chat", 32768); lab.pin("coder", ["CUDA2"]); lab.set_keep_loaded("embed", False)
    lab.plan, lab.fleet                             # the current FleetPlan and Fleet

`%gpulab fleet lab FLEET.toml --sim ...` opens one from a fleet file.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import replace

import ipywidgets as W
import plotly.graph_objects as go

from ..core.devices import Device
from ..core.errors import GpulabError
from ..core.fleet.model import Fleet
from ..core.fleet.planner import FleetPlan, plan_fleet
from ..core.profile import ModelProfile
from . import figures as F
from .text import fleet_search_lines

__all__ = ["FleetLab", "ctx_choices"]

_CTX = (512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072, 262144)


def ctx_choices(n_ctx_train: int, current: int) -> list[int]:
    """The contexts to offer a model: the usual powers of two up to what it was trained at (more is
    past what it was trained for: llama.cpp warns), that context itself, and the current one."""
    cap = n_ctx_train if n_ctx_train > 0 else _CTX[-1]
    return sorted({c for c in _CTX if c <= cap} | ({n_ctx_train} if n_ctx_train > 0 else set()) | {current})


class FleetLab(W.VBox):
    def __init__(self, fleet: Fleet, profiles: Mapping[str, ModelProfile], devices: Sequence[Device],
                 host: Device | None = None, *, objective: str = "fewest", time_budget: float | None = None):
        super().__init__()
        self._fleet = fleet
        self._profiles = dict(profiles)
        self._devices = [d for d in devices if d.is_offload]
        self._host = host
        self._busy = False
        self.plan: FleetPlan | None = None
        names = [d.name for d in self._devices]
        self.objective = W.Dropdown(options=["fewest", "balanced"] + [f"tg:{m.name}" for m in fleet.models],
                                    value=objective, description="objective")
        self.rows: dict[str, dict] = {}
        row_boxes = []
        for m in fleet.models:
            ctx_options = ctx_choices(self._profiles[m.name].n_ctx_train if m.name in self._profiles else 0, m.ctx)
            c = {
                "devices": W.SelectMultiple(options=names, value=tuple(d for d in m.devices if d in names),
                                            rows=min(4, max(1, len(names))), description="pin",
                                            layout=W.Layout(width="220px")),
                "ctx": W.Dropdown(options=ctx_options, value=m.ctx, description="ctx", layout=W.Layout(width="180px")),
                "keep_loaded": W.Checkbox(value=m.keep_loaded, description="stays loaded", indent=False),
            }
            self.rows[m.name] = c
            row_boxes.append(W.HBox([W.HTML(f"<b>{html.escape(m.name)}</b>", layout=W.Layout(width="110px")),
                                     c["devices"], c["ctx"], c["keep_loaded"]]))
            for w in c.values():
                w.observe(self._changed, names="value")
        self.objective.observe(self._changed, names="value")
        # large fleets: the search stops improving after this many seconds (0: no budget) and keeps
        # the best plan so far; the bar shows how far it got
        self.time_budget = W.BoundedFloatText(value=time_budget or 0.0, min=0.0, max=600.0, step=0.5,
                                              description="budget s", layout=W.Layout(width="160px"))
        self.time_budget.observe(self._changed, names="value")
        self.progress = W.FloatProgress(value=0.0, min=0.0, max=1.0, description="search",
                                        layout=W.Layout(width="300px"))
        self.figure = go.FigureWidget()
        self.status = W.HTML()
        self.children = [W.HBox([self.objective, self.time_budget, self.progress]), *row_boxes, self.figure,
                         self.status]
        self.redraw()

    # -- the fleet the controls describe --------------------------------------------------------
    @property
    def fleet(self) -> Fleet:
        models = []
        for m in self._fleet.models:
            c = self.rows[m.name]
            models.append(replace(m, devices=tuple(c["devices"].value), ctx=int(c["ctx"].value),
                                  keep_loaded=bool(c["keep_loaded"].value)))
        return replace(self._fleet, models=tuple(models))

    def pin(self, name: str, devices: Sequence[str]) -> FleetPlan | None:
        """Pin model `name` to `devices` (empty: the planner chooses); re-plans."""
        self.rows[name]["devices"].value = tuple(devices)
        return self.plan

    def set_ctx(self, name: str, ctx: int) -> FleetPlan | None:
        w = self.rows[name]["ctx"]
        if ctx not in w.options:
            w.options = sorted(set(w.options) | {int(ctx)})
        w.value = int(ctx)
        return self.plan

    def set_keep_loaded(self, name: str, keep: bool) -> FleetPlan | None:
        self.rows[name]["keep_loaded"].value = bool(keep)
        return self.plan

    def _progress(self, fraction: float, text: str) -> None:
        self.progress.value = max(0.0, min(1.0, fraction))
        self.progress.description = "search"

    # -- re-plan and draw --------------------------------------------------------------------
    def _changed(self, _change) -> None:
        if not self._busy:
            self.redraw()

    def redraw(self) -> FleetPlan | None:
        try:
            p = plan_fleet(self.fleet, self._profiles, self._devices, self._host, objective=self.objective.value,
                           time_budget=self.time_budget.value or None, progress=self._progress)
        except GpulabError as e:
            self.status.value = f"<span style='color:#d62728'>{html.escape(str(e))}</span>"
            return None
        self.plan = p
        self.progress.value = 1.0
        new = F.fleet_bars(p)
        with self.figure.batch_update():
            self.figure.data = ()
            self.figure.add_traces(list(new.data))
            self.figure.layout = new.layout
        lines = [f"<b>{'fits' if p.fits else 'DOES NOT FIT'}</b> ({p.search} search, {p.evaluated} model plans)"]
        for pl in p.placements:
            ts = ",".join(f"{x:g}" for x in pl.plan.config.tensor_split)
            lines.append(f"{html.escape(pl.name)}: {', '.join(pl.devices) or 'CPU'}" + (f" (-ts {ts})" if ts else ""))
        lines += [f"<i>search: {html.escape(x)}</i>" for x in fleet_search_lines(p)]
        lines += [html.escape(a.text) for a in p.advice]
        self.status.value = "<br>".join(lines)
        return p
