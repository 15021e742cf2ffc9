"""Fit's dry runs made by llama.cpp itself: a `measure` for gpulab.core.policies.server_fit.server_fit that loads
the model with `no_alloc` in a worker, as common_get_device_memory_data does (common/fit.cpp).

gpulab's fit plans each dry run (milliseconds); where a decision lies within the compute-buffer
estimate's uncertainty (FitResult.near_boundary) this gives llama.cpp's own numbers instead, on
the devices present (seconds: one no_alloc load per dry run). Weights and KV are the planner's (a
dry run logs them as 0.00 MiB, and they are exact); compute buffers are what llama.cpp's dry run
reports, which is also what its fit counts (with pipeline parallelism more than a real load
allocates, see gpulab.core.placement.compute.dry_run_extra_bytes).

    from gpulab.runtime.fit_dry_run import dry_run_measure
    with Worker(endpoints) as w:
        r = server_fit(profile, devices, config, measure=dry_run_measure(w, path, profile, devices))
"""

from __future__ import annotations

import os
from collections.abc import Callable

from ..core.config import SplitConfig
from ..core.devices import Device
from ..core.placement.planner import plan
from ..core.profile import ModelProfile

__all__ = ["dry_run_measure"]


def dry_run_measure(worker, path: str | os.PathLike, profile: ModelProfile, devices: list[Device],
                    host: Device | None = None) -> Callable[[SplitConfig], list[int]]:
    """measure(config) -> model + context + compute bytes of each device the config uses, the
    compute buffers from a no_alloc load of `path` in `worker` (a gpulab Worker)."""
    def measure(config: SplitConfig) -> list[int]:
        report, _ = worker.load(path, config, dry_run=True, check_fit=False)
        compute = report.kinds_by_device()
        p = plan(profile, devices, config, host)
        return [d.weights_bytes + d.kv_bytes + d.state_bytes + compute.get(d.name, {}).get("compute", 0)
                for d in p.offload_devices]
    return measure
