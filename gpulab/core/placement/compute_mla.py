"""Compute-buffer peaks of MLA attention (deepseek2 and the graphs that build it: src/models/deepseek2.cpp).

deepseek2 itself (and mistral4) are replayed op by op (placement.dense); these closed forms size the MLA
graphs the replay does not take (other architectures with a K-only cache, an attention weight moved by -ot).

With absorbed MLA (attn_k_b/attn_v_b, llama_hparams::is_mla) a layer's attention builds, in
llm_build_deepseek2 (src/models/deepseek2.cpp), all [*, n_tokens] f32:
  q_a        [q_lora_rank]                      wq_a, normed in place
  q_b        [n_head * n_embd_head_k_mla]       wq_b; q_nope and q_pe are views of it
  q_absorbed [kv_lora_rank, n_head]             wk_b x q_nope
  q_pe       [n_embd_head_qk_rope, n_head]      RoPE of the view (not in place)
  Qcur       [kv_lora_rank + rope, n_head]      the concat of the two: the widest tensor
and, without flash attention, KQ [n_kv, n_head] on top while Qcur is live (build_attn_mha). The
cache holds K only (kv_lora_rank + rope per token), V is a view of it; build_attn_mha's v_mla
product gives [n_embd_head_v_mla, n_head].

Where these land depends on what the layer before left (ggml-alloc's best fit, ggml/src/ggml-alloc.c):
  A: a device's first layers: nothing freed below is wide enough, so the norm, q_a, q_b,
     q_absorbed, q_pe and Qcur stack up from the device's bottom (its input copies);
  B: a layer after two MoE layers on the same device: the second leaves its output where the GLU
     output was (the expert outputs took up's and gate's range), above the FFN's range; q_a, q_b
     and q_pe fit in the holes below it, q_absorbed and Qcur go on top. (After a device's first
     layer, or a dense one, the MoE output finds a hole below instead.)
Measured layer by layer (every tensor's offset in the compute buffer, read through the scheduler's
eval callback on a real decode of the reserved shape) on the arch matrix's deepseek2 (n_embd 1024,
16 heads, q_lora 512, kv_lora 256, rope 64; tests/integration/test_arch_matrix_vs_llama.py).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

from ..profile import ModelProfile

__all__ = ["MlaGeom", "after_two_moe", "mla_geom", "mla_host_peaks", "mla_peaks"]


def _a(nbytes: int) -> int:
    return (nbytes + 31) // 32 * 32


@dataclass(frozen=True)
class MlaGeom:
    """Elements per token of the MLA attention's tensors (see the module's docstring)."""
    q_a: int
    q_b: int
    q_abs: int
    q_pe: int
    q_cat: int
    v_mla: int           # the v_mla product's output, n_head * n_embd_head_v_mla


_CACHE: dict[int, tuple[weakref.ref, MlaGeom | None]] = {}


def mla_geom(profile: ModelProfile) -> MlaGeom | None:
    """The MLA geometry from the first layer with absorbed MLA weights (attn_k_b, attn_v_b); None without
    (computed once per profile: the planner asks for every placement it tries)."""
    hit = _CACHE.get(id(profile))
    if hit is not None and hit[0]() is profile:
        return hit[1]
    key = id(profile)
    g = _mla_geom(profile) if any(layer.has_kv and not layer.has_v for layer in profile.layers) else None
    _CACHE[key] = (weakref.ref(profile, lambda _r: _CACHE.pop(key, None)), g)
    return g


def _mla_geom(profile: ModelProfile) -> MlaGeom | None:
    for layer in profile.layers:
        shapes = {t.name.split(".", 2)[-1].rsplit(".", 1)[0]: t.shape for t in layer.tensors}
        k_b, v_b, kv_a = shapes.get("attn_k_b"), shapes.get("attn_v_b"), shapes.get("attn_kv_a_mqa")
        if not (k_b and v_b and kv_a) or len(k_b) < 3 or len(v_b) < 2:
            continue
        n_head = layer.n_head
        kv_lora = k_b[1]                        # attn_k_b: {qk_nope, kv_lora_rank, n_head}
        rope = kv_a[1] - kv_lora                # attn_kv_a_mqa: {n_embd, kv_lora_rank + rope}
        q_a = shapes.get("attn_q_a", (0, 0))[1]
        q_b = shapes.get("attn_q_b", shapes.get("attn_q", (0, 0)))[1]
        return MlaGeom(q_a=q_a, q_b=q_b, q_abs=n_head * kv_lora, q_pe=n_head * rope,
                       q_cat=n_head * (kv_lora + rope), v_mla=n_head * v_b[1])
    return None


def _sizes(m: MlaGeom, T: int) -> tuple[int, int, int, int, int, int]:
    return tuple(_a(4 * x * T) for x in (m.q_a, m.q_b, m.q_abs, m.q_pe, m.q_cat, m.v_mla))  # type: ignore[return-value]


def after_two_moe(profile: ModelProfile, layer_devices: list[str], name: str) -> bool:
    """Whether some layer on `name` follows two MoE layers on `name` (case B of the module's docstring)."""
    mine = [i for i, d in enumerate(layer_devices[:profile.n_layer]) if d == name]
    moe = [any(t.is_expert for t in profile.layers[i].tensors) for i in mine]
    return any(moe[k - 1] and moe[k - 2] for k in range(2, len(mine)))


def mla_peaks(m: MlaGeom, T: int, *, bottom: int, n_layers: int, after_moe: bool, pipelined: bool, e: int,
              kq: int, ffn_base: int, fe: int, fd: int) -> list[int]:
    """Candidate peaks of an offload device running `n_layers` MLA layers from `bottom` (its input copies).

    A (first layer): the norm, q_a, q_b, q_absorbed, q_pe and Qcur stack on the bottom; from the second
    layer on, pipelined, the layer before's output stays below (the input copies are never freed), else it
    takes the freed input's place. B (`after_moe`: a layer after two MoE layers): above the FFN's base
    (`ffn_base`: where the expert up/gate start), the expert outputs' range (fd, within up and gate where it
    fits), the layer output, q_absorbed and Qcur. `kq`: KQ without flash attention (0 with it), on top of
    Qcur in both."""
    qa, qb, qabs, qpe, qc, _vm = _sizes(m, T)
    a1 = bottom + e + qa + qb + qabs + qpe + qc + kq
    peaks = [a1, a1 + (e if pipelined and n_layers > 1 else 0)]
    if after_moe and fe and fd <= 2 * fe:
        peaks.append(ffn_base + fd + e + qabs + qc + kq)
    return peaks


def mla_host_peaks(m: MlaGeom, T: int, *, persist: int, n_layers: int, first_dense: bool, e: int,
                   kq: int) -> list[int]:
    """The host running the first layers (-ngl below n_layer): A on `persist` (the graph inputs, inp_embd
    and the embeddings); after a dense first layer, the layer output lands above the v_mla product's range
    and the FFN input, and q_b, q_absorbed and Qcur stack on it (q_a and q_pe fit below)."""
    qa, qb, qabs, qpe, qc, vm = _sizes(m, T)
    peaks = [persist + e + qa + qb + qabs + qpe + qc + kq]
    if first_dense and n_layers > 1:
        peaks.append(persist + vm + 2 * e + qb + qabs + qc + kq)
    return peaks
