"""Results in llama-bench's terms: Run <-> JSON and llama-bench records (printed by
gpulab.core.measure.llama_bench, stored by gpulab.storage.results).

    records = to_llama_bench_records(run)         # one per test (pp, tg), llama-bench's JSON fields
    d = run_to_dict(run); run_from_dict(d) == run # plain JSON for the worker and the store

A record has exactly the fields of llama-bench's JSON output (`test::get_fields()` in the
vendored tools/llama-bench/llama-bench.cpp, then samples_ns and samples_ts), with llama-bench's
types and formats (tensor_split as '3.00/1.00', flash_attn as -1/0/1, type_k as 'f16'), plus one
key "gpulab": the plan, the buffers llama.cpp reported, NVML peaks and gpulab's own fields.
Tools that read llama-bench JSON ignore the extra key.

Standard library only, like the rest of gpulab.core.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from datetime import datetime, timezone

from ..config import SplitConfig, config_from_dict, config_to_dict
from ..memory import PlannedMemory
from ..report import LoadReport
from ..run import Run, Throughput

__all__ = [
    "BenchRun", "run_to_dict", "run_from_dict", "to_llama_bench_records", "runs_from_records",
    "LLAMA_BENCH_FIELDS", "LLAMA_BENCH_SAMPLE_FIELDS", "INT_FIELDS", "BOOL_FIELDS", "FLOAT_FIELDS",
    "format_tensor_split", "throughput_from_samples", "stored_fingerprint",
]

# test::get_fields() of the vendored llama-bench.cpp, in order (tests/runtime/test_bench_results.py
# checks this copy against the source when the sdist is at hand). The JSON printers then add
# the two sample lists.
LLAMA_BENCH_FIELDS: tuple[str, ...] = (
    "build_commit", "build_number", "cpu_info", "gpu_info", "backends",
    "model_filename", "model_type", "model_size", "model_n_params", "n_batch",
    "n_ubatch", "n_threads", "cpu_mask", "cpu_strict", "poll",
    "type_k", "type_v", "n_gpu_layers", "n_cpu_moe", "split_mode",
    "main_gpu", "no_kv_offload", "flash_attn", "devices", "tensor_split",
    "tensor_buft_overrides", "load_mode", "lazy_mode",
    "embeddings",
    "no_op_offload", "no_host", "repack", "fit_target", "fit_min_ctx",
    "n_prompt", "n_gen", "n_depth",
    "test_time", "avg_ns", "stddev_ns", "avg_ts", "stddev_ts",
)
LLAMA_BENCH_SAMPLE_FIELDS = ("samples_ns", "samples_ts")

# test::get_field_type: everything else is a string
INT_FIELDS = frozenset({
    "build_number", "n_batch", "n_ubatch", "n_threads", "poll", "model_size", "model_n_params",
    "n_gpu_layers", "main_gpu", "n_prompt", "n_gen", "n_depth", "avg_ns", "stddev_ns", "no_op_offload",
    "n_cpu_moe", "fit_target", "fit_min_ctx", "flash_attn"})
BOOL_FIELDS = frozenset({"no_kv_offload", "cpu_strict", "embeddings", "no_host", "repack"})
FLOAT_FIELDS = frozenset({"avg_ts", "stddev_ts"})

_FLASH_ATTN_INT = {"auto": -1, "off": 0, "on": 1}   # enum llama_flash_attn_type


@dataclass(frozen=True)
class BenchRun(Run):
    """A Run measured by gpulab.runtime.bench, with what llama-bench's records also need.

    Every field has a default, so a BenchRun is a Run wherever one is expected.
    """

    model_type: str = ""               # llama_model_desc: 'llama 135M Q4_1'
    model_n_params: int = 0            # llama_model_n_params
    model_fingerprint: str = ""        # the GGUF's fingerprint (gpulab.sources.fingerprint)
    cpu_info: str = ""                 # llama-bench get_cpu_info: CPU/ACCEL device descriptions
    gpu_info: str = ""                 # llama-bench get_gpu_info: GPU/IGPU device descriptions
    backends: str = ""                 # llama-bench test::get_backend: 'CPU', 'CUDA', 'RPC', ...
    system_info: str = ""              # llama_print_system_info
    context_seconds: float = 0.0       # llama_init_from_model (also inside load_seconds)
    warmup: bool = True
    # NVML: device name -> UUID, and used bytes per device before the load (the baseline the
    # peaks are taken against when the driver does not report this process's own usage)
    device_uuids: dict = field(default_factory=dict)
    nvml_baseline_bytes: dict = field(default_factory=dict)
    nvml_per_process: bool = False     # nvml_peak_bytes is this process's own usage (else device used - baseline)
    run_id: str = ""                   # groups a run's records in the store
    notes: tuple[str, ...] = ()


# --- statistics as llama-bench computes them ------------------------------------------------

def _mean(v):
    return sum(v) / len(v) if v else 0.0


def _stdev(v) -> float:
    """Sample standard deviation (n - 1), 0 for fewer than two samples (llama-bench's stdev)."""
    if len(v) <= 1:
        return 0.0
    m = _mean(v)
    return math.sqrt(max(0.0, sum((x - m) ** 2 for x in v) / (len(v) - 1)))


def throughput_from_samples(n_prompt: int, n_gen: int, samples_ns) -> Throughput:
    """A Throughput from wall times, as llama-bench's test::get_ts: 1e9 * (n_prompt + n_gen) / ns."""
    ns = tuple(int(x) for x in samples_ns)
    ts = tuple(1e9 * (n_prompt + n_gen) / x for x in ns)
    return Throughput(n_prompt=n_prompt, n_gen=n_gen, samples_ns=ns, samples_ts=ts,
                      avg_ts=_mean(ts), stddev_ts=_stdev(ts))


# --- Run <-> dict -----------------------------------------------------------------------------

def _throughput_dict(t: Throughput | None):
    return None if t is None else {"n_prompt": t.n_prompt, "n_gen": t.n_gen, "samples_ns": list(t.samples_ns),
                                   "samples_ts": list(t.samples_ts), "avg_ts": t.avg_ts, "stddev_ts": t.stddev_ts}


def _throughput(d) -> Throughput | None:
    if d is None:
        return None
    return Throughput(n_prompt=d["n_prompt"], n_gen=d["n_gen"], samples_ns=tuple(d["samples_ns"]),
                      samples_ts=tuple(d["samples_ts"]), avg_ts=d["avg_ts"], stddev_ts=d["stddev_ts"])


def _overrides_str(c: SplitConfig) -> str:
    """llama-bench's tensor_buft_overrides field (cmd_params_instance::get_values): the -ot rules as
    PATTERN=BUFFER_TYPE joined by ';', or 'none'. --n-cpu-moe has its own field; --cpu-moe and
    --n-cpu-ffn, which llama-bench lacks, are written as the rules they stand for."""
    from ..overrides import effective_rules
    rules = [r for r in effective_rules(c) if r.source != "-ncmoe"]
    return ";".join(r.text for r in rules) or "none"


_RUN_FIELDS = tuple(f.name for f in fields(Run))
_BENCH_FIELDS = tuple(f.name for f in fields(BenchRun) if f.name not in _RUN_FIELDS)


def run_to_dict(run: Run, *, include_log: bool = True) -> dict:
    """Plain JSON types. `include_log=False` leaves out llama.cpp's log (tens of KiB to MiB)."""
    report = run.report.to_dict()
    if not include_log:
        report["log"] = ""
    d = {"model_path": run.model_path, "model_bytes": run.model_bytes, "config": config_to_dict(run.config),
         "report": report, "pp": _throughput_dict(run.pp), "tg": _throughput_dict(run.tg),
         "load_seconds": run.load_seconds, "n_threads": run.n_threads, "devices": list(run.devices),
         "nvml_peak_bytes": dict(run.nvml_peak_bytes), "plan": _plan_dict(run), "timestamp": run.timestamp,
         "build": run.build}
    if isinstance(run, BenchRun):
        for name in _BENCH_FIELDS:
            v = getattr(run, name)
            d[name] = list(v) if isinstance(v, tuple) else v
    return d


def stored_fingerprint(g: dict) -> str:
    """The model fingerprint of a stored record's "gpulab" object (records written before the field
    was named model_fingerprint call it model_hash)."""
    return g.get("model_fingerprint") or g.get("model_hash", "")


def _plan_dict(run: Run) -> dict | None:
    return run.plan.to_dict() if run.plan is not None else None


def run_from_dict(d: dict) -> Run:
    """Inverse of run_to_dict: a BenchRun when the dict has BenchRun's fields, else a Run."""
    kw = dict(model_path=d["model_path"], model_bytes=d["model_bytes"], config=config_from_dict(d["config"]),
              report=LoadReport.from_dict(d["report"]), pp=_throughput(d.get("pp")), tg=_throughput(d.get("tg")),
              load_seconds=d.get("load_seconds", 0.0), n_threads=d.get("n_threads", 0),
              devices=tuple(d.get("devices", ())), nvml_peak_bytes=dict(d.get("nvml_peak_bytes", {})),
              plan=PlannedMemory.from_dict(d["plan"]) if d.get("plan") else None,
              timestamp=d.get("timestamp", ""), build=d.get("build", ""))
    extra = {k: d[k] for k in _BENCH_FIELDS if k in d}
    if not extra:
        return Run(**kw)
    if "notes" in extra:
        extra["notes"] = tuple(extra["notes"])
    return BenchRun(**kw, **extra)


# --- llama-bench records ----------------------------------------------------------------------

def format_tensor_split(ts) -> str:
    """llama-bench's test::get_values: '%.2f' up to the last non-zero entry, joined by '/'
    ('0.00' when all are zero, i.e. the default split by free memory)."""
    ts = list(ts) or [0.0]
    last = max((i for i, x in enumerate(ts) if x > 0), default=0)
    return "/".join(f"{x:.2f}" for x in ts[:last + 1])


def _devices_str(devs) -> str:
    # devices_to_string: 'auto' without --device, 'none' for --device none, else 'A/B'
    if not devs:
        return "auto"
    if tuple(devs) == ("none",):
        return "none"
    return "/".join(devs)


def _test_time(ts: str) -> str:
    # RFC 3339 as llama-bench writes it: %FT%TZ
    try:
        t = datetime.fromisoformat(ts.replace("Z", "+00:00"))
    except (ValueError, AttributeError):
        return ts
    if t.tzinfo is not None:
        t = t.astimezone(timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _gpulab_object(run: Run, t: Throughput) -> dict:
    report = run.report.to_dict()
    report.pop("log", None)
    g = {"test": t.name, "config": config_to_dict(run.config), "plan": _plan_dict(run), "report": report,
         "buffers": run.report.kinds_by_device(), "nvml_peak_bytes": dict(run.nvml_peak_bytes),
         "load_seconds": run.load_seconds, "devices": list(run.devices), "model_path": run.model_path,
         "timestamp": run.timestamp, "build": run.build}
    if isinstance(run, BenchRun):
        g.update(model_fingerprint=run.model_fingerprint, run_id=run.run_id, context_seconds=run.context_seconds,
                 warmup=run.warmup, device_uuids=dict(run.device_uuids),
                 nvml_baseline_bytes=dict(run.nvml_baseline_bytes), nvml_per_process=run.nvml_per_process,
                 system_info=run.system_info, notes=list(run.notes))
    return g


def to_llama_bench_records(run: Run, *, include_gpulab: bool = True) -> list[dict]:
    """One dict per test (pp, then tg) with llama-bench's JSON fields, types and formats.

    Fields llama-bench has and gpulab does not vary are written as llama-bench's defaults
    (cpu_mask '0x0', poll 50, load_mode 'auto', repack true, ...).
    """
    c = run.config
    bench = run if isinstance(run, BenchRun) else None
    model_type = bench.model_type if bench and bench.model_type else (run.plan.arch if run.plan else "")
    out = []
    for t in (run.pp, run.tg):
        if t is None:
            continue
        ns = list(t.samples_ns)
        rec = {
            "build_commit": run.build or "unknown",
            "build_number": 0,
            "cpu_info": bench.cpu_info if bench else "",
            "gpu_info": bench.gpu_info if bench else "",
            "backends": (bench.backends if bench and bench.backends else
                         ("RPC" if any(d.startswith("RPC") for d in run.devices) else "CPU")),
            "model_filename": run.model_path,
            "model_type": model_type,
            "model_size": int(run.model_bytes),
            "model_n_params": int(bench.model_n_params) if bench else 0,
            "n_batch": c.n_batch,
            "n_ubatch": c.n_ubatch,
            "n_threads": run.n_threads,
            "cpu_mask": "0x0",
            "cpu_strict": False,
            "poll": 50,
            "type_k": c.type_k,
            "type_v": c.type_v,
            "n_gpu_layers": c.n_gpu_layers,
            "n_cpu_moe": c.n_cpu_moe,
            "split_mode": c.split_mode,
            "main_gpu": c.main_gpu,
            "no_kv_offload": not c.offload_kqv,
            "flash_attn": _FLASH_ATTN_INT[c.flash_attn],
            "devices": _devices_str(c.devices),
            "tensor_split": format_tensor_split(c.tensor_split),
            "tensor_buft_overrides": _overrides_str(c),
            "load_mode": "none" if run.report.dry_run else "auto",
            "lazy_mode": "auto",
            "embeddings": False,
            "no_op_offload": int(not c.op_offload),
            "no_host": c.no_host,
            "repack": c.use_extra_bufts,
            "fit_target": 0,
            "fit_min_ctx": 0,
            "n_prompt": t.n_prompt,
            "n_gen": t.n_gen,
            "n_depth": 0,
            "test_time": _test_time(run.timestamp),
            "avg_ns": int(sum(ns) // len(ns)) if ns else 0,
            "stddev_ns": int(_stdev(ns)),
            "avg_ts": t.avg_ts,
            "stddev_ts": t.stddev_ts,
            "samples_ns": ns,
            "samples_ts": list(t.samples_ts),
        }
        if include_gpulab:
            rec["gpulab"] = _gpulab_object(run, t)
        out.append(rec)
    return out


def runs_from_records(records: list[dict]) -> list[Run]:
    """Rebuild Runs from stored records (their "gpulab" objects), one per run_id, in order."""
    groups: dict[str, list[dict]] = {}
    for i, r in enumerate(records):
        g = r.get("gpulab") or {}
        key = g.get("run_id") or f"#{i}"
        groups.setdefault(key, []).append(r)
    runs: list[Run] = []
    for recs in groups.values():
        g = recs[0]["gpulab"]
        tp = {}
        for r in recs:
            t = Throughput(n_prompt=r["n_prompt"], n_gen=r["n_gen"], samples_ns=tuple(r["samples_ns"]),
                           samples_ts=tuple(r["samples_ts"]), avg_ts=r["avg_ts"], stddev_ts=r["stddev_ts"])
            tp["pp" if t.n_prompt else "tg"] = t
        r0 = recs[0]
        d = {"model_path": g.get("model_path", r0["model_filename"]), "model_bytes": r0["model_size"],
             "config": g["config"], "report": {**g["report"], "log": ""}, "pp": None, "tg": None,
             "load_seconds": g.get("load_seconds", 0.0), "n_threads": r0["n_threads"],
             "devices": g.get("devices", []), "nvml_peak_bytes": g.get("nvml_peak_bytes", {}),
             "plan": g.get("plan"), "timestamp": g.get("timestamp", ""), "build": g.get("build", "")}
        if "run_id" in g:
            d.update(model_type=r0["model_type"], model_n_params=r0["model_n_params"], cpu_info=r0["cpu_info"],
                     gpu_info=r0["gpu_info"], backends=r0["backends"], model_fingerprint=stored_fingerprint(g),
                     run_id=g["run_id"], context_seconds=g.get("context_seconds", 0.0),
                     warmup=g.get("warmup", True), device_uuids=g.get("device_uuids", {}),
                     nvml_baseline_bytes=g.get("nvml_baseline_bytes", {}),
                     nvml_per_process=g.get("nvml_per_process", False), system_info=g.get("system_info", ""),
                     notes=g.get("notes", []))
        run = run_from_dict(d)
        runs.append(replace(run, pp=tp.get("pp"), tg=tp.get("tg")))
    return runs
