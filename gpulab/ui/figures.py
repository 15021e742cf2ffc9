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
from ..core.placement.plan import DevicePlan, Plan
from ..core.placement.planner import kv_layer_bytes
from ..core.units import GiB, MiB, format_bytes
from .palette import (
    BOTTOM_MARGIN,
    HOST_COLOR,
    INK,
    MEASURE_SYMBOLS,
    OVERFULL_COLOR,
    THROUGHPUT_DASH,
    color_sequence,
    legend_below,
    term_marker,
)
from .palette import device_colors as _device_colors

__all__ = ["device_colors", "layer_bytes", "layer_expert_bytes", "layer_map", "memory_bars", "throughput_chart", "show",
           "mimebundle", "run_label", "memory_compare", "runs_compare", "apply", "memory_unit", "memory_scale",
           "sync_widget_state", "memory_terms", "styled", "HOST_COLOR", "OVERFULL_COLOR", "fleet_bars", "SMALL_SHARE"]

# the model is "small" on its devices when each uses less than this share of its free memory:
# then the memory axis fits the model and the free memory is written, not drawn to scale
SMALL_SHARE = 0.25


def device_colors(names: Sequence[str]) -> dict[str, str]:
    """A stable colour per device name, by position; the host ('CPU') is always grey (gpulab.ui.palette)."""
    return _device_colors(names, HOST_NAME)


def memory_terms() -> list[tuple[str, str]]:
    """(label, DevicePlan attribute) of each memory term a bar stacks, bottom up; 'state' where the
    planner counts a recurrent state (SSM / hybrid models) apart from KV."""
    terms = [("weights", "weights_bytes"), ("KV", "kv_bytes")]
    if "state_bytes" in getattr(DevicePlan, "__dataclass_fields__", {}):
        terms.append(("state", "state_bytes"))
    # the same llama-server process's draft, projector and MTP context (DevicePlan.process_bytes)
    return terms + [("compute", "compute_bytes"), ("draft & projector", "process_bytes"),
                    ("overhead", "overhead_bytes")]


def _q(n: int | float, unit: tuple[str, int]) -> str:
    """Bytes in the figure's unit, for hover text: one unit per figure."""
    return f"{n / unit[1]:,.2f} {unit[0]}"


def _order(plan: Plan, order: Sequence[str] | None) -> list[str]:
    """The device names to draw, in order, host last: `order` plus any the plan has beyond it."""
    names = [n for n in (order or ()) if n != HOST_NAME]
    for d in plan.devices:
        if d.name not in names and d.name != HOST_NAME:
            names.append(d.name)
    return names + [HOST_NAME]


def memory_unit(n_bytes: int | float) -> tuple[str, int]:
    """('GiB', GiB) for anything of a GiB or more, else ('MiB', MiB): the axis unit (MiB below 1 GiB,
    as gpulab.core.units.format_bytes writes bytes)."""
    return ("GiB", GiB) if n_bytes >= GiB else ("MiB", MiB)


