"""Commands per host: rpc-servers bound where the cluster says, with what their port exposes; the
head's llama-server with --rpc in llama.cpp's order and -ts that reproduces the plan."""

from __future__ import annotations

from gpulab.core.cluster import cluster_from_dict
from gpulab.core.config import SplitConfig
from gpulab.core.devices import Device
from gpulab.core.exports.cluster import cluster_export
from gpulab.core.placement.planner import plan
from gpulab.testing import make_llama_profile

HOST = Device(name="CPU", total_bytes=64 << 30, free_bytes=64 << 30, source="host", kind="cpu")


def test_commands_per_host():
    c = cluster_from_dict({"head": "desk", "hosts": [
        {"name": "desk", "devices": []},
        {"name": "a", "address": "10.0.0.2", "cache_dir": "/var/cache/llama", "link": {"gbit_per_s": 1, "rtt_ms": 1},
         "devices": [{"spec": "8GiB", "device": "CUDA0", "port": 50052},
                     {"spec": "8GiB", "device": "CUDA1", "port": 50053}]},
        {"name": "b", "address": "10.0.0.3", "link": {"gbit_per_s": 1, "rtt_ms": 1},
         "devices": [{"spec": "8GiB", "device": "CUDA0", "port": 50052}]}]})
    devs, _ = c.devices()
    prof = make_llama_profile(n_layer=8)
    p = plan(prof, devs, SplitConfig(n_ctx=512, tensor_split=(1.0, 1.0, 1.0)), HOST)
    exp = cluster_export(p, c, ("desk", "a", "b"), devs, model_path="m.gguf", name="m")
    assert [s.text for s in exp.servers] == [
        "LLAMA_CACHE=/var/cache/llama rpc-server -H 10.0.0.2 -p 50052 -d CUDA0 -c",
        "LLAMA_CACHE=/var/cache/llama rpc-server -H 10.0.0.2 -p 50053 -d CUDA1 -c",
        "rpc-server -H 10.0.0.3 -p 50052 -d CUDA0"]
    assert exp.servers[2].exposure.startswith("port 50052 on 10.0.0.3 is open to whoever can reach 10.0.0.3: "
                                              "llama.cpp's RPC has no authentication")
    head = exp.head.argv
    assert head[:5] == ("llama-server", "-m", "m.gguf", "--rpc", "10.0.0.2:50052,10.0.0.2:50053,10.0.0.3:50052")
    # 9 layer slots (8 layers and the output) as llama.cpp splits 1/1/1: 3 + 3 + 3
    assert p.layer_devices == ("RPC0",) * 3 + ("RPC1",) * 3 + ("RPC2",) * 3
    assert head[head.index("-ts") + 1] == "3,3,3"
    assert "0.0.0.0" not in exp.text()
    assert exp.llama_swap["models"]["m"]["cmd"].startswith("llama-server --port ${PORT} -m m.gguf --rpc ")
