"""Monitor: live per-GPU memory and utilisation timelines, with per-process memory.

    from gpulab.ui.monitor import Monitor
    m = Monitor(interval=0.5)              # NVML (gpulab.sources.nvml.NvmlProbe)
    m = Monitor(probe=fake)                # anything with available() and devices() -> [GpuInfo]
    m = Monitor(worker=w)                  # no NVML: llama.cpp's own device memory (RPC, CPU)
    m.mark_phase("pp"); ...; m.mark_phase(None)   # shade a phase on the timelines
    m.close()                              # stops polling

Polling runs in a daemon thread at `interval` seconds and stops when the widget is closed (or
`stop()`); it never calls NVML itself but goes through the probe, like the rest of the UI.
Where there is neither NVML nor a worker it says plainly that there is nothing to monitor.
"""

from __future__ import annotations

import html
import threading
import time

import ipywidgets as W
import plotly.graph_objects as go

from ..core.units import MiB, format_bytes
from . import figures as F
from .html import table_html
from .palette import BOTTOM_MARGIN, device_colors, legend_below

__all__ = ["Monitor"]

_PHASE_COLORS = {"load": "rgba(120,120,120,0.15)", "pp": "rgba(76,120,168,0.18)", "tg": "rgba(245,133,24,0.18)"}


