"""Load a GGUF with llama.cpp in-process, exactly as a SplitConfig says, and report what it did.

    with open_model(path, SplitConfig(tensor_split=(1, 3)), devices=devs) as m:
        m.report.layer_devices      # llama.cpp's own 'layer N assigned to device X'
        m.report.bytes_on("RPC1", "kv")

`open_model` calls llama_model_load_from_file and llama_init_from_model with the structs from
`params.llama_params` (the one translation point), while capturing llama.cpp's log, and parses
that log into a `LoadReport`. `close()` frees the context and then the model, at once: GPU
memory is really free before the next split is tried.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from ..core.config import SplitConfig
from ..core.devices import Device
from ..core.errors import ConfigError, DeviceError, DoesNotFitError, LoadError
from ..core.memory import PlannedMemory
from ..core.report import LoadReport
from . import ggml, llama_lib
from .crash import guard
from .logcapture import LogCapture, parse_load_log
from .params import llama_params

__all__ = ["open_model", "LoadedModel"]

# llama.cpp's log is process-wide: one load at a time keeps each report to its own load
_load_lock = threading.Lock()


class LoadedModel:
    """A model and context loaded by `open_model`. Close it (or use `with`)."""

    def __init__(self, *, path: str, config: SplitConfig, effective_config: SplitConfig,
                 devices: list[Device], report: LoadReport, model, ctx, dry_run: bool,
                 load_seconds: float, context_seconds: float, notes: tuple[str, ...],
                 plan: PlannedMemory | None = None):
        self.path = path
        self.config = config                      # as asked
        self.effective_config = effective_config  # as passed to llama.cpp (see notes)
        self.devices = devices                    # the devices the log was read against
        self.report = report
        self.dry_run = dry_run
        self.load_seconds = load_seconds          # llama_model_load_from_file
        self.context_seconds = context_seconds    # llama_init_from_model
        # from asking to a context ready to run: the whole open_model call (resplit: the close
        # of the previous model included)
        self.ready_seconds = load_seconds + context_seconds
        self.notes = notes
        self.plan = plan                          # the prediction the load was checked against, if any
        self._model = model
        self._ctx = ctx
        # RPC servers this model has buffers on: known alive while it is loaded (llama_lib.hold_endpoints)
        self._endpoints = tuple(dict.fromkeys(d.endpoint for d in devices
                                              if d.kind == "rpc" and d.endpoint and d.name in report.devices))
        llama_lib.hold_endpoints(self._endpoints)

    @property
    def model(self):
        """The llama_model pointer (llama_cpp.llama_model_p); None once closed."""
        return self._model

    @property
    def ctx(self):
        """The llama_context pointer; None once closed."""
        return self._ctx

    @property
    def closed(self) -> bool:
        return self._model is None

    def close(self) -> None:
        """Free the context, then the model (llama_free, llama_model_free). Idempotent."""
        if self._model is None:
            return
        lc = llama_lib.llama_cpp()
        ctx, model = self._ctx, self._model
        self._ctx = self._model = None
        with LogCapture():   # keeps the destructors' debug lines off stderr
            if ctx:
                lc.llama_free(ctx)
            lc.llama_model_free(model)
        llama_lib.release_endpoints(self._endpoints)

    def __enter__(self) -> LoadedModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        if getattr(self, "_model", None) is not None:
            warnings.warn(f"LoadedModel({self.path!r}) was never closed; its memory stays allocated "
                          "until the process exits. Use `with open_model(...)` or .close().",
                          ResourceWarning, stacklevel=1)

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("dry run" if self.dry_run else "loaded")
        return f"LoadedModel({Path(self.path).name!r}, {state}, devices={list(self.report.devices)})"


def _safe_config(config: SplitConfig) -> tuple[SplitConfig, tuple[str, ...]]:
    """Keep llama.cpp away from RPC servers that have gone away.

    ggml cannot unregister a backend, so an RPC server that was registered and then stopped
    stays among llama.cpp's devices, and llama.cpp's default device selection would query it
    and abort the process. When that is the case, pass llama.cpp the device list it would have
    chosen itself among the reachable devices (llama_prepare_model_devices), as --device.
    """
    g = llama_lib.ggml()
    if config.devices:
        by_name = {ggml.dev_name(g, dev): dev for dev in ggml.device_handles(g)}
        for name in config.devices:
            dev = by_name.get(name)  # unknown names are llama_params' to report
            if dev is not None and llama_lib._is_rpc(g, dev):
                ep = ggml.dev_description(g, dev)
                if not llama_lib.endpoint_reachable(ep):
                    raise DeviceError(f"--device {name}: its RPC server {ep} does not accept connections "
                                      "(llama.cpp would abort the process)")
        return config, ()
    everything = llama_lib.default_device_names(skip_unreachable=False)
    reachable = llama_lib.default_device_names()
    if everything == reachable:
        return config, ()
    gone = [n for n in everything if n not in reachable]
    note = (f"RPC device(s) {', '.join(gone)} no longer answer (their servers stopped); passed "
            f"--device {','.join(reachable) or 'none'}, llama.cpp's own choice among the rest")
    return config.replace(devices=tuple(reachable) or ("none",)), (note,)


def open_model(path: str | os.PathLike, config: SplitConfig | None = None, *,
               devices: list[Device] | None = None, dry_run: bool = False,
               progress: Callable[[float], object] | None = None, verbose: bool = False,
               context_params: dict | None = None, check_fit: bool = True,
               plan: PlannedMemory | None = None) -> LoadedModel:
    """Load `path` with llama.cpp as `config` says; a `LoadedModel` with the parsed `.report`.

    devices: the devices llama.cpp sees (default: `llama_devices()`); used to check the config
      and to name buffers. Which devices llama.cpp uses is the config's business (--device).
    dry_run: llama_model_params.no_alloc. llama.cpp reads the metadata, places every layer and
      plans every buffer without allocating or reading weights (and without mmap: see
      params.llama_params). The report then has the layer placement, the devices, the KV
      placement per layer, kv_total_bytes, the output buffer and the compute buffer sizes
      (llama.cpp's no_alloc estimate: a few percent above a real load's on the device with the
      output layer); the model and KV buffers are listed on their devices, as 0 bytes (dummies).
    progress: called with the fraction loaded (llama.cpp's progress_callback), and with 1.0 at
      the end. If it raises, the load is cancelled and the exception re-raised.
    verbose: echo llama.cpp's log to stderr as it comes.
    context_params: further llama_context_params fields to set, by name, for settings a
      SplitConfig does not carry (e.g. {'no_perf': False} to have llama.cpp time its decodes).

    check_fit: plan the load first (gpulab.core.placement.planner.plan on these devices) and raise
      DoesNotFitError, naming each over-full device and its deficit, when the plan says it
      cannot fit; llama.cpp is then not called, so a CUDA out-of-memory mid-load is avoided
      rather than survived. On by default; False leaves the judgement to llama.cpp. Ignored
      for dry runs.
    plan: the caller's prediction for this config on these devices (Plan.memory()), so that the
      load is checked against it instead of planning again; ignored when the config llama.cpp
      gets differs from `config` (see _safe_config).

    Raises LoadError (with llama.cpp's last error lines) when llama.cpp refuses the file or the
    settings; nothing stays allocated then.
    """
    t_call = time.perf_counter()
    config = config or SplitConfig()
    path = os.fspath(path)
    if not Path(path).is_file():
        raise LoadError(f"no model file at {path}")
    lc = llama_lib.llama_cpp()
    devs = list(devices) if devices is not None else llama_lib.llama_devices()
    effective, notes = _safe_config(config)
    if effective != config:
        plan = None
    if check_fit and not dry_run:
        plan = plan or plan_load(path, effective, devs)
        _check_fit(path, plan)
    mp, cp = llama_params(effective, devs, dry_run=dry_run)
    for name, value in (context_params or {}).items():
        if name not in {f[0] for f in cp._fields_}:
            raise ConfigError(f"llama_context_params has no field {name!r}")
        setattr(cp, name, value)

    failure: list[BaseException] = []
    last = [0.0]

    def on_progress(fraction: float, _user) -> bool:
        if failure:
            return False
        try:
            last[0] = float(fraction)
            if progress is not None:
                progress(float(fraction))
            return True
        except BaseException as e:  # noqa: BLE001 - re-raised after llama.cpp unwinds
            failure.append(e)
            return False

    callback = lc.llama_progress_callback(on_progress)   # referenced until the load returns
    mp.progress_callback = callback

    model = ctx = None
    with _load_lock, guard(f"the load of {Path(path).name}"), \
            LogCapture(echo=sys.stderr.write if verbose else None) as cap:
        t0 = time.perf_counter()
        model = lc.llama_model_load_from_file(path.encode(), mp)
        t1 = time.perf_counter()
        if not model:
            if failure:
                raise failure[0]
            raise LoadError(_failure_message("load", path, cap))
        try:
            ctx = lc.llama_init_from_model(model, cp)
        except BaseException:
            lc.llama_model_free(model)
            raise
        t2 = time.perf_counter()
        if not ctx:
            lc.llama_model_free(model)
            raise LoadError(_failure_message("create a context for", path, cap))
    try:
        if progress is not None and last[0] < 1.0:
            progress(1.0)
        report = parse_load_log(cap.text, devs)
    except BaseException:
        lc.llama_free(ctx)
        lc.llama_model_free(model)
        raise
    loaded = LoadedModel(path=path, config=config, effective_config=effective, devices=devs, report=report,
                         model=model, ctx=ctx, dry_run=dry_run, load_seconds=t1 - t0,
                         context_seconds=t2 - t1, notes=notes, plan=plan)
    loaded.ready_seconds = time.perf_counter() - t_call
    return loaded


def plan_load(path: str, config: SplitConfig, devices: list[Device]) -> PlannedMemory:
    """The planner's prediction for loading `path` with `config` on the devices llama.cpp sees."""
    from ..core.placement.planner import plan
    from ..sources.read import read_profile
    host = next((d for d in devices if d.kind == "cpu"), None)
    offload = [d for d in devices if d.is_offload]
    return plan(read_profile(path), offload, config, host).memory()


def _check_fit(path: str, p: PlannedMemory) -> None:
    if not p.fits:
        raise DoesNotFitError(f"{Path(path).name} does not fit with this configuration: "
                              + "; ".join(p.deficits())
                              + ". Lower n_gpu_layers or n_ctx, or move layers with tensor_split")


def _failure_message(what: str, path: str, cap: LogCapture) -> str:
    errors = cap.error_lines(4)
    if not errors:  # some refusals are logged at warning or info level only
        errors = [ln.strip() for ln in cap.text.splitlines() if ln.strip()][-3:]
    detail = " | ".join(errors) if errors else "llama.cpp logged nothing"
    return f"llama.cpp could not {what} {Path(path).name}: {detail}"
