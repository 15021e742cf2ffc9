"""MTP (nextn) heads with llama-server's `--spec-type draft-mtp`: where their weights, KV and
compute go.

With the mode (common/common.cpp common_model_params_to_llama: mparams.load_mtp), the model
loads the nextn layers' tensors, which it otherwise creates with TENSOR_SKIP (src/models/*.cpp
load_arch_tensors: mtp_flags); they sit on the nextn layer's device like any layer's tensors.
The main context's KV holds the trunk only (llama_model::create_memory: filter il < n_layer()).

Then common_speculative_init_result (common/speculative.cpp) creates a second llama_context on
the same model with ctx_type LLAMA_CONTEXT_TYPE_MTP and common_base_params_to_speculative's
parameters: the main context's n_ctx, n_seq_max, -ub, -b, -fa; the draft cache types -ctkd/-ctvd
(default f16); n_outputs_max = n_parallel. Its KV holds the nextn layers only (create_memory:
filter il >= n_layer()), on their devices; its graph (LLM_GRAPH_TYPE_DECODER_MTP, e.g.
src/models/glm4-moe.cpp graph_mtp) runs one nextn block and the LM head.

    head = mtp_head(profile)            # the nextn layers, as the MTP context's model
    ctx = plan_mtp_context(profile, main_plan, cfg, n_outputs)
    ctx.kv_bytes, ctx.compute_bytes     # per device name
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..config import SplitConfig
from ..devices import HOST_NAME
from ..profile import ModelProfile
from .compute import _a, compute_tokens, estimate_compute_bytes, pipeline_copies
from .plan import Plan
from .planner import kv_cell_bytes, kv_cells

__all__ = ["MtpContext", "mtp_head", "plan_mtp_context", "with_mtp"]


def with_mtp(profile: ModelProfile) -> ModelProfile:
    """The model as load_mtp loads it: the nextn layers carry their tensors (same placement,
    same trunk graph, the main context's KV unchanged). Archs that never load them stay as they are."""
    if not profile.n_nextn or profile.mtp_never_loaded or not profile.mtp_weights_bytes:
        return profile
    layers = tuple(replace(layer, tensors=layer.tensors + layer.mtp_tensors, mtp_tensors=())
                   if layer.is_nextn else layer for layer in profile.layers)
    return replace(profile, layers=layers)


def mtp_head(profile: ModelProfile) -> ModelProfile:
    """The nextn layers alone as the MTP context sees them: their tensors loaded, and a KV cache
    for each (create_memory's MTP filter keeps exactly these layers)."""
    nextn = [layer for layer in profile.layers if layer.is_nextn]
    layers = tuple(replace(layer, index=i, tensors=layer.tensors + layer.mtp_tensors, mtp_tensors=(),
                           has_kv=True, is_nextn=False) for i, layer in enumerate(nextn))
    return replace(profile, n_layer=len(layers), layers=layers, n_nextn=0)


@dataclass(frozen=True)
class MtpContext:
    """The second llama_context of --spec-type draft-mtp: no weights of its own."""
    config: SplitConfig
    layer_devices: tuple[str, ...]     # the nextn layers' devices, then the output layer's
    kv_bytes: dict[str, int]
    compute_bytes: dict[str, int]

    def bytes_on(self, name: str) -> int:
        return self.kv_bytes.get(name, 0) + self.compute_bytes.get(name, 0)


def mtp_config(main: SplitConfig, type_k: str = "f16", type_v: str = "f16") -> SplitConfig:
    """common_base_params_to_speculative: the main context's settings with the draft cache types."""
    return main.replace(type_k=type_k, type_v=type_v)


def plan_mtp_context(profile: ModelProfile, main: Plan, config: SplitConfig, n_outputs: int) -> MtpContext:
    """KV and compute of the MTP context on `main`'s placement. `config`: mtp_config of the main
    plan's (resolved) config; `n_outputs`: n_parallel (common_base_params_to_speculative)."""
    head = mtp_head(profile)
    if not head.n_layer:
        raise ValueError(f"{profile.arch}: no nextn layers: llama.cpp refuses an MTP context "
                         "(llama_init_from_model: 'model doesn't contain MTP layers')")
    names = [d.name for d in main.devices]
    first = profile.n_layer - profile.n_nextn
    devs = tuple(main.layer_devices[first:profile.n_layer]) + (main.layer_devices[-1],)
    full, swa = kv_cells(head, config)
    per_cell = kv_cell_bytes(head, config)
    kv = dict.fromkeys(names, 0)
    for layer in head.layers:
        where = devs[layer.index] if config.offload_kqv else HOST_NAME
        kv[where] += (swa if layer.is_swa else full) * per_cell[layer.index]
    compute = estimate_compute_bytes(head, config, list(devs), names, n_outputs=n_outputs)
    # what graph_mtp adds to a decoder block on the nextn layer's device: the trunk's hidden state
    # h [n_embd, T] f32, a graph input there, one copy per pipeline copy (the scheduler's n_copies
    # follow the model's placement, not this graph's), and one more [n_embd, T] row set (the
    # normed embedding and h side by side before their concat). Measured, not derived: RPC
    # devices, glm4moe, n_copies 1 and 4, -ub 256/512, -np 1/2, -fa on/off, f16 and q8_0 KV
    # (tests/integration/test_mtp_vs_llama_server.py)
    nc = pipeline_copies(config, list(main.layer_devices), len(names) - 1)
    T = compute_tokens(config)[0]
    h = _a(4 * profile.n_embd * T)
    for d in dict.fromkeys(devs[:-1]):
        if d != HOST_NAME:
            compute[d] = compute.get(d, 0) + (nc + 1) * h
    return MtpContext(config=config, layer_devices=devs, kv_bytes=kv, compute_bytes=compute)
