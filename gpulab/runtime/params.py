"""The one translation point from a `SplitConfig` to llama.cpp.

`llama_params` fills llama.cpp's own structs (llama_model_params, llama_context_params) for an
in-process load; `llama_kwargs` gives the keyword arguments of `llama_cpp.Llama(...)` for
exports. Both walk the same table, `FIELDS`, so a setting cannot be mapped one way here and
another way there. Where `Llama()` has no keyword for a setting, the table says so and
`llama_kwargs_gaps` names it.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..core.config import SplitConfig
from ..core.devices import Device
from ..core.ggml_types import ggml_type_id
from ..errors import ConfigError

__all__ = ["FIELDS", "Field", "llama_params", "llama_kwargs", "llama_kwargs_gaps",
           "SPLIT_MODE_IDS", "FLASH_ATTN_IDS"]

# enum llama_split_mode (include/llama.h)
SPLIT_MODE_IDS = {"none": 0, "layer": 1, "row": 2}
# enum llama_flash_attn_type (include/llama.h): AUTO = -1, DISABLED = 0, ENABLED = 1
FLASH_ATTN_IDS = {"auto": -1, "off": 0, "on": 1}
_LOAD_MODE_NONE = 0  # enum llama_load_mode (include/llama.h): LLAMA_LOAD_MODE_NONE


class _Gap:
    """A value llama_cpp.Llama() cannot express; `why` says what it does instead."""

    def __init__(self, why: str):
        self.why = why


def _same(v, _c=None):
    return v


@dataclass(frozen=True)
class Field:
    attr: str                    # SplitConfig attribute
    flag: str                    # llama.cpp command-line flag
    struct: str                  # 'model' (llama_model_params) or 'context' (llama_context_params)
    c_name: str | None           # field of that struct; None: set by special code (arrays)
    to_c: Callable[..., Any]     # value -> C field value
    kwarg: str | None            # llama_cpp.Llama keyword; None: Llama() has none
    to_kwarg: Callable[..., Any]  # value -> keyword value, or a _Gap


def _ts_kwarg(ts, _c=None):
    return list(ts) if ts else None


def _fa_kwarg(mode, _c=None):
    # Llama(flash_attn: bool) sets LLAMA_FLASH_ATTN_TYPE_ENABLED or _DISABLED: no 'auto'
    if mode == "auto":
        return _Gap("flash_attn='auto' (-fa auto): Llama() takes flash_attn as a bool, on or off; "
                    "without it Llama() turns flash attention off")
    return mode == "on"


def _devices_kwarg(devs, _c=None):
    if devs:
        return _Gap(f"devices={list(devs)} (--device): Llama() has no keyword for it and uses "
                    "every device llama.cpp finds")
    return None


def _seq_kwarg(n, _c=None):
    if n != 1:
        return _Gap(f"n_seq_max={n} (-np): Llama() has no keyword for it and uses 1")
    return None


FIELDS: tuple[Field, ...] = (
    Field("n_gpu_layers", "-ngl", "model", "n_gpu_layers", int, "n_gpu_layers", int),
    Field("split_mode", "-sm", "model", "split_mode", SPLIT_MODE_IDS.__getitem__, "split_mode",
          SPLIT_MODE_IDS.__getitem__),
    Field("main_gpu", "-mg", "model", "main_gpu", int, "main_gpu", int),
    Field("tensor_split", "-ts", "model", None, _same, "tensor_split", _ts_kwarg),
    Field("devices", "--device", "model", None, _same, None, _devices_kwarg),
    Field("n_ctx", "-c", "context", "n_ctx", int, "n_ctx", int),
    Field("n_batch", "-b", "context", "n_batch", int, "n_batch", int),
    Field("n_ubatch", "-ub", "context", "n_ubatch", int, "n_ubatch", int),
    Field("type_k", "-ctk", "context", "type_k", ggml_type_id, "type_k", ggml_type_id),
    Field("type_v", "-ctv", "context", "type_v", ggml_type_id, "type_v", ggml_type_id),
    Field("flash_attn", "-fa", "context", "flash_attn_type", FLASH_ATTN_IDS.__getitem__,
          "flash_attn", _fa_kwarg),
    Field("offload_kqv", "-nkvo", "context", "offload_kqv", bool, "offload_kqv", bool),
    Field("n_seq_max", "-np", "context", "n_seq_max", int, None, _seq_kwarg),
    Field("swa_full", "--swa-full", "context", "swa_full", bool, "swa_full", bool),
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


def _kwarg_items(config: SplitConfig):
    _check_fields_cover_config()
    for f in FIELDS:
        value = getattr(config, f.attr)
        kw = f.to_kwarg(value)
        yield f, kw


def llama_kwargs(config: SplitConfig, *, strict: bool = False) -> dict:
    """Keyword arguments for `llama_cpp.Llama(model_path, **kwargs)` that reproduce `config`.

    Settings Llama() cannot express (see `llama_kwargs_gaps`) are left out, or with
    strict=True raise ConfigError.
    """
    out: dict[str, Any] = {}
    gaps = []
    for f, kw in _kwarg_items(config):
        if isinstance(kw, _Gap):
            gaps.append(kw.why)
        elif f.kwarg is not None and kw is not None:
            out[f.kwarg] = kw
    if strict and gaps:
        raise ConfigError("llama_cpp.Llama() cannot express " + "; ".join(gaps))
    return out


def llama_kwargs_gaps(config: SplitConfig) -> list[str]:
    """Human lines for each setting of `config` that llama_cpp.Llama() cannot express."""
    return [kw.why for _, kw in _kwarg_items(config) if isinstance(kw, _Gap)]
