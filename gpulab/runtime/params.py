"""The one translation point from a `SplitConfig` to llama.cpp.

`llama_params` fills llama.cpp's own structs (llama_model_params, llama_context_params) for an
in-process load, walking `gpulab.core.settings.SETTINGS` (each setting names its struct and
field). `llama_kwargs` gives the keyword arguments of `llama_cpp.Llama(...)`: it is the 'python'
column of `gpulab.core.exports.render.SPELLINGS`, the table every export (llama-server, llama-bench,
Ollama, KoboldCpp) is rendered from, so a setting cannot be spelled one way here and another way
there. Where `Llama()` has no keyword for a setting, that table says so and `llama_kwargs_gaps`
names it.
"""

from __future__ import annotations

import ctypes
from typing import Any

from ..core.config import SplitConfig
from ..core.devices import Device
from ..core.errors import ConfigError
from ..core.exports.render import python_gaps, python_kwargs
from ..core.overrides import effective_rules
from ..core.placement.planner import select_devices
from ..core.settings import SETTINGS, check_settings_cover_config
from . import ggml

__all__ = ["llama_params", "llama_kwargs", "llama_kwargs_gaps"]

_LOAD_MODE_NONE = 0  # enum llama_load_mode (include/llama.h): LLAMA_LOAD_MODE_NONE


class _BuftOverride(ctypes.Structure):   # struct llama_model_tensor_buft_override (include/llama.h)
    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


def _buffer_type(g, target: str) -> int:
    """The buffer type a rule names: the CPU's own (llama.cpp compares the pointer with
    ggml_backend_cpu_buffer_type() to choose among the host's buffers), else the default buffer
    type of the device by gpulab's name or by llama.cpp's buffer type name ('RPC0[host:port]')."""
    if target == "CPU":
        return g.ggml_backend_cpu_buffer_type()
    for dev in ggml.device_handles(g):
        buft = g.ggml_backend_dev_buffer_type(dev)
        if target in (ggml.dev_name(g, dev), ggml.buft_name(g, buft) or None):
            return buft
    raise ConfigError(f"tensor override buffer type {target!r}: llama.cpp has no such device")


def llama_params(config: SplitConfig, devices: list[Device] | None = None, *,
                 dry_run: bool = False):
    """(llama_model_params, llama_context_params) for `config`, from llama.cpp's defaults.

    `devices` are the devices llama.cpp sees (e.g. `llama_devices()`); when given, the config
    is checked against them (tensor_split length, main_gpu, --device names). As with
    llama.cpp's --device, config.devices == ('none',) means no offload device at all. `dry_run` sets
    `no_alloc` (and load_mode NONE, see below): llama.cpp then plans every allocation without
    making it. The ctypes arrays the
    structs point to (tensor_split, the NULL-terminated --device list) are kept alive on the
    model params object (`_gpulab_keep`).
    """
    from . import llama_lib

    check_settings_cover_config()
    lc = llama_lib.llama_cpp()
    g = llama_lib.ggml()
    if devices is not None:
        # the planner's checks of names, -ts length and -mg; whether llama.cpp takes -sm row is
        # llama.cpp's to say here (the planner predicts its refusal, and is tested against it)
        select_devices(list(devices), config.replace(split_mode="layer") if config.split_mode == "row" else config)
    elif config.devices and config.devices != ("none",):
        config.check_devices(len(config.devices))

    mp = lc.llama_model_default_params()
    cp = lc.llama_context_default_params()
    keep: list[Any] = []
    for f in SETTINGS:
        value = getattr(config, f.attr)
        target = mp if f.struct == "model" else cp
        if f.c_field is not None:
            setattr(target, f.c_field, f.to_c(value))
        elif f.attr == "tensor_split":
            n_max = int(lc.llama_max_devices())
            if len(value) > n_max:
                raise ConfigError(f"tensor_split has {len(value)} entries; this llama.cpp takes at most {n_max}")
            arr = (ctypes.c_float * n_max)(*value)   # the rest are zero
            mp.tensor_split = arr
            keep.append(arr)
        elif f.attr == "devices":
            if value:
                # common/arg.cpp parse_device_list: 'none' is the empty list (CPU only), and
                # the CPU itself is not a device one can pass
                handles = [] if tuple(value) == ("none",) else [llama_lib.device_handle(n) for n in value]
                for name, h in zip(value, handles):
                    if g.ggml_backend_dev_type(h) == 0:   # GGML_BACKEND_DEVICE_TYPE_CPU
                        raise ConfigError(f"--device {name}: the CPU is not an offload device; layers "
                                          "not offloaded stay on it anyway (use -ngl, or --device none)")
                dev_arr = (ctypes.c_void_p * (len(handles) + 1))(*handles, None)
                mp.devices = ctypes.cast(dev_arr, ctypes.c_void_p).value
                keep.append(dev_arr)
        elif f.attr == "tensor_overrides":
            # llama_model_params.tensor_buft_overrides: a {pattern, buft} array ending in {NULL,
            # NULL} (include/llama.h). llama-cpp-python declares the field but leaves it unused;
            # ctypes fills it. -cmoe, -ncmoe and -ncffn are rules too (gpulab.core.overrides).
            rules = effective_rules(config)
            if rules:
                ot_arr = (_BuftOverride * (len(rules) + 1))(
                    *[_BuftOverride(r.pattern.encode(), _buffer_type(g, r.target)) for r in rules],
                    _BuftOverride())   # zeroed: {NULL, NULL}
                mp.tensor_buft_overrides = ctypes.cast(ot_arr, ctypes.c_void_p).value
                keep.append(ot_arr)
        elif f.attr in ("cpu_moe", "n_cpu_moe", "n_cpu_ffn"):
            continue          # in the tensor_overrides array above
        elif f.attr in ("fit", "fit_target", "fit_ctx"):
            continue          # common_params of llama-server/llama-cli: an in-process load never fits
        else:  # pragma: no cover - a Setting without c_field must be handled above
            raise RuntimeError(f"no C translation for {f.attr}")
    if dry_run:
        # as llama.cpp's own dry run does (common_get_device_memory_data, common/fit.cpp):
        # no_alloc together with mmap hits GGML_ASSERT(!ml.no_alloc) in load_tensors and aborts
        # the process, so a dry run also turns mmap off (LLAMA_LOAD_MODE_NONE). Host weights then
        # sit in a 'CPU' buffer where a real load maps them ('CPU_Mapped').
        mp.no_alloc = True
        mp.load_mode = _LOAD_MODE_NONE
    mp._gpulab_keep = keep
    return mp, cp


def llama_kwargs(config: SplitConfig, *, strict: bool = False) -> dict:
    """Keyword arguments for `llama_cpp.Llama(model_path, **kwargs)` that reproduce `config`.

    Settings Llama() cannot express (see `llama_kwargs_gaps`) are left out, or with
    strict=True raise ConfigError.
    """
    return python_kwargs(config, strict=strict)


def llama_kwargs_gaps(config: SplitConfig) -> list[str]:
    """Human lines for each setting of `config` that llama_cpp.Llama() cannot express."""
    return python_gaps(config)
