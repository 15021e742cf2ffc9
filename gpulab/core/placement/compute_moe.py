"""Compute-buffer peaks of MoE layers with a shared expert (qwen2moe, deepseek2, glm4moe, llama4).

build_moe_ffn (src/llama-graph.cpp) runs the routed experts, then the model's graph runs the shared expert
on the same normed input (src/models/qwen2moe.cpp, deepseek2.cpp, glm4-moe.cpp, llama4.cpp) and adds the
two. The FFN's norm is therefore still live when the sum over the routed experts is allocated, and it
cannot take the norm's place as it does without a shared expert (qwen3moe): ggml-alloc
(ggml/src/ggml-alloc.c) puts it where the GLU output was, above the expert outputs (which took up's and
gate's range), and the layer's output stays there. So:
  - the FFN's range starts right above the residual, the norm and the router's small tensors: no hole
    below it (`ffn_base`);
  - the next layer's KQ (no flash attention) and the logits go on top of that layer output, at
    ffn_base + the expert outputs + a row set;
  - a host layer's closing ops that run on the next device are the adds of the shared expert (and its
    sigmoid gate, ffn_gate_inp_shexp: qwen2moe): that device receives three row sets (the shared expert's
    output, the routed sum, the FFN input), not the expert outputs.
With flash attention and a Q wider than a row set (glm4moe: 16 heads of 128 over n_embd 1024) the freed
attention output leaves a hole below the FFN that takes the layer output every other layer: the FFN keeps
the hole below it (as without a shared expert) and the logits go above the last layer's output in it. A
leading dense layer (glm4moe, deepseek2) first on a device puts its gate, up and GLU output above the FFN
input and the freed attention output.
Measured layer by layer (every tensor's offset in the compute buffer, read through the scheduler's eval
callback on a real decode of the reserved shape) on the arch matrix's qwen2moe and glm4moe (n_embd 1024,
16 experts of 512, 4 used; tests/integration/test_arch_matrix_vs_llama.py), where the expert outputs fill
up's and gate's range exactly (n_embd = 2 n_ff_exp); other shapes are not measured, so the later peaks are
only added there.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

from ..profile import ModelProfile

__all__ = ["MoeFlags", "moe_flags", "moe_then_layer", "output_in_dense_hole", "router_bytes", "shared_expert_peaks"]


@dataclass(frozen=True)
class MoeFlags:
    shared: bool               # some layer has a shared expert (ffn_*_shexp)
    gated: bool                # ... with the sigmoid gate ffn_gate_inp_shexp (qwen2moe)
    probs_bias: bool           # the router has a bias (exp_probs_b)
    layer_moe: tuple[bool, ...]  # per layer: routed experts (else a dense FFN: leading dense layers)
    # llama4 scales the FFN input by the router weight before the experts (build_moe_ffn: weight_before_ffn)
    weight_before: bool = False
    # build_moe_ffn multiplies a gate beside up (ffn_gate_exps, or a fused ffn_gate_up_exps); granitemoe's loader
    # makes ffn_gate_exps optional (TENSOR_NOT_REQUIRED, src/models/granite-moe.cpp)
    gated_experts: bool = True

    @property
    def router_rows(self) -> int:
        """[n_expert, T] tensors of the router below the experts: the logits (probabilities in place), the
        argsort, and the biased probabilities (exp_probs_b) or, weighting before the FFN, the probabilities."""
        return 3 if self.probs_bias or self.weight_before else 2

    def output_offset(self, fe: int, fd: int) -> int:
        """Where a shared-expert MoE layer's output lands above the FFN's base: above the expert outputs (which
        took up's and gate's range), and with the weighting before the FFN (n_expert_used 1: the weighted
        input, up and gate, the GLU output in the input's place) above the expert outputs and the GLU output."""
        if not self.gated_experts:
            # up alone, its SILU in place, the expert outputs above it: the output takes up's freed range, right
            # at the FFN's base (granitemoe, -ts 1,1: bench/compute_trace.py)
            return 0
        return fd + (fe if self.weight_before else 0)

    def device_layers(self, layer_devices: list[str], name: str) -> list[bool]:
        """Per layer `name` runs, in order: whether it is a MoE layer."""
        return [m for m, d in zip(self.layer_moe, layer_devices) if d == name]


_CACHE: dict[int, tuple[weakref.ref, MoeFlags]] = {}


def moe_flags(profile: ModelProfile) -> MoeFlags:
    """The profile's MoE flags, once per profile (the planner asks for every placement it tries)."""
    hit = _CACHE.get(id(profile))
    if hit is not None and hit[0]() is profile:
        return hit[1]
    names = [t.name for layer in profile.layers for t in layer.tensors if "_shexp" in t.name or "exp_probs_b" in t.name]
    flags = MoeFlags(shared=any("_shexp" in n for n in names), gated=any("ffn_gate_inp_shexp" in n for n in names),
                     probs_bias=any("exp_probs_b" in n for n in names),
                     layer_moe=tuple(any(t.is_expert for t in layer.tensors) for layer in profile.layers),
                     weight_before=profile.arch == "llama4",
                     gated_experts=any("gate_exps" in t.name or "gate_up_exps" in t.name
                                       for layer in profile.layers for t in layer.tensors if t.is_expert))
    key = id(profile)
    _CACHE[key] = (weakref.ref(profile, lambda _r: _CACHE.pop(key, None)), flags)
    return flags


def moe_then_layer(layer_moe: list[bool], *, pipelined: bool = False, weight_before: bool = False) -> bool:
    """Whether a MoE layer whose output lands above its FFN is followed by another layer on the device
    (`layer_moe`: its layers, in order). Pipelined, a llama4 MoE layer after a dense one on the same device
    puts its output in the hole the dense layer's output left (measured: -ts 1,2,1 without flash attention)."""
    return any(moe and not (pipelined and weight_before and k and not layer_moe[k - 1])
               for k, moe in enumerate(layer_moe[:-1]))


def output_in_dense_hole(flags: MoeFlags, layer_moe: list[bool], rotated_k: bool) -> bool:
    """llama4, -fa on with a quantized K: the K rotation's products leave the dense layer's output hole open
    when the model's last layer (MoE) follows a dense layer on its device, and the last layer's output takes
    it instead of landing above its FFN (measured: -ts 1,1,1 -c 4096, q4_0 low, f16 high)."""
    return flags.weight_before and rotated_k and len(layer_moe) >= 2 and layer_moe[-1] and not layer_moe[-2]


def router_bytes(n_expert: int, n_expert_used: int, T: int, rows: int) -> int:
    """build_moe_ffn's router tensors below the experts' up/gate: `rows` [n_expert, T] tensors
    (MoeFlags.router_rows); with two the selected weights [n_expert_used, T] land there too (with three,
    in what the logits left)."""
    row = (4 * n_expert * T + 31) // 32 * 32
    return 3 * row if rows == 3 else 2 * row + (4 * n_expert_used * T + 31) // 32 * 32


def shared_expert_peaks(*, ffn_base: int, fe: int, fd: int, e: int, kq: int, logits: int, next_layer: bool,
                        has_out: bool, offset: int | None = None) -> list[int]:
    """What goes on top of a shared-expert MoE layer's output (at ffn_base + `offset`, by default fd: see
    MoeFlags.output_offset): the next layer's KQ (`kq`, 0 with flash attention; `next_layer`: the device
    runs a layer after a MoE one) and the logits."""
    if not fe or fd > 2 * fe:
        return []
    out = ffn_base + (fd if offset is None else offset) + e
    return ([out + kq] if next_layer and kq else []) + ([out + logits] if has_out else [])
