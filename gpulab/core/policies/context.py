"""The largest context that fits: for a model, devices, settings and a free-memory margin, the
largest -c (in common_params_fit's steps of 256 * streams) whose plan leaves every device at least
its margin free; and the table of that context against the KV cache type.

The margin is fit's (-fitt, 1024 MiB per device by default, gpulab.core.policies.server_fit.fit_margins) and what
a device uses is what fit's dry runs count: weights + KV + compute (the planner's numbers; a
runtime overhead learned from NVML, when known, is counted too, as `Plan.fits` does).

Streams: -np N without -kvu is N KV streams, so the step is 256 * N; with -kvu (llama-server's
default: -np auto is 4 slots sharing one unified KV cache, tools/server/server.cpp) it is one
stream and n_ctx is the total the slots share: plan `-np 4 -kvu` for llama-server's defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..config import SplitConfig
from ..devices import Device
from ..errors import ConfigError
from ..placement.planner import plan, select_devices
from ..profile import ModelProfile
from .server_fit import fit_margins

__all__ = ["largest_ctx", "ctx_table", "CtxRow", "KV_TABLE_TYPES"]

KV_TABLE_TYPES = ("f16", "q8_0", "q4_0")


def _fits(profile, devices, config, host, margins) -> bool:
    p = plan(profile, devices, config, host)
    return all(d.free_bytes - d.used_bytes >= m for d, m in zip(p.offload_devices, margins))


def largest_ctx(profile: ModelProfile, devices: list[Device], config: SplitConfig | None = None,
                host: Device | None = None, *, margins_bytes: list[int] | None = None,
                max_ctx: int | None = None) -> int:
    """The largest n_ctx, a multiple of 256 * streams and at most `max_ctx` (default: the
    training context times the streams, fit's n_ctx_max), whose plan leaves each offload device
    `margins_bytes` free (default: the config's -fitt). 0 when not even one step fits.
    The rest of `config` (-ngl, -ts, -ot, KV types) is kept."""
    config = config or SplitConfig()
    used = select_devices(devices, config)
    margins = margins_bytes if margins_bytes is not None else fit_margins(config, len(used))
    streams = config.n_streams
    step = 256 * streams
    top = max_ctx if max_ctx is not None else (profile.n_ctx_train or 4096) * streams
    if top < step:
        raise ConfigError(f"max_ctx {top} is below one step of {step} tokens")
    lo, hi = 0, top // step        # in steps: lo fits (0: nothing yet), hi + 1 does not
    if _fits(profile, devices, replace(config, n_ctx=hi * step), host, margins):
        return hi * step
    hi -= 1
    while lo < hi:               # memory grows with the context: bisect on steps
        mid = (lo + hi + 1) // 2
        if _fits(profile, devices, replace(config, n_ctx=mid * step), host, margins):
            lo = mid
        else:
            hi = mid - 1
    return lo * step


@dataclass(frozen=True)
class CtxRow:
    type_k: str
    type_v: str
    n_ctx: int          # the largest context that fits (0: none)


def ctx_table(profile: ModelProfile, devices: list[Device], config: SplitConfig | None = None,
              host: Device | None = None, *, types: tuple[str, ...] = KV_TABLE_TYPES,
              margins_bytes: list[int] | None = None, max_ctx: int | None = None) -> list[CtxRow]:
    """largest_ctx for each KV cache type (K and V alike; a quantized V needs flash attention, so
    -fa off is turned to auto for those rows, as llama.cpp would refuse them)."""
    config = config or SplitConfig()
    rows = []
    for t in types:
        fa = "auto" if t not in ("f32", "f16", "bf16") and config.flash_attn == "off" else config.flash_attn
        c = replace(config, type_k=t, type_v=t, flash_attn=fa)
        rows.append(CtxRow(t, t, largest_ctx(profile, devices, c, host, margins_bytes=margins_bytes,
                                             max_ctx=max_ctx)))
    return rows