def memory_scale(plan: Plan) -> tuple[tuple[str, int], list[float] | None]:
    """The scale rule of every memory figure: (unit, y range). When the plan fits and every device
    holds less than SMALL_SHARE of its free memory, the axis fits the model (range 0 to 1.3x the
    fullest device, in that size's unit) and the free memory is written above each bar; otherwise
    None (autorange), in the unit of the largest total, free line and all to scale."""
    known = [d for d in plan.devices if d.used_bytes > 0 and d.free_bytes > 0]   # the host's free may be unknown
    top = max([d.used_bytes for d in plan.devices] or [0])
    small = bool(known) and plan.fits and all(d.used_bytes < SMALL_SHARE * d.free_bytes for d in known)
    if small and top > 0:
        unit = memory_unit(top)
        return unit, [0.0, 1.3 * top / unit[1]]
    return memory_unit(max([max(d.total_bytes, d.used_bytes) for d in plan.devices] or [0])), None


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
    per_layer_kv = kv_layer_bytes(prof, config)
    for layer in prof.layers:
        weights[layer.index] = layer.weights_bytes
        kv[layer.index] = per_layer_kv[layer.index]
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
def _tensor_split_traces(plan: Plan, names: list[str], weights, kv, unit: tuple[str, int]) -> list[dict]:
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
                     f"weights {_q(a, unit)}<br>KV {_q(b, unit)}"
                     for i, a, b in zip(meta_idx.tolist(), w.tolist(), k.tolist())]
            traces.append(dict(x=meta_idx, y=(w + k) / unit[1], hovertext=hover, name=name,
                               hovertemplate="%{hovertext}<extra></extra>"))
        else:
            sel = np.flatnonzero(devs == name)
            hover = [f"<b>{'output layer' if i == n else f'layer {i}'}</b> on {name}<br>weights "
                     f"{_q(weights[i], unit)}<br>KV {_q(kv[i], unit)}" for i in sel.tolist()]
            traces.append(dict(x=sel, y=(weights[sel] + kv[sel]) / unit[1], hovertext=hover, name=name,
                               hovertemplate="%{hovertext}<extra></extra>"))
    return traces


def layer_unit(plan: Plan) -> tuple[str, int]:
    """The layer map's unit: that of its tallest bar (MiB below 1 GiB)."""
    weights, kv = layer_bytes(plan)
    return memory_unit(int((weights + kv).max(initial=0)))


def _layer_traces(plan: Plan, names: list[str]) -> list[dict]:
    """One trace per device: its layers' dense weights and KV. For a MoE model, then one trace
    per device of expert bytes (hatched, in the colour of the device they sit on), stacked on
    the layer's bar wherever the experts are: a moved expert shows in its new device's colour."""
    weights, kv = layer_bytes(plan)
    unit = memory_unit(int((weights + kv).max(initial=0)))
    if plan.tensor_parallel is not None:
        return _tensor_split_traces(plan, names, weights, kv, unit)
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
        hover = [f"<b>{lab}</b> on {name}<br>weights {_q(weights[i], unit)}"
                 + (f" (dense {_q(dense[i], unit)}, experts {_q(all_experts[i], unit)})"
                    if moe and i < n else "")
                 + f"<br>KV {_q(kv[i], unit)}{kv_dev_note}" for lab, i in zip(labels, sel.tolist())]
        traces.append(dict(x=sel, y=(dense[sel] + kv[sel]) / unit[1], hovertext=hover, name=name,
                           hovertemplate="%{hovertext}<extra></extra>"))
    if moe:
        below = (dense + kv).astype(np.float64)
        for name in names:
            arr = experts.get(name, np.zeros(n, dtype=np.int64))
            sel = np.nonzero(arr)[0]
            hover = [f"<b>layer {i}</b> (on {plan.layer_devices[i]}): experts on {name} "
                     f"{_q(arr[i], unit)} of {_q(all_experts[i], unit)}" for i in sel.tolist()]
            traces.append(dict(x=sel, y=arr[sel] / unit[1], base=below[sel] / unit[1], hovertext=hover,
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
        margin=dict(l=60, r=10, t=40, b=BOTTOM_MARGIN),
        title=dict(text=_layer_title(plan), font=dict(size=14)),
        xaxis=dict(title=_layer_axis_title(plan), range=[-0.7, plan.profile.n_layer + 0.7]),
        yaxis=dict(title=f"{layer_unit(plan)[0]} on its device", rangemode="tozero"),
        legend=legend_below(),
        template="plotly_white"))
    for t in _layer_traces(plan, names):
        dev = t["name"].removesuffix(" experts")
        hatch = dict(pattern=dict(shape="/", fgcolor="white", solidity=0.35)) if dev != t["name"] else {}
        fig.add_trace(go.Bar(marker=dict(color=colors[dev], **hatch), **t))
    return fig


