"""Reconciliation: predicted vs llama.cpp-reported vs NVML-measured, per device and term (the
overhead learned from it: tests/storage/test_overheads.py)."""

from __future__ import annotations

import json

import pytest

from builders import UUID, MiB, gpu_run
from gpulab.core.config import SplitConfig
from gpulab.core.devices import Device
from gpulab.core.measure.reconcile import reconcile
from gpulab.core.measure.results import run_from_dict, run_to_dict
from gpulab.core.report import BufferReport, LoadReport


def test_table_numbers():
    rec = reconcile(gpu_run())
    assert rec.devices() == ["CUDA0", "CPU"]
    w = rec.row("CUDA0", "weights")
    assert (w.predicted, w.reported, w.measured) == (505 * MiB, 500 * MiB, None)
    assert w.error_bytes == 5 * MiB and w.rel_error == pytest.approx(0.01)
    kv = rec.row("CUDA0", "kv")
    assert kv.error_bytes == 0 and kv.rel_error == 0.0
    c = rec.row("CUDA0", "compute")
    assert c.error_bytes == -10 * MiB and c.rel_error == pytest.approx(-0.1)
    o = rec.row("CUDA0", "overhead")
    # NVML 900 MiB - llama.cpp's 664 MiB of buffers = 236 MiB the plan did not count
    assert (o.predicted, o.reported, o.measured) == (0, None, 236 * MiB)
    assert o.error_bytes == -236 * MiB and o.rel_error == pytest.approx(-1.0)
    t = rec.row("CUDA0", "total")
    assert (t.predicted, t.reported, t.measured) == (659 * MiB, 664 * MiB, 900 * MiB)
    assert t.error_bytes == -241 * MiB
    assert rec.overhead_bytes == {"CUDA0": 236 * MiB}
    out = rec.row("CPU", "output")
    assert out.predicted is None and out.reported == 1 * MiB and "not modelled" in out.note
    assert "CPU_Mapped" in rec.row("CPU", "weights").note
    cpu_over = rec.row("CPU", "overhead")
    assert cpu_over.measured is None and "overhead unknown" in cpu_over.note
    assert any("no NVML figures for CPU" in n for n in rec.notes)


def test_text_and_table_are_plain():
    rec = reconcile(gpu_run())
    text = rec.text()
    assert text.splitlines()[0].split() == ["device", "term", "predicted", "MiB", "llama.cpp", "MiB", "NVML",
                                            "MiB", "error", "MiB", "error"]
    assert "236.00" in text and "-10.0%" in text and "note:" in text
    json.dumps(rec.table())
    assert len(rec.table()) == 2 * 6


def test_without_nvml_and_without_plan():
    rec = reconcile(gpu_run(nvml_used=None, plan=None))
    assert rec.row("CUDA0", "weights").predicted is None and rec.row("CUDA0", "weights").error_bytes is None
    assert rec.row("CUDA0", "overhead").measured is None and rec.overhead_bytes == {}
    assert any("carries no plan" in n for n in rec.notes)


def test_device_level_nvml_is_flagged():
    rec = reconcile(gpu_run(nvml_per_process=False))
    assert any("minus used before the load" in n for n in rec.notes)


def test_reconcile_with_a_plan_object(profile_factory):
    from gpulab.core.placement.planner import plan
    prof = profile_factory(n_layer=4)
    devs = [Device("CUDA0", 80 << 30, 80 << 30, "nvml", uuid=UUID)]
    p = plan(prof, devs, SplitConfig(n_ctx=512))
    rec = reconcile(gpu_run(), p)
    assert rec.row("CUDA0", "kv").predicted == p.device("CUDA0").kv_bytes
    assert rec.row("CUDA0", "overhead").predicted == 0


def test_a_stored_run_reconciles_as_the_live_one(profile_factory):
    """The overhead the planner assumed (learned from earlier runs) is predicted in both."""
    from gpulab.core.placement.planner import plan
    devs = [Device("CUDA0", 80 << 30, 80 << 30, "nvml", uuid=UUID, overhead_bytes=300 * MiB)]
    p = plan(profile_factory(n_layer=4), devs, SplitConfig(n_ctx=512))
    live = gpu_run(plan=p.memory())
    stored = run_from_dict(json.loads(json.dumps(run_to_dict(live))))
    assert stored.plan == live.plan
    assert reconcile(stored).table() == reconcile(live).table() == reconcile(live, p).table()
    assert reconcile(stored).row("CUDA0", "overhead").predicted == 300 * MiB


def test_tensor_split_is_compared_on_the_meta_line_llama_cpp_logs():
    from builders import make_llama_profile
    from gpulab import parse_sim_spec
    from gpulab import plan as make_plan
    from gpulab.core.measure.reconcile import comparison_rows
    from gpulab.core.run import Run
    p = make_plan(make_llama_profile(), parse_sim_spec("2x24GiB"),
                  SplitConfig(split_mode="tensor", tensor_split=(3, 1)))
    # llama.cpp logs one Meta() line per buffer, each at its largest member's size
    report = LoadReport(layer_devices=("Meta()",) * 5, devices=("SIM0", "SIM1"),
                        buffers=(BufferReport("Meta()", "Meta()", "model", 20 * MiB),
                                 BufferReport("Meta()", "Meta()", "kv", 6 * MiB),
                                 BufferReport("CPU", "CPU_Mapped", "model", 4 * MiB)))
    run = Run(model_path="m.gguf", model_bytes=0, config=p.config, report=report, plan=p.memory(),
              devices=("SIM0", "SIM1"))
    rec = reconcile(run)
    # the prediction on that line is SIM0's 3/4 share (20.27 MiB), not SIM1's (6.77 MiB) nor the sum
    w = rec.row("Meta()", "weights")
    assert (w.predicted, w.reported, w.error_bytes) == (21_252_096, 20 * MiB, 21_252_096 - 20 * MiB)
    kv = rec.row("Meta()", "kv")
    assert (kv.predicted, kv.reported, kv.error_bytes) == (6 * MiB, 6 * MiB, 0)
    assert any("Meta()" in n for n in rec.notes)
    rows = {r["device"]: r for r in comparison_rows(p, run)}
    assert set(rows) == {"SIM0", "SIM1", "Meta()", "CPU"} and rows["SIM0"]["llama.cpp"] == "-"
