"""Plotly figures of a Plan and of Runs: pure functions, cheap enough to rebuild on every slider move.

    fig = layer_map(plan)          # one bar per layer, coloured by device, height = bytes it puts there
    fig = memory_bars(plan)        # per device and the host: weights / KV / compute / overhead vs free
    fig = throughput_chart(runs)   # pp and tg tokens/s of measured runs, side by side
    fig = memory_compare(plan, report)   # predicted vs llama.cpp-reported (vs NVML) per device

Each figure has a fixed trace structure for a given device order (`order=`), so a widget can
keep one `FigureWidget` and copy new data into it (`apply`) inside `batch_update` instead of
rebuilding it: that is what keeps the lab's redraw in milliseconds for 128 layers x 8 devices.
Human units appear here only (hover text, axis titles); the data in is bytes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go

from ..core.devices import HOST_NAME
from ..core.placement.plan import Plan
from ..core.placement.planner import kv_cell_bytes, kv_cells
from ..core.units import GiB, MiB, format_bytes

__all__ = ["device_colors", "layer_bytes", "layer_expert_bytes", "layer_map", "memory_bars", "throughput_chart", "show",
           "mimebundle", "run_label", "memory_compare", "apply", "memory_unit", "sync_widget_state", "TERM_COLORS",
           "OVERFULL_COLOR", "fleet_bars"]

# Okabe-Ito-like palette: distinguishable for colour-blind readers; the host is grey
_PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#7F3C8D",
            "#11A579", "#3969AC", "#F2B701", "#E73F74")
HOST_COLOR = "#8c8c8c"
OVERFULL_COLOR = "#d62728"
TERM_COLORS = {"weights": "#4C78A8", "KV": "#F58518", "compute": "#54A24B", "overhead": "#B279A2"}


def device_colors(names: Sequence[str]) -> dict[str, str]:
    """A stable colour per device name, by position; the host ('CPU') is always grey."""
    out, k = {}, 0
    for n in names:
        if n == HOST_NAME:
            out[n] = HOST_COLOR
        else:
            out[n] = _PALETTE[k % len(_PALETTE)]
            k += 1
    return out


def _order(plan: Plan, order: Sequence[str] | None) -> list[str]:
    """The device names to draw, in order, host last: `order` plus any the plan has beyond it."""
    names = [n for n in (order or ()) if n != HOST_NAME]
    for d in plan.devices:
        if d.name not in names and d.name != HOST_NAME:
            names.append(d.name)
    return names + [HOST_NAME]


def memory_unit(n_bytes: int | float) -> tuple[str, int]:
    """('GiB', GiB) for anything of a GiB or more, else ('MiB', MiB): the axis unit."""
    return ("GiB", GiB) if n_bytes >= GiB else ("MiB", MiB)


# -- per-layer bytes ---------------------------------------------------------------------------

def layer_bytes(plan: Plan) -> tuple[np.ndarray, np.ndarray]:
    """(weights, KV) bytes each layer 0..n_layer puts on its device (the last is the output layer).

    Mirrors the planner's sums (gpulab.core.placement.planner.plan), per layer instead of per device: the
    output layer carries a tied token_embd copy only when offloaded, KV follows the layer's
    device (or stays on the host with -nkvo, then it is drawn with the layer anyway: the hover
    says where it lives). The UI tests check that these add up to the plan's per-device totals.
    """
    prof, config = plan.profile, plan.config
    n = prof.n_layer
    weights = np.zeros(n + 1, dtype=np.int64)
    kv = np.zeros(n + 1, dtype=np.int64)
    full_cells, swa_cells = kv_cells(prof, config)
    per_cell = kv_cell_bytes(prof, config)
    for layer in prof.layers:
        weights[layer.index] = layer.weights_bytes
        kv[layer.index] = (swa_cells if layer.is_swa else full_cells) * per_cell[layer.index]
    out = sum(t.n_bytes for t in prof.output_tensors)
    if prof.tied_output and plan.layer_devices[n] != HOST_NAME and prof.token_embd is not None:
        out += prof.token_embd.n_bytes   # llama.cpp duplicates token_embd on the output device
    weights[n] = out
    return weights, kv


# -- layer map ---------------------------------------------------------------------------------

def layer_expert_bytes(plan: Plan) -> dict[str, np.ndarray]:
    """device -> the MoE expert bytes of each layer 0..n_layer-1 that sit there: on the layer's
    own device unless a tensor override moved them (-ot, -cmoe, -ncmoe, moe-balance)."""
    prof = plan.profile
    out: dict[str, np.ndarray] = {}
    moved = plan.moved_tensors
    for layer in prof.layers:
        home = plan.layer_devices[layer.index]
        for t in layer.tensors:
            if t.is_expert:
                dev = moved.get(t.name, home)
                if dev not in out:
                    out[dev] = np.zeros(prof.n_layer, dtype=np.int64)
                out[dev][layer.index] += t.n_bytes
    return out
def _tensor_split_traces(plan: Plan, names: list[str], weights, kv) -> list[dict]:
    """-sm tensor: each layer on the meta device is on every member, in proportion: one trace per
    member with its slice of every such layer (stacked), the host's whole layers as usual."""
    ts = plan.tensor_parallel
    assert ts is not None   # drawn for -sm tensor plans only
    n = plan.profile.n_layer
    devs = np.asarray(plan.layer_devices)
    meta_idx = np.flatnonzero(devs == ts.meta_name)
    traces = []
    for name in names:
        if name in ts.devices:
            j = ts.devices.index(name)
            w = np.array([ts.layer_weights[i][j] for i in meta_idx.tolist()], dtype=np.int64)
            k = np.array([ts.layer_kv[i][j] for i in meta_idx.tolist()], dtype=np.int64)
            hover = [f"<b>{'output layer' if i == n else f'layer {i}'}</b>: {name}'s slice<br>"
                     f"weights {format_bytes(int(a))}<br>KV {format_bytes(int(b))}"
                     for i, a, b in zip(meta_idx.tolist(), w.tolist(), k.tolist())]
            traces.append(dict(x=meta_idx, y=(w + k) / MiB, hovertext=hover, name=name,
                               hovertemplate="%{hovertext}<extra></extra>"))
        else:
            sel = np.flatnonzero(devs == name)
            hover = [f"<b>{'output layer' if i == n else f'layer {i}'}</b> on {name}<br>weights "
                     f"{format_bytes(int(weights[i]))}<br>KV {format_bytes(int(kv[i]))}" for i in sel.tolist()]
            traces.append(dict(x=sel, y=(weights[sel] + kv[sel]) / MiB, hovertext=hover, name=name,
                               hovertemplate="%{hovertext}<extra></extra>"))
    return traces


