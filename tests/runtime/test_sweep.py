"""Sweeps: every point stored as it arrives, resumed without repeating finished points.

The resume logic runs against a fake measuring function; then a real 2x2x2 sweep on two CPU
RPC devices is interrupted halfway (SIGINT to `gpulab sweep`), resumed, and its md and json
output read by llama.cpp's own reader of llama-bench results (scripts/compare-llama-bench.py).
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from gpulab.core.config import SplitConfig
from gpulab.core.errors import LoadError
from gpulab.core.measure.results import LLAMA_BENCH_FIELDS, throughput_from_samples
from gpulab.core.measure.sweep_grid import parse_grid
from gpulab.core.report import LoadReport
from gpulab.core.run import Run
from gpulab.runtime.sweep import ProgressBar, pareto_front, run_sweep, sweep
from gpulab.storage.results import ResultsStore
from llama_tools import vendored_src

GRID = ["-ts", "1/1,3/1", "-fa", "on,off", "-ub", "64,128"]


class FakeMeasure:
    """Pretends to measure: tokens/s from the config; can fail or be interrupted at a call."""

    def __init__(self, interrupt_at: int | None = None, fail_at: int | None = None):
        self.calls: list[SplitConfig] = []
        self.interrupt_at, self.fail_at = interrupt_at, fail_at

    def __call__(self, path, config, *, n_prompt, n_gen, repetitions, n_threads, progress):
        if len(self.calls) == self.interrupt_at:
            raise KeyboardInterrupt
        self.calls.append(config)
        if len(self.calls) - 1 == self.fail_at:
            raise LoadError("llama.cpp could not load m.gguf: out of memory")
        for phase in ("load", "pp", "tg"):
            progress(phase, 1.0)
        speed = 100.0 * (config.tensor_split[0] if config.tensor_split else 1) / config.n_ubatch
        pp = throughput_from_samples(n_prompt, 0, [int(1e9 * n_prompt / (speed * 10))] * repetitions)
        tg = throughput_from_samples(0, n_gen, [int(1e9 * n_gen / speed)] * repetitions)
        return Run(model_path=str(path), model_bytes=os.path.getsize(path), config=config,
                   report=LoadReport(layer_devices=(), buffers=(), devices=("RPC0", "RPC1")), pp=pp, tg=tg,
                   n_threads=1, devices=("RPC0", "RPC1"), timestamp="2025-01-01T00:00:00Z")


@pytest.fixture
def model(tmp_path):
    p = tmp_path / "m.gguf"
    from gpulab.sources.synth import SynthSpec, write_model
    return write_model(p, SynthSpec(n_layer=4, n_embd=128, n_ff=256, n_head=4, n_head_kv=2, n_vocab=512))


def test_interrupted_sweep_resumes_without_repeating_points(model, tmp_path):
    store = ResultsStore(tmp_path / "results.jsonl")
    grid = parse_grid(GRID)
    first = FakeMeasure(interrupt_at=4)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(model, grid, n_prompt=16, n_gen=8, repetitions=2, store=store, measure=first, progress=False)
    assert len(first.calls) == 4 and len(store.records()) == 8     # pp and tg of 4 points, stored
    second = FakeMeasure()
    res = run_sweep(model, grid, n_prompt=16, n_gen=8, repetitions=2, store=store, measure=second, progress=False)
    assert [p.status for p in res.points] == ["stored"] * 4 + ["measured"] * 4
    assert second.calls == grid.configs(SplitConfig(n_ctx=24))[4:]   # only the rest, in grid order
    assert len(res.records) == 16 and len(store.records()) == 16
    third = FakeMeasure()
    again = run_sweep(model, grid, n_prompt=16, n_gen=8, repetitions=2, store=store, measure=third, progress=False)
    assert third.calls == [] and again.format("jsonl") == res.format("jsonl")
    # another point definition (repetitions) is another measurement
    fourth = FakeMeasure()
    run_sweep(model, grid, n_prompt=16, n_gen=8, repetitions=3, store=store, measure=fourth, progress=False)
    assert len(fourth.calls) == 8
    fresh = FakeMeasure()
    run_sweep(model, grid, n_prompt=16, n_gen=8, repetitions=2, store=store, measure=fresh, progress=False,
              resume=False)
    assert len(fresh.calls) == 8


def test_failed_skipped_and_invalid_points(model, tmp_path):
    store = ResultsStore(tmp_path / "r.jsonl")
    grid = parse_grid(["-ctv", "q8_0", "-fa", "on,off", "-ts", "1/1,3/1"])
    fm = FakeMeasure(fail_at=0)
    events = []
    res = run_sweep(model, grid, n_prompt=8, n_gen=4, repetitions=1, store=store, measure=fm, progress=events.append,
                    fits=lambda c: "does not fit: RPC0 needs 1 GiB more" if c.tensor_split == (3.0, 1.0) else "")
    st = [(p.status, p.values["flash_attn"], p.values["tensor_split"]) for p in res.points]
    assert st == [("failed", "on", (1.0, 1.0)), ("invalid", "off", (1.0, 1.0)),
                  ("skipped", "on", (3.0, 1.0)), ("invalid", "off", (3.0, 1.0))]
    assert "out of memory" in res.points[0].error and "needs flash attention" in res.points[1].error
    assert [e["status"] for e in events if e["event"] == "point"] == ["failed", "invalid", "skipped", "invalid"]
    assert store.records() == []
    # a failed point is tried again on the next run
    fm2 = FakeMeasure()
    res = run_sweep(model, grid, n_prompt=8, n_gen=4, repetitions=1, store=store, measure=fm2, progress=False,
                    fits=lambda c: "")
    assert len(fm2.calls) == 2 and res.n_measured == 2


def test_dataframe_and_pareto(model, tmp_path):
    df = sweep(model, parse_grid(GRID), n_prompt=16, n_gen=8, repetitions=1, store=ResultsStore(tmp_path / "r.jsonl"),
               measure=FakeMeasure(), progress=False)
    assert len(df) == 16 and set(df["test"]) == {"pp16", "tg8"}
    assert {"tensor_split", "flash_attn", "n_ubatch", "avg_ts", "min_headroom_bytes"} <= set(df.columns)
    assert df.attrs["sweep"].n_measured == 8


def test_pareto_front_keeps_the_points_nothing_beats_on_speed_and_headroom():
    import pandas as pd
    pts = pd.DataFrame({"config": ["a", "b", "c", "d", "e", "f"],
                        "avg_ts": [10.0, 8.0, 9.0, 7.0, 10.0, 12.0],
                        "min_headroom_bytes": [1, 5, 2, 4, 0, None]})
    # d is beaten by b (faster, more room), e by a (as fast, more room); f has no headroom figure
    assert list(pareto_front(pts)["config"]) == ["b", "c", "a"]


def test_progress_bar_shows_eta():
    out = io.StringIO()
    bar = ProgressBar(4, stream=out)
    bar.point_done("ts=1/1", "stored", None)
    bar.point_done("ts=3/1", "tg8 10.00 t/s", 30.0)
    line = out.getvalue().splitlines()[-1]
    assert line.startswith("[3/4]") and "50%" in line and "ETA 1:00" in line and "ts=3/1: tg8" in line


# -- real llama.cpp on CPU RPC devices ---------------------------------------------------------------
def _load_compare_module():
    """The readers of llama.cpp's scripts/compare-llama-bench.py (LlamaBenchDataJSON, ...), which
    load llama-bench's json/jsonl/csv into SQLite. The script parses its command line and
    imports GitPython at the top, so its constants and reader classes are taken verbatim and run
    on their own."""
    root = vendored_src()
    src = root / "scripts" / "compare-llama-bench.py" if root is not None else None
    if src is None or not src.is_file():
        return None
    text = src.read_text()
    consts = text[text.index("# All llama-bench SQL fields"):text.index("DESCRIPTION = ")]
    classes = text[text.index("class LlamaBenchData:"):text.index("def format_flops")]
    mod = types.ModuleType("compare_llama_bench_readers")

    class _NoRepo(Exception):
        pass

    def _no_repo(*_a, **_k):
        raise _NoRepo   # as outside a git checkout: the readers then skip commit lookups
    mod.git = types.SimpleNamespace(Repo=_no_repo, InvalidGitRepositoryError=_NoRepo, Commit=object)
    header = ("import csv, json, logging, os, sqlite3\nfrom collections.abc import Iterator, Sequence\n"
              "from typing import Any, Optional, Union\nlogger = logging.getLogger('compare-llama-bench')\n")
    exec(compile(header + consts + classes, str(src), "exec"), mod.__dict__)
    return mod


def _parse_md(text: str) -> list[dict]:
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert set(lines[1].replace("|", "").replace("-", "").replace(":", "").strip()) == set()
    return [dict(zip(head, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[2:]]


@pytest.mark.slow
def test_real_sweep_on_rpc_devices_interrupted_and_resumed(smollm2_path, tmp_path):
    pytest.importorskip("llama_cpp")
    from gpulab.runtime.rpc import start_servers
    store_path = tmp_path / "results.jsonl"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    with start_servers(2) as cluster:
        argv = [sys.executable, "-m", "gpulab", "sweep", smollm2_path, "--rpc", ",".join(cluster.endpoints),
                *GRID, "-p", "16", "-n", "4", "-r", "1", "-t", "1", "--store", str(store_path), "-o", "json"]
        # Ctrl-C as a terminal sends it; a runner that started the suite in the background has SIGINT
        # ignored, and a child inherits that (Python then installs no KeyboardInterrupt handler)
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if store_path.exists() and store_path.read_text().count("\n") >= 8:   # 4 points, pp + tg
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 130, err[-2000:]
        done = ResultsStore(store_path).records()
        n_first = len(done) // 2
        assert 4 <= n_first < 8, f"interrupt came too late: {n_first} points stored"

        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stderr.count(": stored") == n_first     # found again, not measured
        assert proc.stderr.count("t/s") >= 8 - n_first
        records = ResultsStore(store_path).records()
        assert len(records) == 16                            # nothing measured twice
        first_ids = {(r["gpulab"]["run_id"]) for r in done}
        assert len({r["gpulab"]["run_id"] for r in records} - first_ids) == 8 - n_first

        # json: llama-bench's fields and types, read by llama.cpp's own reader
        out_json = tmp_path / "out.json"
        out_json.write_text(proc.stdout)
        data = json.loads(proc.stdout)
        assert len(data) == 16 and all(list(r)[:len(LLAMA_BENCH_FIELDS)] == list(LLAMA_BENCH_FIELDS) for r in data)
        assert {r["tensor_split"] for r in data} == {"1.00/1.00", "3.00/1.00"}
        assert {r["flash_attn"] for r in data} == {0, 1} and {r["n_ubatch"] for r in data} == {64, 128}
        assert all(r["avg_ts"] > 0 and r["backends"] for r in data)
        cmp = _load_compare_module()
        if cmp is not None:
            db = cmp.LlamaBenchDataJSON([str(out_json)])
            rows = db.cursor.execute("SELECT tensor_split, flash_attn, n_ubatch, n_prompt, n_gen, avg_ts "
                                     "FROM llama_bench").fetchall()
            assert len(rows) == 16 and {r[0] for r in rows} == {"1.00/1.00", "3.00/1.00"}

        # md: llama-bench's table, one row per test, the swept columns shown
        md = subprocess.run(argv[:-2] + ["-o", "md", "--no-progress"], capture_output=True, text=True, env=env,
                            timeout=300)
        assert md.returncode == 0, md.stderr[-2000:]
        rows = _parse_md(md.stdout)
        assert len(rows) == 16 and {"ts", "fa", "n_ubatch", "test", "t/s"} <= set(rows[0])
        assert {r["test"] for r in rows} == {"pp16", "tg4"} and {r["ts"] for r in rows} == {"1.00/1.00", "3.00/1.00"}


@pytest.mark.slow
def test_real_tune_saves_an_allocation_that_is_applied(smollm2_path, tmp_path, monkeypatch):
    pytest.importorskip("llama_cpp")
    from gpulab.core.devices import Device
    from gpulab.core.errors import AllocationMismatchError
    from gpulab.runtime.rpc import start_servers
    from gpulab.runtime.worker import Worker
    from gpulab.storage.allocations import config_for, find_allocation
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]),
               GPULAB_CONFIG_DIR=str(tmp_path / "cfg"))
    with start_servers(2) as cluster:
        rpc = ",".join(cluster.endpoints)
        r = subprocess.run([sys.executable, "-m", "gpulab", "tune", smollm2_path, "--rpc", rpc, "-ngl", "31,0",
                            "-ts", "1/1,3/1", "--objective", "tg", "--budget", "2", "-p", "16", "-n", "4", "-r", "1",
                            "-t", "1", "--store", str(tmp_path / "r.jsonl"), "--save"],
                           capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "after 2 loads" in r.stdout and "saved " in r.stdout and "llama-server -m" in r.stdout
        assert "llama-server's -fit choice (-c " in r.stdout and "of the best tg" in r.stdout
        with Worker(cluster.endpoints) as w:
            devices = [d for d in w.devices() if d.kind == "rpc"]
    monkeypatch.setenv("GPULAB_CONFIG_DIR", env["GPULAB_CONFIG_DIR"])
    prof = find_allocation(smollm2_path, devices)
    assert prof is not None and prof.source == "tune" and prof.measurement["tg_tokens_per_s"] > 0
    assert prof.measurement["loads"] == 2 and prof.config.n_ctx == 4096
    assert config_for(smollm2_path, devices).devices == ("RPC0", "RPC1")
    gone = [Device("RPC0", devices[0].total_bytes, 0, "rpc", "rpc", endpoint="127.0.0.1:1")]
    with pytest.raises(AllocationMismatchError, match="not present now"):
        config_for(smollm2_path, gone)