def _layer_axis_title(plan: Plan) -> str:
    n = plan.profile.n_layer
    return f"layer (0-{n - 1}: the {n} blocks; {n}: the output layer)"


def _layer_title(plan: Plan) -> str:
    p = plan.profile
    cut = " (-sm tensor: every offloaded layer cut across the devices)" if plan.tensor_parallel is not None else ""
    return f"{p.title}: {p.n_layer} layers + output{cut}"


# -- memory bars -------------------------------------------------------------------------------

def _memory_data(plan: Plan, names: list[str], unit: tuple[str, int],
                 y_range: list | None = None) -> tuple[list[dict], dict]:
    """The memory figure's traces, in a fixed order for a given device order: one per memory term
    (memory_terms), then free, total, the deficit text and the free-memory text (written over a
    bar whose free line is above y_range)."""
    uname, usize = unit
    by = {d.name: d for d in plan.devices}
    rows = [by.get(n) for n in names]
    colors = list(device_colors(names).values())

    def col(attr):
        return [getattr(d, attr) / usize if d is not None else 0.0 for d in rows]

    line_colors = [OVERFULL_COLOR if d is not None and not d.fits else "rgba(0,0,0,0)" for d in rows]
    line_widths = [3 if d is not None and not d.fits else 0 for d in rows]
    traces = []
    for label, attr in memory_terms():
        traces.append(dict(
            x=names, y=col(attr), name=label,
            hovertext=[f"{n} {label}: {_q(getattr(d, attr), unit)}"
                       + (" (gpulab's CUDA default, nothing learned yet)" if attr == "overhead_bytes"
                          and d.overhead_is_default else "") if d else f"{n}: not used"
                       for n, d in zip(names, rows)],
            marker=dict(term_marker(colors, label), line=dict(color=line_colors, width=line_widths)),
            hovertemplate="%{hovertext}<extra></extra>"))
    free = [d.free_bytes / usize if d is not None and d.free_bytes else None for d in rows]
    total = [d.total_bytes / usize if d is not None and d.total_bytes else None for d in rows]
    free_colors = [OVERFULL_COLOR if d is not None and not d.fits else INK for d in rows]
    traces.append(dict(x=names, y=free, name="free", marker=dict(color=free_colors),
                       hovertext=[f"{n} free: {_q(d.free_bytes, unit)}" if d else "" for n, d in zip(names, rows)],
                       hovertemplate="%{hovertext}<extra></extra>"))
    traces.append(dict(x=names, y=total, name="total",
                       hovertext=[f"{n} total: {_q(d.total_bytes, unit)}" if d else ""
                                  for n, d in zip(names, rows)],
                       hovertemplate="%{hovertext}<extra></extra>"))
    # the deficit in words, over each over-full bar (a text trace keeps the trace count fixed)
    used = [d.used_bytes / usize if d is not None else 0.0 for d in rows]
    tops = [max(u, f or 0.0) for u, f in zip(used, free)]
    texts = [f"needs {format_bytes(d.deficit_bytes)} more" if d is not None and not d.fits else ""
             for d in rows]
    traces.append(dict(x=names, y=tops, text=texts, name="deficit"))
    # a free line above the axis (the axis fits the model): its amount, written at the top
    ceiling = y_range[1] if y_range else None
    off = [ceiling is not None and f is not None and f > ceiling for f in free]
    traces.append(dict(x=names, y=[ceiling if o else None for o in off], name="free (above the axis)",
                       text=[f"free {format_bytes(d.free_bytes)} ↑" if o and d is not None else ""
                             for o, d in zip(off, rows)]))
    ticktext = []
    for n, d in zip(names, rows):
        if d is None:
            ticktext.append(f"<span style='color:#aaa'>{n} (not used)</span>")
        elif not d.fits:
            ticktext.append(f"<span style='color:{OVERFULL_COLOR}'><b>{n} OVER</b></span>")
        else:
            ticktext.append(n)
    layout = dict(title=dict(text=_memory_title(plan, ceiling is not None and any(off)), font=dict(size=14)),
                  xaxis=dict(tickvals=names, ticktext=ticktext),
                  yaxis=dict(title=f"{uname}"))
    return traces, layout


