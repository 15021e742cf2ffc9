"""SplitLab: drag a model's tensor_split across devices and watch llama.cpp's placement change.

    from gpulab.ui.lab import SplitLab
    lab = SplitLab("model.gguf")                    # GPUs from NVML; with none, 2 virtual RPC devices
    lab = SplitLab("model.gguf", sim="8x24GiB")     # what-if devices: plan only
    lab = SplitLab("model.gguf", worker=w)          # devices (and loads) of an existing Worker
    lab                                             # in a notebook: the widget

Every control change re-plans (gpulab.core.placement.planner.plan, well under a millisecond) and copies the
new data into the two FigureWidgets inside `batch_update`; slider drags are throttled to one
redraw per `debounce` seconds, always ending on the latest value. `lab.plan` is the current Plan,
`lab.config` the current SplitConfig, `lab.runs` this session's measured runs. Every llama.cpp
setting without a control of its own here gets a generic one from gpulab.core.settings, so a
setting added there appears in the lab too.

Devices come from a gpulab.runtime.session.Session (the magics pass theirs), by the same rules as
the CLI's. Loads never happen in the notebook kernel: they go to a gpulab worker process
(gpulab.runtime.worker), because llama.cpp aborts a process whose RPC server dies and ggml cannot
unregister an RPC backend. RPC endpoints are registered only in the worker.
"""

from __future__ import annotations

import asyncio
import html
import math
import threading
import time
import weakref
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import ipywidgets as W
import plotly.graph_objects as go

from ..core.config import FLASH_ATTN_MODES, SPLIT_MODES, SplitConfig
from ..core.devices import HOST_NAME, Device, parse_sim_spec
from ..core.errors import GpulabError
from ..core.exports.render import TARGETS, render
from ..core.ggml_types import KV_CACHE_TYPES
from ..core.measure.reconcile import comparison_rows
from ..core.placement.plan import Plan
from ..core.placement.planner import plan as make_plan
from ..core.policies.apply import ALL_POLICIES, apply_policy, policy_split
from ..core.profile import ModelProfile
from ..core.run import Run
from ..core.settings import SETTINGS, value_from_text
from ..core.units import format_bytes
from . import figures as F
from .html import exports_html, run_rows, table_html

if TYPE_CHECKING:
    from ..runtime.session import Session

__all__ = ["SplitLab"]

_POLICY_LABELS = {"llama": "llama.cpp default", "ollama-spread": "ollama spread", "pack": "pack",
                  "balanced": "balanced", "moe-balance": "MoE balance", "fit": "llama-server -fit",
                  "ollama": "ollama (today)"}
# settings with a control of their own below; every other one gets a generic control
_CUSTOM = {"tensor_split", "devices", "main_gpu", "n_gpu_layers", "split_mode", "n_ctx", "type_k", "type_v",
           "flash_attn"}
_EXPORT_TARGETS = tuple(t for t in TARGETS if t != "llama-cli")
_PROMINENT = ("n_cpu_moe", "tensor_overrides")     # on their own rows; the rest share one


def _cleanup(session) -> None:
    if session is not None:
        try:
            session.close()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


def _ctx_options(n_ctx_train: int, current: int) -> list[int]:
    opts = [256 * 2**k for k in range(0, 10)]      # 256 .. 131072
    top = max(n_ctx_train or 4096, 4096)
    opts = [x for x in opts if x <= top]
    for extra in (top, current):
        if extra not in opts:
            opts.append(extra)
    return sorted(set(opts))


