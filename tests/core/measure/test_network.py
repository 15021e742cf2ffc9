"""What crosses each link, per token and per prompt, for the demo model split over two hosts; the
figures written out are the byte counters of gpulab.netem's proxies in front of two real RPC
servers holding SmolLM2-135M (-ts 1/1, -c 256, -fa off): up 6780 and 7098 bytes per token, down
2312 (activations) and 196616 (logits); per 64-token prompt (one ubatch) up 313968 and 314286, down
147464 and 196616 (bench/hosts_pp.py, the proxies' command parser: 5 and 6 SET_TENSOR, one
GET_TENSOR, one GRAPH_RECOMPUTE per server)."""

from __future__ import annotations

import pytest

from gpulab.core.cluster import Cluster, Host, HostDevice, Link
from gpulab.core.config import SplitConfig
from gpulab.core.devices import Device
from gpulab.core.measure.network import network_cost, predict_over
from gpulab.core.placement.planner import plan

HOST = Device(name="CPU", total_bytes=64 << 30, free_bytes=64 << 30, source="host", kind="cpu")


def cluster(gbit: float = 1.0, rtt_ms: float = 1.0, same_host: bool = False) -> Cluster:
    link = Link(gbit * 1e9 / 8, rtt_ms / 1e3)
    if same_host:
        two = (HostDevice("4GiB", "CPU", 50052), HostDevice("4GiB", "CPU", 50053))
        return Cluster((Host("head", ()), Host("a", two, address="10.0.0.2", link=link)), head="head")
    return Cluster((Host("head", ()), Host("a", (HostDevice("4GiB", "CPU", 50052),), address="10.0.0.2", link=link),
                    Host("b", (HostDevice("4GiB", "CPU", 50052),), address="10.0.0.3", link=link)), head="head")


@pytest.fixture(scope="module")
def profile(smollm2):
    from gpulab.sources.read import read_profile
    return read_profile(smollm2)


def _plan(profile, c, **cfg):
    devs, host_of = c.devices()
    p = plan(profile, devs, SplitConfig(n_ctx=256, n_batch=64, n_ubatch=64, flash_attn="off", **cfg), HOST)
    return p, host_of, {d.name: d.endpoint for d in devs}


def test_bytes_per_token_match_the_proxies(profile):
    c = cluster()
    p, host_of, ep = _plan(profile, c, tensor_split=(1.0, 1.0))
    assert p.layer_devices[:16] == ("RPC0",) * 16 and p.layer_devices[16:] == ("RPC1",) * 15
    net = network_cost(p, c, host_of, ep, n_prompt=64, n_gen=64)
    a, b = net.tg["a"], net.tg["b"]
    # every byte the proxies counted: data and ggml-rpc.cpp's command headers
    assert (a.bytes_up, b.bytes_up, a.bytes_down, b.bytes_down) == (6780, 7098, 2312, 196616)
    assert a.round_trips == 1 and b.round_trips == 1
    # the prompt: V's row indices are one I64 per element of a transposed V row (192 per token)
    pa, pb = net.pp["a"], net.pp["b"]
    assert (pa.bytes_up, pb.bytes_up, pa.bytes_down, pb.bytes_down) == (313968, 314286, 147464, 196616)
    assert pa.round_trips == 1 and pb.round_trips == 1
    # at 1 Gbit/s two round trips of 1 ms cost more than the logits (196 KB per token: 1.6 ms); at 100 Mbit/s not
    assert net.dominant("tg") == "round trips"
    assert cluster(gbit=0.1).host("a").link.bytes_per_s == 12.5e6
    slow = network_cost(p, cluster(gbit=0.1), host_of, ep, n_prompt=64, n_gen=64)
    assert slow.dominant("tg") == "logits"


def test_two_servers_on_one_host_still_go_through_the_head(profile):
    c = cluster(same_host=True)
    p, host_of, ep = _plan(profile, c, tensor_split=(1.0, 1.0))
    net = network_cost(p, c, host_of, ep, n_prompt=64, n_gen=64)
    # one link carries both servers' traffic: the activations go down and up again
    u = net.tg["a"]
    assert u.round_trips == 2
    assert u.down["activations"] == 2304 + 8 and u.up["activations"] == 2 * 2304   # + the answer's u64 size


def test_remote_links_slow_generation_the_head_alone_does_not(profile):
    c = cluster(gbit=1.0, rtt_ms=1.0)
    p, host_of, ep = _plan(profile, c, tensor_split=(1.0, 1.0))
    fast, _ = predict_over(p, cluster(gbit=10, rtt_ms=0.1), host_of, ep, n_prompt=64, n_gen=64)
    slow, net = predict_over(p, c, host_of, ep, n_prompt=64, n_gen=64)
    assert slow.tg_tokens_per_s < fast.tg_tokens_per_s
    assert 1 / slow.tg_tokens_per_s - 1 / fast.tg_tokens_per_s == pytest.approx(
        net.tg_seconds - network_cost(p, cluster(gbit=10, rtt_ms=0.1), host_of, ep, n_prompt=64, n_gen=64).tg_seconds)
    # 2 round trips of 1 ms, 6.8 + 7.1 KB up, 2.3 KB + 196.6 KB down at 125 MB/s
    assert net.tg_seconds == pytest.approx(2e-3 + (6780 + 7098 + 2312 + 196616) / 125e6, rel=1e-6)


def test_tensor_split_sends_its_graphs_every_token(profile):
    """Counted through the proxies on real llama.cpp: 19.60 and 19.73 MB up, 335 KB and 139 KB down
    per token for the two members."""
    c = cluster()
    devs, host_of = c.devices()
    p = plan(profile, devs, SplitConfig(n_ctx=256, n_batch=64, n_ubatch=64, split_mode="tensor",
                                        tensor_split=(1.0, 1.0)), HOST)
    net = network_cost(p, c, host_of, {d.name: d.endpoint for d in devs}, n_prompt=0, n_gen=40)
    a, b = net.tg["a"], net.tg["b"]
    assert a.bytes_up == pytest.approx(19.6e6, rel=0.02) and b.bytes_up == pytest.approx(19.7e6, rel=0.02)
    assert a.bytes_down == pytest.approx(335336, rel=0.01) and b.bytes_down == pytest.approx(138720, rel=0.01)
    assert a.round_trips == 61    # 60 all-reduce stages (2 per layer) and the output
    assert net.dominant("tg") == "graphs"