def _memory_title(plan: Plan, zoomed: bool = False) -> str:
    if plan.fits:
        return ("fits: memory per device (weights, KV, compute), the axis fitted to the model" if zoomed
                else "fits: memory per device (weights, KV, compute) against free memory")
    return f"<span style='color:{OVERFULL_COLOR}'><b>DOES NOT FIT</b></span>: {'; '.join(plan.deficits())}"


def memory_bars(plan: Plan, *, order: Sequence[str] | None = None, unit: tuple[str, int] | None = None,
                y_range: list | None | str = "auto", height: int = 340) -> go.Figure:
    """One stacked bar per device and the host, in the device's colour: weights (solid), KV,
    compute buffers, runtime overhead (lighter, patterned), with each device's free memory
    (black tick) and total (grey tick). An over-full device's bar is outlined red, its label reads
    OVER and the deficit is written above it. unit / y_range: memory_scale's rule unless given
    (y_range None: autorange)."""
    names = _order(plan, order)
    auto_unit, auto_range = memory_scale(plan)
    unit = unit or auto_unit
    if isinstance(y_range, str):
        y_range = [r * auto_unit[1] / unit[1] for r in auto_range] if auto_range else None
    traces, patch = _memory_data(plan, names, unit, y_range)
    if y_range is not None:
        patch["yaxis"]["range"] = y_range
    fig = go.Figure(layout=dict(
        barmode="stack", height=height, margin=dict(l=60, r=10, t=50, b=BOTTOM_MARGIN), template="plotly_white",
        legend=legend_below(), **patch))
    n = len(memory_terms())
    for t in traces[:n]:
        fig.add_trace(go.Bar(**t))
    fig.add_trace(go.Scatter(mode="markers", marker=dict(symbol="line-ew-open", size=46, line=dict(width=3)),
                             **_line_marker(traces[n])))
    fig.add_trace(go.Scatter(mode="markers", marker=dict(symbol="line-ew-open", size=46, color="#aaa",
                                                         line=dict(width=1.5)), **traces[n + 1]))
    fig.add_trace(go.Scatter(mode="text", textposition="top center", showlegend=False, hoverinfo="skip",
                             textfont=dict(color=OVERFULL_COLOR, size=12), **traces[n + 2]))
    fig.add_trace(go.Scatter(mode="text", textposition="bottom center", showlegend=False, hoverinfo="skip",
                             cliponaxis=False, textfont=dict(color=INK, size=12), **traces[n + 3]))
    return fig


def _line_marker(t: dict) -> dict:
    """The free ticks colour their line by marker.color."""
    t = dict(t)
    m = t.pop("marker", {})
    return dict(t, marker_line_color=m.get("color"), marker_color=m.get("color"))


# -- in-place update ---------------------------------------------------------------------------

