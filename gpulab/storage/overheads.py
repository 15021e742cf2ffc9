"""Runtime overhead learned per GPU: what NVML shows beyond llama.cpp's buffers (CUDA context,
cuBLAS workspaces, the memory pool), kept per device UUID in <data dir>/overhead/<uuid>.json.

    learn_overhead(run)          # after a run with NVML figures (gpulab.runtime.bench does this)
    learned_overhead(device)     # the median of the recent observations; 0 when none

The session (gpulab.runtime.session) puts it on each Device as `overhead_bytes`, and the planner
counts it in DevicePlan.overhead_bytes, so that "fits" means fits in what NVML will show.
CPU and RPC devices learn nothing (no NVML there).
"""

from __future__ import annotations

import statistics
from pathlib import Path

from ..core.measure.reconcile import Reconciliation, reconcile
from ..core.measure.results import BenchRun
from ..core.run import Run
from .files import read_json, write_json
from .paths import data_dir

__all__ = ["learn_overhead", "learned_overhead", "overhead_path"]

_MAX_SAMPLES = 20


def overhead_path(uuid: str) -> Path:
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in uuid)
    return data_dir() / "overhead" / f"{safe}.json"


def learned_overhead(device) -> int:
    """The overhead learned for a device (a Device with a uuid, or a UUID string), 0 if none."""
    key = device if isinstance(device, str) else (getattr(device, "uuid", "") or "")
    if not key:
        return 0
    data = read_json(overhead_path(key), {})
    samples = [int(x) for x in (data.get("samples", []) if isinstance(data, dict) else [])
               if isinstance(x, (int, float))]
    return int(statistics.median(samples)) if samples else 0


def learn_overhead(run: Run, rec: Reconciliation | None = None) -> dict[str, int]:
    """Record the overhead each NVML-measured device of `run` showed, by device UUID.

    Returns {device name: learned overhead after this observation}; devices without NVML or
    without a known UUID (the run must be a BenchRun with device_uuids) are left out."""
    rec = rec or reconcile(run)
    uuids = run.device_uuids if isinstance(run, BenchRun) else {}
    out = {}
    for name, over in rec.overhead_bytes.items():
        uid = uuids.get(name)
        if not uid or over < 0:
            continue
        path = overhead_path(uid)
        data = read_json(path, {})
        samples = list(data.get("samples", []) if isinstance(data, dict) else [])[-(_MAX_SAMPLES - 1):] + [int(over)]
        write_json(path, {"uuid": uid, "name": name, "samples": samples,
                          "overhead_bytes": int(statistics.median(samples))}, indent=None)
        out[name] = int(statistics.median(samples))
    return out
