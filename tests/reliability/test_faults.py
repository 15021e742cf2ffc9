"""Fault injection on CPU with RPC devices (issue 7).

Every fault must give a clear GpulabError, leave this (the test) process alive, keep the
results already in the store, and let the next run work. RPC devices are only ever registered
in gpulab workers (gpulab.runtime.worker), never in this process.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time

import pytest

from gpulab.core.config import SplitConfig
from gpulab.core.errors import DeviceError, GpulabError, LoadError, StoreError
from gpulab.core.placement.planner import plan
from gpulab.runtime import llama_lib
from gpulab.runtime.rpc import RpcServer, start_servers
from gpulab.runtime.worker import Worker
from gpulab.sources.gguf_file import read_local_profile
from gpulab.storage.results import ResultsStore

pytestmark = pytest.mark.skipif(not llama_lib.rpc_supported(),
                                reason="llama-cpp-python built without RPC (CMAKE_ARGS=-DGGML_RPC=ON)")

CFG = SplitConfig(tensor_split=(1, 1), n_ctx=256, n_batch=16, n_ubatch=16)
SMALL = dict(n_prompt=8, n_gen=4, repetitions=1, n_threads=1, seed=1, nvml=False)


@pytest.fixture
def store(tmp_path, monkeypatch):
    """The user's store (<GPULAB_DATA_DIR>/results.jsonl) in a tmp dir, holding one earlier run."""
    monkeypatch.setenv("GPULAB_DATA_DIR", str(tmp_path / "data"))
    s = ResultsStore()
    assert s.path == tmp_path / "data" / "results.jsonl"
    return s


@pytest.fixture(scope="module")
def earlier_run(smollm2_path):
    """A real run measured on the CPU (in a worker), to stand for results stored before a fault."""
    with Worker() as w:
        return w.measure(smollm2_path, SplitConfig(n_ctx=256, n_batch=16, n_ubatch=16), **SMALL)


def _assert_survived(store: ResultsStore, n_before: int) -> None:
    recs = store.records()
    assert len(recs) == n_before and store.skipped_lines == 0   # earlier results intact, no half line


@pytest.mark.parametrize("phase", ["load", "pp", "tg"])
def test_rpc_server_killed_mid_run(phase, smollm2_path, store, earlier_run):
    store.append_run(earlier_run)
    with start_servers(2) as c, Worker(c.endpoints) as w:
        victim = c.servers[1]
        port, killed = victim.port, []

        def progress(ph: str, fraction: float) -> None:
            if ph == phase and not killed and (ph != "load" or fraction >= 0.3):
                os.kill(victim.pid, signal.SIGKILL)
                victim._proc.wait(10)
                killed.append((ph, fraction))

        with pytest.raises(LoadError, match=r"ended the worker process .*during measure.*This process is fine") as err:
            w.measure(smollm2_path, CFG, **dict(SMALL, n_gen=32, repetitions=3), progress=progress)
        print(f"FAULT killed-during-{phase}: {type(err.value).__name__}: {err.value}")
        assert killed and not w.alive
        _assert_survived(store, 2)
        victim.stop()
        with RpcServer(port=port):    # the same endpoint served again: a fresh worker, a good run
            run = w.measure(smollm2_path, CFG, **SMALL)
        assert run.devices == ("RPC0", "RPC1") and run.tg.avg_ts > 0
        store.append_run(run)
        assert len(store.records()) == 4