def apply(fig: go.Figure, plan: Plan, kind: str, *, order: Sequence[str] | None = None,
          unit: tuple[str, int] | None = None, y_range: list | None | str = "auto") -> None:
    """Copy `plan`'s data into an existing layer_map / memory_bars figure (same `order`) in place.

    Goes through plotly_restyle / plotly_relayout, the path a FigureWidget uses for updates
    from its own view: the values here are already well formed, so plotly's per-property
    validation (most of the cost of `trace.update`, about 10x) is skipped. One restyle message
    per group of traces, one relayout message per figure. Memory: y_range 'auto' is memory_scale's
    rule, None plotly's autorange, [lo, hi] a range in `unit`.
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
                             "xaxis.title.text": _layer_axis_title(plan),
                             "yaxis.title.text": f"{layer_unit(plan)[0]} on its device",
                             "barmode": "stack" if plan.tensor_parallel is not None else "overlay"})
    elif kind == "memory":
        auto_unit, auto_range = memory_scale(plan)
        unit = unit or auto_unit
        if isinstance(y_range, str):
            y_range = [r * auto_unit[1] / unit[1] for r in auto_range] if auto_range else None
        traces, patch = _memory_data(plan, names, unit, y_range)
        n = len(memory_terms())
        every = list(range(len(traces)))
        if list(fig.data[0].x or ()) != names:      # a different order: move the bars, recolour them
            fig.plotly_restyle({"x": [t["x"] for t in traces]}, every)
            fig.plotly_restyle({"marker.color": [t["marker"]["color"] for t in traces[:n]],
                                "marker.pattern.fgcolor": [t["marker"].get("pattern", {}).get("fgcolor")
                                                           for t in traces[:n]]}, list(range(n)))
        fig.plotly_restyle({"y": [t["y"] for t in traces]}, every)
        fig.plotly_restyle({"hovertext": [t["hovertext"] for t in traces[:n + 2]]}, list(range(n + 2)))
        fig.plotly_restyle({"marker.line.color": [t["marker"]["line"]["color"] for t in traces[:n]],
                            "marker.line.width": [t["marker"]["line"]["width"] for t in traces[:n]]}, list(range(n)))
        colors = traces[n]["marker"]["color"]
        fig.plotly_restyle({"marker.color": [colors], "marker.line.color": [colors]}, [n])
        fig.plotly_restyle({"text": [traces[n + 2]["text"], traces[n + 3]["text"]]}, [n + 2, n + 3])
        relayout = {"title.text": patch["title"]["text"], "xaxis.tickvals": patch["xaxis"]["tickvals"],
                    "xaxis.ticktext": patch["xaxis"]["ticktext"], "yaxis.title.text": patch["yaxis"]["title"]}
        if y_range is not None:     # a fixed range (the model fitted to the axis)
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
    """pp and tg tokens/s (mean, with the standard deviation as error bars) of each run: pp a solid
    line, tg a dashed one (colour is for devices)."""
    runs = list(runs)
    labels = list(labels) if labels is not None else [run_label(r, i + 1) for i, r in enumerate(runs)]
    fig = go.Figure(layout=dict(height=height, template="plotly_white",
                                margin=dict(l=60, r=10, t=40, b=BOTTOM_MARGIN),
                                title=dict(text="throughput of this session's runs", font=dict(size=14)),
                                yaxis=dict(title="tokens/s", rangemode="tozero"),
                                xaxis=dict(type="category", range=[-0.5, max(len(labels), 1) - 0.5]),
                                legend=legend_below()))
    for attr, symbol in (("pp", "circle"), ("tg", "square")):
        ys, errs, names = [], [], []
        for r in runs:
            t = getattr(r, attr, None)
            ys.append(t.avg_ts if t else None)
            errs.append(t.stddev_ts if t else None)
            names.append(t.name if t else attr)
        fig.add_trace(go.Scatter(x=labels, y=ys, name=attr, mode="lines+markers",
                                 line=dict(color=INK, dash=THROUGHPUT_DASH[attr], width=2),
                                 marker=dict(color=INK, symbol=symbol, size=8),
                                 error_y=dict(type="data", array=errs, visible=True, color=INK),
                                 customdata=[[n] for n in names],
                                 hovertemplate="%{x}<br>%{customdata[0]}: %{y:.1f} t/s<extra></extra>"))
    if not any(getattr(r, "pp", None) or getattr(r, "tg", None) for r in runs):
        fig.add_annotation(text="no throughput measured yet" if not runs else
                           "these runs measured memory only (no pp/tg)", showarrow=False,
                           xref="paper", yref="paper", x=0.5, y=0.5, font=dict(color="#888"))
    return fig


def memory_compare(plan: Plan, report=None, nvml_bytes: dict | None = None, height: int = 320) -> go.Figure:
    """Per device, in its colour: gpulab's prediction (a bar), llama.cpp's reported buffers
    (LoadReport: a cross over the bar) and, on GPUs, NVML's measured use (an open circle).
    Hover says the per-term split."""
    names = [d.name for d in plan.devices]
    colors = [device_colors(names)[n] for n in names]
    unit = memory_unit(max([d.used_bytes for d in plan.devices] or [0]))
    fig = go.Figure(layout=dict(height=height, template="plotly_white",
                                margin=dict(l=60, r=10, t=40, b=BOTTOM_MARGIN),
                                title=dict(text="predicted (bars) vs llama.cpp-reported (crosses) memory",
                                           font=dict(size=14)),
                                yaxis=dict(title=unit[0], rangemode="tozero"), legend=legend_below()))
    pred = [d.used_bytes for d in plan.devices]
    fig.add_trace(go.Bar(x=names, y=[b / unit[1] for b in pred], name="gpulab predicts",
                         marker=dict(color=colors, opacity=0.55),
                         customdata=[[_q(d.weights_bytes, unit), _q(d.kv_bytes, unit), _q(d.compute_bytes, unit)]
                                     for d in plan.devices],
                         hovertemplate="%{x} predicted: weights %{customdata[0]}, KV %{customdata[1]}, "
                                       "compute %{customdata[2]}<extra></extra>"))
    if report is not None:
        kinds = report.kinds_by_device()
        got = [sum(kinds.get(n, {}).values()) for n in names]
        fig.add_trace(go.Scatter(x=names, y=[b / unit[1] for b in got], name="llama.cpp reports", mode="markers",
                                 marker=dict(symbol=MEASURE_SYMBOLS["llama.cpp"], size=16, color=colors,
                                             line=dict(width=3, color=colors)),
                                 customdata=[[", ".join(f"{k} {_q(v, unit)}" for k, v in kinds.get(n, {}).items())
                                              or "nothing"] for n in names],
                                 hovertemplate="%{x} llama.cpp: %{customdata[0]}<extra></extra>"))
    if nvml_bytes:
        fig.add_trace(go.Scatter(x=names, y=[(nvml_bytes.get(n) or 0) / unit[1] for n in names], name="NVML measured",
                                 mode="markers", marker=dict(symbol=MEASURE_SYMBOLS["NVML"], size=14, color=colors,
                                                             line=dict(width=2, color=colors))))
    return fig


def runs_compare(labels: Sequence[str], plans: Sequence[Plan], runs: Sequence, height: int = 380) -> go.Figure:
    """Several configurations side by side: for each, one bar per device (in its colour) with
    gpulab's prediction, and a cross over that very bar with what llama.cpp reported."""
    names: list[str] = []
    for q in plans:
        names += [d.name for d in q.devices if d.name not in names and d.name != HOST_NAME]
    names.append(HOST_NAME)
    colors = device_colors(names)
    unit = memory_unit(max([d.used_bytes for q in plans for d in q.devices] or [0]))
    fig = go.Figure(layout=dict(barmode="group", scattermode="group", height=height, template="plotly_white",
                                margin=dict(l=60, r=10, t=40, b=BOTTOM_MARGIN), legend=legend_below(),
                                title=dict(text="memory per device: bars predicted, crosses llama.cpp-reported",
                                           font=dict(size=14)),
                                yaxis=dict(title=unit[0], rangemode="tozero")))
    for dev in names:
        pred = [q.device(dev).used_bytes / unit[1] if dev in [x.name for x in q.devices] else 0 for q in plans]
        fig.add_bar(x=list(labels), y=pred, name=f"{dev} predicted", offsetgroup=dev, legendgroup=dev,
                    marker=dict(color=colors[dev], opacity=0.55),
                    hovertemplate=f"%{{x}}<br>{dev} predicted %{{y:.2f}} {unit[0]}<extra></extra>")
        fig.add_scatter(x=list(labels), y=[r.report.bytes_on(dev) / unit[1] for r in runs], mode="markers",
                        name=f"{dev} llama.cpp", offsetgroup=dev, legendgroup=dev,
                        marker=dict(symbol=MEASURE_SYMBOLS["llama.cpp"], size=14, color=colors[dev],
                                    line=dict(width=3, color=colors[dev])),
                        hovertemplate=f"%{{x}}<br>{dev} llama.cpp %{{y:.2f}} {unit[0]}<extra></extra>")
    return fig


