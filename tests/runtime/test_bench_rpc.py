"""Measurement across two RPC devices, through a worker process, with several tensor splits:
llama.cpp's placement equals the plan the run carries, pp/tg are measured, the results reach
the store; and an RPC server killed mid-run fails the run, not this process.
"""

from __future__ import annotations

import os
import signal

import pytest

from gpulab.core.config import SplitConfig
from gpulab.core.errors import LoadError
from gpulab.core.measure.reconcile import reconcile
from gpulab.runtime import llama_lib
from gpulab.runtime.rpc import RpcServer, start_servers
from gpulab.runtime.worker import Worker
from gpulab.storage.results import ResultsStore

pytestmark = pytest.mark.skipif(not llama_lib.rpc_supported(),
                                reason="llama-cpp-python built without RPC (CMAKE_ARGS=-DGGML_RPC=ON)")

N_LAYER = 30   # SmolLM2-135M
SPLITS = [(1, 1), (1, 3), (5, 1)]
KW = dict(n_prompt=16, n_gen=4, repetitions=2, n_threads=1, seed=3)


@pytest.fixture(scope="module")
def cluster():
    with start_servers(2) as c:
        yield c


@pytest.fixture(scope="module")
def runs(cluster, smollm2_path, tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GPULAB_DATA_DIR", str(data))
        store = ResultsStore()          # the user's store: <GPULAB_DATA_DIR>/results.jsonl
    assert store.path == data / "results.jsonl"
    out = {}
    with Worker(cluster.endpoints) as w:
        for ts in SPLITS:
            run = w.measure(smollm2_path, SplitConfig(tensor_split=ts, n_ctx=256, n_batch=16, n_ubatch=16), **KW)
            store.append_run(run)
            out[ts] = run
    return out, store


@pytest.mark.parametrize("ts", SPLITS)
def test_placement_equals_plan(runs, ts):
    run = runs[0][ts]
    assert run.devices == ("RPC0", "RPC1") and run.backends == "RPC"
    planned = list(run.plan.layer_devices)
    assert list(run.report.layer_devices) == planned
    n0 = planned.count("RPC0")
    assert 0 < n0 < N_LAYER + 1 and planned == ["RPC0"] * n0 + ["RPC1"] * (N_LAYER + 1 - n0)
    # the split moves layers the way the proportions say
    assert abs(n0 / (N_LAYER + 1) - ts[0] / sum(ts)) < 0.05


@pytest.mark.parametrize("ts", SPLITS)
def test_pp_tg_measured(runs, ts):
    run = runs[0][ts]
    assert run.config.tensor_split == ts
    assert len(run.pp.samples_ns) == 2 and len(run.tg.samples_ns) == 2
    assert run.pp.avg_ts > 0 and run.tg.avg_ts > 0


def test_reconciliation_on_rpc_devices(runs):
    rec = reconcile(runs[0][(1, 3)])
    assert rec.devices() == ["RPC0", "RPC1", "CPU"]
    for dev in ("RPC0", "RPC1"):
        w = rec.row(dev, "weights")
        assert abs(w.error_bytes) <= max(0.01 * w.reported, 2**20)
        kv = rec.row(dev, "kv")
        assert abs(kv.error_bytes) <= 6 * 1024
        assert rec.row(dev, "overhead").measured is None and "unknown" in rec.row(dev, "overhead").note
    assert rec.overhead_bytes == {}


def test_results_in_the_store(runs):
    by_split, store = runs
    recs = store.records()
    assert len(recs) == 2 * len(SPLITS)
    assert [r["tensor_split"] for r in recs] == ["1.00/1.00"] * 2 + ["1.00/3.00"] * 2 + ["5.00/1.00"] * 2
    assert [r["n_prompt"] or r["n_gen"] for r in recs] == [16, 4] * len(SPLITS)
    one = by_split[(1, 3)]
    assert len(store.records(config=one.config)) == 2
    back = store.runs(config=one.config)
    assert len(back) == 1 and back[0].pp == one.pp and back[0].tg == one.tg
    assert back[0].report.layer_devices == one.report.layer_devices and back[0].plan == one.plan
    assert len(store.records(model_fingerprint=one.model_fingerprint)) == 2 * len(SPLITS)
    assert store.records(model_fingerprint="0" * 16) == []


def test_killing_a_server_mid_run_fails_the_run_not_this_process(smollm2_path):
    with start_servers(2) as c, Worker(c.endpoints) as w:
        victim = c.servers[1]
        port = victim.port
        killed = []

        def progress(phase: str, fraction: float) -> None:
            if phase == "tg" and not killed:   # in the middle of the measurement
                os.kill(victim.pid, signal.SIGKILL)
                victim._proc.wait(10)
                killed.append(phase)

        cfg = SplitConfig(tensor_split=(1, 1), n_ctx=256, n_batch=16, n_ubatch=16)
        with pytest.raises(LoadError, match=r"ended the worker process .*during measure.*This process is fine"):
            w.measure(smollm2_path, cfg, n_prompt=8, n_gen=32, repetitions=3, n_threads=1, progress=progress)
        assert killed and not w.alive
        victim.stop()
        # the same endpoint served again: the next measure starts a fresh worker and works
        with RpcServer(port=port) as again:
            assert again.endpoint == victim.endpoint
            run = w.measure(smollm2_path, cfg, n_prompt=8, n_gen=4, repetitions=1, n_threads=1)
            assert run.devices == ("RPC0", "RPC1") and run.tg.avg_ts > 0


def test_resplit_live_in_the_worker(cluster, smollm2_path):
    cfg = SplitConfig(tensor_split=(1, 1), n_ctx=256, n_batch=16, n_ubatch=16)
    with Worker(cluster.endpoints) as w:
        with w.open(smollm2_path, cfg) as m:
            first = m.measure(n_prompt=8, n_gen=2, repetitions=1, n_threads=1)
            before = m.report.layer_devices
            assert before == first.report.layer_devices and before.count("RPC0") == 16
            m.resplit(cfg.replace(tensor_split=(1, 3)))
            assert m.ready_seconds >= m.load_seconds > 0 and m.config.tensor_split == (1, 3)
            second = m.measure(n_prompt=8, n_gen=2, repetitions=1, n_threads=1)
            assert second.report.layer_devices == m.report.layer_devices != before
            assert list(second.report.layer_devices) == list(second.plan.layer_devices)
            assert second.report.layer_devices.count("RPC0") == 8 and second.tg.avg_ts > 0
        assert m.closed
        with pytest.raises(LoadError, match="closed"):
            m.measure(n_prompt=8, n_gen=0, repetitions=1)
