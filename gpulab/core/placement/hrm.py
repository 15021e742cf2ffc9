"""HRM-Text's compute buffers, replayed op by op (ggml_replay): its layers are cache slots, not weights.

llama_model_hrm_text (src/models/hrm-text.cpp) runs a low stack n_hrm_l_cycles times and a high stack once per
high cycle, n_hrm_h_cycles times; the GGUF's block count is the number of those passes times the layers per
stack, each pass with a KV cache slot of its own (on that slot's device), but the weights exist once per stack:
load_arch_tensors creates blk.0..lps-1 (low) and blk.lps..2lps-1 (high) and aliases every later pass to them.
So a pass's matrix products run where its stack's weights are (the devices of the first 2 lps layers), its K and
V are stored in its slot's cache, wherever that is, and the scheduler moves the rest between them: a device that
holds only later slots holds their caches and what the scheduler hands it. Closed forms cannot follow that;
the replay of the scheduler split and ggml-alloc does.

The graph, per pass: a weightless RMS norm (not named "norm", so never pinned), the sigmoid gate's product on
it, Q/K/V, RoPE, attention, the gate applied before the output projection, the residual, a weightless norm, the
SwiGLU FFN, the residual; each stack ends in a weightless norm; the high state zH (the embeddings first) is added
to the low state zL (first the learned hrm.z_l_init) at every pass's input. The output rows are gathered after the
last pass, then the output product.
"""

from __future__ import annotations

import weakref

from ..config import SplitConfig
from ..devices import HOST_NAME
from ..profile import ModelProfile
from .ggml_replay import Graph, Tensor, buffer_peaks, schedule
from .replay_attn import KvInputs
from .replay_attn import attention as attention_ops

__all__ = ["hrm_compute_bytes", "hrm_replayable"]

_KEYS = ("hrm.layers_per_stack", "hrm.h_cycles", "hrm.l_cycles")
_CACHE: dict[tuple, tuple[weakref.ref, dict[str, int]]] = {}


def hrm_replayable(profile: ModelProfile) -> bool:
    """An hrm_text profile whose file carries the stack hyperparameters, with every pass's slot accounted for."""
    if profile.arch != "hrm_text" or not all(f"hrm_text.{k}" in profile.metadata for k in _KEYS):
        return False
    lps, h, l_ = (int(profile.metadata[f"hrm_text.{k}"]) for k in _KEYS)
    return lps > 0 and profile.n_layer == lps * h * (l_ + 1) and all(layer.has_kv for layer in profile.layers)


def _graph(profile: ModelProfile, config: SplitConfig, dev: list[str], T: int, T_out: int, fa: bool) -> Graph:
    g, p, E = Graph(), profile, profile.n_embd
    lps, h_cycles, l_cycles = (int(p.metadata[f"hrm_text.{k}"]) for k in _KEYS)
    layer = p.layers[0]
    hd, n_head, n_head_kv = layer.n_embd_head_k, layer.n_head, layer.n_head_kv
    q_size, kv_size = 4 * hd * n_head * T, 4 * hd * n_head_kv * T
    n_ctx = -(-config.n_ctx // 256) * 256
    n_kv = n_ctx if config.kv_unified else -(-(n_ctx // max(1, config.n_seq_max)) // 256) * 256
    # build_inp_embd, build_inp_pos, build_attn_inp_kv, build_inp_out_ids (src/llama-graph.cpp)
    tokens = g.inp(4 * T)
    g.expand(g.inp(4 * E * T))                      # inp_embd: a text batch never reads it, it is allocated
    zh = g.expand(g.op(4 * E * T, tokens, w=HOST_NAME))           # get_rows(token_embd)
    pos = g.inp(4 * T)
    kv = KvInputs(g, config, T, n_kv, hd, layer.n_embd_v_gqa, fa)
    out_ids = g.inp(4 * T_out)
    # hrm.z_l_init: a repeating-layer tensor created with block 0 (LLM_TENSOR_LAYER_REPEATING, llama-arch.cpp)
    z_l: Tensor = g.ext(dev[0])

    def norm(x: Tensor) -> Tensor:          # build_norm without a weight: an RMS_NORM, pinned nowhere
        return g.op(x.size, x, inplace=True)

    def attention(cur: Tensor, slot: int, wd: str) -> Tensor:
        q = g.op(q_size, g.view(g.op(q_size, cur, w=wd)), pos)          # RoPE of the reshaped product
        k = g.op(kv_size, g.view(g.op(kv_size, cur, w=wd)), pos)
        v = g.view(g.op(kv_size, cur, w=wd))
        out = attention_ops(g, kv, q, k, v, cache_dev=dev[slot], T=T, hd=hd, n_head=n_head, n_head_kv=n_head_kv)
        gate = g.op(q_size, g.op(q_size, cur, w=wd), inplace=True)            # sigmoid(wqkv_gate x)
        return g.op(4 * E * T, g.op(q_size, out, gate, inplace=True), w=wd)   # wo(out * gate)

    def stack(cur: Tensor, slot_base: int, blk_base: int) -> Tensor:
        for il in range(lps):
            wd = dev[blk_base + il]           # the weights of blk.<blk_base + il> (llama_model_hrm_text aliases)
            h = norm(cur)
            cur = g.op(4 * E * T, attention(h, slot_base + il, wd), cur, inplace=True)
            h = norm(cur)
            f = 4 * p.n_ff * T
            ff = g.op(f, g.op(f, h, w=wd), g.op(f, h, w=wd))                    # swiglu(gate, up)
            cur = g.op(cur.size, g.op(cur.size, ff, w=wd), cur, inplace=True)
        return norm(cur)

    for h in range(h_cycles):
        for l_ in range(l_cycles):
            z_l = stack(g.op(4 * E * T, zh, z_l, inplace=True), (h * (l_cycles + 1) + l_) * lps, 0)
        zh = stack(g.op(4 * E * T, zh, z_l, inplace=True), (h * (l_cycles + 1) + l_cycles) * lps, lps)
    rows = g.op(4 * E * T_out, zh, out_ids)
    g.expand(g.op(4 * p.n_vocab * T_out, rows, w=dev[p.n_layer], out=True))     # result_output
    return g


def hrm_compute_bytes(profile: ModelProfile, config: SplitConfig, layer_devices: list[str], names: list[str], *,
                      T: int, T_out: int, n_copies: int) -> dict[str, int]:
    """Compute buffer bytes of every backend in `names` for an `hrm_replayable` profile, remembered per arguments."""
    key = (id(profile), config, tuple(layer_devices), tuple(names), T, T_out, n_copies)
    hit = _CACHE.get(key)
    if hit is not None and hit[0]() is profile:
        return dict(hit[1])
    g = _graph(profile, config, layer_devices, T, T_out, config.flash_attn != "off")
    schedule(g)
    tops = buffer_peaks(g, n_copies)
    out = {name: tops.get(name, 0) for name in names}
    if len(_CACHE) > 256:
        _CACHE.clear()
    _CACHE[key] = (weakref.ref(profile), out)
    return dict(out)
