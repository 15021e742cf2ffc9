"""Run: one measured load of a model with a SplitConfig, in llama-bench's terms.

Produced by the runtime (gpulab.runtime.bench), stored by the results store, shown by the lab,
compared with the Plan by reconciliation. Plain data: bytes are ints, rates carry their unit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import SplitConfig
from .report import LoadReport
from .units import format_bytes

__all__ = ["Throughput", "Run", "PlannedDevice", "PlannedMemory", "deficit_lines"]


@dataclass(frozen=True)
class Throughput:
    """One llama-bench test: pp (n_prompt > 0, n_gen == 0) or tg (n_gen > 0, n_prompt == 0)."""

    n_prompt: int
    n_gen: int
    samples_ns: tuple[int, ...]          # one per repetition, wall time of the timed part
    samples_ts: tuple[float, ...]        # tokens/s per repetition
    avg_ts: float
    stddev_ts: float

    @property
    def name(self) -> str:
        return f"pp{self.n_prompt}" if self.n_prompt else f"tg{self.n_gen}"


@dataclass(frozen=True)
class PlannedDevice:
    """One device of a prediction, as a run keeps it: bytes per term (see DevicePlan)."""
    name: str
    total_bytes: int
    free_bytes: int
    weights_bytes: int
    kv_bytes: int
    compute_bytes: int
    used_bytes: int
    fits: bool
    overhead_bytes: int = 0


@dataclass(frozen=True)
class PlannedMemory:
    """The planner's prediction a run checks: per device memory and the layer placement.

    One type for a live run and a stored one: a Plan becomes one through `Plan.memory()`, which is
    `from_dict(plan.to_dict())`, and the results store keeps `to_dict()` (a subset of `gpulab plan
    --json`'s object), so reconciling a stored run and a live run reads the same fields."""
    model_path: str
    arch: str
    devices: tuple[PlannedDevice, ...]     # the offload devices in llama.cpp's order, then the host
    layer_devices: tuple[str, ...]         # n_layer + 1 device names; the last is the output layer
    fits: bool                             # memory: every device's bytes within its free memory
    meta_device: str = ""                  # -sm tensor: the Meta() device llama.cpp logs ...
    meta_members: tuple[str, ...] = ()     # ... and the devices it spans

    def deficits(self) -> list[str]:
        return deficit_lines(self.devices)

    def to_dict(self) -> dict:
        d: dict = {"model": {"path": self.model_path, "arch": self.arch},
                   "devices": [{"name": x.name, "total_bytes": x.total_bytes, "free_bytes": x.free_bytes,
                                "weights_bytes": x.weights_bytes, "kv_bytes": x.kv_bytes,
                                "compute_bytes": x.compute_bytes, "overhead_bytes": x.overhead_bytes,
                                "used_bytes": x.used_bytes, "fits": x.fits} for x in self.devices],
                   "layers": [{"index": i, "device": n} for i, n in enumerate(self.layer_devices)],
                   "fits": self.fits}
        if self.meta_device:
            d["tensor_parallel"] = {"meta_device": self.meta_device, "devices": list(self.meta_members)}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PlannedMemory":
        """From `to_dict()` or a `gpulab plan --json` object (runs stored before overhead_bytes was
        written read it as 0)."""
        model = d.get("model") or {}
        tp = d.get("tensor_parallel") or {}
        devices = tuple(PlannedDevice(
            name=x["name"], total_bytes=int(x.get("total_bytes", 0)), free_bytes=int(x.get("free_bytes", 0)),
            weights_bytes=int(x.get("weights_bytes", 0)), kv_bytes=int(x.get("kv_bytes", 0)),
            compute_bytes=int(x.get("compute_bytes", 0)), used_bytes=int(x.get("used_bytes", 0)),
            fits=bool(x.get("fits", True)), overhead_bytes=int(x.get("overhead_bytes", 0)))
            for x in d.get("devices", ()))
        return cls(model_path=model.get("path", ""), arch=model.get("arch", ""), devices=devices,
                   layer_devices=tuple(x["device"] for x in d.get("layers", ())),
                   fits=bool(d.get("fits", all(x.fits for x in devices))),
                   meta_device=tp.get("meta_device", ""), meta_members=tuple(tp.get("devices", ())))


def deficit_lines(devices) -> list[str]:
    """Human lines for every over-full device, e.g. 'CUDA1: needs 1.20 GiB more than its 22.0 GiB free'.
    `devices`: DevicePlans or PlannedDevices."""
    return [f"{d.name}: needs {format_bytes(max(0, d.used_bytes - d.free_bytes))} more than its "
            f"{format_bytes(d.free_bytes)} free" for d in devices if not d.fits]


@dataclass(frozen=True)
class Run:
    model_path: str
    model_bytes: int
    config: SplitConfig
    report: LoadReport                   # what llama.cpp said it allocated, per device and buffer
    pp: Throughput | None = None
    tg: Throughput | None = None
    load_seconds: float = 0.0
    n_threads: int = 0
    devices: tuple[str, ...] = ()        # offload devices llama.cpp used, in its order
    nvml_peak_bytes: dict = field(default_factory=dict)   # device name -> peak used bytes during the run
    plan: PlannedMemory | None = None    # the prediction this run checks (Plan.memory())
    timestamp: str = ""                  # ISO 8601, UTC
    build: str = ""                      # llama.cpp build / commit as llama.cpp reports it
