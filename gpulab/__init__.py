"""gpulab: see and measure where llama.cpp puts each layer of a GGUF model.

    import gpulab
    profile = gpulab.read_profile("model.gguf")
    devices = gpulab.parse_sim_spec("24GiB,24GiB,12GiB")
    p = gpulab.plan(profile, devices, gpulab.SplitConfig(tensor_split=(3, 1, 1)))
    fp = gpulab.plan_fleet(gpulab.read_fleet("fleet.toml"), {name: profile, ...}, devices)

Nothing heavy happens at import: the names above load on first use, and NVML, llama.cpp,
ipywidgets, plotly (and numpy, for what needs it) later still (tests/test_layering.py checks it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .core.errors import *  # noqa: F403
from .core.errors import __all__ as _errors_all

if TYPE_CHECKING:   # what _LAZY provides, for type checkers and editors
    from .core.config import SplitConfig
    from .core.devices import Device, parse_sim_spec
    from .core.fleet.model import Fleet, FleetModel
    from .core.fleet.planner import FleetPlan, plan_fleet
    from .core.memory import DevicePlan
    from .core.placement.plan import Plan
    from .core.placement.planner import plan
    from .core.profile import LayerProfile, ModelProfile, TensorInfo
    from .sources.read import read_profile

__version__ = "0.1.0"

# name -> module that defines it: imported on first use (module __getattr__, PEP 562), so that
# `import gpulab` and `gpulab plan` do not pay for the fleet planner they do not use.
_LAZY = {
    "SplitConfig": "core.config", "Device": "core.devices", "parse_sim_spec": "core.devices",
    "Plan": "core.placement.plan", "DevicePlan": "core.memory", "plan": "core.placement.planner",
    "ModelProfile": "core.profile", "LayerProfile": "core.profile", "TensorInfo": "core.profile",
    "read_profile": "sources.read",
    "Fleet": "core.fleet.model", "FleetModel": "core.fleet.model",
    "FleetPlan": "core.fleet.planner", "plan_fleet": "core.fleet.planner",
}

__all__ = [
    "SplitConfig", "Device", "parse_sim_spec", "Plan", "DevicePlan", "plan",
    "ModelProfile", "LayerProfile", "TensorInfo", "read_profile", "load", *_errors_all,
    "Fleet", "FleetModel", "FleetPlan", "plan_fleet", "read_fleet",
]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'gpulab' has no attribute {name!r}")
    from importlib import import_module
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value   # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


def read_fleet(path):
    """gpulab.storage.fleet_files.read_any_fleet: a fleet TOML (or a llama-swap config.yaml, a
    router presets .ini) as a Fleet; what a foreign format leaves out is dropped with a note."""
    from .storage.fleet_files import read_any_fleet
    return read_any_fleet(path)[0]


def load(model, config: SplitConfig | None = None, **kwargs):
    """gpulab.runtime.load.load: open `model` with its saved allocation (see there)."""
    from .runtime.load import load as _load
    return _load(model, config, **kwargs)


def load_ipython_extension(ipython) -> None:
    """`%load_ext gpulab`: registers the %gpulab magics (imported only now: IPython stays optional)."""
    from .magics import load_ipython_extension as _load
    _load(ipython)


def unload_ipython_extension(ipython) -> None:
    from .magics import unload_ipython_extension as _unload
    _unload(ipython)
