"""The one translation point from a `SplitConfig` to llama.cpp.

`llama_params` fills llama.cpp's own structs (llama_model_params, llama_context_params) for an
in-process load, walking `FIELDS`. `llama_kwargs` gives the keyword arguments of
`llama_cpp.Llama(...)`: it is the 'python' column of `gpulab.core.exports.SPELLINGS`, the table
every export (llama-server, llama-bench, Ollama, KoboldCpp) is rendered from, so a setting
cannot be spelled one way here and another way there. Where `Llama()` has no keyword for a
setting, that table says so and `llama_kwargs_gaps` names it.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..core.config import SplitConfig
from ..core.devices import Device
from ..core.exports import FLASH_ATTN_IDS, SPLIT_MODE_IDS, python_gaps, python_kwargs
from ..core.ggml_types import ggml_type_id
from ..errors import ConfigError

__all__ = ["FIELDS", "Field", "llama_params", "llama_kwargs", "llama_kwargs_gaps",
           "SPLIT_MODE_IDS", "FLASH_ATTN_IDS"]

_LOAD_MODE_NONE = 0  # enum llama_load_mode (include/llama.h): LLAMA_LOAD_MODE_NONE


def _same(v, _c=None):
    return v


@dataclass(frozen=True)
class Field:
    attr: str                    # SplitConfig attribute
    flag: str                    # llama.cpp command-line flag
    struct: str                  # 'model' (llama_model_params) or 'context' (llama_context_params)
    c_name: str | None           # field of that struct; None: set by special code (arrays)
    to_c: Callable[..., Any]     # value -> C field value


FIELDS: tuple[Field, ...] = (
    Field("n_gpu_layers", "-ngl", "model", "n_gpu_layers", int),
    Field("split_mode", "-sm", "model", "split_mode", SPLIT_MODE_IDS.__getitem__),
    Field("main_gpu", "-mg", "model", "main_gpu", int),
    Field("tensor_split", "-ts", "model", None, _same),
    Field("devices", "--device", "model", None, _same),
    Field("n_ctx", "-c", "context", "n_ctx", int),
    Field("n_batch", "-b", "context", "n_batch", int),
    Field("n_ubatch", "-ub", "context", "n_ubatch", int),
    Field("type_k", "-ctk", "context", "type_k", ggml_type_id),
    Field("type_v", "-ctv", "context", "type_v", ggml_type_id),
    Field("flash_attn", "-fa", "context", "flash_attn_type", FLASH_ATTN_IDS.__getitem__),
    Field("offload_kqv", "-nkvo", "context", "offload_kqv", bool),
    Field("n_seq_max", "-np", "context", "n_seq_max", int),
    Field("swa_full", "--swa-full", "context", "swa_full", bool),
)


def _check_fields_cover_config() -> None:
    from dataclasses import fields as dc_fields
    missing = {f.name for f in dc_fields(SplitConfig)} - {f.attr for f in FIELDS}
    if missing:  # a new SplitConfig setting must be mapped here before it can be used
        raise RuntimeError(f"gpulab.runtime.params.FIELDS does not map SplitConfig.{sorted(missing)}")


def _n_offload_devices(config: SplitConfig, devices: list[Device] | None) -> int | None:
    if config.devices:
        return 0 if tuple(config.devices) == ("none",) else len(config.devices)
    if devices is None:
        return None
    offload = [d for d in devices if d.kind in ("rpc", "gpu")]
    if not offload:  # iGPUs count only when there is no discrete GPU (llama_prepare_model_devices)
        offload = [d for d in devices if d.kind == "igpu"]
    return len(offload)


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
    from .llama_lib import device_handle, ggml, llama_cpp

    _check_fields_cover_config()
    lc = llama_cpp()
    g = ggml()
    if devices is not None and config.devices and tuple(config.devices) != ("none",):
        known = {d.name for d in devices}
        missing = [n for n in config.devices if n not in known]
        if missing:
            raise ConfigError(f"--device {', '.join(missing)}: llama.cpp has no such device; it has "
                              f"{', '.join(sorted(known)) or 'none'}")
    n_off = _n_offload_devices(config, devices)
    if n_off is not None:
        config.check_devices(n_off)

    mp = lc.llama_model_default_params()
    cp = lc.llama_context_default_params()
    keep: list[Any] = []
    for f in FIELDS:
        value = getattr(config, f.attr)
        target = mp if f.struct == "model" else cp
        if f.c_name is not None:
            setattr(target, f.c_name, f.to_c(value))
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
                handles = [] if tuple(value) == ("none",) else [device_handle(n) for n in value]
                for name, h in zip(value, handles):
                    if g.ggml_backend_dev_type(h) == 0:   # GGML_BACKEND_DEVICE_TYPE_CPU
                        raise ConfigError(f"--device {name}: the CPU is not an offload device; layers "
                                          "not offloaded stay on it anyway (use -ngl, or --device none)")
                arr = (ctypes.c_void_p * (len(handles) + 1))(*handles, None)
                mp.devices = ctypes.cast(arr, ctypes.c_void_p).value
                keep.append(arr)
        else:  # pragma: no cover - a Field without c_name must be handled above
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
