"""Load (issue 7): 50 configurations, load after load, on CPU RPC devices through one Worker.

Ends with the worker's resident memory near where it was after the first load, no RPC server
or worker process left behind, and no file descriptor leaked in this process.
"""

from __future__ import annotations

import gc
import itertools
import os
import statistics
import time
from pathlib import Path

import pytest

from gpulab.core.config import SplitConfig
from gpulab.runtime import llama_lib
from gpulab.runtime.rpc import start_servers
from gpulab.runtime.worker import Worker

pytestmark = [pytest.mark.skipif(not llama_lib.rpc_supported(), reason="llama-cpp-python built without RPC")]

N_CONFIGS = 50
RSS_GROWTH_LIMIT = 64 * 2**20   # worker RSS, load 50 against load 1
PLATEAU_LIMIT = 32 * 2**20      # loads 46-50 against loads 8-12, medians (worker and servers)


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _children(pid: int) -> set[int]:
    out = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.add(int(d.name))
    return out


def _fds() -> set[str]:
    return {f"{fd}->{os.readlink(f'/proc/self/fd/{fd}')}" for fd in os.listdir("/proc/self/fd")
            if os.path.exists(f"/proc/self/fd/{fd}")}


def _configs() -> list[SplitConfig]:
    splits = [(a, b) for a, b in itertools.product(range(1, 8), repeat=2)]      # 49 proportions
    cfgs = [SplitConfig(tensor_split=ts, n_ctx=256, n_batch=16, n_ubatch=16) for ts in splits]
    cfgs.append(SplitConfig(tensor_split=(1, 1), n_ctx=256, n_batch=16, n_ubatch=16, split_mode="none"))
    return cfgs[:N_CONFIGS]


def test_fifty_loads_through_one_worker(smollm2_path, capsys):
    gc.collect()
    fds_before, kids_before = _fds(), _children(os.getpid())
    cfgs = _configs()
    assert len(cfgs) == N_CONFIGS
    t0 = time.monotonic()
    rss, server_rss = [], []
    with start_servers(2) as c, Worker(c.endpoints) as w:
        server_pids = [s.pid for s in c]
        worker_pids = set()
        for cfg in cfgs:
            report, raw = w.load(smollm2_path, cfg)
            assert set(report.layer_devices) <= {"RPC0", "RPC1", "CPU"}, report.layer_devices
            worker_pids.add(w.proc.pid)
            rss.append(_rss(w.proc.pid))
            server_rss.append(sum(_rss(p) for p in server_pids))
        assert len(worker_pids) == 1          # one worker did all 50, none died
    elapsed = time.monotonic() - t0
    gc.collect()
    growth = rss[-1] - rss[0]
    server_growth = server_rss[-1] - server_rss[0]
    with capsys.disabled():
        print(f"\n{N_CONFIGS} loads in {elapsed:.1f} s; worker RSS after load 1 {rss[0] / 2**20:.1f} MiB, "
              f"max {max(rss) / 2**20:.1f} MiB, after load {N_CONFIGS} {rss[-1] / 2**20:.1f} MiB "
              f"(growth {growth / 2**20:+.1f} MiB); RPC servers' RSS {server_rss[0] / 2**20:.1f} -> "
              f"{server_rss[-1] / 2**20:.1f} MiB ({server_growth / 2**20:+.1f} MiB)")
        print("worker RSS MiB at loads 1,10,20,30,40,50:", [round(rss[i] / 2**20, 1) for i in (0, 9, 19, 29, 39, 49)])
        print("servers RSS MiB at loads 1,10,20,30,40,50:",
              [round(server_rss[i] / 2**20, 1) for i in (0, 9, 19, 29, 39, 49)])
    assert growth < RSS_GROWTH_LIMIT
    # warmed up after the first few loads (allocator arenas, ggml's caches): flat from then on.
    # Medians of five loads, since one load's RSS can spike transiently (seen: +48 MiB on the servers).
    assert statistics.median(rss[-5:]) - statistics.median(rss[7:12]) < PLATEAU_LIMIT
    assert statistics.median(server_rss[-5:]) - statistics.median(server_rss[7:12]) < PLATEAU_LIMIT
    # every process gpulab started is gone: RPC servers and the worker
    for pid in server_pids + list(worker_pids):
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not Path(f"/proc/{pid}").exists(), f"process {pid} left behind"
    assert _children(os.getpid()) - kids_before == set()
    assert _fds() == fds_before