class Monitor(W.VBox):
    """Memory and utilisation timelines of the GPUs (see the module docstring)."""

    def __init__(self, probe=None, *, interval: float = 1.0, history: int = 600, worker=None,
                 autostart: bool = True, clock=time.monotonic, models=None):
        super().__init__()
        # a fleet's models, name -> resolved path: each GPU process is attributed to the model it
        # serves (gpulab.core.fleet.processes), and the memory is summed per model
        self.models = dict(models or {})
        self.interval = float(interval)
        self.history = int(history)
        self.worker = worker
        self._clock = clock
        self._t0 = clock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._own_probe = probe is None
        if probe is None:
            from ..sources.nvml import NvmlProbe
            probe = NvmlProbe()
        self.probe = probe
        self.series: dict[str, dict] = {}       # device key -> {"name", "t": [], "used": [], "util": [], "total"}
        self.phases: list[list] = []            # [name, t_start, t_end or None]
        self.errors = 0
        self.last_error = ""
        if probe.available():
            self.source = "nvml"
            self.note = "NVML: memory used and GPU utilisation per GPU"
        elif worker is not None:
            self.source = "llama"
            reason = getattr(probe, "unavailable_reason", None)
            self.note = ("no NVML" + (f" ({reason})" if reason else "") + ": llama.cpp's own device memory "
                         "(RPC and CPU devices) from the worker, read between loads")
        else:
            self.source = "none"
            reason = getattr(probe, "unavailable_reason", None)
            self.note = ("nothing to monitor: NVML is not available" + (f" ({reason})" if reason else "")
                         + " and no llama.cpp worker was given (Monitor(worker=...) shows RPC/CPU device memory)")
        self.header = W.HTML(f"<b>monitor</b> <span style='color:#666;font-size:12px'>{html.escape(self.note)}</span>")
        self.mem_fig = go.FigureWidget(layout=dict(
            height=300, template="plotly_white", margin=dict(l=60, r=10, t=30, b=BOTTOM_MARGIN),
            title=dict(text="memory used", font=dict(size=13)), xaxis=dict(title="seconds"),
            yaxis=dict(title="MiB", rangemode="tozero"), legend=legend_below()))
        self.util_fig = go.FigureWidget(layout=dict(
            height=200, template="plotly_white", margin=dict(l=60, r=10, t=30, b=35),
            title=dict(text="GPU utilisation", font=dict(size=13)), xaxis=dict(title="seconds"),
            yaxis=dict(title="%", range=[0, 100]), showlegend=False))
        self.processes = W.HTML()
        self.status = W.HTML()
        if self.source == "none":
            self.children = [self.header]
            return
        kids = [self.header, self.mem_fig]
        if self.source == "nvml":
            kids += [self.util_fig, self.processes]
        self.children = kids + [self.status]
        if autostart:
            self.start()

    # -- sampling --------------------------------------------------------------------------
    def _sample(self) -> list[dict] | None:
        """[{key, name, used, total, util, processes}] now; None when nothing could be read."""
        if self.source == "nvml":
            out = []
            # named as llama.cpp names them (CUDA0...: CUDA's order, CUDA_VISIBLE_DEVICES applied)
            cuda = {d.uuid: d.name for d in self.probe.cuda_devices()[0] if d.uuid}
            for g in self.probe.devices():
                name = cuda.get(g.uuid) or f"NVML{g.index} (not visible to CUDA)"
                out.append({"key": g.uuid or str(g.index), "name": name, "description": g.name,
                            "used": g.used_bytes, "total": g.total_bytes, "util": g.utilization_gpu_percent,
                            "processes": list(g.processes)})
            return out
        if self.source == "llama":
            devices = self.worker.try_devices()
            if devices is None:
                return None              # a load is running in the worker: read again later
            return [{"key": d.name, "name": d.name, "description": d.description,
                     "used": d.total_bytes - d.free_bytes, "total": d.total_bytes, "util": None, "processes": []}
                    for d in devices]
        return None

    def poll(self) -> bool:
        """Take one sample and redraw; False when nothing was read (busy worker, error)."""
        try:
            sample = self._sample()
        except Exception as e:  # noqa: BLE001 - a failed read is shown, polling goes on
            self.errors += 1
            self.last_error = f"{type(e).__name__}: {e}"
            self.status.value = f"<span style='color:#b35c00'>last read failed: {html.escape(self.last_error)}</span>"
            return False
        if sample is None:
            return False
        t = self._clock() - self._t0
        for s in sample:
            ser = self.series.get(s["key"])
            if ser is None:
                ser = self.series[s["key"]] = {"name": s["name"], "description": s["description"],
                                               "t": [], "used": [], "util": [], "total": s["total"]}
            ser["t"].append(t)
            ser["used"].append(s["used"])
            ser["util"].append(s["util"])
            ser["total"] = s["total"]
            for k in ("t", "used", "util"):
                del ser[k][:-self.history]
        self._redraw(sample)
        return True

    def _redraw(self, sample: list[dict]) -> None:
        colors = device_colors([s["name"] for s in self.series.values()])
        keys = list(self.series)
        with self.mem_fig.batch_update(), self.util_fig.batch_update():
            while len(self.mem_fig.data) < len(keys):
                ser = self.series[keys[len(self.mem_fig.data)]]
                c = colors[ser["name"]]
                self.mem_fig.add_scatter(mode="lines", name=f"{ser['name']} {ser['description']}".strip(),
                                         line=dict(color=c))
                self.util_fig.add_scatter(mode="lines", name=ser["name"], line=dict(color=c))
            for i, k in enumerate(keys):
                ser = self.series[k]
                self.mem_fig.data[i].update(x=list(ser["t"]), y=[(u or 0) / MiB for u in ser["used"]])
                self.util_fig.data[i].update(x=list(ser["t"]), y=list(ser["util"]))
            self._draw_phases()
        F.sync_widget_state(self.mem_fig)
        F.sync_widget_state(self.util_fig)
        if self.source == "nvml":
            from ..core.fleet.processes import model_of_process
            rows = []
            for s in sample:
                for p in s["processes"]:
                    row = {"GPU": s["name"], "pid": p.pid, "process": p.name or "?"}
                    if self.models:
                        row["model"] = model_of_process(p.argv, self.models) or "-"
                    row["memory"] = format_bytes(p.used_bytes) if p.used_bytes is not None else "n/a"
                    rows.append(row)
            totals = ", ".join(f"{s['name']} {format_bytes(s['used'] or 0)} / {format_bytes(s['total'] or 0)}"
                               for s in sample)
            self.processes.value = table_html(rows, caption=f"processes on the GPUs ({totals})",
                                              right=("memory",)) if rows else (
                f"<span style='color:#666'>no processes on the GPUs ({html.escape(totals)})</span>")
        self.status.value = ""

    def _draw_phases(self) -> None:
        now = self._clock() - self._t0
        shapes, notes = [], []
        for name, a, b in self.phases:
            shapes.append(dict(type="rect", xref="x", yref="paper", x0=a, x1=b if b is not None else now,
                               y0=0, y1=1, fillcolor=_PHASE_COLORS.get(name, "rgba(84,162,75,0.15)"),
                               line=dict(width=0), layer="below"))
            notes.append(dict(x=a, y=1, xref="x", yref="paper", text=name, showarrow=False,
                              xanchor="left", yanchor="top", font=dict(size=10, color="#555")))
        for fig in (self.mem_fig, self.util_fig):
            fig.layout.shapes = shapes
            fig.layout.annotations = notes

    # -- phases ----------------------------------------------------------------------------
    def mark_phase(self, name: str | None) -> None:
        """Start phase `name` now ('load', 'pp', 'tg', ...), ending the current one; None ends it."""
        now = self._clock() - self._t0
        if self.phases and self.phases[-1][2] is None:
            if name is not None and self.phases[-1][0] == name:
                return
            self.phases[-1][2] = now
        if name is not None:
            self.phases.append([str(name), now, None])
        if self.source != "none":
            with self.mem_fig.batch_update(), self.util_fig.batch_update():
                self._draw_phases()
            F.sync_widget_state(self.mem_fig)
            F.sync_widget_state(self.util_fig)

    # -- polling thread --------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self.source == "none" or self.running:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="gpulab-monitor")
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.poll()
            if self._stop.wait(self.interval):
                break

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(max(5.0, 2 * self.interval))
        self._thread = None

    def close(self) -> None:
        """Stop polling and close the widget (and the NVML session the monitor opened)."""
        self.stop()
        if self._own_probe:
            try:
                self.probe.shutdown()
            except Exception:  # noqa: BLE001
                pass
        for fig in (self.mem_fig, self.util_fig):
            try:
                fig.close()
            except Exception:  # noqa: BLE001
                pass
        super().close()
