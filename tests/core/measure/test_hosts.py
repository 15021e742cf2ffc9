"""Which hosts to span: the head alone with a partial offload against two hosts with every layer
on a device, at a slow and a fast link (SmolLM2-135M, devices of 250 MiB at 400 GB/s)."""

from __future__ import annotations

import pytest

from gpulab.core.cluster import cluster_from_dict
from gpulab.core.config import SplitConfig
from gpulab.core.devices import Device
from gpulab.core.measure.hosts import choose, host_options

HOST = Device(name="CPU", total_bytes=64 << 30, free_bytes=64 << 30, source="host", kind="cpu")
DEV = {"spec": "250MiB:400GB/s", "device": "CUDA0", "port": 50052}


def cluster(gbit: float, rtt_ms: float):
    return cluster_from_dict({"head": "desk", "hosts": [
        {"name": "desk", "devices": [{"spec": DEV["spec"]}]},
        {"name": "box", "address": "10.0.0.2", "link": {"gbit_per_s": gbit, "rtt_ms": rtt_ms}, "devices": [DEV]}]})


@pytest.fixture(scope="module")
def profile(smollm2):
    from gpulab.sources.read import read_profile
    return read_profile(smollm2)


def test_options_and_the_answer_at_two_link_speeds(profile):
    cfg = SplitConfig(n_ctx=4096)
    fast = host_options(profile, cluster(10, 0.1), cfg, HOST)
    assert [o.hosts for o in fast] == [("desk",), ("desk", "box")]
    alone, both = fast
    assert alone.n_cpu_layers == 6 and both.full_offload        # 25 of 31 layers fit one device
    assert both.plan.layer_devices[0] == "RPC0" and both.plan.layer_devices[-1] == "SIM0"
    assert both.endpoints == ("10.0.0.2:50052",)
    chosen, why = choose(fast, "tg")
    assert chosen is both and "spans 2 hosts" in why
    slow = host_options(profile, cluster(0.1, 5.0), cfg, HOST)
    chosen, why = choose(slow, "tg")
    assert chosen is slow[0] and why == "the head alone with a partial offload is the fastest choice"
    # fewest hosts that hold every layer on a device: two, whatever the link
    chosen, why = choose(slow, "hosts")
    assert chosen is slow[1] and "fewest" in why
    assert slow[1].network.dominant("tg") == "round trips"


def test_unknown_objective_says_which_exist(profile):
    from gpulab.core.errors import ConfigError
    with pytest.raises(ConfigError, match="one of tg, hosts"):
        choose(host_options(profile, cluster(1, 1), SplitConfig(n_ctx=4096), HOST), "speed")
