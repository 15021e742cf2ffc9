"""Hand-built objects for unit tests (importable as `builders`: tests/ is on pythonpath).

The synthetic models live in gpulab.testing (bench scripts and notebooks use them too); this
module adds what only tests use: canned runs, a markdown table reader, llama.cpp's tolerance.
Test modules share helpers through here, never by importing one another.
"""

from __future__ import annotations

import re

from gpulab.core.config import SplitConfig
from gpulab.core.measure.results import BenchRun, throughput_from_samples
from gpulab.core.memory import PlannedMemory
from gpulab.core.report import BufferReport, LoadReport
from gpulab.sources.synth import moe_profile as make_moe_profile
from gpulab.testing import MiB, make_hand_moe_profile, make_llama_profile, make_profile

__all__ = ["MiB", "UUID", "make_profile", "make_hand_moe_profile", "make_llama_profile", "make_moe_profile",
           "make_run", "gpu_run", "parse_md", "close_to_llama"]

UUID = "GPU-11111111-2222-3333-4444-555555555555"   # gpu_run's CUDA0


def make_run(**over) -> BenchRun:
    """A two-RPC-device run of a 1B llama with every field set; `over` replaces fields."""
    report = LoadReport(
        layer_devices=("RPC0",) * 3 + ("RPC1",) * 2, devices=("RPC0", "RPC1"),
        buffers=(BufferReport("RPC0", "RPC0[127.0.0.1:1]", "model", 30 * MiB),
                 BufferReport("RPC1", "RPC0[127.0.0.1:2]", "model", 25 * MiB),
                 BufferReport("CPU", "CPU_Mapped", "model", 60 * MiB),
                 BufferReport("RPC0", "RPC0[127.0.0.1:1]", "kv", 3 * MiB),
                 BufferReport("RPC1", "RPC0[127.0.0.1:2]", "kv", 1 * MiB),
                 BufferReport("CPU", "CPU", "output", MiB // 2),
                 BufferReport("RPC0", "RPC0[127.0.0.1:1]", "compute", 10 * MiB),
                 BufferReport("CPU", "CPU", "compute", 2 * MiB)),
        kv_layer_devices=("RPC0",) * 3 + ("RPC1",), kv_total_bytes=4 * MiB, log="a log\n")
    kw = dict(model_path="/m/x.gguf", model_bytes=123 * MiB, config=SplitConfig(tensor_split=(3, 1), n_ctx=640),
              report=report, pp=throughput_from_samples(512, 0, [1_000_000_000, 1_100_000_000]),
              tg=throughput_from_samples(0, 128, [2_000_000_000, 2_000_000_000]), load_seconds=1.5, n_threads=2,
              devices=("RPC0", "RPC1"),
              plan=PlannedMemory(model_path="/m/x.gguf", arch="llama", devices=(), layer_devices=()),
              timestamp="2025-01-02T03:04:05Z", build="llama-cpp-python-0.3.36", model_type="llama 1B Q4_0",
              model_n_params=1_235_814_400, model_fingerprint="abcd", cpu_info="AMD EPYC", gpu_info="127.0.0.1:1",
              backends="RPC", run_id="r1", notes=("n1",))
    kw.update(over)
    return BenchRun(**kw)


def gpu_run(nvml_used: int | None = 900 * MiB, **over) -> BenchRun:
    """A one-GPU run (CUDA0, UUID) with its plan and NVML's peak; `over` replaces fields."""
    report = LoadReport(
        layer_devices=("CUDA0",) * 5, devices=("CUDA0",),
        buffers=(BufferReport("CUDA0", "CUDA0", "model", 500 * MiB),
                 BufferReport("CPU", "CPU_Mapped", "model", 560 * MiB),
                 BufferReport("CUDA0", "CUDA0", "kv", 64 * MiB),
                 BufferReport("CPU", "CPU", "output", 1 * MiB),
                 BufferReport("CUDA0", "CUDA0", "compute", 100 * MiB),
                 BufferReport("CPU", "CUDA_Host", "compute", 8 * MiB)))
    plan = {"devices": [
        {"name": "CUDA0", "total_bytes": 80 << 30, "free_bytes": 79 << 30, "weights_bytes": 505 * MiB,
         "kv_bytes": 64 * MiB, "compute_bytes": 90 * MiB, "used_bytes": 659 * MiB, "fits": True},
        {"name": "CPU", "total_bytes": 0, "free_bytes": 0, "weights_bytes": 60 * MiB, "kv_bytes": 0,
         "compute_bytes": 10 * MiB, "used_bytes": 70 * MiB, "fits": True}]}
    kw = dict(model_path="m.gguf", model_bytes=560 * MiB, config=SplitConfig(), report=report,
              plan=PlannedMemory.from_dict(plan),
              devices=("CUDA0",), nvml_peak_bytes={"CUDA0": nvml_used} if nvml_used is not None else {},
              device_uuids={"CUDA0": UUID}, nvml_per_process=True)
    kw.update(over)
    return BenchRun(**kw)


def parse_md(text: str) -> tuple[list[str], list[dict]]:
    """(header, rows as dicts) of a markdown table in `text`."""
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    head, sep, rows = cells[0], cells[1], cells[2:]
    assert all(re.fullmatch(r"-+[-:]", s) for s in sep)
    return head, [dict(zip(head, r)) for r in rows]


def close_to_llama(predicted: int, actual: int) -> bool:
    """The bar for weights and KV against llama.cpp's log (printed to 0.01 MiB): 1% or 1 MiB."""
    return abs(predicted - actual) <= max(0.01 * actual, 1 * MiB)