def _layer_traces(plan: Plan, names: list[str]) -> list[dict]:
    """One trace per device: its layers' dense weights and KV. For a MoE model, then one trace
    per device of expert bytes (hatched, in the colour of the device they sit on), stacked on
    the layer's bar wherever the experts are: a moved expert shows in its new device's colour."""
    weights, kv = layer_bytes(plan)
    if plan.tensor_parallel is not None:
        return _tensor_split_traces(plan, names, weights, kv)
    n = plan.profile.n_layer
    moe = plan.profile.is_moe
    experts = layer_expert_bytes(plan) if moe else {}
    all_experts = np.zeros(n + 1, dtype=np.int64)
    for arr in experts.values():
        all_experts[:n] += arr
    dense = weights - all_experts
    devs = np.asarray(plan.layer_devices)
    idx = np.arange(n + 1)
    kv_dev_note = "" if plan.config.offload_kqv else " (KV on CPU: -nkvo)"
    traces = []
    for name in names:
        sel = idx[devs == name]
        labels = [("output layer" if i == n else f"layer {i}") for i in sel.tolist()]
        hover = [f"<b>{lab}</b> on {name}<br>weights {format_bytes(int(weights[i]))}"
                 + (f" (dense {format_bytes(int(dense[i]))}, experts {format_bytes(int(all_experts[i]))})"
                    if moe and i < n else "")
                 + f"<br>KV {format_bytes(int(kv[i]))}{kv_dev_note}" for lab, i in zip(labels, sel.tolist())]
        traces.append(dict(x=sel, y=(dense[sel] + kv[sel]) / MiB, hovertext=hover, name=name,
                           hovertemplate="%{hovertext}<extra></extra>"))
    if moe:
        below = (dense + kv).astype(np.float64)
        for name in names:
            arr = experts.get(name, np.zeros(n, dtype=np.int64))
            sel = np.nonzero(arr)[0]
            hover = [f"<b>layer {i}</b> (on {plan.layer_devices[i]}): experts on {name} "
                     f"{format_bytes(int(arr[i]))} of {format_bytes(int(all_experts[i]))}" for i in sel.tolist()]
            traces.append(dict(x=sel, y=arr[sel] / MiB, base=below[sel] / MiB, hovertext=hover,
                               name=f"{name} experts", hovertemplate="%{hovertext}<extra></extra>"))
            below[:n] += arr
    return traces