def mimebundle(fig: go.Figure) -> dict:
    """The figure as Jupyter's plotly mime type (rendered by JupyterLab's plotly extension and
    Voilà), plus a one-line text form: no plotly.js inlined, no browser opened."""
    import json
    title = fig.layout.title.text if fig.layout.title and fig.layout.title.text else "plotly figure"
    return {"application/vnd.plotly.v1+json": {**json.loads(fig.to_json()), "config": {"displaylogo": False}},
            "text/plain": f"<figure: {title}>"}


def styled(fig: go.Figure) -> go.Figure:
    """A figure built by hand (in a notebook) in the house style: a white template and, unless it
    places its legend itself, the legend below the plot, clear of the toolbar. A copy."""
    fig = go.Figure(fig)
    if fig.layout.legend.orientation is None and fig.layout.legend.y is None:
        margin = fig.layout.margin.b
        fig.update_layout(legend=legend_below(), margin_b=max(margin or 0, BOTTOM_MARGIN))
    if fig.layout.template.layout.paper_bgcolor is None:       # no template chosen
        fig.update_layout(template="plotly_white")
    return fig


def show(fig: go.Figure) -> None:
    """Display a figure in the notebook through its mime bundle (see `mimebundle`), `styled`."""
    from IPython.display import display
    display(mimebundle(styled(fig)), raw=True)


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


