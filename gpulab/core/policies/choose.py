"""What a policy button sets: every placement setting the policy needs, from the current settings,
and one line saying what it chose (or why it cannot).

The lab (gpulab.ui.lab) and `gpulab plan --policy P` agree by construction: the config returned here
is `apply_policy(P, ...)` of the current settings with the placement flags a policy owns reset to
llama.cpp's defaults first, so the same flags on the command line plan the same.

- llama, ollama-spread, pack, balanced: every device, -sm layer, -mg 0, then the policy's -ts
- moe-balance: the same, and its -ot rules instead of -ot/-cmoe/-ncmoe
- fit: llama-server's defaults (every device, -sm layer, no -c/-np/-ngl/-ts/-ot), then its fit
- ollama: Ollama's own flags and devices (it reads none of the current settings)
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import SplitConfig
from ..devices import Device
from ..errors import GpulabError
from ..profile import ModelProfile
from .apply import ALL_POLICIES, apply_policy

__all__ = ["LABELS", "PolicyChoice", "choose", "policy_base"]

LABELS = {"llama": "llama.cpp default", "ollama-spread": "ollama spread", "pack": "pack", "balanced": "balanced",
          "moe-balance": "MoE balance", "fit": "llama-server -fit", "ollama": "ollama (today)"}


@dataclass(frozen=True)
class PolicyChoice:
    name: str
    config: SplitConfig | None     # None: the policy cannot choose (see note)
    note: str                      # one line
    result: object | None = None   # FitResult (fit) or OllamaResult (ollama)

    @property
    def ok(self) -> bool:
        return self.config is not None


def policy_base(name: str, current: SplitConfig) -> SplitConfig:
    """`current` with the flags policy `name` owns reset to llama.cpp's defaults."""
    base = current.replace(devices=(), split_mode="layer", main_gpu=0, tensor_split=())
    if name == "moe-balance":
        base = base.replace(tensor_overrides=(), cpu_moe=False, n_cpu_moe=0)
    if name == "fit":
        # llama-server without -c, -np, -ngl, -ts, -ot: -np auto is 4 slots sharing one unified KV
        # cache (tools/server/server.cpp), as `gpulab plan --policy fit` without those flags
        base = base.replace(n_ctx=0, n_gpu_layers=-1, tensor_overrides=(), cpu_moe=False, n_cpu_moe=0,
                            n_cpu_ffn=0, fit="on", n_seq_max=4, kv_unified=True)
    return base


def _ts_text(ts: tuple[float, ...]) -> str:
    return ",".join(f"{x:g}" for x in ts)


def choose(name: str, profile: ModelProfile, devices: list[Device], current: SplitConfig,
           host: Device | None = None) -> PolicyChoice:
    label = LABELS.get(name, name)
    if name not in ALL_POLICIES:
        return PolicyChoice(name, None, f"unknown policy {name!r}; choose one of {', '.join(ALL_POLICIES)}")
    if not devices and name != "ollama":
        return PolicyChoice(name, None, f"{label}: no offload device to place layers on")
    if name == "moe-balance" and not profile.is_moe:
        return PolicyChoice(name, None,
                            f"{label}: {profile.name or profile.arch} is not a MoE model (no experts to place)")
    base = policy_base(name, current)
    try:
        if name == "fit":
            from .server_fit import server_fit
            r = server_fit(profile, devices, base, host)
            if not r.ok:
                return PolicyChoice(name, None, f"llama-server's fit gives up: {r.reasons[-1]}", r)
            near = (f" ({len(r.near_boundary)} decision(s) within gpulab's compute-buffer uncertainty: llama.cpp "
                    "may choose one layer or context step differently)") if r.near_boundary else ""
            return PolicyChoice(name, r.config, f"fit: {r.flags(devices)}{near}", r)
        if name == "ollama":
            from .ollama import ollama
            o = ollama(profile, devices, host=host)
            why = next((x for x in o.reasons if x.startswith("selectLlamaServerPlacement")), "")
            return PolicyChoice(name, o.config, f"ollama passes {' '.join(o.args)}" + (f" ({why})" if why else ""), o)
        config = apply_policy(name, profile, devices, base, host)
    except GpulabError as e:
        return PolicyChoice(name, None, f"{label}: {e}")
    ts = config.tensor_split
    said = f"-ts {_ts_text(ts)}" if ts else "no -ts (layers in proportion to free memory)"
    if config.tensor_overrides and name == "moe-balance":
        said += f" and {len(config.tensor_overrides)} -ot rule(s)"
    return PolicyChoice(name, config, f"{label}: every device, -sm layer, {said}")