def layer_map(plan: Plan, *, order: Sequence[str] | None = None, height: int = 300) -> go.Figure:
    """One bar per layer (the output layer last, at x = n_layer), coloured by the device
    llama.cpp puts it on, as tall as the bytes (weights + KV) it puts there. A MoE model's expert
    bytes are the hatched top of each bar, coloured by the device they sit on. Under -sm tensor a
    layer's bar is stacked from every device's slice of it."""
    names = _order(plan, order)
    colors = device_colors(names)
    fig = go.Figure(layout=dict(
        barmode="stack" if plan.tensor_parallel is not None else "overlay", bargap=0.08, height=height,
        margin=dict(l=60, r=10, t=40, b=40),
        title=dict(text=_layer_title(plan), font=dict(size=14)),
        xaxis=dict(title="layer (the last is the output layer)", range=[-0.7, plan.profile.n_layer + 0.7]),
        yaxis=dict(title="MiB on its device", rangemode="tozero"),
        legend=dict(orientation="h", y=1.02, x=1, xanchor="right", yanchor="bottom"),
        template="plotly_white"))
    for t in _layer_traces(plan, names):
        dev = t["name"].removesuffix(" experts")
        hatch = dict(pattern=dict(shape="/", fgcolor="white", solidity=0.35)) if dev != t["name"] else {}
        fig.add_trace(go.Bar(marker=dict(color=colors[dev], **hatch), **t))
    return fig


def _layer_title(plan: Plan) -> str:
    p = plan.profile
    cut = " (-sm tensor: every offloaded layer cut across the devices)" if plan.tensor_parallel is not None else ""
    return f"{p.name or p.arch}: {p.n_layer} layers + output{cut}"


# -- memory bars -------------------------------------------------------------------------------

