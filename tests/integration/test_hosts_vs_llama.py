"""A model over three emulated hosts, llama.cpp real: the head (this machine's llama.cpp) and two
hosts whose devices are CPU RPC servers behind gpulab.netem's shaping proxies (the 'fast'
profile). What cannot flake is asserted here; the timings are bench/hosts.py's.

- placement: the plan over the cluster's devices equals the layers llama.cpp placed and the
  weights and KV each RPC server allocated (its own debug log);
- bytes: what each proxy carried per generated token equals network_cost's count;
- the exported commands start: gpulab rpc-server per host as exported, the head's llama-server
  as exported (--rpc through the proxies, -ts), and its log's placement equals the plan.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp")

from builders import close_to_llama
from gpulab.core.cluster import Cluster, Host, HostDevice, Link
from gpulab.core.config import SplitConfig
from gpulab.core.measure.network import network_cost
from gpulab.core.placement.planner import plan
from gpulab.netem import PROFILES, ShapingProxy
from gpulab.sources.host import host_device
from gpulab.sources.read import read_profile
from llama_tools import NOT_BUILT, tools_bin
from processes import stop

PROFILE = PROFILES["fast"]
CONFIG = SplitConfig(n_ctx=256, n_batch=64, n_ubatch=64, flash_attn="off", tensor_split=(1.0, 1.0))


def _cluster(ports: list[int]) -> Cluster:
    link = Link(PROFILE.bytes_per_s, PROFILE.rtt_s)
    return Cluster((Host("head", ()),
                    *(Host(f"h{i}", (HostDevice("4GiB", "CPU", p),), address="127.0.0.1", link=link)
                      for i, p in enumerate(ports))), head="head")


@pytest.fixture(scope="module")
def emulated():
    """Two RPC servers (debug log on), each behind a proxy: (servers, proxies, cluster as the head sees it)."""
    from gpulab.runtime.rpc import start_servers
    with start_servers(2, debug_log=True) as servers:
        proxies = [ShapingProxy.for_profile(("127.0.0.1", s.port), PROFILE, lifetime_s=600).start() for s in servers]
        try:
            yield servers, proxies, _cluster([p.port for p in proxies])
        finally:
            for p in proxies:
                p.stop()


def _plan_for(profile, cluster, devices):
    by_ep = {ep: h.name for h in cluster.remote() for ep in h.endpoints()}
    host_of = {d.name: by_ep[d.endpoint] for d in devices}
    return plan(profile, devices, CONFIG, host_device()), host_of, {d.name: d.endpoint for d in devices}


def test_placement_and_bytes_per_link_match_llama(smollm2, emulated):
    from gpulab.runtime.rpc import server_buffers
    from gpulab.runtime.worker import Worker
    servers, proxies, cluster = emulated
    prof = read_profile(smollm2)
    with Worker(cluster.endpoints()) as w:
        devices = [d for d in w.devices() if d.kind == "rpc"]
        assert [d.endpoint for d in devices] == cluster.endpoints()
        p, host_of, endpoint_of = _plan_for(prof, cluster, devices)
        marks = [len(s.output()) for s in servers]
        m = w.open(smollm2, CONFIG)
        try:
            assert list(m.report.layer_devices) == list(p.layer_devices)
            assert p.layer_devices == ("RPC0",) * 16 + ("RPC1",) * 15
            for s, mark, d in zip(servers, marks, devices):
                got = server_buffers(s.output()[mark:])
                assert abs(got.model_bytes - p.device(d.name).weights_bytes) <= 4096
                assert abs(got.kv_bytes - p.device(d.name).kv_bytes) <= 4096
            counts = []
            m.measure(n_prompt=0, n_gen=4, repetitions=1, warmup=False)   # sends the generation graph once
            for n_gen in (8, 40):   # the difference: 32 tokens of generation, the graph reused
                before = [(x.bytes_up[0], x.bytes_down[0]) for x in proxies]
                m.measure(n_prompt=0, n_gen=n_gen, repetitions=1, warmup=False)
                counts.append([(x.bytes_up[0] - b[0], x.bytes_down[0] - b[1]) for x, b in zip(proxies, before)])
            m.measure(n_prompt=64, n_gen=0, repetitions=1, warmup=False)   # sends the prompt's graph once
            for reps in (2, 6):     # the difference: 4 prompts of 64 tokens, the graph reused
                before = [(x.bytes_up[0], x.bytes_down[0]) for x in proxies]
                m.measure(n_prompt=64, n_gen=0, repetitions=reps, warmup=False)
                counts.append([(x.bytes_up[0] - b[0], x.bytes_down[0] - b[1]) for x, b in zip(proxies, before)])
        finally:
            m.close()
    net = network_cost(p, cluster, host_of, endpoint_of, n_prompt=64, n_gen=40)
    for i, host in enumerate(("h0", "h1")):
        up = (counts[1][i][0] - counts[0][i][0]) / 32
        down = (counts[1][i][1] - counts[0][i][1]) / 32
        assert up == pytest.approx(net.tg[host].bytes_up, rel=0.005), host
        assert down == pytest.approx(net.tg[host].bytes_down, rel=0.005), host
        # a prompt: V's row indices (one I64 per element of a transposed V row) weigh as much as the mask
        up = (counts[3][i][0] - counts[2][i][0]) / 4
        down = (counts[3][i][1] - counts[2][i][1]) / 4
        assert up == pytest.approx(net.pp[host].bytes_up, rel=0.005), host
        assert down == pytest.approx(net.pp[host].bytes_down, rel=0.005), host
    assert net.tg["h1"].down["logits"] == 4 * prof.n_vocab + 8   # + the answer's u64 size


@pytest.mark.skipif(tools_bin() is None, reason=NOT_BUILT)
def test_exported_commands_start_and_place_as_planned(smollm2, tmp_path):
    """The servers and the head's llama-server started from the export; the proxies stand between
    (the export's ports are the proxies', where the head connects; each server binds its own)."""
    from gpulab.core.devices import Device
    from gpulab.core.exports.cluster import cluster_export
    from gpulab.runtime.logcapture import parse_load_log
    from gpulab.runtime.rpc import _free_port
    server_ports = [_free_port("127.0.0.1") for _ in range(2)]
    server_side = _cluster(server_ports)
    prof = read_profile(smollm2)
    # described, not registered: this process must not hold the servers llama-server needs
    devices = [Device(f"RPC{i}", 4 << 30, 4 << 30, "rpc", "rpc", endpoint=e)
               for i, e in enumerate(server_side.endpoints())]
    procs: list[subprocess.Popen] = []
    proxies: list[ShapingProxy] = []
    try:
        p = plan(prof, devices, CONFIG, host_device())
        exp = cluster_export(p, server_side, ("head", "h0", "h1"), devices, model_path=str(smollm2),
                             server_tool="gpulab")
        assert all(s.argv[s.argv.index("--host") + 1] == "127.0.0.1" for s in exp.servers)
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
        for i, s in enumerate(exp.servers):
            argv = [sys.executable, "-m", "gpulab", *s.argv[1:]]
            procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL,
                                          stderr=(tmp_path / f"server{i}.log").open("w"), start_new_session=True))
        deadline = time.monotonic() + 60
        from gpulab.runtime.rpc import probe
        for port in server_ports:
            while True:
                try:
                    probe(f"127.0.0.1:{port}", timeout=2)
                    break
                except Exception:  # noqa: BLE001 - not up yet
                    assert time.monotonic() < deadline, "an exported rpc-server did not start"
                    time.sleep(0.5)
        proxies = [ShapingProxy.for_profile(("127.0.0.1", port), PROFILE, lifetime_s=300).start()
                   for port in server_ports]
        head_argv = list(exp.head.argv)
        rpc_at = head_argv.index("--rpc") + 1
        assert head_argv[rpc_at] == ",".join(server_side.endpoints())
        head_argv[rpc_at] = ",".join(x.endpoint for x in proxies)   # through the links
        assert head_argv[head_argv.index("-ts") + 1] == "16,15"
        port = _free_port("127.0.0.1")
        log = tmp_path / "head.log"
        # -v: llama.cpp logs 'layer N assigned to device X' at debug level
        procs.append(subprocess.Popen([str(tools_bin() / "llama-server"), *head_argv[1:], "--host", "127.0.0.1",
                                       "--port", str(port), "-v"], stdout=subprocess.DEVNULL, stderr=log.open("w"),
                                      start_new_session=True))
        deadline = time.monotonic() + 180
        while "model loaded" not in log.read_text(errors="replace"):
            assert procs[-1].poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, "llama-server did not load the model in 180 s"
            time.sleep(1)
        seen = [replace(d, endpoint=x.endpoint) for d, x in zip(devices, proxies)]   # the head's names
        report = parse_load_log(log.read_text(errors="replace"), seen)
        assert list(report.layer_devices) == list(p.layer_devices)
        for d in devices:
            assert close_to_llama(p.device(d.name).weights_bytes, report.bytes_on(d.name, "model"))
        assert all(x.bytes_up[0] > 0 for x in proxies)   # the weights went through the links
    finally:
        for proc in reversed(procs):
            stop(proc, 30)
        for x in proxies:
            x.stop()
    assert shlex.split(exp.llama_swap["models"]["model"]["cmd"])[:3] == ["llama-server", "--port", "${PORT}"]


def test_tensor_split_bytes_per_link_match_llama(smollm2, emulated):
    """-sm tensor over RPC: the all-reduces through the head, and the meta device's small graphs
    sent in full every token (19.6 MB per member per token for SmolLM2's 30 layers)."""
    from gpulab.runtime.worker import Worker
    _servers, proxies, cluster = emulated
    cfg = CONFIG.replace(split_mode="tensor", flash_attn="auto")
    with Worker(cluster.endpoints()) as w:
        devices = [d for d in w.devices() if d.kind == "rpc"]
        m = w.open(smollm2, cfg)
        try:
            m.measure(n_prompt=0, n_gen=4, repetitions=1, warmup=False)
            counts = []
            for n_gen in (8, 24):
                before = [(x.bytes_up[0], x.bytes_down[0]) for x in proxies]
                m.measure(n_prompt=0, n_gen=n_gen, repetitions=1, warmup=False)
                counts.append([(x.bytes_up[0] - b[0], x.bytes_down[0] - b[1]) for x, b in zip(proxies, before)])
        finally:
            m.close()
    by_ep = {ep: h.name for h in cluster.remote() for ep in h.endpoints()}
    p = plan(read_profile(smollm2), devices, cfg, host_device())
    net = network_cost(p, cluster, {d.name: by_ep[d.endpoint] for d in devices},
                       {d.name: d.endpoint for d in devices}, n_prompt=0, n_gen=24)
    for i, host in enumerate(("h0", "h1")):
        up = (counts[1][i][0] - counts[0][i][0]) / 16
        down = (counts[1][i][1] - counts[0][i][1]) / 16
        assert up == pytest.approx(net.tg[host].bytes_up, rel=0.05), host
        assert down == pytest.approx(net.tg[host].bytes_down, rel=0.02), host
    assert net.dominant("tg") == "graphs"
