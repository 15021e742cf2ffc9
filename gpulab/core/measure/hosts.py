"""Which hosts a model should span: every choice of the cluster's other hosts beside the head,
planned as llama.cpp would place it (devices in --rpc order, then the head's own) and priced
with the links (gpulab.core.measure.network).

For each choice of hosts the plan is llama.cpp's default split over their devices (by free
memory); when it does not fit, the most layers that do (-ngl, the rest on the head's CPU):
so "the head alone with a partial offload" and "two hosts with every layer on a device" are
both options, with their predicted tg and pp side by side.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import combinations

from ..cluster import Cluster
from ..config import SplitConfig
from ..devices import HOST_NAME, Device
from ..placement.plan import Plan
from ..placement.planner import plan as plan_of
from ..profile import ModelProfile
from .network import NetworkCost, predict_over
from .speed import SpeedModel, SpeedPrediction

__all__ = ["HostOption", "host_options", "choose", "OBJECTIVES", "MAX_REMOTE_HOSTS"]

OBJECTIVES = ("tg", "hosts")
MAX_REMOTE_HOSTS = 8        # 2^8 choices of hosts, each planned up to n_layer times: still milliseconds


@dataclass(frozen=True)
class HostOption:
    hosts: tuple[str, ...]          # the head first, then the remote hosts in --rpc order
    plan: Plan
    speed: SpeedPrediction
    network: NetworkCost
    host_of: dict                   # device name -> host
    endpoints: tuple[str, ...]      # the head's --rpc list

    @property
    def fits(self) -> bool:
        return self.plan.fits

    @property
    def n_cpu_layers(self) -> int:
        return sum(1 for d in self.plan.layer_devices if d == HOST_NAME)

    @property
    def full_offload(self) -> bool:
        return self.n_cpu_layers == 0

    def describe(self) -> str:
        where = " + ".join(self.hosts)
        layers = ("every layer on a device" if self.full_offload
                  else f"{self.n_cpu_layers} of {len(self.plan.layer_devices)} layers on the head's CPU")
        net = ""
        if self.network.tg:
            net = (f"; links {self.network.tg_seconds * 1e3:.2f} ms per token, mostly "
                   f"{self.network.dominant('tg')}")
        return (f"{where}: {layers}; tg {self.speed.tg_tokens_per_s:.1f} t/s, pp {self.speed.pp_tokens_per_s:.0f} t/s"
                + net + ("" if self.fits else " (does not fit)"))


def _fitting_plan(profile: ModelProfile, devices: list[Device], config: SplitConfig, host: Device | None) -> Plan:
    """The plan with llama.cpp's split; if it does not fit, the most offloaded layers that do."""
    p = plan_of(profile, devices, config, host)
    if p.fits or config.n_gpu_layers == 0:
        return p
    top = profile.n_layer + 1 if config.n_gpu_layers < 0 else min(config.n_gpu_layers, profile.n_layer + 1)
    for ngl in range(top - 1, -1, -1):
        q = plan_of(profile, devices, replace(config, n_gpu_layers=ngl), host)
        if q.fits:
            return q
    return p


def host_options(profile: ModelProfile, cluster: Cluster, config: SplitConfig, host: Device | None,
                 model: SpeedModel | None = None, *, n_prompt: int = 512, n_gen: int = 128) -> list[HostOption]:
    """One option per choice of remote hosts (none, each one, each pair, ...), in that order."""
    remote = [h.name for h in cluster.remote()]
    if len(remote) > MAX_REMOTE_HOSTS:
        from ..errors import ConfigError
        raise ConfigError(f"{len(remote)} remote hosts: gpulab weighs every choice of up to {MAX_REMOTE_HOSTS}; "
                          "list fewer hosts in the cluster file")
    out = []
    for k in range(len(remote) + 1):
        for chosen in combinations(remote, k):
            devices, host_of = cluster.devices(list(chosen))
            cfg = replace(config, n_gpu_layers=config.n_gpu_layers if devices else 0)
            p = _fitting_plan(profile, devices, cfg, host)
            endpoint_of = {d.name: d.endpoint for d in devices if d.endpoint}
            speed, net = predict_over(p, cluster, host_of, endpoint_of, model, n_prompt=n_prompt, n_gen=n_gen,
                                      bandwidth_hints={d.name: d.bandwidth_bytes_per_s for d in devices
                                                       if d.bandwidth_bytes_per_s})
            out.append(HostOption(hosts=(cluster.head, *chosen), plan=p, speed=speed, network=net, host_of=host_of,
                                  endpoints=tuple(cluster.endpoints(list(chosen)))))
    return out


def choose(options: list[HostOption], objective: str = "tg") -> tuple[HostOption | None, str]:
    """(the chosen option, why): objective 'tg' takes the fitting option with the best predicted
    tg; 'hosts' the fewest hosts that hold every layer on a device (else the best tg among the
    fewest that fit), ties to the best tg. A model stays on the head alone unless it must span
    or spanning is faster; the reason says which."""
    if objective not in OBJECTIVES:
        from ..errors import ConfigError
        raise ConfigError(f"--objective {objective!r}: one of {', '.join(OBJECTIVES)}")
    fitting = [o for o in options if o.fits]
    if not fitting:
        return None, "no choice of hosts holds the model, even with layers on the head's CPU"
    alone = next((o for o in fitting if len(o.hosts) == 1), None)
    if objective == "tg":
        best = max(fitting, key=lambda o: (o.speed.tg_tokens_per_s, -len(o.hosts)))
    else:
        full = [o for o in fitting if o.full_offload] or fitting
        fewest = min(len(o.hosts) for o in full)
        best = max((o for o in full if len(o.hosts) == fewest), key=lambda o: o.speed.tg_tokens_per_s)
    if len(best.hosts) == 1:
        why = "the head alone" + ("" if best.full_offload else " with a partial offload") + " is " + (
            "the fastest choice" if objective == "tg" else "the fewest hosts")
    elif alone is None:
        why = f"spans {len(best.hosts)} hosts because the head alone cannot hold it"
    elif objective == "tg":
        gain = best.speed.tg_tokens_per_s / alone.speed.tg_tokens_per_s if alone.speed.tg_tokens_per_s else float("inf")
        why = (f"spans {len(best.hosts)} hosts: predicted tg {gain:.2f}x the head alone "
               f"({alone.n_cpu_layers} layers on its CPU)")
    else:
        why = f"spans {len(best.hosts)} hosts: the fewest that hold every layer on a device"
    return best, why
