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
    "ModelProfile", "LayerProfile", "TensorInfo", "read_profile", *_errors_all,
]


def read_profile(source: str, **kwargs) -> ModelProfile:
    """A ModelProfile from a local GGUF path or an http(s) URL (header only, by range requests)."""
    if str(source).startswith(("http://", "https://")):
        from .sources.remote import read_remote_profile
        return read_remote_profile(str(source), **kwargs)
    from .sources.gguf_file import read_profile as _read
    return _read(source, **kwargs)


def load_ipython_extension(ipython) -> None:
    """`%load_ext gpulab`: registers the %gpulab magics (imported only now: IPython stays optional)."""
    from .magics import load_ipython_extension as _load
    _load(ipython)


def unload_ipython_extension(ipython) -> None:
    from .magics import unload_ipython_extension as _unload
    _unload(ipython)