def _memory_data(plan: Plan, names: list[str], unit: tuple[str, int]) -> tuple[list[dict], dict]:
    uname, usize = unit
    by = {d.name: d for d in plan.devices}
    rows = [by.get(n) for n in names]

    def col(attr):
        return [getattr(d, attr) / usize if d is not None else 0.0 for d in rows]

    terms = [("weights", "weights_bytes"), ("KV", "kv_bytes"), ("compute", "compute_bytes"),
             ("overhead", "overhead_bytes")]
    line_colors = [OVERFULL_COLOR if d is not None and not d.fits else "rgba(0,0,0,0)" for d in rows]
    line_widths = [3 if d is not None and not d.fits else 0 for d in rows]
    traces = []
    for label, attr in terms:
        traces.append(dict(
            x=names, y=col(attr), name=label,
            hovertext=[f"{n} {label}: {format_bytes(getattr(d, attr))}"
                       + (" (gpulab's CUDA default, nothing learned yet)" if attr == "overhead_bytes"
                          and d.overhead_is_default else "") if d else f"{n}: not used"
                       for n, d in zip(names, rows)],
            marker=dict(line=dict(color=line_colors, width=line_widths)),
            hovertemplate="%{hovertext}<extra></extra>"))
    free = [d.free_bytes / usize if d is not None and d.free_bytes else None for d in rows]
    total = [d.total_bytes / usize if d is not None and d.total_bytes else None for d in rows]
    free_colors = [OVERFULL_COLOR if d is not None and not d.fits else "#222" for d in rows]
    traces.append(dict(x=names, y=free, name="free", marker=dict(color=free_colors),
                       hovertext=[f"{n} free: {format_bytes(d.free_bytes)}" if d else "" for n, d in zip(names, rows)],
                       hovertemplate="%{hovertext}<extra></extra>"))
    traces.append(dict(x=names, y=total, name="total",
                       hovertext=[f"{n} total: {format_bytes(d.total_bytes)}" if d else ""
                                  for n, d in zip(names, rows)],
                       hovertemplate="%{hovertext}<extra></extra>"))
    # the deficit in words, over each over-full bar (a text trace keeps the trace count fixed)
    used = [d.used_bytes / usize if d is not None else 0.0 for d in rows]
    tops = [max(u, f or 0.0) for u, f in zip(used, free)]
    texts = [f"needs {format_bytes(d.deficit_bytes)} more" if d is not None and not d.fits else ""
             for d in rows]
    traces.append(dict(x=names, y=tops, text=texts, name="deficit"))
    ticktext = []
    for n, d in zip(names, rows):
        if d is None:
            ticktext.append(f"<span style='color:#aaa'>{n} (not used)</span>")
        elif not d.fits:
            ticktext.append(f"<span style='color:{OVERFULL_COLOR}'><b>{n} OVER</b></span>")
        else:
            ticktext.append(n)
    layout = dict(title=dict(text=_memory_title(plan), font=dict(size=14)),
                  xaxis=dict(tickvals=names, ticktext=ticktext),
                  yaxis=dict(title=f"{uname}"))
    return traces, layout


def _memory_title(plan: Plan) -> str:
    if plan.fits:
        return "fits: memory per device (weights, KV, compute) against free memory"
    return f"<span style='color:{OVERFULL_COLOR}'><b>DOES NOT FIT</b></span>: {'; '.join(plan.deficits())}"


def memory_bars(plan: Plan, *, order: Sequence[str] | None = None, unit: tuple[str, int] | None = None,
                height: int = 340) -> go.Figure:
    """One stacked bar per device and the host: weights, KV, compute buffers, runtime overhead,
    with each device's free memory (black tick) and total (grey tick). An over-full device's
    bar is outlined red, its label reads OVER and the deficit is written above it."""
    names = _order(plan, order)
    unit = unit or memory_unit(max([max(d.total_bytes, d.used_bytes) for d in plan.devices] or [0]))
    traces, patch = _memory_data(plan, names, unit)
    fig = go.Figure(layout=dict(
        barmode="stack", height=height, margin=dict(l=60, r=10, t=50, b=40), template="plotly_white",
        legend=dict(orientation="h", y=-0.18, x=0), **patch))
    for t in traces[:4]:
        fig.add_trace(go.Bar(marker_color=TERM_COLORS[t["name"]], **_merge_marker(t)))
    fig.add_trace(go.Scatter(mode="markers", marker=dict(symbol="line-ew-open", size=46, line=dict(width=3)),
                             **_merge_marker(traces[4], line_color=True)))
    fig.add_trace(go.Scatter(mode="markers", marker=dict(symbol="line-ew-open", size=46, color="#aaa",
                                                         line=dict(width=1.5)), **traces[5]))
    fig.add_trace(go.Scatter(mode="text", textposition="top center", showlegend=False, hoverinfo="skip",
                             textfont=dict(color=OVERFULL_COLOR, size=12), **traces[6]))
    return fig


