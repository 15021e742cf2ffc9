"""Commands for a model spread over hosts: an `rpc-server` per remote device, the head's
`llama-server` with `--rpc` in llama.cpp's device order and -ngl/-ts to match the plan, and a
llama-swap entry for it.

llama.cpp's RPC protocol has no authentication: every rpc-server binds the address its host has
in the cluster description (never 0.0.0.0 unless that is what the description says), and each
command comes with one line saying what its open port exposes.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, replace

from ..cluster import Cluster
from ..config import SplitConfig
from ..devices import Device
from ..placement.plan import Plan
from .render import render

__all__ = ["HostCommand", "ClusterExport", "cluster_export", "exposure_line", "SERVER_TOOLS"]


@dataclass(frozen=True)
class HostCommand:
    host: str
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    exposure: str = ""

    @property
    def text(self) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env)
        return (env + " " if env else "") + shlex.join(self.argv)


@dataclass(frozen=True)
class ClusterExport:
    servers: tuple[HostCommand, ...]     # one rpc-server per remote device, in --rpc order
    head: HostCommand                    # llama-server on the head
    llama_swap: dict                     # {'models': {name: {'cmd': ...}}}
    gaps: tuple[str, ...] = ()

    def text(self) -> str:
        lines = []
        for s in self.servers:
            lines += [f"# on {s.host}: {s.exposure}", s.text]
        lines += [f"# on {self.head.host} (the head):", self.head.text]
        lines += [f"# {g}" for g in self.gaps]
        return "\n".join(lines)


def exposure_line(address: str, port: int) -> str:
    where = ("this machine only" if address.startswith("127.") or address == "localhost"
             else "every machine that can reach it" if address == "0.0.0.0"
             else f"whoever can reach {address}")
    return (f"port {port} on {address} is open to {where}: llama.cpp's RPC has no authentication, so they can "
            "read and overwrite this device's memory and run computations on it")


def _tensor_split(plan: Plan) -> tuple[float, ...]:
    """-ts that gives the plan's layers per offload device whatever the devices' free memory: the
    count of its offloaded layer slots (the output layer included) per device. llama.cpp
    (llama_model::load_tensors) puts slot il of the act offloaded ones on the first device whose
    cumulative split exceeds il / act, so integer counts reproduce the plan exactly."""
    names = [d.name for d in plan.offload_devices]
    return tuple(float(sum(1 for x in plan.layer_devices if x == n)) for n in names)


SERVER_TOOLS = ("rpc-server", "gpulab")


def cluster_export(plan: Plan, cluster: Cluster, hosts: tuple[str, ...] | list[str], devices: list[Device],
                   *, model_path: str, name: str = "model", server_tool: str = "rpc-server") -> ClusterExport:
    """Commands for `plan` over `devices` (Cluster.devices(hosts), llama.cpp's order): the plan's
    layers per device as -ts, its -ngl, --rpc with the chosen hosts' servers. server_tool:
    llama.cpp's `rpc-server` or `gpulab rpc-server` (the same server through libggml-rpc, for a
    host with llama-cpp-python and no llama.cpp build)."""
    servers = []
    for h in cluster.remote(list(hosts)):
        for d in h.devices:
            env: tuple[tuple[str, str], ...] = ()
            if server_tool == "gpulab":
                argv: tuple[str, ...] = ("gpulab", "rpc-server", "--host", h.address, "--port", str(d.port),
                                         "--device", d.device or "CPU")
                if h.cache_dir:
                    argv += ("--cache-dir", h.cache_dir)
                servers.append(HostCommand(h.name, argv, env, exposure_line(h.address, d.port)))
                continue
            argv = ("rpc-server", "-H", h.address, "-p", str(d.port), "-d", d.device or "CPU")
            if h.cache_dir:
                # rpc-server -c caches under fs_get_cache_directory() (tools/rpc/rpc-server.cpp), which
                # LLAMA_CACHE sets
                argv += ("-c",)
                env = (("LLAMA_CACHE", h.cache_dir),)
            servers.append(HostCommand(h.name, argv, env, exposure_line(h.address, d.port)))
    cfg: SplitConfig = replace(plan.config, tensor_split=_tensor_split(plan))
    exp = render(cfg, "llama-server", model_path=model_path, n_layer=plan.profile.n_layer, devices=devices)
    head_argv = tuple(exp.data)
    swap_argv = [head_argv[0], "--port", "${PORT}", *head_argv[1:]]
    swap = {"models": {name: {"cmd": " ".join(t if t == "${PORT}" else shlex.quote(t) for t in swap_argv)}}}
    return ClusterExport(tuple(servers), HostCommand(cluster.head, head_argv), swap, tuple(exp.gaps))
