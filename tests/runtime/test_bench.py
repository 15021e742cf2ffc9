"""gpulab.runtime.bench on the CPU, in this process: llama-bench's measurement on the demo model.

One thread everywhere: the test machine has two cores that other work shares, and OpenMP
threads that wait for a busy core make a two-thread run crawl.
"""

from __future__ import annotations

import pytest

from gpulab.core.config import SplitConfig
from gpulab.core.errors import ConfigError, LoadError
from gpulab.core.measure.results import LLAMA_BENCH_FIELDS, BenchRun, run_from_dict, run_to_dict, to_llama_bench_records
from gpulab.core.run import Run
from gpulab.runtime.bench import default_threads, measure, measure_loaded, resplit, system_facts
from gpulab.runtime.model import open_model

pytest.importorskip("llama_cpp")

N_LAYER = 30   # SmolLM2-135M
CPU = SplitConfig(n_gpu_layers=0, n_ctx=256, n_batch=16, n_ubatch=16)


@pytest.fixture(scope="module")
def cpu_run(smollm2_path):
    phases: list[tuple[str, float]] = []
    run = measure(smollm2_path, CPU, n_prompt=32, n_gen=8, repetitions=2, n_threads=1,
                  progress=lambda p, f: phases.append((p, f)), seed=1)
    return run, phases


def test_run_structure(cpu_run, smollm2_path):
    run, _ = cpu_run
    assert isinstance(run, Run) and isinstance(run, BenchRun)
    assert run.model_path == smollm2_path and run.config == CPU
    assert run.n_threads == 1 and run.devices == () and run.warmup
    assert run.model_type.startswith("llama") and "Q4_1" in run.model_type
    assert 130e6 < run.model_n_params < 140e6 and 90 * 2**20 < run.model_bytes < 95 * 2**20
    assert run.backends == "CPU" and run.cpu_info and run.build and "llama-cpp-python" in run.system_info
    assert run.load_seconds > 0 and run.context_seconds > 0 and run.timestamp.endswith("Z")
    assert len(run.model_fingerprint) == 16 and run.run_id
    assert run.nvml_peak_bytes == {} and any("NVML" in n for n in run.notes)   # no GPU here


def test_samples_and_rates(cpu_run):
    run, _ = cpu_run
    pp, tg = run.pp, run.tg
    assert (pp.n_prompt, pp.n_gen, pp.name) == (32, 0, "pp32")
    assert (tg.n_prompt, tg.n_gen, tg.name) == (0, 8, "tg8")
    for t, n in ((pp, 32), (tg, 8)):
        assert len(t.samples_ns) == len(t.samples_ts) == 2
        assert all(ns > 0 for ns in t.samples_ns)
        assert t.samples_ts == pytest.approx(tuple(1e9 * n / ns for ns in t.samples_ns))
        assert t.avg_ts == pytest.approx(sum(t.samples_ts) / 2) and t.avg_ts > 0 and t.stddev_ts >= 0


def test_progress_phases_in_order(cpu_run):
    _, phases = cpu_run
    order = [p for i, (p, _) in enumerate(phases) if i == 0 or phases[i - 1][0] != p]
    assert order == ["load", "warmup", "pp", "warmup", "tg"]
    assert ("pp", 1.0) in phases and ("tg", 1.0) in phases and ("load", 1.0) in phases


def test_run_carries_its_plan_and_placement_agrees(cpu_run):
    run, _ = cpu_run
    assert run.config.n_gpu_layers == 0
    assert list(run.plan.layer_devices) == list(run.report.layer_devices) == ["CPU"] * (N_LAYER + 1)
    kv_pred = next(d.kv_bytes for d in run.plan.devices if d.name == "CPU")
    assert abs(kv_pred - run.report.bytes_on("CPU", "kv")) <= 6 * 1024   # llama.cpp logs MiB, 2 decimals


def test_run_round_trips_as_json(cpu_run):
    import json
    run, _ = cpu_run
    again = run_from_dict(json.loads(json.dumps(run_to_dict(run))))
    assert again == run and type(again) is BenchRun


def test_records(cpu_run):
    run, _ = cpu_run
    recs = to_llama_bench_records(run)
    assert [(r["n_prompt"], r["n_gen"]) for r in recs] == [(32, 0), (0, 8)]
    for r in recs:
        assert list(r)[:len(LLAMA_BENCH_FIELDS)] == list(LLAMA_BENCH_FIELDS)
        assert r["n_threads"] == 1 and r["n_gpu_layers"] == 0 and r["n_batch"] == 16
        assert r["model_size"] == run.model_bytes and r["model_n_params"] == run.model_n_params
        assert r["gpulab"]["plan"] == run.plan.to_dict() and r["gpulab"]["run_id"] == run.run_id


def test_measure_loaded_again_and_resplit(smollm2_path):
    with open_model(smollm2_path, CPU) as m:
        a = measure_loaded(m, n_prompt=16, n_gen=4, repetitions=1, n_threads=1, warmup=False)
        b = measure_loaded(m, n_prompt=0, n_gen=4, repetitions=1, n_threads=1)
        assert a.pp is not None and b.pp is None and b.tg.n_gen == 4 and a.run_id != b.run_id
        m2 = resplit(m, CPU.replace(n_ctx=512))
    try:
        assert m.closed and not m2.closed
        assert m2.ready_seconds >= m2.load_seconds + m2.context_seconds > 0
        c = measure_loaded(m2, n_prompt=16, n_gen=0, repetitions=1, n_threads=1)
        assert c.config.n_ctx == 512 and c.tg is None and c.pp.avg_ts > 0
    finally:
        m2.close()
    with pytest.raises(LoadError, match="closed"):
        measure_loaded(m2, n_prompt=4, n_gen=0, repetitions=1)


def test_refusals(smollm2_path):
    with open_model(smollm2_path, CPU.replace(n_ctx=64)) as m:
        with pytest.raises(ConfigError, match="holds 256 tokens per sequence but the tests need 300"):
            measure_loaded(m, n_prompt=300, n_gen=8, repetitions=1, n_threads=1)   # n_ctx is padded to 256
        with pytest.raises(ConfigError, match="repetitions"):
            measure_loaded(m, n_prompt=8, n_gen=8, repetitions=0)
    with open_model(smollm2_path, CPU, dry_run=True) as m:
        with pytest.raises(ConfigError, match="dry-run"):
            measure_loaded(m, n_prompt=8, n_gen=8, repetitions=1)


def test_facts():
    f = system_facts()
    assert f["backends"] in ("CPU", "RPC") and f["cpu_info"] and "CPU" in f["system_info"]
    assert default_threads() >= 1
