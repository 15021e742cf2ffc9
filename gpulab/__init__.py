"""gpulab: see and measure where llama.cpp puts each layer of a GGUF model.

    import gpulab
    profile = gpulab.read_profile("model.gguf")
    devices = gpulab.parse_sim_spec("24GiB,24GiB,12GiB")
    p = gpulab.plan(profile, devices, gpulab.SplitConfig(tensor_split=(3, 1, 1)))
    fp = gpulab.plan_fleet(gpulab.read_fleet("fleet.toml"), {name: profile, ...}, devices)

Nothing heavy happens at import: NVML, llama.cpp, ipywidgets and plotly load on first use
(tests/test_layering.py checks it).
"""

from __future__ import annotations

from .core.config import SplitConfig
from .core.devices import Device, parse_sim_spec
from .core.errors import *  # noqa: F403
from .core.errors import __all__ as _errors_all
from .core.fleet.model import Fleet, FleetModel
from .core.fleet.planner import FleetPlan, plan_fleet
from .core.memory import DevicePlan
from .core.placement.plan import Plan
from .core.placement.planner import plan
from .core.profile import LayerProfile, ModelProfile, TensorInfo
from .sources.read import read_profile

__version__ = "0.1.0"

__all__ = [
    "SplitConfig", "Device", "parse_sim_spec", "Plan", "DevicePlan", "plan",
    "ModelProfile", "LayerProfile", "TensorInfo", "read_profile", "load", *_errors_all,
    "Fleet", "FleetModel", "FleetPlan", "plan_fleet", "read_fleet",
]


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
