"""Policies: ways to choose a tensor_split, each returning the split llama.cpp should be given.

- llama          llama.cpp's own default: no -ts, proportions = free memory at load time
- ollama-spread  Ollama <= 0.12 (its llama.cpp engine, llm/memory.go `estimateGPULayers`, read at
                 v0.3.0, v0.9.0, v0.12.0 and v0.12.10; gone in v0.12.11, commit f560bd077): layers
                 dealt round-robin to every GPU, so a 61-block model on 8 GPUs gets
                 -ts 8,8,8,8,8,8,7,7 however small it is. Those releases dealt over every GPU with
                 OLLAMA_SCHED_SPREAD set, or when no smaller set of GPUs (largest free first) held
                 the model (`pickBestFullFitByLibrary`: server/sched.go, llm/memory.go in v0.12.x)
- ollama         today's Ollama (v0.30 to v0.33.0-rc2, gpulab.core.policies.ollama): it picks the GPUs
                 (one GPU when the model fits in 80% of it), passes -c, -np, -b/-ub and, only when
                 set, -ngl and --main-gpu, and llama-server's fit chooses -ngl, -ts and -ot; like fit,
                 `apply_policy` returns its whole config
- pack           the fewest devices (largest free memory first) that hold the model
- balanced       equal free memory left on every device
- moe-balance    a MoE model: -ts and -ot rules that move expert tensors (to another device, or to
                 the CPU when they must) so every device is equally full (gpulab.core.policies.moe_balance)
- fit            llama-server's and llama-cli's own (common_fit_params, gpulab.core.policies.server_fit): it may also
                 change -c (when 0), -ngl (when auto) and the tensor overrides, so `apply_policy`
                 returns its whole config; `policy_split` and the lab's policy buttons take the others
"""

from __future__ import annotations

from dataclasses import replace

from ..config import SplitConfig
from ..devices import Device
from ..errors import ConfigError
from ..placement.planner import plan, select_devices
from ..profile import ModelProfile

__all__ = ["POLICIES", "ALL_POLICIES", "apply_policy", "policy_split"]

POLICIES = ("llama", "ollama-spread", "pack", "balanced", "moe-balance")   # -ts (moe-balance: and -ot)
ALL_POLICIES = (*POLICIES, "fit", "ollama")          # fit, ollama: -c, -ngl, -ts, -ot (ollama: and the devices)


def _n_offloaded(profile: ModelProfile, config: SplitConfig) -> int:
    ngl = config.n_gpu_layers
    return profile.n_layer + 1 if ngl < 0 else min(ngl, profile.n_layer + 1)


def _ollama_spread(profile: ModelProfile, used: list[Device], config: SplitConfig) -> tuple[float, ...]:
    # Ollama <= 0.12 (v0.12.0 llm/memory.go estimateGPULayers): layers, the output layer counted,
    # dealt one at a time across the GPUs (`gpusWithSpace[i%j]`); the counts were passed as
    # --tensor-split. gpulab deals over every selected device, as if each had room.
    n, count = len(used), _n_offloaded(profile, config)
    return tuple(float(count // n + (1 if i < count % n else 0)) for i in range(n))


def _pack(used: list[Device], try_split) -> tuple[float, ...]:
    order = sorted(range(len(used)), key=lambda i: -used[i].free_bytes)
    for k in range(1, len(used) + 1):
        chosen = set(order[:k])
        split = tuple(float(used[i].free_bytes) if i in chosen else 0.0 for i in range(len(used)))
        if try_split(split).fits:
            return split
    return tuple(float(d.free_bytes) for d in used)   # nothing fits: llama.cpp's proportions


def _balanced(used: list[Device], try_split) -> tuple[float, ...]:
    # Water-filling: aim every device at the same headroom c, take_i = free_i - c with
    # sum(take_i) = need; a device whose share would be negative drops out. Then correct the
    # targets by the headroom the planner actually leaves (layers are whole, the output layer
    # is bigger), keeping the split with the smallest spread.
    free = [float(d.free_bytes) for d in used]
    base = try_split(tuple(free))
    # compute buffers follow the layers (the logits buffer follows the output layer), so they are
    # part of what is placed, not a fixed cost per device
    need = float(sum(d.weights_bytes + d.kv_bytes + d.state_bytes + d.compute_bytes for d in base.offload_devices))
    active = list(range(len(used)))
    take: dict[int, float] = {}
    while active:
        c = (sum(free[i] for i in active) - need) / len(active)
        take = {i: free[i] - c for i in active}
        if all(v > 0 for v in take.values()):
            break
        active = [i for i in active if take[i] > 0]
    if not active:
        return tuple(free)
    target = [take.get(i, 0.0) for i in range(len(used))]
    # a device the water-filling kept keeps a share: refinement trades layers, it does not drop devices
    floor = [0.5 * t for t in target]
    best: tuple[float, ...] = tuple(target)
    best_spread = float("inf")
    for _ in range(6):
        got = try_split(tuple(target))
        left = [d.free_bytes - d.used_bytes for d in got.offload_devices]
        spread = max(left[i] for i in active) - min(left[i] for i in active)
        if spread < best_spread:
            best, best_spread = tuple(target), spread
        mean = sum(left[i] for i in active) / len(active)
        target = [max(floor[i], t + (left[i] - mean)) if i in active else 0.0 for i, t in enumerate(target)]
    return best


def _readable(split: tuple[float, ...] | list[float]) -> tuple[float, ...]:
    """Proportions scaled so the largest is 1, four decimals: '-ts 1,0.4375' rather than bytes."""
    top = max(split, default=0.0)
    return tuple(round(x / top, 4) for x in split) if top > 0 else tuple(split)


def policy_split(name: str, profile: ModelProfile, devices: list[Device], config: SplitConfig | None = None,
                 host: Device | None = None) -> tuple[float, ...]:
    """The tensor_split a policy chooses for the devices `config` selects (empty for 'llama')."""
    config = config or SplitConfig()
    if name not in POLICIES:
        raise ConfigError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
    if name == "moe-balance":
        return apply_policy(name, profile, devices, config, host).tensor_split
    if name == "llama" or config.split_mode == "none":
        return ()
    used = select_devices(devices, replace(config, tensor_split=()))
    if not used:
        return ()
    if name == "ollama-spread":
        return _ollama_spread(profile, used, config)   # whole layer counts, as Ollama passed them
    def try_split(split: tuple[float, ...]):
        return plan(profile, devices, replace(config, tensor_split=split), host)

    if name == "pack":
        return _readable(_pack(used, try_split))
    return _readable(_balanced(used, try_split))


def apply_policy(name: str, profile: ModelProfile, devices: list[Device], config: SplitConfig | None = None,
                 host: Device | None = None) -> SplitConfig:
    """`config` with what the policy chooses: -ts; moe-balance its -ot rules too; fit and ollama the
    whole config (-c, -ngl, -ts, -ot; ollama also the devices)."""
    config = config or SplitConfig()
    if name == "moe-balance":
        from .moe_balance import moe_balance
        return moe_balance(profile, devices, config, host).config
    if name == "fit":
        from .server_fit import server_fit
        return server_fit(profile, devices, config, host).config
    if name == "ollama":
        # Ollama sets every placement flag itself, from its own defaults (OllamaSettings); `config`
        # is not what it would pass, so it is not read
        from .ollama import ollama
        return ollama(profile, devices, host=host).config
    return replace(config, tensor_split=policy_split(name, profile, devices, config, host))