def _merge_marker(t: dict, line_color: bool = False) -> dict:
    """Bar traces carry marker.line; the free ticks colour their line by marker.color."""
    t = dict(t)
    m = t.pop("marker", {})
    if line_color:
        return dict(t, marker_line_color=m.get("color"), marker_color=m.get("color"))
    return dict(t, marker_line=m.get("line"))


# -- in-place update ---------------------------------------------------------------------------

def apply(fig: go.Figure, plan: Plan, kind: str, *, order: Sequence[str] | None = None,
          unit: tuple[str, int] | None = None, y_range: list | None = None) -> None:
    """Copy `plan`'s data into an existing layer_map / memory_bars figure (same `order`) in place.

    Goes through plotly_restyle / plotly_relayout, the path a FigureWidget uses for updates
    from its own view: the values here are already well formed, so plotly's per-property
    validation (most of the cost of `trace.update`, about 10x) is skipped. One restyle message
    per group of traces, one relayout message per figure.
    """
    names = _order(plan, order)
    if kind == "layers":
        traces = _layer_traces(plan, names)
        fig.plotly_restyle({"x": [t["x"].tolist() for t in traces], "y": [t["y"].tolist() for t in traces],
                            "hovertext": [t["hovertext"] for t in traces]}, list(range(len(traces))))
        stacked = [i for i, t in enumerate(traces) if "base" in t]
        if stacked:
            fig.plotly_restyle({"base": [traces[i]["base"].tolist() for i in stacked]}, stacked)
        fig.plotly_relayout({"title.text": _layer_title(plan),
                             "xaxis.range": [-0.7, plan.profile.n_layer + 0.7],
                             "barmode": "stack" if plan.tensor_parallel is not None else "overlay"})
    elif kind == "memory":
        unit = unit or memory_unit(max([max(d.total_bytes, d.used_bytes) for d in plan.devices] or [0]))
        traces, patch = _memory_data(plan, names, unit)
        if list(fig.data[0].x or ()) != names:      # a different order: move the bars too
            fig.plotly_restyle({"x": [t["x"] for t in traces]}, list(range(7)))
        fig.plotly_restyle({"y": [t["y"] for t in traces]}, list(range(7)))
        fig.plotly_restyle({"hovertext": [t["hovertext"] for t in traces[:6]]}, list(range(6)))
        fig.plotly_restyle({"marker.line.color": [t["marker"]["line"]["color"] for t in traces[:4]],
                            "marker.line.width": [t["marker"]["line"]["width"] for t in traces[:4]]}, [0, 1, 2, 3])
        colors = traces[4]["marker"]["color"]
        fig.plotly_restyle({"marker.color": [colors], "marker.line.color": [colors]}, [4])
        fig.plotly_restyle({"text": [traces[6]["text"]]}, [6])
        relayout = {"title.text": patch["title"]["text"], "xaxis.tickvals": patch["xaxis"]["tickvals"],
                    "xaxis.ticktext": patch["xaxis"]["ticktext"], "yaxis.title.text": patch["yaxis"]["title"]}
        if y_range is not None:     # a fixed range ('used only'); None: plotly's autorange
            relayout["yaxis.range"] = y_range
        else:
            relayout["yaxis.autorange"] = True
        fig.plotly_relayout(relayout)
    else:
        raise ValueError(f"kind must be 'layers' or 'memory', not {kind!r}")


# -- runs --------------------------------------------------------------------------------------

def run_label(run, i: int | None = None) -> str:
    """'#2 -ts 1,3 -ngl 31 -c 1024': what distinguishes runs of one session."""
    c = run.config
    ts = ",".join(f"{x:g}" for x in c.tensor_split) if c.tensor_split else "auto"
    parts = [f"#{i}" if i is not None else "", f"-ts {ts}", f"-ngl {c.n_gpu_layers}"]
    if c.split_mode != "layer":
        parts.append(f"-sm {c.split_mode}")
    parts.append(f"-c {c.n_ctx}")
    if c.devices:
        parts.append(f"--device {','.join(c.devices)}")
    return " ".join(p for p in parts if p)


