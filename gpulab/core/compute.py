"""Compute-buffer estimate: the scratch memory ggml's scheduler reserves per backend.

llama.cpp sizes these by reserving the worst-case graph (llama_context::graph_reserve); we
cannot run that without llama.cpp, so this is a model of its largest live tensors.
"""

from __future__ import annotations

from .config import SplitConfig
from .devices import HOST_NAME
from .profile import ModelProfile

__all__ = ["estimate_compute_bytes"]


def estimate_compute_bytes(profile: ModelProfile, config: SplitConfig, layer_devices: list[str],
                           names: list[str]) -> dict[str, int]:
    """Placeholder model, refined against llama.cpp's 'compute buffer size' lines."""
    n_ub = min(config.n_ubatch, config.n_batch)
    out = dict.fromkeys(names, 0)
    act = 4 * n_ub * max(profile.n_embd, profile.n_ff) * 3
    for name in set(layer_devices):
        out[name] = act
    out[layer_devices[-1]] += 4 * n_ub * profile.n_vocab
    out.setdefault(HOST_NAME, 0)
    return out
