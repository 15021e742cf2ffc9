"""Memory per device: what the planner predicts each device holds (DevicePlan), and a prediction
as a run keeps it (PlannedMemory). Plain data, shared by the planner (gpulab.core.placement.plan),
runs (gpulab.core.run) and reconciliation."""

from __future__ import annotations

from dataclasses import dataclass

from .units import format_bytes

__all__ = ["DevicePlan", "PlannedMemory", "deficit_lines"]


@dataclass(frozen=True)
class DevicePlan:
    name: str
    total_bytes: int
    free_bytes: int
    weights_bytes: int
    kv_bytes: int
    compute_bytes: int
    overhead_bytes: int = 0       # runtime overhead (CUDA context, ...), learned from runs
    overhead_is_default: bool = False   # overhead_bytes is gpulab's CUDA default, nothing learned yet
    n_layers: int = 0             # repeating layers placed here
    has_output: bool = False      # holds the output layer (index n_layer)
    is_host: bool = False
    expert_bytes: int = 0         # of weights_bytes: MoE expert tensors
    # the host only, its weights as llama.cpp allocates them (weights_bytes = the two together):
    mapped_bytes: int = 0         # CPU_Mapped: the file span from its first to its last host tensor
    repack_bytes: int = 0         # CPU_REPACK: copies of the weights the CPU backend repacks
    state_bytes: int = 0          # recurrent state (llama_memory_recurrent's RS buffer): r_l and s_l rows
    # the same llama-server process's other buffers here: its draft model, projector and MTP context
    # (gpulab.core.policies.process.around; the fleet planner counts them per device)
    process_bytes: int = 0

    @property
    def buffer_bytes(self) -> int:
        """What llama.cpp allocates here: weights, KV, recurrent state and compute (no base cost)."""
        return self.weights_bytes + self.kv_bytes + self.state_bytes + self.compute_bytes

    @property
    def used_bytes(self) -> int:
        return self.buffer_bytes + self.overhead_bytes + self.process_bytes

    @property
    def fits(self) -> bool:
        """Memory fitting: this device's bytes within its free memory (not llama-server's -fit,
        which is gpulab.core.policies.server_fit). The host's free memory is advisory (mmap pages
        can be evicted), devices' is not."""
        return self.used_bytes <= self.free_bytes or (self.is_host and self.free_bytes == 0)

    @property
    def deficit_bytes(self) -> int:
        return max(0, self.used_bytes - self.free_bytes)


@dataclass(frozen=True)
class PlannedMemory:
    """The planner's prediction a run checks: per device memory and the layer placement.

    One type for a live run and a stored one: a Plan becomes one through `Plan.memory()`, which is
    `from_dict(plan.to_dict())`, and the results store keeps `to_dict()` (a subset of `gpulab plan
    --json`'s object), so reconciling a stored run and a live run reads the same fields."""
    model_path: str
    arch: str
    devices: tuple[DevicePlan, ...]        # the offload devices in llama.cpp's order, then the host
    layer_devices: tuple[str, ...]         # n_layer + 1 device names; the last is the output layer
    meta_device: str = ""                  # -sm tensor: the Meta() device llama.cpp logs ...
    meta_members: tuple[str, ...] = ()     # ... and the devices it spans

    @property
    def fits(self) -> bool:
        """Memory fitting: every device's bytes within its free memory (as Plan.fits)."""
        return all(d.fits for d in self.devices)

    def deficits(self) -> list[str]:
        return deficit_lines(self.devices)

    def to_dict(self) -> dict:
        d: dict = {"model": {"path": self.model_path, "arch": self.arch},
                   "devices": [{"name": x.name, "total_bytes": x.total_bytes, "free_bytes": x.free_bytes,
                                "weights_bytes": x.weights_bytes, "kv_bytes": x.kv_bytes,
                                "state_bytes": x.state_bytes, "compute_bytes": x.compute_bytes,
                                "overhead_bytes": x.overhead_bytes,
                                "overhead_is_default": x.overhead_is_default,
                                "used_bytes": x.used_bytes, "fits": x.fits} for x in self.devices],
                   "layers": [{"index": i, "device": n} for i, n in enumerate(self.layer_devices)],
                   "fits": self.fits}
        if self.meta_device:
            d["tensor_parallel"] = {"meta_device": self.meta_device, "devices": list(self.meta_members)}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PlannedMemory:
        """From `to_dict()` or a `gpulab plan --json` object (runs stored before overhead_bytes was
        written read it as 0)."""
        model = d.get("model") or {}
        tp = d.get("tensor_parallel") or {}
        rows = list(d.get("devices", ()))
        devices = tuple(DevicePlan(
            name=x["name"], total_bytes=int(x.get("total_bytes", 0)), free_bytes=int(x.get("free_bytes", 0)),
            weights_bytes=int(x.get("weights_bytes", 0)), kv_bytes=int(x.get("kv_bytes", 0)),
            state_bytes=int(x.get("state_bytes", 0)),
            compute_bytes=int(x.get("compute_bytes", 0)), overhead_bytes=int(x.get("overhead_bytes", 0)),
            overhead_is_default=bool(x.get("overhead_is_default", False)),
            is_host=i == len(rows) - 1) for i, x in enumerate(rows))
        return cls(model_path=model.get("path", ""), arch=model.get("arch", ""), devices=devices,
                   layer_devices=tuple(x["device"] for x in d.get("layers", ())),
                   meta_device=tp.get("meta_device", ""), meta_members=tuple(tp.get("devices", ())))


def deficit_lines(devices: tuple[DevicePlan, ...] | list[DevicePlan]) -> list[str]:
    """Human lines for every over-full device, e.g. 'CUDA1: needs 1.20 GiB more than its 22.0 GiB free'."""
    return [f"{d.name}: needs {format_bytes(d.deficit_bytes)} more than its "
            f"{format_bytes(d.free_bytes)} free" for d in devices if not d.fits]
