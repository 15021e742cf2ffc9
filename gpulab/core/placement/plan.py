"""Plan: where every layer goes and what each device then holds. Produced by `planner.plan`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..config import SplitConfig, config_to_dict
from ..memory import DevicePlan, PlannedMemory, deficit_lines
from ..profile import ModelProfile
from .coverage import Doubt

if TYPE_CHECKING:   # -sm tensor's module loads with the -sm tensor plans that carry one
    from .tensor_parallel import TensorParallel

__all__ = ["Plan"]


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
    # what this plan does not model exactly for this architecture and these settings, one line each
    # (str(doubt)) with the term and the largest error measured (gpulab.core.placement.coverage);
    # empty: every term is exact
    doubts: tuple[Doubt, ...] = ()

    @property
    def fits(self) -> bool:
        """Memory fitting: every device's bytes within its free memory. Not llama-server's -fit,
        which changes the settings until they fit (gpulab.core.policies.server_fit)."""
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
        return deficit_lines(self.devices)

    def memory(self) -> PlannedMemory:
        """The prediction as a run keeps it (and the results store writes it)."""
        return PlannedMemory.from_dict(self.to_dict())

    def to_dict(self) -> dict:
        """The `gpulab plan --json` object (schema documented in the README)."""
        p, c = self.profile, self.config
        return {
            "model": {"path": p.path, "arch": p.arch, "n_layer": p.n_layer, "size_bytes": p.file_bytes},
            "config": config_to_dict(c),     # every SplitConfig field, by its name
            "devices": [
                {"name": d.name, "total_bytes": d.total_bytes, "free_bytes": d.free_bytes,
                 "weights_bytes": d.weights_bytes, "kv_bytes": d.kv_bytes, "state_bytes": d.state_bytes,
                 "compute_bytes": d.compute_bytes, "overhead_bytes": d.overhead_bytes,
                 "overhead_is_default": d.overhead_is_default, "used_bytes": d.used_bytes, "fits": d.fits}
                for d in self.devices
            ],
            "layers": [{"index": i, "device": name} for i, name in enumerate(self.layer_devices)],
            # every tensor override in the order llama.cpp tries them (-ot, then -cmoe, -ncmoe, -ncffn)
            "rules": [m.to_dict() for m in self.rule_matches],
            "fits": self.fits,
            "doubts": [d.text for d in self.doubts],
            **({"tensor_parallel": self._tensor_parallel_dict()} if self.tensor_parallel is not None else {}),
        }

    def _tensor_parallel_dict(self) -> dict:
        ts = self.tensor_parallel
        assert ts is not None   # asked for where there is one
        return {"meta_device": ts.meta_name, "devices": list(ts.devices),
                "mirrored_bytes": list(ts.mirrored), "kv_heads_per_layer": [list(h) for h in ts.kv_heads],
                "layer_bytes": [[w + k for w, k in zip(lw, lk)] for lw, lk in zip(ts.layer_weights, ts.layer_kv)]}

