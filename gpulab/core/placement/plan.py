"""Plan: where every layer goes and what each device then holds. Produced by `planner.plan`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..config import SplitConfig
from ..profile import ModelProfile

if TYPE_CHECKING:   # -sm tensor's module loads with the -sm tensor plans that carry one
    from .tensor_parallel import TensorParallel

__all__ = ["DevicePlan", "Plan"]


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

    @property
    def used_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.compute_bytes + self.overhead_bytes

    @property
    def fits(self) -> bool:
        # the host's free memory is advisory (mmap pages can be evicted), devices' is not
        return self.used_bytes <= self.free_bytes or (self.is_host and self.free_bytes == 0)

    @property
    def deficit_bytes(self) -> int:
        return max(0, self.used_bytes - self.free_bytes)


@dataclass(frozen=True)
class Plan:
    profile: ModelProfile
    config: SplitConfig
    devices: tuple[DevicePlan, ...]    # the offload devices in llama.cpp's order, then the host
    layer_devices: tuple[str, ...]     # n_layer + 1 names; the last is the output layer
    split_points: tuple[float, ...]    # llama.cpp's normalised cumulative split (float32 values)
    kv_cells: int                      # KV cells per full-attention layer (n_ctx padded to 256)
    kv_cells_swa: int                  # KV cells per sliding-window layer
    moved_tensors: Mapping[str, str] = field(default_factory=dict)   # tensor -> device, where not its layer's
    rule_matches: tuple = ()           # gpulab.core.placement.tensors.RuleMatch per tensor override rule
    notes: tuple[str, ...] = ()        # warnings (a rule that matches nothing, ...)
    # -sm tensor: what each member of the meta device holds (layer_devices then names the meta
    # device, 'Meta()', as llama.cpp's log does); None for the other split modes
    tensor_parallel: TensorParallel | None = None

    @property
    def fits(self) -> bool:
        return all(d.fits for d in self.devices)

    @property
    def host(self) -> DevicePlan:
        return self.devices[-1]

    @property
    def offload_devices(self) -> tuple[DevicePlan, ...]:
        return self.devices[:-1]

    def device(self, name: str) -> DevicePlan:
        for d in self.devices:
            if d.name == name:
                return d
        raise KeyError(name)

    def layers_on(self, name: str) -> list[int]:
        return [i for i, d in enumerate(self.layer_devices) if d == name]

    def deficits(self) -> list[str]:
        """Human lines for every device that is over-full, e.g. 'CUDA1: needs 1.20 GiB more'."""
        from ..units import format_bytes
        return [f"{d.name}: needs {format_bytes(d.deficit_bytes)} more than its "
                f"{format_bytes(d.free_bytes)} free" for d in self.devices if not d.fits]

    def to_dict(self) -> dict:
        """The `gpulab plan --json` object (schema documented in the README)."""
        p, c = self.profile, self.config
        return {
            "model": {"path": p.path, "arch": p.arch, "n_layer": p.n_layer, "size_bytes": p.file_bytes},
            "config": {
                "n_gpu_layers": c.n_gpu_layers, "split_mode": c.split_mode, "main_gpu": c.main_gpu,
                "tensor_split": list(c.tensor_split), "n_ctx": c.n_ctx, "type_k": c.type_k,
                "type_v": c.type_v, "n_batch": c.n_batch, "n_ubatch": c.n_ubatch,
                "flash_attn": c.flash_attn, "tensor_overrides": list(c.tensor_overrides),
            },
            "devices": [
                {"name": d.name, "total_bytes": d.total_bytes, "free_bytes": d.free_bytes,
                 "weights_bytes": d.weights_bytes, "kv_bytes": d.kv_bytes,
                 "compute_bytes": d.compute_bytes, "overhead_bytes": d.overhead_bytes,
                 "overhead_is_default": d.overhead_is_default, "used_bytes": d.used_bytes, "fits": d.fits}
                for d in self.devices
            ],
            "layers": [{"index": i, "device": name} for i, name in enumerate(self.layer_devices)],
            # every tensor override in the order llama.cpp tries them (-ot, then -cmoe, -ncmoe, -ncffn)
            "rules": [m.to_dict() for m in self.rule_matches],
            "fits": self.fits,
            **({"tensor_parallel": self._tensor_parallel_dict()} if self.tensor_parallel is not None else {}),
        }

    def _tensor_parallel_dict(self) -> dict:
        ts = self.tensor_parallel
        assert ts is not None   # asked for where there is one
        return {"meta_device": ts.meta_name, "devices": list(ts.devices),
                "mirrored_bytes": list(ts.mirrored), "kv_heads_per_layer": [list(h) for h in ts.kv_heads],
                "layer_bytes": [[w + k for w, k in zip(lw, lk)] for lw, lk in zip(ts.layer_weights, ts.layer_kv)]}

