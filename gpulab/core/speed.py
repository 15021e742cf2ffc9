"""Throughput model: pp and tg tokens/s predicted for a Plan, before anything is loaded.

In layer split a sequence passes through the devices one after another (llama.cpp's scheduler
runs the graph splits in order), so a token costs the SUM of every device's time plus one hop
per device boundary; spreading a model over more devices never makes one sequence faster and
adds hops. Per device and step:
    time = max(bytes read / bandwidth, FLOPs / FLOP rate) + fixed overhead
    tg step: one token; bytes = weights of its layers (active experts only) + KV of the context
    pp step: one ubatch of u tokens; bytes = weights once; FLOPs = u x per-token FLOPs
A hop costs a fixed latency plus the activations (n_embd x tokens x 4 bytes) over the link.
Cheap: a pass over the layers and O(devices) arithmetic, recomputed on every slider move.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .devices import HOST_NAME
from .ggml_types import row_bytes
from .plan import Plan

__all__ = ["DeviceSpeed", "LinkSpeed", "SpeedModel", "SpeedPrediction", "predict_speed", "per_device_load"]

GB = 1e9


@dataclass(frozen=True)
class DeviceSpeed:
    bandwidth_bytes_per_s: float       # achievable memory bandwidth when reading weights
    flops_per_s: float                 # achievable matrix FLOP rate (prompt processing)
    overhead_s: float = 0.0            # fixed cost per step of running this device's graph split
    source: str = "default"            # 'calibrated', 'spec', 'nvml', 'default'


@dataclass(frozen=True)
class LinkSpeed:
    latency_s: float = 20e-6           # per hop and step: copy launch + synchronisation
    bytes_per_s: float = 25 * GB       # PCIe 4.0 x16-ish; RPC over loopback is slower (calibrate)


# Defaults when nothing is known: a mid-range GPU, a desktop CPU. Calibration replaces them.
DEFAULT_GPU = DeviceSpeed(bandwidth_bytes_per_s=500 * GB, flops_per_s=50e12, overhead_s=50e-6)
DEFAULT_HOST = DeviceSpeed(bandwidth_bytes_per_s=20 * GB, flops_per_s=0.2e12, overhead_s=20e-6)


@dataclass(frozen=True)
class SpeedModel:
    devices: dict = field(default_factory=dict)   # device name -> DeviceSpeed ('CPU' for the host)
    link: LinkSpeed = LinkSpeed()

    def of(self, name: str, bandwidth_hint: float | None = None) -> DeviceSpeed:
        if name in self.devices:
            return self.devices[name]
        if name == HOST_NAME:
            return DEFAULT_HOST
        if bandwidth_hint:   # from a --sim spec or NVML's clock x bus width: 80% is achievable
            return DeviceSpeed(0.8 * bandwidth_hint, 300 * 0.8 * bandwidth_hint, DEFAULT_GPU.overhead_s, "spec")
        return DEFAULT_GPU


@dataclass(frozen=True)
class SpeedPrediction:
    tg_tokens_per_s: float
    pp_tokens_per_s: float
    roofline_tg_tokens_per_s: float    # bytes / bandwidth only: no hops, no overheads
    tg_seconds: dict                   # device -> seconds per generated token
    pp_seconds: dict                   # device -> seconds for the whole prompt
    bytes_per_token: dict              # device -> bytes read per generated token
    n_hops: int

    @property
    def roofline_fraction(self) -> float:
        return self.tg_tokens_per_s / self.roofline_tg_tokens_per_s if self.roofline_tg_tokens_per_s else 0.0


def per_device_load(plan: Plan, n_past: int) -> tuple[dict, dict, dict]:
    """(bytes per token, FLOPs per token, KV bytes read per token) per device, at context n_past."""
    prof, cfg = plan.profile, plan.config
    names = [d.name for d in plan.devices]
    weights = dict.fromkeys(names, 0)
    flops = dict.fromkeys(names, 0.0)
    kv = dict.fromkeys(names, 0)
    active_bytes, active_params = prof.active_bytes_per_layer, prof.active_params_per_layer
    for layer in prof.layers:
        dev = plan.layer_devices[layer.index]
        weights[dev] += active_bytes[layer.index]
        flops[dev] += 2.0 * active_params[layer.index]
        if layer.has_kv and n_past:
            kv_dev = dev if cfg.offload_kqv else HOST_NAME
            ctx = min(n_past, plan.kv_cells_swa if layer.is_swa else plan.kv_cells)
            kv[kv_dev] += ctx * (row_bytes(cfg.type_k, layer.n_embd_k_gqa) + row_bytes(cfg.type_v, layer.n_embd_v_gqa))
            flops[kv_dev] += 4.0 * ctx * layer.n_head * layer.n_embd_head_k   # QK^T and softmax(QK^T)V
    out = plan.layer_devices[prof.n_layer]
    weights[out] += sum(t.n_bytes for t in prof.output_tensors) or (prof.token_embd.n_bytes if prof.token_embd else 0)
    flops[out] += 2.0 * prof.output_params
    return weights, flops, kv


def _hops(plan: Plan) -> int:
    seq = [d for d in plan.layer_devices]
    return sum(1 for a, b in zip(seq, seq[1:]) if a != b)


def predict_speed(plan: Plan, model: SpeedModel | None = None, *, n_prompt: int = 512, n_gen: int = 128,
                  n_past: int | None = None, bandwidth_hints: dict | None = None) -> SpeedPrediction:
    """Predicted llama-bench pp{n_prompt} and tg{n_gen} for a plan.

    tg runs at context depth n_past (default: the middle of a tg{n_gen} run from an empty
    cache, as llama-bench's tg test does). bandwidth_hints: device -> bytes/s from Device specs.
    """
    model = model or SpeedModel()
    hints = bandwidth_hints or {}
    n_past = n_gen // 2 if n_past is None else n_past
    weights, flops, kv = per_device_load(plan, n_past)
    hops = _hops(plan)
    n_embd = plan.profile.n_embd
    u = min(plan.config.effective_n_ubatch, n_prompt)
    n_steps = -(-n_prompt // u)

    tg_s, pp_s, roof_s, per_tok = {}, {}, 0.0, {}
    for name in weights:
        if not weights[name] and not flops[name]:
            continue
        sp = model.of(name, hints.get(name))
        read = weights[name] + kv[name]
        per_tok[name] = read
        roof_s += read / sp.bandwidth_bytes_per_s
        tg_s[name] = max(read / sp.bandwidth_bytes_per_s, flops[name] / sp.flops_per_s) + sp.overhead_s
        # pp: weights are read once per ubatch, FLOPs scale with the tokens in it
        pp_s[name] = n_steps * (max(weights[name] / sp.bandwidth_bytes_per_s, u * flops[name] / sp.flops_per_s)
                                + sp.overhead_s)
    link = model.link
    tg_total = sum(tg_s.values()) + hops * (link.latency_s + n_embd * 4 / link.bytes_per_s)
    pp_total = sum(pp_s.values()) + hops * n_steps * (link.latency_s + u * n_embd * 4 / link.bytes_per_s)
    return SpeedPrediction(
        tg_tokens_per_s=1.0 / tg_total if tg_total else 0.0,
        pp_tokens_per_s=n_prompt / pp_total if pp_total else 0.0,
        roofline_tg_tokens_per_s=1.0 / roof_s if roof_s else 0.0,
        tg_seconds=tg_s, pp_seconds=pp_s, bytes_per_token=per_tok, n_hops=hops)