class SplitLab(W.VBox):
    """The split lab widget (see the module docstring)."""

    def __init__(self, model: str | Path | ModelProfile, devices: list[Device] | None = None, *,
                 config: SplitConfig | None = None, host: Device | None = None, sim: str | None = None,
                 rpc: list[str] | str | None = None, virtual: int | None = None, llama_devices: bool = False,
                 worker=None, session=None, debounce: float = 0.05, background: bool = True, monitor=None,
                 n_prompt: int = 128, n_gen: int = 32, repetitions: int = 2):
        super().__init__()
        if isinstance(model, ModelProfile):
            self.profile = model
            self.model_path = model.path
        else:
            from ..sources.read import read_profile
            self.model_path = str(model)
            self.profile = read_profile(self.model_path)
        self.debounce = debounce
        self.background = background
        self.monitor = monitor
        self.runs: list[Run] = []
        self.plan: Plan | None = None
        self.error: str | None = None
        self.last_update_s = 0.0
        self._suspend = 0
        self._handle: asyncio.TimerHandle | None = None
        self._last_draw = 0.0
        self._busy = False
        self._thread: threading.Thread | None = None
        self._own_session: Session | None = None
        self.worker = worker
        self.notes: list[str] = []
        self.devices, self.host, self.can_load, self.load_reason = self._resolve_devices(
            devices, host, sim, rpc, virtual, llama_devices, worker, session)
        self._finalizer = weakref.finalize(self, _cleanup, self._own_session)
        self._build(config or SplitConfig(), n_prompt, n_gen, repetitions)
        self.redraw()

    # -- devices ---------------------------------------------------------------------------
    def _resolve_devices(self, devices, host, sim, rpc, virtual, llama_devices, worker, session):
        load_ok = isinstance(self.profile.path, str) and Path(self.profile.path).is_file()
        no_file = "the model is a profile without a file to load"
        if devices is not None or worker is not None:
            if host is None:
                from ..sources.host import host_device
                host = host_device()
            devs = [d for d in (devices if devices is not None else worker.devices()) if d.is_offload]
            if any(d.source == "sim" for d in devs):
                return devs, host, False, "simulated devices cannot load a model (plan only)"
            if worker is None:
                why = ("RPC devices given without their worker: pass worker=Worker(endpoints)"
                       if any(d.kind == "rpc" for d in devs) else "no worker to load with: pass worker=Worker()")
                return devs, host, False, why
            return devs, host, load_ok, "" if load_ok else no_file
        if session is None:
            from ..runtime.session import Session
            session = self._own_session = Session()
        try:
            choice = session.devices(sim=sim, rpc=rpc, llama_devices=llama_devices, virtual=virtual,
                                     for_load=sim is None, virtual_if_no_gpu=sim is None)
        except GpulabError as e:
            if sim is not None or rpc:
                raise
            # no RPC runtime for the virtual devices: still teach, with simulated ones
            self.notes.append(f"could not start virtual devices ({e}); showing 2 simulated 8 GiB devices")
            return parse_sim_spec("2x8GiB"), host, False, "no virtual devices: plan only"
        if choice.note:
            self.notes.append(choice.note)
        self.worker = choice.worker
        can = choice.can_load and load_ok
        return list(choice.devices), host or choice.host, can, choice.why_not or ("" if load_ok else no_file)

    # -- building --------------------------------------------------------------------------
    def _build(self, config: SplitConfig, n_prompt: int, n_gen: int, repetitions: int) -> None:
        prof = self.profile
        names = [d.name for d in self.devices]
        self.order = names
        ts = list(config.tensor_split) + [0.0] * (len(names) - len(config.tensor_split))
        chosen = set(config.devices) if config.devices and config.devices != ("none",) else (
            set() if config.devices == ("none",) else set(names))
        self.use_boxes, self.split_sliders, self.share_labels = [], [], []
        rows = []
        sel_i = 0
        for d in self.devices:
            use = W.Checkbox(value=d.name in chosen, indent=False, layout=W.Layout(width="22px"),
                             tooltip=f"use {d.name}")
            val = 0.0
            if d.name in chosen:
                val = float(ts[sel_i]) if sel_i < len(ts) else 0.0
                sel_i += 1
            sl = W.FloatSlider(value=val, min=0.0, max=max(1.0, math.ceil(val)), step=0.01, description=d.name,
                               continuous_update=True, readout_format=".2f",
                               style={"description_width": "60px"}, layout=W.Layout(width="330px"))
            share = W.HTML(layout=W.Layout(width="260px"))
            free = W.HTML(f"<span style='color:#666;font-size:11px'>{format_bytes(d.free_bytes)} free of "
                          f"{format_bytes(d.total_bytes)}</span>", layout=W.Layout(width="200px"))
            use.observe(self._changed, "value")
            sl.observe(self._changed, "value")
            self.use_boxes.append(use)
            self.split_sliders.append(sl)
            self.share_labels.append(share)
            rows.append(W.HBox([use, sl, share, free]))
        self.policy_buttons = {}
        tooltips = {"fit": "set -c, -ngl, -ts and -ot to what llama-server's -fit chooses from its defaults "
                           "(-c 0, -ngl auto, no -ts, no -ot)",
                    "ollama": "set the devices and every flag to what today's Ollama (0.30-0.33) launches "
                              "llama-server with, and what its -fit then chooses"}
        for p in ALL_POLICIES:
            if p == "moe-balance" and not prof.is_moe:
                continue        # it places expert tensors: a dense model has none
            b = W.Button(description=_POLICY_LABELS.get(p, p),
                         tooltip=tooltips.get(p, f"set the sliders by the {p} policy"),
                         layout=W.Layout(width="auto", min_width="90px"))
            b.on_click(lambda _b, p=p: self.apply_policy(p))
            self.policy_buttons[p] = b
        n_max = prof.n_layer + 1
        ngl = n_max if config.n_gpu_layers < 0 else min(config.n_gpu_layers, n_max)
        self.ngl_slider = W.IntSlider(value=ngl, min=0, max=n_max, description="-ngl", continuous_update=True,
                                      style={"description_width": "60px"}, layout=W.Layout(width="330px"))
        self.split_mode = W.ToggleButtons(options=list(SPLIT_MODES), value=config.split_mode, description="-sm",
                                          style={"description_width": "60px", "button_width": "60px"})
        self.main_gpu = W.Dropdown(options=[(f"{i}: {n}", i) for i, n in enumerate(names)] or [("0", 0)],
                                   value=config.main_gpu if config.main_gpu < max(len(names), 1) else 0,
                                   description="-mg", style={"description_width": "60px"},
                                   layout=W.Layout(width="200px"))
        self.n_ctx = W.SelectionSlider(options=_ctx_options(prof.n_ctx_train, config.n_ctx), value=config.n_ctx,
                                       description="-c", continuous_update=True,
                                       style={"description_width": "60px"}, layout=W.Layout(width="330px"))
        self.type_k = W.Dropdown(options=list(KV_CACHE_TYPES), value=config.type_k, description="-ctk",
                                 style={"description_width": "60px"}, layout=W.Layout(width="160px"))
        self.type_v = W.Dropdown(options=list(KV_CACHE_TYPES), value=config.type_v, description="-ctv",
                                 style={"description_width": "60px"}, layout=W.Layout(width="160px"))
        self.flash_attn = W.ToggleButtons(options=list(FLASH_ATTN_MODES), value=config.flash_attn,
                                          description="-fa", style={"description_width": "60px",
                                                                    "button_width": "50px"})
        self.y_scale = W.ToggleButtons(options=[("device memory", "device"), ("used only", "used")],
                                       value=self._default_scale(), description="y-axis",
                                       style={"description_width": "60px", "button_width": "100px"})
        # every other setting: a generic control, named by its llama.cpp flag
        self.setting_controls: dict[str, W.ValueWidget] = {}
        for st in SETTINGS:
            if st.attr in _CUSTOM or not st.lab:
                continue
            value = getattr(config, st.attr)
            label = st.flags[-1] if st.flags[-1].startswith("--") else st.flags[0]
            if st.kind in ("off", "on"):
                ctl = W.Checkbox(value=(not value) if st.kind == "off" else bool(value), description=label,
                                 indent=False, tooltip=st.help, layout=W.Layout(width="auto"))
            elif st.attr == "n_cpu_moe" and prof.is_moe:
                # the experts-on-CPU slider: the experts of layers 0..N-1 go to the host
                ctl = W.IntSlider(value=int(value), min=0, max=prof.n_layer, description="-ncmoe",
                                  tooltip=st.help, continuous_update=True, style={"description_width": "60px"},
                                  layout=W.Layout(width="330px"))
            elif st.kind == "int":
                ctl = W.BoundedIntText(value=int(value), min=0 if st.default == 0 else 1, max=1 << 20,
                                       description=st.flags[0], tooltip=st.help,
                                       style={"description_width": "50px"}, layout=W.Layout(width="150px"))
            elif st.kind == "mibs":
                ctl = W.Text(value=",".join(str(x) for x in value), description=st.flags[0], tooltip=st.help,
                             placeholder="1024", continuous_update=False,
                             style={"description_width": "60px"}, layout=W.Layout(width="200px"))
            elif st.kind == "rules":
                ctl = W.Text(value=",".join(value), description=st.flags[0], tooltip=st.help,
                             placeholder=r"blk\.[0-9]\.ffn_.*_exps=CPU,...", continuous_update=False,
                             style={"description_width": "60px"}, layout=W.Layout(width="660px"))
            else:
                ctl = W.Dropdown(options=list(st.choices), value=value, description=st.flags[0], tooltip=st.help)
            ctl.observe(self._changed, "value")
            self.setting_controls[st.attr] = ctl
        for w in (self.ngl_slider, self.split_mode, self.main_gpu, self.n_ctx, self.type_k, self.type_v,
                  self.flash_attn, self.y_scale):
            w.observe(self._changed, "value")
        self._base_config = config
        self.status = W.HTML()

        # figures: built once, updated in place
        first = self._safe_plan(self.current_config()) or make_plan(prof, self.devices, SplitConfig(
            n_gpu_layers=config.n_gpu_layers), self.host)
        self.unit = F.memory_unit(max([d.total_bytes for d in self.devices] + [first.host.used_bytes, 1]))
        self.layer_fig = go.FigureWidget(F.layer_map(first, order=self.order))
        self.memory_fig = go.FigureWidget(F.memory_bars(first, order=self.order, unit=self.unit))

        # load & measure
        self.measure_button = W.Button(description="Load & measure", button_style="primary", icon="play",
                                       disabled=not self.can_load, tooltip=self.load_reason or
                                       "load the model with these settings in a worker process")
        self.measure_button.on_click(lambda _b: self.measure(wait=not self.background))
        self.force_load = W.Checkbox(value=False, description="load even if the plan says it does not fit",
                                     indent=False, layout=W.Layout(width="auto"))
        self.n_prompt = W.BoundedIntText(value=n_prompt, min=0, max=65536, description="-p",
                                         style={"description_width": "30px"}, layout=W.Layout(width="120px"))
        self.n_gen = W.BoundedIntText(value=n_gen, min=0, max=65536, description="-n",
                                      style={"description_width": "30px"}, layout=W.Layout(width="120px"))
        self.repetitions = W.BoundedIntText(value=repetitions, min=1, max=100, description="-r",
                                            style={"description_width": "30px"}, layout=W.Layout(width="120px"))
        self.progress = W.FloatProgress(value=0.0, min=0.0, max=1.0, description="", layout=W.Layout(width="300px"))
        self.progress_label = W.HTML()
        self.result_html = W.HTML()
        self.compare_box = W.Box()
        self.results_html = W.HTML()
        self.throughput_fig = go.FigureWidget(F.throughput_chart([]))
        self.export_html = W.HTML()

        title = (f"<b>{html.escape(prof.name or prof.arch)}</b> — {prof.n_layer} layers + output, "
                 f"{format_bytes(prof.file_bytes)}")
        if self.notes:
            title += "<br><span style='color:#666;font-size:12px'>" + html.escape("; ".join(self.notes)) + "</span>"
        if not self.devices:
            title += ("<br><span style='color:#b35c00'>no offload devices: everything stays on the CPU "
                      "(try sim='2x24GiB' or virtual=2)</span>")
        left = W.VBox([W.HTML("<b>tensor_split</b> <span style='color:#666;font-size:12px'>(tick = use this "
                              "device; all at 0 = llama.cpp's default, by free memory)</span>"), *rows])
        right = W.VBox([W.HTML("<b>policies</b> set the sliders"),
                        W.HBox(list(self.policy_buttons.values()), layout=W.Layout(flex_flow="row wrap")),
                        self.ngl_slider, self.split_mode, self.main_gpu, self.n_ctx,
                        W.HBox([self.type_k, self.type_v]), self.flash_attn, self.y_scale,
                        *[c for a, c in self.setting_controls.items() if a in _PROMINENT],
                        W.HBox([c for a, c in self.setting_controls.items() if a not in _PROMINENT],
                               layout=W.Layout(flex_flow="row wrap"))])
        measure_box = W.VBox([
            W.HTML("<b>Load &amp; measure</b> <span style='color:#666;font-size:12px'>(in a worker process: the "
                   "kernel survives whatever llama.cpp does)</span>"),
            W.HBox([self.measure_button, self.n_prompt, self.n_gen, self.repetitions, self.force_load]),
            W.HBox([self.progress, self.progress_label]), self.result_html, self.compare_box,
            self.results_html, self.throughput_fig])
        self.children = [W.HTML(title), W.HBox([left, right]), self.status, self.layer_fig, self.memory_fig,
                         measure_box, W.HTML("<b>Export</b> (copy-ready, for the current settings)"),
                         self.export_html]
        self.add_class("gpulab-splitlab")

    def _default_scale(self) -> str:
        # virtual devices report the host's memory: a 100 MiB model would be invisible against it
        total = sum(layer.weights_bytes for layer in self.profile.layers) or 1
        small = min([d.free_bytes for d in self.devices] or [0])
        return "used" if small and total < 0.05 * small else "device"

    # -- the current settings --------------------------------------------------------------
    @property
    def selected(self) -> list[str]:
        return [d.name for d, b in zip(self.devices, self.use_boxes) if b.value]

    @property
    def config(self) -> SplitConfig:
        return self.current_config()

    def current_config(self) -> SplitConfig:
        """The SplitConfig the controls describe (raises ConfigError for impossible values)."""
        names = [d.name for d in self.devices]
        sel = [i for i, b in enumerate(self.use_boxes) if b.value]
        ts = tuple(float(self.split_sliders[i].value) for i in sel)
        while ts and ts[-1] == 0.0 and any(ts):
            ts = ts[:-1]
        if not any(ts):
            ts = ()
        if len(sel) == len(names):
            devices: tuple[str, ...] = ()
        else:
            devices = tuple(names[i] for i in sel) or ("none",)
        n_max = self.profile.n_layer + 1
        ngl = self.ngl_slider.value
        generic = {}
        for st in SETTINGS:
            ctl = self.setting_controls.get(st.attr)
            if ctl is None:
                continue
            if st.kind == "off":
                generic[st.attr] = not ctl.value
            elif st.kind in ("rules", "mibs"):
                generic[st.attr] = value_from_text(st, ctl.value.strip())
            else:
                generic[st.attr] = ctl.value
        return self._base_config.replace(
            tensor_split=ts, devices=devices, n_gpu_layers=-1 if ngl >= n_max else ngl,
            split_mode=self.split_mode.value, main_gpu=self.main_gpu.value or 0, n_ctx=self.n_ctx.value,
            type_k=self.type_k.value, type_v=self.type_v.value, flash_attn=self.flash_attn.value, **generic)

    def _plan(self, config: SplitConfig) -> Plan:
        return make_plan(self.profile, self.devices, config, self.host)

    def _safe_plan(self, config) -> Plan | None:
        try:
            return self._plan(config)
        except GpulabError:
            return None

    # -- redrawing -------------------------------------------------------------------------
    def _changed(self, change) -> None:
        if self._suspend:
            return
        self._schedule()

    def _schedule(self) -> None:
        """Throttle: redraw now if the last redraw is `debounce` old, else once when it is."""
        if not self.debounce:
            self.redraw()
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None:          # plain Python (tests, scripts): redraw synchronously
            self.redraw()
            return
        if self._handle is not None:
            return                # a redraw is already due; it will read the latest values
        wait = self._last_draw + self.debounce - time.monotonic()
        if wait <= 0:
            self.redraw()
        else:
            self._handle = loop.call_later(wait, self._trailing)

    def _trailing(self) -> None:
        self._handle = None
        self.redraw()

    def flush(self) -> None:
        """Run a pending (throttled) redraw now."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
            self.redraw()

    def redraw(self) -> Plan | None:
        """Re-plan from the controls and update every view; errors become the status message."""
        t0 = time.perf_counter()
        self._last_draw = time.monotonic()
        try:
            cfg = self.current_config()
            p = self._plan(cfg)
        except GpulabError as e:
            self._set_error(str(e))
            return None
        except Exception as e:  # noqa: BLE001 - the widget must stay alive whatever happens
            self._set_error(f"{type(e).__name__}: {e}")
            return None
        self.error = None
        self.plan = p
        self._sync_main_gpu()
        for w, sl in zip(self.use_boxes, self.split_sliders):
            sl.disabled = not w.value
        self._draw(p)
        self.last_update_s = time.perf_counter() - t0
        return p

    def _draw(self, p: Plan) -> None:
        # plotly_restyle / plotly_relayout messages only (see figures.apply), in one fixed order
        F.apply(self.layer_fig, p, "layers", order=self.order)
        y_range = None
        if self.y_scale.value == "used":
            top = max(d.used_bytes for d in p.devices) / self.unit[1]
            y_range = [0, top * 1.25 or 1]
        F.apply(self.memory_fig, p, "memory", order=self.order, unit=self.unit, y_range=y_range)
        F.sync_widget_state(self.layer_fig)
        F.sync_widget_state(self.memory_fig)
        self._update_shares(p)
        self._update_status(p)
        self.export_html.value = exports_html(self.exports(p))

    def exports(self, p: Plan | None = None) -> dict:
        """{target: Export} of the current (or a given) plan's settings (gpulab.core.exports.render)."""
        p = p or self.plan
        assert p is not None   # the lab draws a plan when it is built
        return {t: render(p.config, t, model_path=str(self.model_path), n_layer=self.profile.n_layer,
                          devices=self.devices) for t in _EXPORT_TARGETS}

    def _update_shares(self, p: Plan) -> None:
        used = [d.name for d in p.offload_devices]
        shares = {}
        prev = 0.0
        for name, pt in zip(used, p.split_points):
            shares[name] = pt - prev
            prev = pt
        default = p.config.default_split
        ts = p.tensor_parallel
        if ts is not None:   # -sm tensor: every device a slice of each layer, the -ts rounded to heads
            shares = {name: ts.share(name) for name in ts.devices}
            default = False
        for d, lab in zip(self.devices, self.share_labels):
            if d.name not in shares:
                lab.value = "<span style='color:#aaa'>not used</span>"
                continue
            dp = p.device(d.name)
            if ts is not None:
                lab.value = (f"<b>{shares[d.name] * 100:.1f}%</b> of the split bytes, a slice of each of "
                             f"{dp.n_layers} layers" + (" +out" if dp.has_output else ""))
                continue
            layers = dp.n_layers + (1 if dp.has_output else 0)
            how = " by free memory" if default else ""
            lab.value = (f"<b>{shares[d.name] * 100:.1f}%</b>{how} → {layers} layer{'s' if layers != 1 else ''}"
                         + (" +out" if dp.has_output else ""))

    def _update_status(self, p: Plan) -> None:
        notes = []
        if p.config.split_mode == "row":
            notes.append("row mode is planned as layer placement (its per-row division of matrices is not modelled)")
        if p.tensor_parallel is not None:
            notes.append("split mode tensor: every offloaded layer is cut across the devices (llama.cpp's Meta() "
                         "device); -ts all 0 = equal shares; 2 all-reduces per layer cross the link each token")
        if p.config.split_mode == "none":
            mg = p.offload_devices[0].name if p.offload_devices else "none"
            notes.append(f"split mode none: only -mg's device ({mg}) is used")
        on_cpu = sum(1 for x in p.layer_devices if x == HOST_NAME)
        if on_cpu:
            notes.append(f"{on_cpu} of {p.profile.n_layer + 1} layers stay on the CPU")
        extra = "".join(f"<div style='color:#666;font-size:12px'>{html.escape(n)}</div>" for n in notes)
        if p.fits:
            self.status.value = f"<div style='color:#2a7d2a;font-weight:bold'>fits</div>{extra}"
        else:
            self.status.value = ("<div class='gpulab-error' style='color:#d62728;font-weight:bold'>does not fit: "
                                 + html.escape("; ".join(p.deficits())) + f"</div>{extra}")

    def _set_error(self, msg: str) -> None:
        self.error = msg
        self.status.value = (f"<div class='gpulab-error' style='color:#d62728;font-weight:bold'>"
                             f"{html.escape(msg)}</div><div style='color:#666;font-size:12px'>the figures show "
                             "the last valid settings</div>")

    def _sync_main_gpu(self) -> None:
        sel = self.selected
        opts = [(f"{i}: {n}", i) for i, n in enumerate(sel)] or [("0 (no device)", 0)]
        if list(self.main_gpu.options) != opts:
            self._suspend += 1
            try:
                keep = self.main_gpu.value if self.main_gpu.value is not None and self.main_gpu.value < len(opts) else 0
                self.main_gpu.options = opts
                self.main_gpu.value = keep
            finally:
                self._suspend -= 1

    # -- policies --------------------------------------------------------------------------
    def set_split(self, values) -> None:
        """Set the selected devices' sliders to `values` (in selection order), one redraw."""
        sel = [i for i, b in enumerate(self.use_boxes) if b.value]
        values = list(values) + [0.0] * (len(sel) - len(values))
        self._suspend += 1
        try:
            for i, v in zip(sel, values):
                sl = self.split_sliders[i]
                if v > sl.max:
                    sl.max = float(math.ceil(v))
                sl.value = float(v)
        finally:
            self._suspend -= 1
        self.redraw()

    def apply_policy(self, name: str) -> Plan | None:
        """Set the sliders to what a policy (gpulab.core.policies.apply) chooses for the selected devices;
        moe-balance also writes its rules into the -ot field (and clears -cmoe and -ncmoe, whose
        experts it places itself). 'fit': llama-server's common_fit_params from its defaults
        (gpulab.core.policies.server_fit), which also sets -c, -ngl and the -ot rules; `last_fit` keeps its result
        (flags, log, near-boundary notes)."""
        if name == "fit":
            return self._apply_fit()
        if name == "ollama":
            return self._apply_ollama()
        rules = None
        try:
            cfg = self.current_config()
            devices = [] if cfg.devices == ("none",) else self.devices
            if name == "moe-balance":
                cfg = cfg.replace(tensor_overrides=(), cpu_moe=False, n_cpu_moe=0)
                chosen = apply_policy(name, self.profile, devices, cfg.replace(tensor_split=()), self.host)
                split, rules = chosen.tensor_split, chosen.tensor_overrides
            else:
                split = policy_split(name, self.profile, devices, cfg.replace(tensor_split=()), self.host)
        except GpulabError as e:
            self._set_error(f"policy {name}: {e}")
            return None
        except Exception as e:  # noqa: BLE001
            self._set_error(f"policy {name}: {type(e).__name__}: {e}")
            return None
        if rules is not None:
            self._suspend += 1
            try:
                for attr, value in (("tensor_overrides", ",".join(rules)), ("cpu_moe", False), ("n_cpu_moe", 0)):
                    if attr in self.setting_controls:
                        self.setting_controls[attr].value = value
            finally:
                self._suspend -= 1
        self.set_split(split or [0.0] * len(self.selected))
        return self.plan

    def _apply_fit(self) -> Plan | None:
        from ..core.policies.server_fit import fit
        try:
            cfg = self.current_config().replace(n_ctx=0, n_gpu_layers=-1, tensor_split=(), tensor_overrides=(),
                                                cpu_moe=False, n_cpu_moe=0, n_cpu_ffn=0, fit="on")
            devices = [] if cfg.devices == ("none",) else self.devices
            r = fit(self.profile, devices, cfg, self.host)
        except GpulabError as e:
            self._set_error(f"fit: {e}")
            return None
        self.last_fit = r
        c = r.config
        used = [d for d in self.selected]
        self._suspend += 1
        try:
            if c.n_ctx not in self.n_ctx.options:
                self.n_ctx.options = sorted({*self.n_ctx.options, c.n_ctx})
            self.n_ctx.value = c.n_ctx
            self.ngl_slider.value = self.ngl_slider.max if c.n_gpu_layers < 0 else min(c.n_gpu_layers,
                                                                                        self.ngl_slider.max)
            ot = self.setting_controls.get("tensor_overrides")
            if ot is not None:
                ot.value = ",".join(c.tensor_overrides)
        finally:
            self._suspend -= 1
        self.set_split(c.tensor_split or [0.0] * len(used))
        if not r.ok:
            self._say(f"llama-server's fit gives up: {r.reasons[-1]}", "warning")
        elif r.near_boundary:
            self._say(f"fit: {r.flags(self.devices)} ({len(r.near_boundary)} decision(s) within gpulab's "
                      "compute-buffer uncertainty: llama.cpp may choose one layer or context step differently)", "info")
        return self.plan

    def _apply_ollama(self) -> Plan | None:
        """Today's Ollama (gpulab.core.policies.ollama) on every device the lab has: tick the GPUs it
        lets llama-server see and set every flag it passes, then what llama-server's fit chose;
        `last_ollama` keeps its result (Ollama's flags and reasons)."""
        from ..core.policies.ollama import ollama
        try:
            r = ollama(self.profile, self.devices, host=self.host)
        except GpulabError as e:
            self._set_error(f"ollama: {e}")
            return None
        self.last_ollama = r
        c = r.config
        chosen = set(c.devices) if c.devices else {d.name for d in self.devices}
        self._suspend += 1
        try:
            for d, box in zip(self.devices, self.use_boxes):
                box.value = d.name in chosen
            self._sync_main_gpu()
            self.split_mode.value, self.main_gpu.value = c.split_mode, c.main_gpu
            if c.n_ctx not in self.n_ctx.options:
                self.n_ctx.options = sorted({*self.n_ctx.options, c.n_ctx})
            self.n_ctx.value = c.n_ctx
            self.ngl_slider.value = self.ngl_slider.max if c.n_gpu_layers < 0 else min(c.n_gpu_layers,
                                                                                        self.ngl_slider.max)
            self.flash_attn.value, self.type_k.value, self.type_v.value = c.flash_attn, c.type_k, c.type_v
            for attr, value in (("n_batch", c.n_batch), ("n_ubatch", c.n_ubatch), ("n_seq_max", c.n_seq_max),
                                ("tensor_overrides", ",".join(c.tensor_overrides)),
                                ("fit_target", ",".join(str(x) for x in c.fit_target))):
                if attr in self.setting_controls:
                    self.setting_controls[attr].value = value
        finally:
            self._suspend -= 1
        self.set_split(c.tensor_split or [0.0] * len(self.selected))
        why = next(x for x in r.reasons if x.startswith("selectLlamaServerPlacement"))
        self._say(f"ollama passes {' '.join(r.args)} ({why})", "info")
        return self.plan

    # -- load & measure --------------------------------------------------------------------
    def measure(self, *, wait: bool = True) -> Run | None:
        """Load (and measure, when the runtime can) the current settings in the worker.

        wait=False runs it in a thread (the button does this, so the kernel stays responsive);
        wait=True returns the Run, or None after showing why there is none.
        """
        if self._busy:
            self._say("a load is already running", "warning")
            return None
        if not wait:
            self._thread = threading.Thread(target=self._measure, daemon=True, name="gpulab-lab-measure")
            self._thread.start()
            return None
        return self._measure()

    def wait(self, timeout: float | None = None) -> None:
        """Wait for a background measurement to finish."""
        if self._thread is not None:
            self._thread.join(timeout)

    def _say(self, msg: str, style: str = "danger") -> None:
        color = {"danger": "#d62728", "warning": "#b35c00", "info": "#333"}[style]
        self.result_html.value = f"<div class='gpulab-{style}' style='color:{color}'>{html.escape(msg)}</div>"

    def _progress(self, *args) -> None:
        """Progress from the runtime: progress(phase, fraction) (gpulab.runtime.bench), or one
        fraction, or one (phase, fraction) pair or dict."""
        event = args if len(args) > 1 else (args[0] if args else None)
        phase, frac = None, None
        if isinstance(event, (int, float)):
            frac = float(event)
        elif isinstance(event, (tuple, list)) and event:
            phase = str(event[0])
            frac = float(event[1]) if len(event) > 1 and isinstance(event[1], (int, float)) else None
        elif isinstance(event, dict):
            phase = event.get("phase")
            frac = event.get("fraction")
        elif isinstance(event, str):
            phase = event
        if frac is not None:
            self.progress.value = max(0.0, min(1.0, frac))
        if phase:
            self.progress_label.value = html.escape(str(phase))
            if self.monitor is not None:
                self.monitor.mark_phase(str(phase))

    def _measure(self) -> Run | None:
        if not self.can_load:
            self._say(f"cannot load: {self.load_reason}")
            return None
        try:
            cfg = self.current_config()
            p = self._plan(cfg)
        except GpulabError as e:
            self._say(f"not loading: {e}")
            return None
        if not p.fits and not self.force_load.value:
            self._say("not loading: the plan does not fit (" + "; ".join(p.deficits()) +
                      "). Tick 'load even if...' to let llama.cpp try.")
            return None
        self._busy = True
        self.measure_button.disabled = True
        self.progress.bar_style = "info"
        self.progress.value = 0.05
        self.progress_label.value = "loading and measuring…"
        if self.monitor is not None:
            self.monitor.mark_phase("load")
        t0 = time.perf_counter()
        try:
            run = self.worker.measure(self.model_path, cfg, n_prompt=self.n_prompt.value, n_gen=self.n_gen.value,
                                      repetitions=self.repetitions.value, progress=self._progress)
            if run.plan is None:
                run = replace(run, plan=p.to_dict())
        except GpulabError as e:
            self.progress.bar_style = "danger"
            self.progress_label.value = "failed"
            self._say(f"{type(e).__name__}: {e}")
            return None
        except Exception as e:  # noqa: BLE001 - never leave the widget dead
            self.progress.bar_style = "danger"
            self.progress_label.value = "failed"
            self._say(f"unexpected {type(e).__name__}: {e}")
            return None
        finally:
            self._busy = False
            self.measure_button.disabled = not self.can_load
            if self.monitor is not None:
                self.monitor.mark_phase(None)
        self.runs.append(run)
        self.progress.value = 1.0
        self.progress.bar_style = "success"
        tps = []
        if run.pp:
            tps.append(f"pp{run.pp.n_prompt} {run.pp.avg_ts:.1f} ± {run.pp.stddev_ts:.1f} t/s")
        if run.tg:
            tps.append(f"tg{run.tg.n_gen} {run.tg.avg_ts:.1f} ± {run.tg.stddev_ts:.1f} t/s")
        self.progress_label.value = " · ".join(tps + [f"{time.perf_counter() - t0:.1f} s"])
        self._show_run(p, run)
        return run

    def _show_run(self, p: Plan, run: Run) -> None:
        same = tuple(run.report.layer_devices) == p.layer_devices if run.report.layer_devices else None
        head = ("placement exactly as planned" if same else
                "placement DIFFERS from the plan" if same is False else "llama.cpp did not log the placement")
        self.result_html.value = table_html(comparison_rows(p, run), caption=f"run #{len(self.runs)}: {head}",
                                            right=("predicted", "llama.cpp", "error"))
        nv = run.nvml_peak_bytes or None
        self.compare_box.children = [go.FigureWidget(F.memory_compare(p, run.report, nv))]
        rows = run_rows(self.runs)
        self.results_html.value = table_html(rows, caption="this session's runs")
        new = F.throughput_chart(self.runs)
        with self.throughput_fig.batch_update():
            for tr, t in zip(self.throughput_fig.data, new.data):
                tr.update(x=t.x, y=t.y, error_y=t.error_y, customdata=t.customdata)
            self.throughput_fig.layout.annotations = new.layout.annotations
        F.sync_widget_state(self.throughput_fig)

    def attach_monitor(self, monitor) -> None:
        """Show a Monitor under the lab; loads and measurements then mark their phases on it."""
        self.monitor = monitor
        self.children = [*self.children, monitor]

    def to_dataframe(self):
        """This session's runs as a pandas DataFrame (one row per run)."""
        import pandas as pd
        return pd.DataFrame(run_rows(self.runs))

    # -- closing ---------------------------------------------------------------------------
    def close(self) -> None:
        """Close the widget and stop what the lab started (its worker, its virtual devices)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self.wait(30)
        if self.monitor is not None and hasattr(self.monitor, "close"):
            self.monitor.close()
        self._finalizer()
        for fig in (self.layer_fig, self.memory_fig, self.throughput_fig):
            try:
                fig.close()
            except Exception:  # noqa: BLE001
                pass
        super().close()