def throughput_chart(runs: Sequence, labels: Sequence[str] | None = None, height: int = 320) -> go.Figure:
    """pp and tg tokens/s (mean, with the standard deviation as error bars) of each run."""
    runs = list(runs)
    labels = list(labels) if labels is not None else [run_label(r, i + 1) for i, r in enumerate(runs)]
    fig = go.Figure(layout=dict(barmode="group", height=height, template="plotly_white",
                                margin=dict(l=60, r=10, t=40, b=40),
                                title=dict(text="throughput of this session's runs", font=dict(size=14)),
                                yaxis=dict(title="tokens/s", rangemode="tozero"),
                                legend=dict(orientation="h", y=1.02, x=1, xanchor="right", yanchor="bottom")))
    for attr, color in (("pp", "#4C78A8"), ("tg", "#F58518")):
        ys, errs, names = [], [], []
        for r in runs:
            t = getattr(r, attr, None)
            ys.append(t.avg_ts if t else None)
            errs.append(t.stddev_ts if t else None)
            names.append(t.name if t else attr)
        fig.add_trace(go.Bar(x=labels, y=ys, name=attr, marker_color=color,
                             error_y=dict(type="data", array=errs, visible=True),
                             customdata=[[n] for n in names],
                             hovertemplate="%{x}<br>%{customdata[0]}: %{y:.1f} t/s<extra></extra>"))
    if not any(getattr(r, "pp", None) or getattr(r, "tg", None) for r in runs):
        fig.add_annotation(text="no throughput measured yet" if not runs else
                           "these runs measured memory only (no pp/tg)", showarrow=False,
                           xref="paper", yref="paper", x=0.5, y=0.5, font=dict(color="#888"))
    return fig


def memory_compare(plan: Plan, report=None, nvml_bytes: dict | None = None, height: int = 320) -> go.Figure:
    """Per device: gpulab's prediction, llama.cpp's reported buffers (LoadReport) and, on GPUs,
    NVML's measured use, side by side. Hover says the per-term split."""
    names = [d.name for d in plan.devices]
    unit = memory_unit(max([d.used_bytes for d in plan.devices] or [0]))
    fig = go.Figure(layout=dict(barmode="group", height=height, template="plotly_white",
                                margin=dict(l=60, r=10, t=40, b=40),
                                title=dict(text="predicted vs llama.cpp-reported memory", font=dict(size=14)),
                                yaxis=dict(title=unit[0]),
                                legend=dict(orientation="h", y=1.02, x=1, xanchor="right", yanchor="bottom")))
    pred = [d.used_bytes for d in plan.devices]
    fig.add_trace(go.Bar(x=names, y=[b / unit[1] for b in pred], name="gpulab predicts", marker_color="#4C78A8",
                         customdata=[[format_bytes(d.weights_bytes), format_bytes(d.kv_bytes),
                                      format_bytes(d.compute_bytes)] for d in plan.devices],
                         hovertemplate="%{x} predicted: weights %{customdata[0]}, KV %{customdata[1]}, "
                                       "compute %{customdata[2]}<extra></extra>"))
    if report is not None:
        kinds = report.kinds_by_device()
        got = [sum(kinds.get(n, {}).values()) for n in names]
        fig.add_trace(go.Bar(x=names, y=[b / unit[1] for b in got], name="llama.cpp reports", marker_color="#F58518",
                             customdata=[[", ".join(f"{k} {format_bytes(v)}" for k, v in kinds.get(n, {}).items())
                                          or "nothing"] for n in names],
                             hovertemplate="%{x} llama.cpp: %{customdata[0]}<extra></extra>"))
    if nvml_bytes:
        fig.add_trace(go.Bar(x=names, y=[(nvml_bytes.get(n) or 0) / unit[1] for n in names], name="NVML measured",
                             marker_color="#54A24B"))
    return fig


