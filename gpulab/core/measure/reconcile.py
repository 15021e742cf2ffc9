"""Reconciliation: predicted (the Plan), llama.cpp-reported (its log) and NVML-measured memory,
per device and per term, with the errors; and the runtime overhead learned per device.

    rec = reconcile(run)                  # run.plan is the prediction the run carries
    rec = reconcile(run, plan)            # or a Plan / PlannedMemory for the same config
    rec.rows                              # TermRow(device, term, predicted, reported, measured)
    print(rec.text())

Terms: 'weights' (model buffers), 'kv' (KV cache), 'compute' (scheduler compute buffers),
'output' (logits/embeddings buffer; the planner does not model it: predicted None),
'overhead' (what a GPU holds beyond llama.cpp's buffers: CUDA context, cuBLAS workspace, pool;
measured = NVML - the buffers llama.cpp reported; unknown without NVML, i.e. on the CPU and
RPC devices), and 'total'.

The overheads measured here are kept per GPU by gpulab.storage.overheads and come back to the
planner as Device.overhead_bytes. Pure: no files, no environment. Host weights: llama.cpp maps the
whole tensor-data range of the file on the CPU ('CPU_Mapped'), so its host 'model' figure includes
bytes of layers placed elsewhere; the row says so in `note`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..memory import DevicePlan, PlannedMemory
from ..run import Run
from ..units import format_bytes
from .results import BenchRun

__all__ = ["TermRow", "Reconciliation", "reconcile", "as_planned_memory", "comparison_rows", "TERMS"]

TERMS = ("weights", "kv", "state", "compute", "output", "overhead", "total")
_KIND = {"weights": "model", "kv": "kv", "state": "state", "compute": "compute", "output": "output"}
_PLAN_KEY = {"weights": "weights_bytes", "kv": "kv_bytes", "state": "state_bytes", "compute": "compute_bytes"}


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


def as_planned_memory(plan) -> PlannedMemory | None:
    """A Plan (live), a PlannedMemory (a run's) or its stored dict, as the one type reconcile reads."""
    if plan is None or isinstance(plan, PlannedMemory):
        return plan
    if isinstance(plan, dict):
        return PlannedMemory.from_dict(plan)
    return plan.memory()


def _plan_devices(plan: PlannedMemory | None) -> dict[str, DevicePlan]:
    if plan is None:
        return {}
    out = {d.name: d for d in plan.devices}
    if plan.meta_device:
        out[plan.meta_device] = _meta_row(plan.meta_device, [out[n] for n in plan.meta_members])
    return out


def _meta_row(name: str, members: list[DevicePlan]) -> DevicePlan:
    """-sm tensor: llama.cpp logs each buffer of the Meta() device at its largest member's size
    (ggml_backend_meta_alloc_ctx_tensors_from_buft); the prediction of that line."""
    return DevicePlan(name, 0, 0, max(m.weights_bytes for m in members), max(m.kv_bytes for m in members),
                      max(m.compute_bytes for m in members))


_META_NOTE = ("-sm tensor: llama.cpp logs one Meta() device, each buffer the size of its largest member's; the "
              "members have no line of their own (their own allocations: gpulab.runtime.rpc.server_buffers)")


def reconcile(run: Run, plan=None) -> Reconciliation:
    """The error table for `run` against `plan` (default: the plan the run carries)."""
    plan = as_planned_memory(run.plan if plan is None else plan)
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
    if any(n.startswith("Meta(") for n in names):
        notes.append(_META_NOTE)
    rows: list[TermRow] = []
    overheads: dict[str, int] = {}
    no_nvml = [n for n in names if n not in nvml]
    for name in names:
        p = pdevs.get(name)
        kinds = by_dev.get(name, {})
        measured_total = nvml.get(name)
        reported_total = sum(kinds.values()) if kinds else (0 if name in by_dev else None)
        for term in ("weights", "kv", "state", "compute", "output"):
            pred = getattr(p, _PLAN_KEY[term]) if (p is not None and term in _PLAN_KEY) else None
            rep = kinds.get(_KIND[term], 0) if name in by_dev else None
            if term == "state" and not pred and not rep:    # a row only for models with recurrent layers
                continue
            note = ""
            if term == "weights" and name == "CPU":
                note = "llama.cpp maps the file's whole tensor data on the host (CPU_Mapped)"
            if term == "output" and pred is None:
                note = "not modelled by the planner"
            rows.append(TermRow(name, term, pred, rep, None, note))
        pred_over = p.overhead_bytes if p is not None else None
        if measured_total is not None and reported_total is not None:
            over = measured_total - reported_total
            overheads[name] = over
            rows.append(TermRow(name, "overhead", pred_over, None, over, "NVML minus llama.cpp's buffers"))
        else:
            why = ("no NVML on the CPU and RPC devices: overhead unknown" if name == "CPU" or name.startswith("RPC")
                   else "no NVML figure for this device: overhead unknown")
            rows.append(TermRow(name, "overhead", pred_over, None, None, why))
        pred_total = p.used_bytes if p is not None else None
        rows.append(TermRow(name, "total", pred_total, reported_total, measured_total,
                            "" if measured_total is not None else "llama.cpp's buffers only"))
    if no_nvml:
        notes.append(f"no NVML figures for {', '.join(no_nvml)}: runtime overhead unknown there "
                     "(NVML measures NVIDIA GPUs only; the CPU and RPC devices have none)")
    if isinstance(run, BenchRun) and run.nvml_peak_bytes and not run.nvml_per_process:
        notes.append("NVML gave no per-process usage: measured = device used minus used before the load, "
                     "which also counts other processes")
    return Reconciliation(rows=tuple(rows), notes=tuple(notes), overhead_bytes=overheads)


def comparison_rows(plan, run: Run) -> list[dict]:
    """Per device, for people: predicted weights/KV/compute against llama.cpp's buffers (and the
    NVML peak where there is one), with the relative error of the total."""
    kinds = run.report.kinds_by_device()
    rows = []
    devices = list(plan.devices)
    if plan.tensor_parallel is not None:     # the line llama.cpp logs: the largest member's buffers
        devices.insert(len(devices) - 1, _meta_row(plan.tensor_parallel.meta_name,
                                                   [d for d in devices if d.name in plan.tensor_parallel.devices]))
    for d in devices:
        k = kinds.get(d.name, {})
        got = sum(k.values())
        row = {"device": d.name, "predicted": format_bytes(d.used_bytes),
               "llama.cpp": format_bytes(got) if k else "-",
               "weights pred/llama": f"{format_bytes(d.weights_bytes)} / {format_bytes(k.get('model', 0))}",
               "KV pred/llama": f"{format_bytes(d.kv_bytes)} / {format_bytes(k.get('kv', 0))}",
               "compute pred/llama": f"{format_bytes(d.compute_bytes)} / "
                                     f"{format_bytes(k.get('compute', 0) + k.get('output', 0))}",
               "error": (f"{(d.used_bytes - got) / got * 100:+.1f}%" if got else "-")}
        nv = (run.nvml_peak_bytes or {}).get(d.name)
        if nv is not None:
            row["NVML peak"] = format_bytes(nv)
        rows.append(row)
    return rows
