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
  - with the shared expert's sigmoid gate (ffn_gate_inp_shexp, qwen2moe), a host layer's closing ops
    that run on the next device are the gate, the shared expert's product and the two adds: that device
    receives three row sets (the shared expert's output, the routed sum, the FFN input), not the expert
    outputs.
Measured layer by layer (every tensor's offset in the compute buffer, read through the scheduler's eval
callback on a real decode of the reserved shape) on the arch matrix's qwen2moe (n_embd 1024, 16 experts of
512, 4 used; tests/integration/test_arch_matrix_vs_llama.py), where the expert outputs fill up's and gate's
range exactly (n_embd = 2 n_ff_exp); other shapes are not measured, so the later peaks are only added there.
"""

from __future__ import annotations

import weakref

from ..profile import ModelProfile

__all__ = ["moe_flags", "router_bytes", "shared_expert_peaks"]

_CACHE: dict[int, tuple[weakref.ref, tuple[bool, bool, bool]]] = {}


def moe_flags(profile: ModelProfile) -> tuple[bool, bool, bool]:
    """(some layer has a shared expert, with the sigmoid gate ffn_gate_inp_shexp, a router bias
    exp_probs_b); once per profile."""
    hit = _CACHE.get(id(profile))
    if hit is not None and hit[0]() is profile:
        return hit[1]
    names = [t.name for layer in profile.layers for t in layer.tensors if "_shexp" in t.name or "exp_probs_b" in t.name]
    flags = (any("_shexp" in n for n in names), any("ffn_gate_inp_shexp" in n for n in names),
             any("exp_probs_b" in n for n in names))
    key = id(profile)
    _CACHE[key] = (weakref.ref(profile, lambda _r: _CACHE.pop(key, None)), flags)
    return flags


def router_bytes(n_expert: int, n_expert_used: int, T: int, probs_bias: bool) -> int:
    """build_moe_ffn's router tensors below the experts' up/gate: the logits (softmax/sigmoid in place),
    the biased probabilities (exp_probs_b) and the argsort, [n_expert, T] each; without a bias the
    selected weights [n_expert_used, T] land there too (with one, in what the probabilities left)."""
    row = (4 * n_expert * T + 31) // 32 * 32
    return 3 * row if probs_bias else 2 * row + (4 * n_expert_used * T + 31) // 32 * 32


def shared_expert_peaks(*, ffn_base: int, fe: int, fd: int, e: int, kq: int, logits: int, next_layer: bool,
                        has_out: bool) -> list[int]:
    """What goes on top of a shared-expert MoE layer's output (at ffn_base + fd): the next layer's KQ
    (`kq`, 0 with flash attention; `next_layer`: the device runs a layer after a MoE one) and the logits."""
    if not fe or fd > 2 * fe:
        return []
    out = ffn_base + fd + e
    return ([out + kq] if next_layer and kq else []) + ([out + logits] if has_out else [])