def mimebundle(fig: go.Figure) -> dict:
    """The figure as Jupyter's plotly mime type (rendered by JupyterLab's plotly extension and
    Voilà), plus a one-line text form: no plotly.js inlined, no browser opened."""
    import json
    title = fig.layout.title.text if fig.layout.title and fig.layout.title.text else "plotly figure"
    return {"application/vnd.plotly.v1+json": {**json.loads(fig.to_json()), "config": {"displaylogo": False}},
            "text/plain": f"<figure: {title}>"}


def show(fig: go.Figure) -> None:
    """Display a figure in the notebook through its mime bundle (see `mimebundle`)."""
    from IPython.display import display
    display(mimebundle(fig), raw=True)


def _copy(v):
    # what plotly's deepcopy of a figure's dicts does, for the JSON-like values figures hold,
    # about 4x faster (no memo, no reduce protocol)
    if isinstance(v, dict):
        return {k: _copy(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_copy(x) for x in v] if v and isinstance(v[0], (dict, list)) else list(v)
    if isinstance(v, np.ndarray):
        return v.copy()
    return v


def sync_widget_state(fig) -> None:
    """Keep a FigureWidget's saved state current after in-place updates.

    A FigureWidget sends each update as a message to the views that exist; a view made later
    (a Voilà page, a reloaded notebook, a second display) starts from the synced traits
    `_widget_data` / `_widget_layout`, which plotly refreshes only when the figure itself is
    displayed, not when it sits inside a Box as the lab's figures do. No-op for a go.Figure.
    """
    if hasattr(fig, "_widget_data") and hasattr(fig, "_layout_obj"):
        fig._widget_data = [_copy(t) for t in fig._data]
        fig._widget_layout = _copy(fig._layout_obj._props)


# shading of a model's colour by term: weights full, KV lighter, compute lightest
_TERM_OPACITY = {"weights": 1.0, "KV": 0.65, "compute": 0.35}


def fleet_bars(fp, *, height: int = 360) -> go.Figure:
    """A fleet plan (gpulab.core.fleet.planner.FleetPlan): one bar per device, stacked by model
    (a colour per model, its weights / KV / compute shaded from full to light), with each device's
    budget (free memory less keep_free, black tick). A short device is titled with its deficit."""
    names = [d.name for d in fp.devices]
    used = [d.used_bytes for d in fp.devices] + [d.budget_bytes for d in fp.devices]
    unit_name, unit = memory_unit(max(used or [0]))
    colors = {p.name: _PALETTE[i % len(_PALETTE)] for i, p in enumerate(fp.placements)}
    fig = go.Figure(layout=dict(barmode="stack", height=height, template="plotly_white",
                                margin=dict(l=60, r=10, t=50, b=40), legend=dict(orientation="h", y=-0.18, x=0),
                                yaxis=dict(title=unit_name)))
    for p in fp.placements:
        rows = {d.name: d for d in p.plan.offload_devices}
        for term, attr in (("weights", "weights_bytes"), ("KV", "kv_bytes"), ("compute", "compute_bytes")):
            ys = [getattr(rows[n], attr) / unit if n in rows else 0.0 for n in names]
            suffix = "" if p.resident else " (swappable)"
            fig.add_trace(go.Bar(x=names, y=ys, name=f"{p.name} {term}{suffix}", legendgroup=p.name,
                                 marker=dict(color=colors[p.name], opacity=_TERM_OPACITY[term]),
                                 hovertemplate=f"{p.name} {term}: %{{y:.2f}} {unit_name}<extra></extra>"))
    fig.add_trace(go.Scatter(x=names, y=[d.budget_bytes / unit for d in fp.devices], mode="markers",
                             name="free less keep_free",
                             marker=dict(symbol="line-ew-open", size=46, color="black", line=dict(width=3))))
    short = [f"{d.name} short by {format_bytes(d.deficit_bytes)}" for d in fp.devices if not d.fits]
    title = ("fits: every model loaded together" if fp.fits else
             f"<span style='color:{OVERFULL_COLOR}'><b>DOES NOT FIT</b></span>: " + "; ".join(short))
    fig.update_layout(title=dict(text=title, font=dict(size=13)))
    return fig
