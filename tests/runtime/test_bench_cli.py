"""`gpulab bench` as a user meets it, and the NVML sampler against a fake NVML."""

from __future__ import annotations

import io
import json
import os

import pytest

from builders import parse_md
from gpulab.cli import main
from gpulab.commands.bench import _Bar
from gpulab.core.measure.results import LLAMA_BENCH_FIELDS
from gpulab.runtime import llama_lib
from gpulab.runtime.nvml_sampler import NvmlSampler
from gpulab.sources.nvml import NvmlProbe
from gpulab.testing import FakeNvml
from gpulab.testing import fake_gpu as gpu

pytest.importorskip("llama_cpp")
MiB = 1024 ** 2


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_bench_md_and_store(capsys, monkeypatch, tmp_path, smollm2_path):
    monkeypatch.setenv("GPULAB_DATA_DIR", str(tmp_path))
    code, out, err = run(capsys, "bench", smollm2_path, "-ngl", "0", "-p", "16", "-n", "4", "-r", "1", "-t", "1",
                         "-b", "16", "-ub", "16")
    assert code == 0, err
    head, rows = parse_md(out)
    assert head[:4] == ["model", "size", "params", "backend"] and head[-2:] == ["test", "t/s"]
    assert "threads" in head and "n_batch" in head and "n_ubatch" in head
    assert [r["test"] for r in rows] == ["pp16", "tg4"] and rows[0]["threads"] == "1"
    assert rows[0]["n_batch"] == "16" and float(rows[1]["t/s"].split(" ± ")[0]) > 0
    assert "\nbuild: " in out
    assert f"2 result(s) appended to {tmp_path / 'results.jsonl'}" in err
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    recs = [json.loads(ln) for ln in lines]
    assert [r["n_prompt"] for r in recs] == [16, 0] and recs[0]["gpulab"]["config"]["n_ctx"] == 20
    assert "\r" not in err            # no progress bar when stderr is not a terminal


def test_bench_json_no_store_reconcile(capsys, monkeypatch, tmp_path, smollm2_path):
    monkeypatch.setenv("GPULAB_DATA_DIR", str(tmp_path))
    code, out, err = run(capsys, "bench", smollm2_path, "-ngl", "0", "-p", "8", "-n", "0", "-r", "2", "-t", "1",
                         "-c", "256", "-o", "json", "--no-store", "--reconcile")
    assert code == 0, err
    recs = json.loads(out)
    assert len(recs) == 1 and list(recs[0])[:len(LLAMA_BENCH_FIELDS)] == list(LLAMA_BENCH_FIELDS)
    assert len(recs[0]["samples_ns"]) == 2 and recs[0]["gpulab"]["config"]["n_ctx"] == 256
    assert not (tmp_path / "results.jsonl").exists()
    assert "predicted MiB" in err and "overhead unknown" in err   # the table goes to stderr with -o json


def test_bench_errors_are_one_line(capsys, smollm2_path, tmp_path):
    code, _, err = run(capsys, "bench", smollm2_path, "-r", "0", "--no-store")
    assert code == 2 and err.strip().startswith("gpulab: error:") and len(err.strip().splitlines()) == 1
    code, _, err = run(capsys, "bench", smollm2_path, "-ngl", "0", "-c", "256", "-p", "300", "-n", "0",
                       "--no-store")
    assert code == 2 and "tests need 300" in err
    code, _, err = run(capsys, "bench", tmp_path / "missing.gguf", "--no-store")
    assert code == 2 and "missing.gguf" in err and "No such file" in err and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(not llama_lib.rpc_supported(), reason="llama-cpp-python built without RPC")
def test_bench_over_rpc_runs_in_a_worker(capsys, tmp_path, smollm2_path):
    from gpulab.runtime.rpc import start_servers
    with start_servers(1) as c:
        code, out, err = run(capsys, "bench", smollm2_path, "--rpc", c.endpoints[0], "-p", "8", "-n", "2", "-r", "1",
                             "-t", "1", "-o", "jsonl", "--store", tmp_path / "r.jsonl")
    assert code == 0, err
    recs = [json.loads(ln) for ln in out.splitlines()]
    assert [r["backends"] for r in recs] == ["RPC", "RPC"] and recs[0]["n_gpu_layers"] == -1
    assert set(recs[0]["gpulab"]["report"]["layer_devices"]) == {"RPC0"}
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == 2
    from gpulab.runtime import rpc
    assert rpc.registered_endpoints() == [] or c.endpoints[0] not in rpc.registered_endpoints()


def test_progress_bar_only_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True
    s = Tty()
    bar = _Bar(s)
    bar("load", 0.5)
    bar("pp", 1.0)
    bar.clear()
    text = s.getvalue()
    assert text.startswith("\rloading    [" + "#" * 15) and " 50%" in text and "prompt" in text
    assert text.endswith("\r")
    plain = io.StringIO()
    bar = _Bar(plain)
    bar("tg", 0.3)
    bar.clear()
    assert plain.getvalue() == ""


# --- the NVML sampler -----------------------------------------------------------------------------

def test_sampler_peaks_per_process():
    g0 = gpu(0, used=1000 * MiB, procs=[(4242, 0)])
    g1 = gpu(1, used=500 * MiB, procs=[])
    fake = FakeNvml([g0, g1])
    s = NvmlSampler(NvmlProbe(fake), pid=4242, interval_s=3600)   # the thread never samples by itself
    s.start()
    try:
        assert s.available and s.uuids == {"CUDA0": g0.uuid, "CUDA1": g1.uuid}
        assert s.baseline_bytes == {"CUDA0": 1000 * MiB, "CUDA1": 500 * MiB}
        g0.procs, g0.used = [(4242, 700 * MiB), (1, 50 * MiB)], 1750 * MiB
        g1.used = 800 * MiB
        s.sample()
        g0.procs, g0.used = [(4242, 600 * MiB)], 1600 * MiB
        s.sample()
    finally:
        s.stop()
    # per-process figures once the driver gives them; CUDA1 shows no process of ours: left out
    assert s.per_process and s.peak_bytes == {"CUDA0": 700 * MiB}


def test_sampler_device_level_fallback_and_no_nvml():
    g0 = gpu(0, used=1000 * MiB, procs=[])
    s = NvmlSampler(NvmlProbe(FakeNvml([g0])), pid=1, interval_s=3600).start()
    g0.used = 1300 * MiB
    s.sample()
    g0.used = 1200 * MiB
    s.stop()
    assert not s.per_process and s.peak_bytes == {"CUDA0": 300 * MiB}
    none = NvmlSampler(NvmlProbe(FakeNvml(init_error=RuntimeError("no driver")))).start()
    none.stop()
    assert not none.available and "no driver" in none.reason and none.peak_bytes == {}


def test_sampler_thread_samples(monkeypatch):
    g0 = gpu(0, used=100 * MiB, procs=[(os.getpid(), 10 * MiB)])
    with NvmlSampler(NvmlProbe(FakeNvml([g0])), interval_s=0.01) as s:
        import time
        deadline = time.monotonic() + 5
        while s.n_samples < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert s.n_samples >= 3 and s.peak_bytes == {"CUDA0": 10 * MiB}