def _silent_listener():
    """A TCP port that accepts connections and never says a word."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    conns: list[socket.socket] = []
    stop = threading.Event()

    def loop() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conns.append(srv.accept()[0])
            except OSError:
                pass

    t = threading.Thread(target=loop, daemon=True)
    t.start()

    def close() -> None:
        stop.set()
        t.join(2)
        for s in conns + [srv]:
            s.close()
    return f"127.0.0.1:{srv.getsockname()[1]}", close


def test_silent_endpoint_is_refused_by_the_handshake_timeout(smollm2_path, store, earlier_run):
    store.append_run(earlier_run)
    endpoint, close = _silent_listener()
    try:
        w = Worker([endpoint])
        t0 = time.monotonic()
        with pytest.raises(DeviceError, match=r"did not answer within 5 s") as err:
            w.devices()
        print(f"FAULT silent-endpoint: {type(err.value).__name__}: {err.value}")
        assert time.monotonic() - t0 < 30
        assert not w.alive          # a worker without its RPC devices is not kept
        w.close()
    finally:
        close()
    _assert_survived(store, 2)
    with RpcServer() as s, Worker([s.endpoint]) as good:
        run = good.measure(smollm2_path, CFG.replace(tensor_split=()), **SMALL)
    assert run.devices == ("RPC0",)
    store.append_run(run)
    assert len(store.records()) == 4


def test_server_that_stops_answering_mid_run_hits_the_worker_timeout(smollm2_path, store, earlier_run):
    """SIGSTOP: the connection stays open and silent; llama.cpp's client would wait forever."""
    store.append_run(earlier_run)
    with start_servers(2) as c, Worker(c.endpoints, timeout_s=5) as w:
        victim = c.servers[1]
        port, frozen = victim.port, []

        def progress(ph: str, fraction: float) -> None:
            if ph == "tg" and not frozen:
                os.kill(victim.pid, signal.SIGSTOP)
                frozen.append(time.monotonic())

        try:
            with pytest.raises(LoadError, match=r"gave no answer within 5 s during measure .*RPC server.*"
                                                r"This process is fine") as err:
                w.measure(smollm2_path, CFG, **dict(SMALL, n_gen=32, repetitions=3), progress=progress)
            print(f"FAULT sigstop-timeout: {type(err.value).__name__}: {err.value}")
            assert frozen and 4 < time.monotonic() - frozen[0] < 30
            assert not w.alive
        finally:
            os.kill(victim.pid, signal.SIGCONT)
        _assert_survived(store, 2)
        victim.stop()
        with RpcServer(port=port):
            run = w.measure(smollm2_path, CFG, **SMALL)
        assert run.tg.avg_ts > 0
        store.append_run(run)
        assert len(store.records()) == 4


def test_worker_timeout_validation():
    with pytest.raises(ValueError):
        Worker(timeout_s=0)


@pytest.mark.parametrize("fault", ["removed", "truncated"])
def test_model_file_changed_between_plan_and_load(fault, smollm2_path, tmp_path, store, earlier_run):
    store.append_run(earlier_run)
    model = tmp_path / "model.gguf"
    shutil.copyfile(smollm2_path, model)
    with RpcServer() as s, Worker([s.endpoint]) as w:
        cfg = CFG.replace(tensor_split=())
        p = plan(read_local_profile(model), w.devices(), cfg)       # the plan, from the intact file
        assert p is not None
        if fault == "removed":
            model.unlink()
            match = r"no model file at .*model\.gguf"
        else:
            with open(model, "r+b") as f:
                f.truncate(model.stat().st_size // 2)
            match = r"model\.gguf"
        with pytest.raises(GpulabError, match=match) as err:
            w.measure(model, cfg, **SMALL)
        print(f"FAULT model-{fault}: {type(err.value).__name__}: {err.value}")
        _assert_survived(store, 2)
        shutil.copyfile(smollm2_path, model)                   # put it back: the next run works
        run = w.measure(model, cfg, **SMALL)
        assert run.devices == ("RPC0",) and run.tg.avg_ts > 0
    store.append_run(run)
    assert len(store.records()) == 4


def test_store_path_under_a_file(tmp_path, monkeypatch, earlier_run):
    """Root ignores permission bits, so a read-only dir would still be writable: a data dir
    whose parent is a plain file cannot be created by anyone."""
    ok = ResultsStore(tmp_path / "ok" / "results.jsonl")
    ok.append_run(earlier_run)
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("GPULAB_DATA_DIR", str(tmp_path / "afile" / "data"))
    bad = ResultsStore()
    with pytest.raises(StoreError,
                       match=r"cannot write the results store .*afile.*Not a directory.*GPULAB_DATA_DIR") as err:
        bad.append_run(earlier_run)
    print(f"FAULT store-under-file: {type(err.value).__name__}: {err.value}")
    assert bad.records() == []
    assert len(ok.records()) == 2          # the other store is untouched; writing goes on
    ok.append_run(earlier_run)
    assert len(ok.records()) == 4


@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_store_disk_full(small_tmpfs, monkeypatch, earlier_run):
    monkeypatch.setenv("GPULAB_DATA_DIR", str(small_tmpfs / "data"))
    store = ResultsStore()
    store.append_run(earlier_run)
    size = store.path.stat().st_size
    filler = small_tmpfs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)   # fill the disk to the last byte
    try:
        for chunk in (4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * chunk)
            except OSError:
                pass
    finally:
        os.close(fd)
    with pytest.raises(StoreError, match=r"cannot write the results store .*the disk is full.*records already "
                                         r"there are kept") as err:
        store.append_run(earlier_run)
    print(f"FAULT store-disk-full: {type(err.value).__name__}: {err.value}")
    assert store.path.stat().st_size == size
    _assert_survived(store, 2)
    filler.unlink()
    store.append_run(earlier_run)
    assert len(store.records()) == 4
