"""The cluster description: hosts, their devices in llama.cpp's order, links, bad input."""

import pytest

from gpulab.core.cluster import cluster_from_dict, cluster_to_dict
from gpulab.core.errors import ConfigError

DOC = {
    "version": 1, "head": "desk",
    "hosts": [
        {"name": "desk", "devices": [{"spec": "24GiB:936GB/s"}]},
        {"name": "box", "address": "10.0.0.2", "link": {"gbit_per_s": 1.0, "rtt_ms": 1.0},
         "devices": [{"spec": "16GiB", "device": "CUDA0", "port": 50052},
                     {"spec": "16GiB", "device": "CUDA1", "port": 50053}]},
        {"name": "nas", "address": "10.0.0.3", "link": {"gbit_per_s": 10, "rtt_ms": 0.1},
         "devices": [{"spec": "8GiB", "port": 50052}]},
    ],
}


def test_devices_in_llama_cpp_order_rpc_first():
    c = cluster_from_dict(DOC)
    devs, host_of = c.devices()
    assert [d.name for d in devs] == ["RPC0", "RPC1", "RPC2", "SIM0"]
    assert [d.endpoint for d in devs[:3]] == ["10.0.0.2:50052", "10.0.0.2:50053", "10.0.0.3:50052"]
    assert host_of == {"RPC0": "box", "RPC1": "box", "RPC2": "nas", "SIM0": "desk"}
    assert devs[0].total_bytes == 16 << 30 and devs[3].bandwidth_bytes_per_s == 936e9
    assert c.endpoints(["nas"]) == ["10.0.0.3:50052"]
    assert c.host("box").link.bytes_per_s == 125e6 and c.host("nas").link.rtt_s == pytest.approx(1e-4)


def test_round_trip():
    c = cluster_from_dict(DOC)
    assert cluster_from_dict(cluster_to_dict(c)) == c


@pytest.mark.parametrize("change, says", [
    (lambda d: d["hosts"][1].pop("link"), "needs its link"),
    (lambda d: d["hosts"][2]["devices"][0].pop("port"), "port of its rpc-server"),
    (lambda d: d.update(head="nope"), "not one of the hosts"),
    (lambda d: d.update(version=9), "version 9"),
    (lambda d: d["hosts"][1]["link"].update(gbit_per_s=0), "positive"),
    (lambda d: d["hosts"][2].update(address="10.0.0.2", devices=[{"spec": "8GiB", "port": 50053}]), "two rpc-servers"),
    (lambda d: d["hosts"][1].update(colour="red"), "unknown key(s) colour"),
])
def test_bad_input_says_what_to_change(change, says):
    import copy
    doc = copy.deepcopy(DOC)
    change(doc)
    with pytest.raises(ConfigError, match=says.replace("(", r"\(").replace(")", r"\)")):
        cluster_from_dict(doc)
