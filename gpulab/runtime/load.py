"""gpulab.load: open a model with its saved allocation for the devices present."""

from __future__ import annotations

from ..core.config import SplitConfig
from ..storage.allocations import config_for

__all__ = ["load"]


def load(model, config: SplitConfig | None = None, *, isolate: bool = False, rpc: tuple[str, ...] = (),
         **open_kwargs):
    """Open `model` with its saved allocation (`gpulab alloc`, the lab's save button,
    `gpulab tune --save`) for the devices present, else with `config` (or the defaults).

    An allocation made for devices that are gone raises AllocationMismatchError naming them
    instead of loading elsewhere; a configuration the plan says cannot fit raises
    DoesNotFitError before llama.cpp is called. In this process it returns a LoadedModel (use
    `with`, so device memory is freed before the next load); a llama.cpp crash then ends this
    process with one line saying why (gpulab.runtime.crash). isolate=True (always, with `rpc`
    endpoints) loads in a worker process instead and returns its RemoteModel: llama.cpp
    failures that abort a process (an RPC server dying: GGML_ABORT in ggml-rpc.cpp) then end
    the worker, not the caller.
    """
    if isolate or rpc:
        from .worker import Worker
        worker = Worker(tuple(rpc))
        devices = [d for d in worker.devices() if d.is_offload]
        remote = worker.open(model, config if config is not None else config_for(model, devices))
        remote.owns_worker = True
        return remote
    from .llama_lib import llama_devices
    from .model import open_model
    devices = open_kwargs.pop("devices", None) or llama_devices()
    chosen = config if config is not None else config_for(model, [d for d in devices if d.is_offload])
    return open_model(model, chosen, devices=devices, **open_kwargs)
