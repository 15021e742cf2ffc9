"""Reconciliation: predicted (the Plan), llama.cpp-reported (its log) and NVML-measured memory,
per device and per term, with the errors; and the runtime overhead learned per device.

    rec = reconcile(run)                  # run.plan is the prediction the run carries
    rec = reconcile(run, plan)            # or any Plan / Plan.to_dict() for the same config
    rec.rows                              # TermRow(device, term, predicted, reported, measured)
    print(rec.text())

Terms: 'weights' (model buffers), 'kv' (KV cache), 'compute' (scheduler compute buffers),
'output' (logits/embeddings buffer; the planner does not model it: predicted None),
'overhead' (what a GPU holds beyond llama.cpp's buffers: CUDA context, cuBLAS workspace, pool;
measured = NVML - the buffers llama.cpp reported; unknown without NVML, i.e. on the CPU and
RPC devices), and 'total'.

Learned overhead: `learn_overhead(run)` keeps each GPU's measured overhead in a small JSON file
per device UUID under <data dir>/overhead/, and `learned_overhead(device)` gives the median of
the recent observations (0 when there are none), for the planner's DevicePlan.overhead_bytes.

Standard library only. Host weights: llama.cpp maps the whole tensor-data range of the file on
the CPU ('CPU_Mapped'), so its host 'model' figure includes bytes of layers placed elsewhere;
the row says so in `note`.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .results import BenchRun, data_dir
from .run import Run

__all__ = ["TermRow", "Reconciliation", "reconcile", "learn_overhead", "learned_overhead", "overhead_path",
           "TERMS"]

TERMS = ("weights", "kv", "compute", "output", "overhead", "total")
_KIND = {"weights": "model", "kv": "kv", "compute": "compute", "output": "output"}
_PLAN_KEY = {"weights": "weights_bytes", "kv": "kv_bytes", "compute": "compute_bytes"}
_MAX_SAMPLES = 20


@dataclass(frozen=True)
class TermRow:
    device: str
    term: str                   # one of TERMS
    predicted: int | None       # the plan (None: not modelled)
    reported: int | None        # llama.cpp's log (None: llama.cpp does not report it)
    measured: int | None        # NVML (None: no NVML for this device)
    note: str = ""

    @property
    def error_bytes(self) -> int | None:
        """predicted - actual, actual being NVML's figure where there is one, else llama.cpp's."""
        actual = self.actual
        if self.predicted is None or actual is None:
            return None
        return self.predicted - actual

    @property
    def actual(self) -> int | None:
        return self.measured if self.measured is not None else self.reported

    @property
    def rel_error(self) -> float | None:
        """error_bytes / actual (None when either is unknown or actual is 0)."""
        e, a = self.error_bytes, self.actual
        if e is None or not a:
            return None
        return e / a

    @property
    def reported_error_bytes(self) -> int | None:
        if self.predicted is None or self.reported is None:
            return None
        return self.predicted - self.reported


@dataclass(frozen=True)
class Reconciliation:
    rows: tuple[TermRow, ...]
    notes: tuple[str, ...]
    overhead_bytes: dict          # device -> measured overhead (only devices NVML measured)

    def row(self, device: str, term: str) -> TermRow:
        for r in self.rows:
            if r.device == device and r.term == term:
                return r
        raise KeyError((device, term))

    def devices(self) -> list[str]:
        return list(dict.fromkeys(r.device for r in self.rows))

    def table(self) -> list[dict]:
        """Plain rows (bytes as ints, relative errors as floats) for JSON, pandas, widgets."""
        return [{"device": r.device, "term": r.term, "predicted": r.predicted, "reported": r.reported,
                 "measured": r.measured, "error_bytes": r.error_bytes, "rel_error": r.rel_error, "note": r.note}
                for r in self.rows]

    def text(self) -> str:
        """An aligned table with MiB figures, then the notes."""
        def mib(v):
            return "-" if v is None else f"{v / 1048576:.2f}"

        def pct(v):
            return "-" if v is None else f"{100 * v:+.1f}%"
        head = ("device", "term", "predicted MiB", "llama.cpp MiB", "NVML MiB", "error MiB", "error")
        rows = [head] + [(r.device, r.term, mib(r.predicted), mib(r.reported), mib(r.measured),
                          mib(r.error_bytes), pct(r.rel_error)) for r in self.rows]
        widths = [max(len(x[i]) for x in rows) for i in range(len(head))]
        lines = ["  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(x, widths))).rstrip()
                 for x in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def _plan_devices(plan) -> dict[str, dict]:
    if plan is None:
        return {}
    d = plan if isinstance(plan, dict) else plan.to_dict()
    out = {}
    for dev in d.get("devices", []):
        out[dev["name"]] = dev
    if not isinstance(plan, dict):   # a Plan object also knows the overhead it assumed
        for dp in plan.devices:
            out[dp.name]["overhead_bytes"] = dp.overhead_bytes
    return out


def reconcile(run: Run, plan=None) -> Reconciliation:
    """The error table for `run` against `plan` (default: the plan the run carries)."""
    plan = run.plan if plan is None else plan
    pdevs = _plan_devices(plan)
    report = run.report
    by_dev = report.kinds_by_device()
    names = list(dict.fromkeys([*pdevs, *by_dev]))
    if "CPU" in names:   # the host last, as in plans and reports
        names = [n for n in names if n != "CPU"] + ["CPU"]
    nvml = dict(run.nvml_peak_bytes)
    notes: list[str] = []
    if plan is None:
        notes.append("the run carries no plan: predicted figures are missing")
    rows: list[TermRow] = []
    overheads: dict[str, int] = {}
    no_nvml = [n for n in names if n not in nvml]
    for name in names:
        p = pdevs.get(name)
        kinds = by_dev.get(name, {})
        measured_total = nvml.get(name)
        reported_total = sum(kinds.values()) if kinds else (0 if name in by_dev else None)
        for term in ("weights", "kv", "compute", "output"):
            pred = p.get(_PLAN_KEY[term]) if (p is not None and term in _PLAN_KEY) else None
            rep = kinds.get(_KIND[term], 0) if name in by_dev else None
            note = ""
            if term == "weights" and name == "CPU":
                note = "llama.cpp maps the file's whole tensor data on the host (CPU_Mapped)"
            if term == "output" and pred is None:
                note = "not modelled by the planner"
            rows.append(TermRow(name, term, pred, rep, None, note))
        pred_over = p.get("overhead_bytes", 0) if p is not None else None
        if measured_total is not None and reported_total is not None:
            over = measured_total - reported_total
            overheads[name] = over
            rows.append(TermRow(name, "overhead", pred_over, None, over, "NVML minus llama.cpp's buffers"))
        else:
            why = ("no NVML on the CPU and RPC devices: overhead unknown" if name == "CPU" or name.startswith("RPC")
                   else "no NVML figure for this device: overhead unknown")
            rows.append(TermRow(name, "overhead", pred_over, None, None, why))
        pred_total = p.get("used_bytes") if p is not None else None
        if p is not None and pred_total is None:
            pred_total = sum(p.get(k, 0) for k in ("weights_bytes", "kv_bytes", "compute_bytes", "overhead_bytes"))
        rows.append(TermRow(name, "total", pred_total, reported_total, measured_total,
                            "" if measured_total is not None else "llama.cpp's buffers only"))
    if no_nvml:
        notes.append(f"no NVML figures for {', '.join(no_nvml)}: runtime overhead unknown there "
                     "(NVML measures NVIDIA GPUs only; the CPU and RPC devices have none)")
    if isinstance(run, BenchRun) and run.nvml_peak_bytes and not run.nvml_per_process:
        notes.append("NVML gave no per-process usage: measured = device used minus used before the load, "
                     "which also counts other processes")
    return Reconciliation(rows=tuple(rows), notes=tuple(notes), overhead_bytes=overheads)


# --- learned overhead -------------------------------------------------------------------------

def overhead_path(uuid: str) -> Path:
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in uuid)
    return data_dir() / "overhead" / f"{safe}.json"


def _device_key(device) -> str:
    """The UUID of a Device (or a UUID string)."""
    if isinstance(device, str):
        return device
    return getattr(device, "uuid", "") or ""


def learned_overhead(device) -> int:
    """The runtime overhead learned for a device (a Device with a uuid, or a UUID string):
    the median of its recent observations, 0 when nothing was learned (CPU, RPC, a new GPU)."""
    key = _device_key(device)
    if not key:
        return 0
    try:
        data = json.loads(overhead_path(key).read_text())
    except (OSError, ValueError):
        return 0
    samples = [int(x) for x in data.get("samples", []) if isinstance(x, (int, float))]
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
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = {}
        samples = list(data.get("samples", []))[-(_MAX_SAMPLES - 1):] + [int(over)]
        data = {"uuid": uid, "name": name, "samples": samples, "overhead_bytes": int(statistics.median(samples))}
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".overhead-")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)    # whole file or the old one, never half of it
        out[name] = data["overhead_bytes"]
    return out