def fleet_bars(fp, *, height: int = 360) -> go.Figure:
    """A fleet plan (gpulab.core.fleet.planner.FleetPlan): one bar per device, stacked by model
    (a colour per model; its weights solid, KV and compute lighter and patterned, as in
    memory_bars), with each device's budget (free memory less keep_free, black tick). A short
    device is titled with its deficit."""
    names = [d.name for d in fp.devices]
    used = [d.used_bytes for d in fp.devices] + [d.budget_bytes for d in fp.devices]
    unit = memory_unit(max(used or [0]))
    colors = dict(zip([p.name for p in fp.placements], color_sequence(len(fp.placements))))
    fig = go.Figure(layout=dict(barmode="stack", height=height, template="plotly_white",
                                margin=dict(l=60, r=10, t=50, b=BOTTOM_MARGIN), legend=legend_below(),
                                yaxis=dict(title=unit[0])))
    for p in fp.placements:
        rows = {d.name: d for d in p.plan.offload_devices}
        for term, attr in (("weights", "weights_bytes"), ("KV", "kv_bytes"), ("compute", "compute_bytes")):
            ys = [getattr(rows[n], attr) / unit[1] if n in rows else 0.0 for n in names]
            suffix = "" if p.resident else " (swappable)"
            fig.add_trace(go.Bar(x=names, y=ys, name=f"{p.name} {term}{suffix}", legendgroup=p.name,
                                 marker=term_marker(colors[p.name], term),
                                 hovertemplate=f"{p.name} {term}: %{{y:.2f}} {unit[0]}<extra></extra>"))
    fig.add_trace(go.Scatter(x=names, y=[d.budget_bytes / unit[1] for d in fp.devices], mode="markers",
                             name="free less keep_free",
                             marker=dict(symbol="line-ew-open", size=46, color="black", line=dict(width=3))))
    short = [f"{d.name} short by {format_bytes(d.deficit_bytes)}" for d in fp.devices if not d.fits]
    title = ("fits: every model loaded together" if fp.fits else
             f"<span style='color:{OVERFULL_COLOR}'><b>DOES NOT FIT</b></span>: " + "; ".join(short))
    fig.update_layout(title=dict(text=title, font=dict(size=13)))
    return fig
