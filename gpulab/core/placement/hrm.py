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

from ..config import SplitConfig
from ..devices import HOST_NAME
from ..profile import ModelProfile
from .ggml_replay import Graph, Tensor
from .recurrent import _Attn, _Ctx, replay_compute_bytes

__all__ = ["hrm_compute_bytes", "hrm_replayable"]

_KEYS = ("hrm.layers_per_stack", "hrm.h_cycles", "hrm.l_cycles")


def hrm_replayable(profile: ModelProfile) -> bool:
    """An hrm_text profile whose file carries the stack hyperparameters, with every pass's slot accounted for."""
    if profile.arch != "hrm_text" or not all(f"hrm_text.{k}" in profile.metadata for k in _KEYS):
        return False
    lps, h, l_ = (int(profile.metadata[f"hrm_text.{k}"]) for k in _KEYS)
    return lps > 0 and profile.n_layer == lps * h * (l_ + 1) and all(layer.has_kv for layer in profile.layers)


def _graph(c: _Ctx, fa: bool, v_trans: bool) -> tuple[Graph, list]:
    g, p, E, T, dev = c.g, c.p, c.E, c.T, c.dev
    lps, h_cycles, l_cycles = (int(p.metadata[f"hrm_text.{k}"]) for k in _KEYS)
    layer = p.layers[0]
    hd, n_head, n_head_kv = layer.n_embd_head_k, layer.n_head, layer.n_head_kv
    q_size, kv_size = 4 * hd * n_head * T, 4 * hd * n_head_kv * T
    # build_inp_embd, build_inp_pos, build_attn_inp_kv, build_inp_out_ids (src/llama-graph.cpp)
    tokens = g.inp(4 * T)
    g.expand(g.inp(4 * E * T))                      # inp_embd: a text batch never reads it, it is allocated
    zh = g.expand(g.op(4 * E * T, tokens, w=HOST_NAME))           # get_rows(token_embd)
    pos = g.inp(4 * T)
    attn = _Attn(c, fa, v_trans)                    # one KV cache; a pass's slot is its cache layer
    out_ids = g.inp(4 * c.T_out)
    # hrm.z_l_init: a repeating-layer tensor created with block 0 (LLM_TENSOR_LAYER_REPEATING, llama-arch.cpp)
    z_l: Tensor = g.ext(dev[0])

    def norm(x: Tensor) -> Tensor:          # build_norm without a weight: an RMS_NORM, pinned nowhere
        return g.op(x.size, x, inplace=True)

    def attention(cur: Tensor, slot: int, wd: str) -> Tensor:
        q = g.op(q_size, g.view(g.op(q_size, cur, w=wd)), pos)          # RoPE of the reshaped product
        k = g.op(kv_size, g.view(g.op(kv_size, cur, w=wd)), pos)
        v = g.view(g.op(kv_size, cur, w=wd))
        out = attn.attend(q, k, v, slot)              # stored in the slot's cache, on dev[slot]
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
    rows = g.op(4 * E * c.T_out, zh, out_ids)
    g.expand(g.op(4 * p.n_vocab * c.T_out, rows, w=dev[p.n_layer], out=True))     # result_output
    return g, [(n, d) for n, d in attn.fa_nodes if n is not None]


def hrm_compute_bytes(profile: ModelProfile, config: SplitConfig, layer_devices: list[str], names: list[str], *,
                      T: int, n_seqs: int, T_out: int, n_copies: int, pin_norm: bool) -> dict[str, int]:
    """Compute buffer bytes of every backend in `names` for an `hrm_replayable` profile (its norms have no
    weight, so none is named "norm" and none is pinned: `pin_norm` is not read)."""
    return replay_compute_bytes(_graph, profile, config, layer_devices, names, T=T, n_seqs=n_seqs, T_out=T_out,
                                n_copies=n_copies, pin_norm=False)
