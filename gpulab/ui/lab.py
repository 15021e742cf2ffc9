"""SplitLab: drag a model's layers across devices and watch llama.cpp's placement change.

    from gpulab.ui.lab import SplitLab
    lab = SplitLab("model.gguf")                    # GPUs from NVML; with none, 2 virtual RPC devices
    lab = SplitLab("model.gguf", sim="8x24GiB")     # what-if devices: plan only
    lab = SplitLab("model.gguf", worker=w)          # devices (and loads) of an existing Worker
    lab                                             # in a notebook: the widget

The split control is a layer strip (gpulab.ui.strip): one cell per block and the output layer, in
the colour of the device llama.cpp puts it on. Dragging the boundary between two devices writes the
-ts that gives exactly those layer counts (planner.split_for_counts); the handle at the strip's
start is -ngl; -ts stays editable as text. Under it, a thin strip shows what llama-server's -fit
would load for the current -c/-fitt. The other settings sit in collapsible groups (split, context &
cache, experts & overrides, fit), every llama.cpp setting from gpulab.core.settings.

Every control change re-plans (gpulab.core.placement.planner.plan) and copies the new data into the
FigureWidgets inside `batch_update`; drags are throttled to one redraw per `debounce` seconds,
always ending on the latest value. `lab.plan` is the current Plan, `lab.config` the current
SplitConfig, `lab.runs` this session's measured runs. Policy buttons set every control a policy owns
(gpulab.core.policies.choose); a note or a measurement made for other settings is cleared or marked
stale as soon as a control changes.

Devices come from the one resolver, gpulab.runtime.session.Session.devices (the CLI and magics reach
it through gpulab.commands.flags.devices_from_args and pass its DeviceChoice as `choice`). Loads
never happen in the notebook kernel: they go to a gpulab worker process (gpulab.runtime.worker),
because llama.cpp aborts a process whose RPC server dies and ggml cannot unregister an RPC backend.
"""

from __future__ import annotations

import asyncio
import html
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
from ..core.errors import ConfigError, GpulabError
from ..core.exports.render import TARGETS, render
from ..core.ggml_types import KV_CACHE_TYPES
from ..core.measure.reconcile import comparison_rows
from ..core.placement.plan import Plan
from ..core.placement.planner import plan as make_plan
from ..core.placement.planner import select_devices, split_for_counts
from ..core.policies.apply import ALL_POLICIES
from ..core.policies.choose import LABELS, choose
from ..core.profile import ModelProfile
from ..core.run import Run
from ..core.settings import SETTINGS, value_from_text
from ..core.units import format_bytes
from . import figures as F
from .html import exports_html, run_rows, table_html
from .strip import LayerStrip
from .text import layers_text

if TYPE_CHECKING:
    from ..runtime.session import Session

__all__ = ["GROUPS", "SplitLab"]

_TOOLTIPS = {"fit": "set every device, -sm layer, -c 0, -ngl auto, no -ts/-ot, then what llama-server's -fit "
                    "chooses from them",
             "ollama": "set the devices and every flag to what today's Ollama (0.30-0.33) launches llama-server "
                       "with, and what its -fit then chooses"}
# settings with a control of their own below; every other one gets a generic control
_CUSTOM = {"tensor_split", "devices", "main_gpu", "n_gpu_layers", "split_mode", "n_ctx", "type_k", "type_v",
           "flash_attn"}
_EXPORT_TARGETS = tuple(t for t in TARGETS if t != "llama-cli")
# the collapsible groups, by SplitConfig attribute; a setting not named here joins "experts & overrides"
GROUPS = {"split": ("devices", "tensor_split", "n_gpu_layers", "split_mode", "main_gpu"),
          "context & cache": ("n_ctx", "type_k", "type_v", "flash_attn", "n_batch", "n_ubatch", "n_seq_max",
                              "kv_unified", "swa_full", "offload_kqv"),
          "experts & overrides": ("tensor_overrides", "cpu_moe", "n_cpu_moe", "n_cpu_ffn", "op_offload", "no_host",
                                  "use_extra_bufts"),
          "fit": ("fit", "fit_target", "fit_ctx")}
_OPEN = ("split", "context & cache")      # groups open at the start
_STYLE = {"description_width": "initial"}  # full labels, never cut
_GREY = "<span style='color:#666;font-size:12px'>{}</span>"


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


def _ts_text(values) -> str:
    return ",".join(f"{float(v):g}" for v in values)


def _group_of(attr: str) -> str:
    return next((g for g, attrs in GROUPS.items() if attr in attrs), "experts & overrides")


