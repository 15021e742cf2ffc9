"""gpulab: see and measure where llama.cpp puts each layer of a GGUF model.

    import gpulab
    profile = gpulab.read_profile("model.gguf")
    devices = gpulab.parse_sim_spec("24GiB,24GiB,12GiB")
    p = gpulab.plan(profile, devices, gpulab.SplitConfig(tensor_split=(3, 1, 1)))

Nothing heavy happens at import: NVML and llama.cpp load on first use.
"""

from __future__ import annotations

from .core.config import SplitConfig
from .core.devices import Device, parse_sim_spec
from .core.plan import DevicePlan, Plan
from .core.planner import plan
from .core.profile import LayerProfile, ModelProfile, TensorInfo
from .errors import *  # noqa: F403
from .errors import __all__ as _errors_all

__version__ = "0.1.0"

__all__ = [
    "SplitConfig", "Device", "parse_sim_spec", "Plan", "DevicePlan", "plan",
    "ModelProfile", "LayerProfile", "TensorInfo", "read_profile", "load", *_errors_all,
]


def read_profile(source: str, **kwargs) -> ModelProfile:
    """A ModelProfile from a local GGUF path or an http(s) URL (header only, by range requests)."""
    if str(source).startswith(("http://", "https://")):
        from .sources.remote import read_remote_profile
        return read_remote_profile(str(source), **kwargs)
    from .sources.gguf_file import read_profile as _read
    return _read(source, **kwargs)


def load(model, config: SplitConfig | None = None, *, isolate: bool = False, rpc: tuple[str, ...] = (),
         **open_kwargs):
    """Open `model` with its saved allocation profile (`gpulab profile`, the lab's save button,
    `gpulab tune --save`) for the devices present, else with `config` (or the defaults).

    A profile made for devices that are gone raises ProfileMismatchError naming them instead of
    loading elsewhere; a configuration the plan says cannot fit raises DoesNotFitError before
    llama.cpp is called. In this process it returns a LoadedModel (use `with`, so device memory
    is freed before the next load). isolate=True (always, with `rpc` endpoints) loads in a worker
    process instead and returns its RemoteModel: llama.cpp failures that abort a process (an RPC
    server dying: GGML_ABORT in ggml-rpc.cpp) then end the worker, not the caller.
    """
    from .profiles import config_for
    if isolate or rpc:
        from .runtime.worker import Worker
        worker = Worker(tuple(rpc))
        devices = [d for d in worker.devices() if d.kind != "cpu"]
        remote = worker.open(model, config if config is not None else config_for(model, devices))
        remote.owns_worker = True
        return remote
    from .runtime.llama_lib import llama_devices
    from .runtime.model import open_model
    devices = open_kwargs.pop("devices", None) or llama_devices()
    chosen = config if config is not None else config_for(model, [d for d in devices if d.kind != "cpu"])
    return open_model(model, chosen, devices=devices, **open_kwargs)


def load_ipython_extension(ipython) -> None:
    """`%load_ext gpulab`: registers the %gpulab magics (imported only now: IPython stays optional)."""
    from .magics import load_ipython_extension as _load
    _load(ipython)


def unload_ipython_extension(ipython) -> None:
    from .magics import unload_ipython_extension as _unload
    _unload(ipython)