class SplitLab(W.VBox):
    """The split lab widget (see the module docstring)."""

    def __init__(self, model: str | Path | ModelProfile, devices: list[Device] | None = None, *,
                 config: SplitConfig | None = None, host: Device | None = None, sim: str | None = None,
                 rpc: list[str] | str | None = None, virtual: int | None = None, llama_devices: bool = False,
                 worker=None, session=None, choice=None, debounce: float = 0.05, background: bool = True,
                 monitor=None, n_prompt: int = 128, n_gen: int = 32, repetitions: int = 2, live_fit: bool = True):
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
        self.live_fit = live_fit
        self.runs: list[Run] = []
        self._run_configs: list[SplitConfig] = []
        self.plan: Plan | None = None
        self.error: str | None = None
        self.note: str = ""                 # the last policy's line, shown while its settings stand
        self._note_config: SplitConfig | None = None
        self.last_update_s = 0.0
        self.last_fit_s = 0.0
        self.live_fit_result: object | None = None
        self._fit_given: SplitConfig | None = None
        self._suspend = 0
        self._handle: asyncio.TimerHandle | None = None
        self._fit_handle: asyncio.TimerHandle | None = None
        self._last_draw = 0.0
        self._busy = False
        self._thread: threading.Thread | None = None
        self._own_session: Session | None = None
        self.worker = worker
        self.notes: list[str] = []
        self.devices, self.host, self.can_load, self.load_reason = self._resolve_devices(
            devices, host, sim, rpc, virtual, llama_devices, worker, session, choice)
        self._finalizer = weakref.finalize(self, _cleanup, self._own_session)
        self._build(config or SplitConfig(), n_prompt, n_gen, repetitions)
        self.redraw()

    # -- devices ---------------------------------------------------------------------------
    def _resolve_devices(self, devices, host, sim, rpc, virtual, llama_devices, worker, session, choice):
        """(devices, host, can_load, why not) from a DeviceChoice: the one given, else
        Session.devices' (the resolver the CLI uses); explicit devices or a worker make one here."""
        from ..runtime.session import DeviceChoice
        if choice is None and (devices is not None or worker is not None):
            if host is None:
                from ..sources.host import host_device
                host = host_device()
            devs = tuple(d for d in (devices if devices is not None else worker.devices()) if d.is_offload)
            why = ("simulated devices cannot load a model (plan only)" if any(d.source == "sim" for d in devs) else
                   "" if worker is not None else
                   "RPC devices given without their worker: pass worker=Worker(endpoints)"
                   if any(d.kind == "rpc" for d in devs) else "no worker to load with: pass worker=Worker()")
            choice = DeviceChoice(devs, host, "", (), worker, not why, why)
        if choice is None:
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
        self.worker = choice.worker if choice.worker is not None else self.worker
        load_ok = isinstance(self.profile.path, str) and Path(self.profile.path).is_file()
        why = choice.why_not or ("" if load_ok else "the model is a profile without a file to load")
        return list(choice.devices), host or choice.host, choice.can_load and load_ok, why

    # -- building --------------------------------------------------------------------------
    def _build(self, config: SplitConfig, n_prompt: int, n_gen: int, repetitions: int) -> None:
        prof = self.profile
        names = [d.name for d in self.devices]
        self.order = names
        self.colors = F.device_colors([*names, HOST_NAME])
        chosen = set(config.devices) if config.devices and config.devices != ("none",) else (
            set() if config.devices == ("none",) else set(names))
        # -ts by device name; the text field shows it in llama.cpp's order of the ticked devices
        try:
            used = [d.name for d in select_devices(self.devices, config.replace(tensor_split=()))]
        except GpulabError:
            used = [n for n in names if n in chosen]
        self._ts = {n: 0.0 for n in names}
        self._ts.update({n: float(v) for n, v in zip(used, config.tensor_split)})
        self.use_boxes, self.share_labels, rows = [], [], []
        for d in self.devices:
            use = W.Checkbox(value=d.name in chosen, description=d.name, indent=False, style=_STYLE,
                             tooltip=f"use {d.name}", layout=W.Layout(width="auto"))
            swatch = W.HTML(f"<span style='display:inline-block;width:14px;height:14px;margin-top:5px;"
                            f"background:{self.colors[d.name]}'></span>", layout=W.Layout(width="18px"))
            share = W.HTML(layout=W.Layout(width="auto", min_width="150px"))
            free = W.HTML(_GREY.format(f"{format_bytes(d.free_bytes)} free of {format_bytes(d.total_bytes)}"),
                          layout=W.Layout(width="auto"))
            use.observe(self._ticked, "value")
            self.use_boxes.append(use)
            self.share_labels.append(share)
            rows.append(W.HBox([swatch, use, share, free], layout=W.Layout(margin="0 24px 0 0")))
        self.strip = LayerStrip(colors={**self.colors, "Meta()": "#555"})
        self.strip.layout = W.Layout(width="100%", min_width="600px")
        self._request_seq = -1
        self.strip.observe(self._strip_request, "request")
        self.ts_text = W.Text(value=_ts_text(config.tensor_split), description="-ts (tensor split, e.g. 3,1)",
                              placeholder="empty: by free memory", continuous_update=False, style=_STYLE,
                              tooltip=next(s.help for s in SETTINGS if s.attr == "tensor_split"),
                              layout=W.Layout(width="420px"))
        self.ts_text.observe(self._ts_typed, "value")
        self.policy_buttons = {}
        for p in ALL_POLICIES:
            if p == "moe-balance" and not prof.is_moe:
                continue        # it places expert tensors: a dense model has none
            b = W.Button(description=LABELS.get(p, p), tooltip=_TOOLTIPS.get(p, f"set -ts by the {p} policy "
                         "(every device, -sm layer)"), layout=W.Layout(width="auto", min_width="90px"))
            b.on_click(lambda _b, p=p: self.apply_policy(p))
            self.policy_buttons[p] = b
        n_max = prof.n_layer + 1
        ngl = n_max if config.n_gpu_layers < 0 else min(config.n_gpu_layers, n_max)
        self.ngl_slider = W.IntSlider(value=ngl, min=0, max=n_max, description="-ngl (layers on the devices)",
                                      continuous_update=True, style=_STYLE, layout=W.Layout(width="460px"))
        self.split_mode = W.ToggleButtons(options=list(SPLIT_MODES), value=config.split_mode,
                                          description="-sm (split mode)",
                                          style={**_STYLE, "button_width": "auto"})
        self.main_gpu = W.Dropdown(options=[(f"{i}: {n}", i) for i, n in enumerate(names)] or [("0", 0)],
                                   value=config.main_gpu if config.main_gpu < max(len(names), 1) else 0,
                                   description="-mg (main device)", style=_STYLE, layout=W.Layout(width="auto"))
        self.n_ctx = W.SelectionSlider(options=_ctx_options(prof.n_ctx_train, config.n_ctx), value=config.n_ctx,
                                       description="-c (context)", continuous_update=True, style=_STYLE,
                                       layout=W.Layout(width="460px"))
        self.type_k = W.Dropdown(options=list(KV_CACHE_TYPES), value=config.type_k, description="-ctk (K type)",
                                 style=_STYLE, layout=W.Layout(width="auto"))
        self.type_v = W.Dropdown(options=list(KV_CACHE_TYPES), value=config.type_v, description="-ctv (V type)",
                                 style=_STYLE, layout=W.Layout(width="auto"))
        self.flash_attn = W.ToggleButtons(options=list(FLASH_ATTN_MODES), value=config.flash_attn,
                                          description="-fa (flash attention)",
                                          style={**_STYLE, "button_width": "auto"})
        # auto: the one scale rule (figures.memory_scale: a small model fills the axis, the free memory
        # is written above it); whole device: the axis to the devices' free and total memory
        self.y_scale = W.ToggleButtons(options=[("auto", "auto"), ("whole device", "device")],
                                       value="auto", description="memory axis",
                                       tooltips=["the axis fits the model when it uses a small part of the "
                                                 "free memory (the free amount is written above the bar)",
                                                 "the axis runs to each device's free and total memory"],
                                       style={**_STYLE, "button_width": "auto"})
        self.y_scale.add_class("gpulab-memory-axis")
        # every other setting: a generic control, named by its llama.cpp flag
        self.setting_controls: dict[str, W.ValueWidget] = {}
        for st in SETTINGS:
            if st.attr in _CUSTOM or not st.lab:
                continue
            value = getattr(config, st.attr)
            label = st.flags[-1] if st.flags[-1].startswith("--") else st.flags[0]
            if st.kind in ("off", "on"):
                ctl = W.Checkbox(value=(not value) if st.kind == "off" else bool(value), description=label,
                                 indent=False, tooltip=st.help, style=_STYLE, layout=W.Layout(width="auto"))
            elif st.attr == "n_cpu_moe" and prof.is_moe:
                # the experts-on-CPU slider: the experts of layers 0..N-1 go to the host
                ctl = W.IntSlider(value=int(value), min=0, max=prof.n_layer,
                                  description="-ncmoe (expert layers on CPU)",
                                  tooltip=st.help, continuous_update=True, style=_STYLE,
                                  layout=W.Layout(width="460px"))
            elif st.kind == "int":
                ctl = W.BoundedIntText(value=int(value), min=0 if st.default == 0 else 1, max=1 << 20,
                                       description=label, tooltip=st.help, style=_STYLE,
                                       layout=W.Layout(width="auto"))
            elif st.kind == "mibs":
                ctl = W.Text(value=",".join(str(x) for x in value), description=f"{label} (MiB)", tooltip=st.help,
                             placeholder="1024", continuous_update=False, style=_STYLE,
                             layout=W.Layout(width="auto"))
            elif st.kind == "rules":
                ctl = W.Text(value=",".join(value), description=label, tooltip=st.help,
                             placeholder=r"blk\.[0-9]\.ffn_.*_exps=CPU,...", continuous_update=False,
                             style=_STYLE, layout=W.Layout(width="660px"))
            else:
                ctl = W.Dropdown(options=list(st.choices), value=value, description=label, tooltip=st.help,
                                 style=_STYLE, layout=W.Layout(width="auto"))
            ctl.observe(self._changed, "value")
            self.setting_controls[st.attr] = ctl
        # what the llama-server process loads beside the model, as a pasted command spells it
        # (gpulab.core.command_line; counted per device by gpulab.core.policies.process.with_process)
        self.process_controls = {
            "mmproj": W.Text(value="", description="--mmproj (projector GGUF)", continuous_update=False,
                             style=_STYLE, layout=W.Layout(width="460px")),
            "draft": W.Text(value="", description="-md (draft GGUF)", continuous_update=False, style=_STYLE,
                            layout=W.Layout(width="460px")),
            "draft_flags": W.Text(value="", description="draft flags", placeholder="-ngld 99 -devd CUDA1 -ctkd q8_0",
                                  continuous_update=False, style=_STYLE, layout=W.Layout(width="460px")),
            "spec_type": W.Dropdown(options=["", "draft-mtp"], value="", description="--spec-type", style=_STYLE,
                                    layout=W.Layout(width="auto")),
        }
        self._companions: dict[tuple[str, str], object] = {}
        for w in (self.ngl_slider, self.split_mode, self.main_gpu, self.n_ctx, self.type_k, self.type_v,
                  self.flash_attn, self.y_scale, *self.process_controls.values()):
            w.observe(self._changed, "value")
        self._base_config = config
        self.status = W.HTML()
        self.policy_note = W.HTML()

        # figures: built once, updated in place
        first = self._safe_plan(self.current_config()) or make_plan(prof, self.devices, SplitConfig(
            n_gpu_layers=config.n_gpu_layers), self.host)
        self.layer_fig = go.FigureWidget(F.layer_map(first, order=self.order))
        self.unit, y_range = self._memory_axis(first)
        self.memory_fig = go.FigureWidget(F.memory_bars(first, order=self.order, unit=self.unit, y_range=y_range))

        # load & measure
        self.measure_button = W.Button(description="Load & measure", button_style="primary", icon="play",
                                       disabled=not self.can_load, tooltip=self.load_reason or
                                       "load the model with these settings in a worker process")
        self.measure_button.on_click(lambda _b: self.measure(wait=not self.background))
        self.force_load = W.Checkbox(value=False, description="load even if the plan says it does not fit",
                                     indent=False, style=_STYLE, layout=W.Layout(width="auto"))
        self.n_prompt = W.BoundedIntText(value=n_prompt, min=0, max=65536, description="-p (prompt tokens)",
                                         style=_STYLE, layout=W.Layout(width="auto"))
        self.n_gen = W.BoundedIntText(value=n_gen, min=0, max=65536, description="-n (generated tokens)",
                                      style=_STYLE, layout=W.Layout(width="auto"))
        self.repetitions = W.BoundedIntText(value=repetitions, min=1, max=100, description="-r (repetitions)",
                                            style=_STYLE, layout=W.Layout(width="auto"))
        self.progress = W.FloatProgress(value=0.0, min=0.0, max=1.0, description="", layout=W.Layout(width="300px"))
        self.progress_label = W.HTML()
        self.result_html = W.HTML()
        self.compare_box = W.Box()
        self.results_html = W.HTML()
        self.throughput_fig = go.FigureWidget(F.throughput_chart([]))
        self.export_html = W.HTML()

        title = (f"<b>{html.escape(prof.title)}</b> — {prof.n_layer} layers + output, "
                 f"{format_bytes(prof.file_bytes)}")
        if self.notes:
            title += "<br>" + _GREY.format(html.escape("; ".join(self.notes)))
        if not self.devices:
            title += ("<br><span style='color:#b35c00'>no offload devices: everything stays on the CPU "
                      "(try sim='2x24GiB' or virtual=2)</span>")
        wrap = W.Layout(flex_flow="row wrap", align_items="center", grid_gap="4px 18px")
        controls: dict[str, list] = {g: [] for g in GROUPS}
        for attr, ctl in self.setting_controls.items():
            controls[_group_of(attr)].append(ctl)
        split = W.VBox([
            W.HBox(rows, layout=wrap),
            W.HTML(_GREY.format("drag a boundary between two colours to move layers (or focus it and use the arrow "
                                "keys); the white handle is -ngl; the thin strip below is what llama-server's -fit "
                                "would load")),
            self.strip,
            W.HBox([self.ts_text, self.ngl_slider], layout=wrap),
            W.HBox([self.split_mode, self.main_gpu], layout=wrap),
            W.HBox([W.HTML("<b>policies</b>"), *self.policy_buttons.values()], layout=wrap),
            self.policy_note])
        ctx = W.VBox([W.HBox([self.n_ctx, self.flash_attn], layout=wrap),
                      W.HBox([self.type_k, self.type_v, *controls["context & cache"]], layout=wrap)])
        experts = W.VBox([c for c in controls["experts & overrides"] if c.layout.width == "460px"] +
                         [W.HBox([c for c in controls["experts & overrides"] if c.layout.width != "460px"],
                                 layout=wrap)])
        fit_box = W.VBox([W.HBox(controls["fit"], layout=wrap),
                          W.HTML(_GREY.format("the thin strip under the layer strip is llama-server's -fit for "
                                              "these values and the current -c (gpulab.core.policies.server_fit)"))])
        process_box = W.VBox([*self.process_controls.values(),
                              W.HTML(_GREY.format("what llama-server loads beside the model: the draft, the "
                                                  "projector and the MTP context, in the bars as 'draft & "
                                                  "projector' (gpulab.core.policies.process)"))])
        self.groups: dict[str, W.Accordion] = {}
        for name, box in (("split", split), ("context & cache", ctx), ("experts & overrides", experts),
                          ("fit", fit_box), ("process", process_box)):
            acc = W.Accordion(children=[box], titles=(name,), selected_index=0 if name in _OPEN else None,
                              layout=W.Layout(width="100%"))
            acc.add_class("gpulab-group")
            self.groups[name] = acc
        measure_box = W.VBox([
            W.HTML("<b>Load &amp; measure</b> " + _GREY.format("(in a worker process: the kernel survives whatever "
                                                               "llama.cpp does)")),
            W.HBox([self.measure_button, self.n_prompt, self.n_gen, self.repetitions, self.force_load], layout=wrap),
            W.HBox([self.progress, self.progress_label]), self.result_html, self.compare_box,
            self.results_html, self.throughput_fig])
        self.children = [W.HTML(title), *self.groups.values(), self.status, self.y_scale, self.layer_fig,
                         self.memory_fig, measure_box, W.HTML("<b>Export</b> (copy-ready, for the current settings)"),
                         self.export_html]
        self.layout.padding = "0 0 0 6px"       # labels at the left edge are not cut by the output area
        self.add_class("gpulab-splitlab")

    def _memory_axis(self, p: Plan) -> tuple[tuple[str, int], list[float] | None]:
        """The memory bars' unit and y range: the scale rule (auto), or the whole devices
        (autorange, in the unit of the largest total)."""
        if self.y_scale.value == "device":
            return F.memory_unit(max([max(d.total_bytes, d.used_bytes) for d in p.devices] or [0])), None
        return F.memory_scale(p)

    # -- the current settings --------------------------------------------------------------
    @property
    def selected(self) -> list[str]:
        return [d.name for d, b in zip(self.devices, self.use_boxes) if b.value]

    @property
    def config(self) -> SplitConfig:
        return self.current_config()

    def _device_setting(self) -> tuple[str, ...]:
        sel = self.selected
        if len(sel) == len(self.devices):
            return ()
        return tuple(sel) or ("none",)

    def _split_order(self) -> list[str]:
        """The ticked devices in llama.cpp's order (select_devices, -sm ignored): -ts's order."""
        try:
            return [d.name for d in select_devices(self.devices, SplitConfig(devices=self._device_setting()))]
        except GpulabError:
            return self.selected

    def current_config(self) -> SplitConfig:
        """The SplitConfig the controls describe (raises ConfigError for impossible values)."""
        ts = tuple(self._ts.get(n, 0.0) for n in self._split_order())
        while ts and ts[-1] == 0.0 and any(ts):
            ts = ts[:-1]
        if not any(ts):
            ts = ()
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
            tensor_split=ts, devices=self._device_setting(), n_gpu_layers=-1 if ngl >= n_max else ngl,
            split_mode=self.split_mode.value, main_gpu=self.main_gpu.value or 0, n_ctx=self.n_ctx.value,
            type_k=self.type_k.value, type_v=self.type_v.value, flash_attn=self.flash_attn.value, **generic)

    def set_config(self, config: SplitConfig) -> Plan | None:
        """Set every control to `config` (one redraw)."""
        self._suspend += 1
        try:
            chosen = set(config.devices) if config.devices and config.devices != ("none",) else (
                set() if config.devices == ("none",) else {d.name for d in self.devices})
            for d, box in zip(self.devices, self.use_boxes):
                box.value = d.name in chosen
            self._sync_main_gpu()
            order = self._split_order()
            self._ts = {n: 0.0 for n in self._ts}
            self._ts.update({n: float(v) for n, v in zip(order, config.tensor_split)})
            self.ts_text.value = _ts_text(config.tensor_split)
            self.split_mode.value = config.split_mode
            self.main_gpu.value = config.main_gpu if config.main_gpu < len(self.main_gpu.options) else 0
            if config.n_ctx not in self.n_ctx.options:
                self.n_ctx.options = sorted({*self.n_ctx.options, config.n_ctx})
            self.n_ctx.value = config.n_ctx
            n_max = self.ngl_slider.max
            self.ngl_slider.value = n_max if config.n_gpu_layers < 0 else min(config.n_gpu_layers, n_max)
            self.type_k.value, self.type_v.value = config.type_k, config.type_v
            self.flash_attn.value = config.flash_attn
            for st in SETTINGS:
                ctl = self.setting_controls.get(st.attr)
                if ctl is None:
                    continue
                v = getattr(config, st.attr)
                if st.kind == "off":
                    v = not v
                elif st.kind == "rules":
                    v = ",".join(v)
                elif st.kind == "mibs":
                    v = ",".join(str(x) for x in v)
                ctl.value = v
        finally:
            self._suspend -= 1
        return self.redraw()

    def _plan(self, config: SplitConfig) -> Plan:
        cmd = self._process_command()
        if cmd is None:
            return make_plan(self.profile, self.devices, config, self.host)
        from ..core.placement.mtp import with_mtp
        from ..core.policies.process import with_process
        profile = with_mtp(self.profile) if "draft-mtp" in cmd.spec_types else self.profile
        p = make_plan(profile, self.devices, config, self.host)
        return with_process(cmd, p, self.devices, self.host, draft=self._companion("draft", cmd.draft),
                            projector=self._companion("projector", cmd.projector))

    def _process_command(self):
        """The process fields as a pasted llama-server command (None: the model alone)."""
        import shlex

        from ..core.command_line import parse_command
        v = {k: (w.value or "").strip() for k, w in self.process_controls.items()}
        if not any(v.values()):
            return None
        argv = ["llama-server", "-m", self.profile.path]
        argv += ["--mmproj", v["mmproj"]] if v["mmproj"] else []
        argv += ["-md", v["draft"]] if v["draft"] else []
        try:
            argv += shlex.split(v["draft_flags"])
        except ValueError as e:
            raise ConfigError(f"draft flags: {e}") from None
        argv += ["--spec-type", v["spec_type"]] if v["spec_type"] else []
        cmd = parse_command(argv)
        if cmd.unmodelled:
            raise ConfigError(cmd.unmodelled[0])
        return cmd

    def _companion(self, kind: str, part):
        """The draft's or projector's profile, read once per path."""
        if part is None:
            return None
        key = (kind, part.path)
        if key not in self._companions:
            from ..sources.projector import read_projector
            from ..sources.read import read_profile
            self._companions[key] = read_profile(part.path) if kind == "draft" else read_projector(part.path)
        return self._companions[key]

    def _safe_plan(self, config) -> Plan | None:
        try:
            return self._plan(config)
        except GpulabError:
            return None

    # -- the split: strip, -ts text, ticks --------------------------------------------------
    def set_split(self, values) -> Plan | None:
        """Set -ts of the ticked devices to `values` (in llama.cpp's order of them), one redraw."""
        order = self._split_order()
        values = [float(v) for v in values]
        for i, n in enumerate(order):
            self._ts[n] = values[i] if i < len(values) else 0.0
        self._show_ts()
        return self.redraw()

    def set_counts(self, counts) -> Plan | None:
        """Put exactly counts[i] offloaded layers on the i-th device of the strip (what a drag does)."""
        segs = [s["name"] for s in self.strip.segments]
        if len(counts) != len(segs):
            self._set_error(f"{len(counts)} layer counts for {len(segs)} devices on the strip")
            return None
        by_name = dict(zip(segs, split_for_counts(list(counts)) + (0.0,) * len(segs)))
        for n in self._ts:
            self._ts[n] = by_name.get(n, 0.0)
        self._show_ts()
        return self._schedule_or_draw()

    def set_ngl(self, ngl: int) -> None:
        self.ngl_slider.value = max(0, min(int(ngl), self.ngl_slider.max))

    def _show_ts(self) -> None:
        ts = [self._ts.get(n, 0.0) for n in self._split_order()]
        while ts and ts[-1] == 0.0:
            ts.pop()
        self._suspend += 1
        try:
            self.ts_text.value = _ts_text(ts)
        finally:
            self._suspend -= 1

    def _strip_request(self, change) -> None:
        req = change["new"] or {}
        self._request_seq = int(req.get("seq", -1))
        if "counts" in req:
            self.set_counts([int(c) for c in req["counts"]])
        elif "ngl" in req:
            self.set_ngl(int(req["ngl"]))

    def _ts_typed(self, change) -> None:
        if self._suspend:
            return
        st = next(s for s in SETTINGS if s.attr == "tensor_split")
        try:
            values = value_from_text(st, change["new"].strip())
        except (GpulabError, ValueError) as e:
            self._set_error(f"-ts {change['new']!r}: {e}")
            return
        order = self._split_order()
        if len(values) > len(order):
            self._set_error(f"-ts has {len(values)} values for {len(order)} ticked devices ({', '.join(order)})")
            return
        for i, n in enumerate(order):
            self._ts[n] = float(values[i]) if i < len(values) else 0.0
        self._schedule()

    def _ticked(self, change) -> None:
        if self._suspend:
            return
        # a device ticked back in while -ts is explicit gets the mean share, not 0 ("not used")
        box = change["owner"]
        name = box.description
        if change["new"] and self._ts.get(name, 0.0) == 0.0:
            others = [self._ts[n] for n in self.selected if n != name and self._ts.get(n, 0.0) > 0]
            if others:
                self._ts[name] = sum(others) / len(others)
        self._sync_main_gpu()
        self._show_ts()
        self._schedule()

    # -- redrawing -------------------------------------------------------------------------
    def _changed(self, change) -> None:
        if self._suspend:
            return
        self._schedule()

    def _schedule_or_draw(self) -> Plan | None:
        self._schedule()
        return self.plan

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
        self._draw(p)
        self.last_update_s = time.perf_counter() - t0
        if self.live_fit:
            self._schedule_fit(cfg)
        self._mark_stale(cfg)
        return p

    def _draw(self, p: Plan) -> None:
        # plotly_restyle / plotly_relayout messages only (see figures.apply), in one fixed order
        F.apply(self.layer_fig, p, "layers", order=self.order)
        self.unit, y_range = self._memory_axis(p)
        F.apply(self.memory_fig, p, "memory", order=self.order, unit=self.unit, y_range=y_range)
        F.sync_widget_state(self.layer_fig)
        F.sync_widget_state(self.memory_fig)
        self._draw_strip(p)
        self._update_shares(p)
        self._update_status(p)
        self.export_html.value = exports_html(self.exports(p))

    def _draw_strip(self, p: Plan) -> None:
        tp = p.tensor_parallel is not None
        segs = [] if tp else [{"name": d.name} for d in p.offload_devices]
        n_max = self.profile.n_layer + 1
        with self.strip.hold_sync():
            self.strip.cells = list(p.layer_devices)
            self.strip.segments = segs
            self.strip.ngl = n_max if p.config.n_gpu_layers < 0 else min(p.config.n_gpu_layers, n_max)
            self.strip.draggable = p.config.split_mode == "layer" and len(segs) > 1
            self.strip.applied = self._request_seq

    def _schedule_fit(self, cfg: SplitConfig) -> None:
        """The live fit after the figures: at once in plain Python; in a notebook once the controls
        rest for `debounce` seconds (fit takes up to hundreds of ms on a large MoE: a -c drag must
        not wait for it at every step)."""
        if self._fit_handle is not None:
            self._fit_handle.cancel()
            self._fit_handle = None
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None or not self.debounce:
            self._draw_fit(cfg)
            return
        self._fit_handle = loop.call_later(self.debounce, self._fit_now)

    def _fit_now(self) -> None:
        self._fit_handle = None
        try:
            self._draw_fit(self.current_config())
        except GpulabError:
            pass        # the status line already says what is wrong with the settings

    def _draw_fit(self, cfg: SplitConfig) -> None:
        """The thin strip: what llama-server's -fit loads for the current -c/-fitt (its own -ngl/-ts)."""
        from ..core.policies.server_fit import fit_flags, server_fit
        t0 = time.perf_counter()
        # fit chooses -ngl and -ts itself: a drag leaves its input as it was, and the last answer stands
        given = cfg.replace(n_gpu_layers=-1, tensor_split=(), fit="on")
        if given == self._fit_given:
            self.last_fit_s = time.perf_counter() - t0
            return
        try:
            r = server_fit(self.profile, self.devices, given, self.host)
            self.live_fit_result = r
            if r.ok:
                cells = list(self._plan(r.config).layer_devices)
                label = (f"llama-server -fit at -c {cfg.n_ctx}: "
                         f"{fit_flags(r.config, r.overrides, self.devices) or 'nothing to change'}")
            else:
                cells, label = [], f"llama-server -fit at -c {cfg.n_ctx} gives up: {r.reasons[-1]}"
        except GpulabError as e:
            cells, label = [], f"llama-server -fit: {e}"
        self._fit_given = given
        with self.strip.hold_sync():
            self.strip.fit_cells = cells
            self.strip.fit_label = label
        self.last_fit_s = time.perf_counter() - t0

    def _mark_stale(self, cfg: SplitConfig) -> None:
        """A policy's note goes once its settings change; measurements of other settings say so."""
        if self.note and cfg != self._note_config:
            self.note, self._note_config = "", None
            self.policy_note.value = ""
        if self.runs:
            stale = self._run_configs[-1] != cfg
            banner = ("<div class='gpulab-stale' style='color:#b35c00'>measured with earlier settings: "
                      "press Load &amp; measure for these</div>")
            has = self.result_html.value.startswith("<div class='gpulab-stale'")
            if stale and not has:
                self.result_html.value = banner + self.result_html.value
            elif not stale and has:
                self.result_html.value = self.result_html.value[len(banner):]

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
                             f"{layers_text(dp.n_layers, dp.has_output)}")
                continue
            how = " by free memory" if default else ""
            lab.value = f"<b>{shares[d.name] * 100:.1f}%</b>{how} → {layers_text(dp.n_layers, dp.has_output)}"

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
            notes.append(f"{on_cpu} of {p.profile.n_layer + 1} layers (blocks and output) stay on the CPU")
        extra = "".join(f"<div style='color:#666;font-size:12px'>{html.escape(n)}</div>" for n in notes)
        extra += "".join(f"<div style='color:#b35c00;font-size:12px'>not exact: {html.escape(str(d))}</div>"
                         for d in p.doubts)
        if p.fits:
            self.status.value = f"<div style='color:#2a7d2a;font-weight:bold'>fits</div>{extra}"
        else:
            self.status.value = ("<div class='gpulab-error' style='color:#d62728;font-weight:bold'>does not fit: "
                                 + html.escape("; ".join(p.deficits())) + f"</div>{extra}")

    def _set_error(self, msg: str) -> None:
        self.error = msg
        if hasattr(self, "strip"):
            self.strip.applied = self._request_seq     # the strip drops its preview: the plan stays
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
    def apply_policy(self, name: str) -> Plan | None:
        """Set every control policy `name` owns (gpulab.core.policies.choose): -ts, the device ticks,
        -sm, -mg; moe-balance its -ot rules; fit and ollama also -c, -ngl and -ot. A policy that
        cannot choose says why in one line and changes nothing. `last_fit` / `last_ollama` keep
        fit's / Ollama's result."""
        try:
            cfg = self.current_config()
        except GpulabError as e:
            cfg = self.plan.config if self.plan is not None else SplitConfig()
            self.error = str(e)
        c = choose(name, self.profile, self.devices, cfg, self.host)
        if name == "fit" and c.result is not None:
            self.last_fit = c.result
        if name == "ollama" and c.result is not None:
            self.last_ollama = c.result
        if c.config is None:
            self._show_note(c.note, "warning", cfg)
            return None
        p = self.set_config(c.config)
        self.result_html.value = ""
        self._show_note(c.note, "info", self.current_config())
        return p

    def _show_note(self, msg: str, style: str, config: SplitConfig | None) -> None:
        color = {"warning": "#b35c00", "info": "#333"}[style]
        self.note, self._note_config = msg, config
        self.policy_note.value = (f"<div class='gpulab-note gpulab-{style}' style='color:{color};font-size:12px'>"
                                  f"{html.escape(msg)}</div>")

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
                run = replace(run, plan=p.memory())
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
        self._run_configs.append(cfg)
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
        for h in (self._handle, self._fit_handle):
            if h is not None:
                h.cancel()
        self._handle = self._fit_handle = None
        self.wait(30)
        if self.monitor is not None and hasattr(self.monitor, "close"):
            self.monitor.close()
        self._finalizer()
        for fig in (self.layer_fig, self.memory_fig, self.throughput_fig, self.strip):
            try:
                fig.close()
            except Exception:  # noqa: BLE001
                pass
        super().close()
