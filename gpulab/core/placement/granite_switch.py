"""Compute buffers of graniteswitch's graph, replayed op by op (gpulab.core.placement.ggml_replay).

llama_model_granite_switch::graph (src/models/granite-switch.cpp): the tokens are embedded through their
substitutes (no build_inp_embd), a one-head attention at the router layer (index block_count, past the real
layers: its K/V sit in the cache of that layer's device) reads three padded lanes of per-token inputs and yields
each token's adapter slot, and every product of every layer adds the switched LoRA delta of that slot (two
ggml_mul_mat_id: lora_a to the rank, lora_b back out; build_switched_lora_delta). The fused QKV product is made
contiguous part by part; the FFN's SiLU and product are separate ops; the logits are scaled (1 / logit_scale).
The attention (placement.recurrent._Attn) and norms (placement.dense._norm) are shared.
"""

from __future__ import annotations

from ..config import SplitConfig
from ..devices import HOST_NAME
from ..profile import ModelProfile
from .dense import _Layer, _norm
from .ggml_replay import Graph, Tensor
from .recurrent import _Attn, _Ctx, replay_compute_bytes

__all__ = ["switch_compute_bytes", "switch_replayable"]


def _delta(c: _Ctx, x: Tensor, ids: Tensor, lay: _Layer, name: str, d: str) -> Tensor:
    """build_switched_lora_delta: mul_mat_id of lora_a over x (reshaped 3-D), then of lora_b, reshaped 2-D."""
    g = c.g
    rows = x.size // (4 * int(lay.shapes[f"{name}.lora_a"][0]))
    a = g.op(4 * int(lay.shapes[f"{name}.lora_a"][1]) * rows, g.view(x), g.view(ids), w=d)
    return g.view(g.op(4 * int(lay.shapes[f"{name}.lora_b"][1]) * rows, a, g.view(ids), w=d))


def _switched_mm(c: _Ctx, x: Tensor, ids: Tensor, lay: _Layer, name: str, d: str) -> Tensor:
    """build_switched_lora_mm: the base product plus its delta (the add in place on the product)."""
    g = c.g
    rows = x.size // (4 * int(lay.shapes[f"{name}.weight"][0]))
    base = g.op(4 * lay.width(f"{name}.weight") * rows, x, w=d)
    return g.op(base.size, base, _delta(c, x, ids, lay, name, d), inplace=True)


def _graph(c: _Ctx, fa: bool, v_trans: bool) -> tuple[Graph, list]:
    g, T, E, p = c.g, c.T, c.E, c.p
    n_real = p.n_layer - 1                     # hparams.router_layer: the extra layer past block_count
    R = n_real
    sub_tokens = g.inp(4 * T)
    lanes = [g.inp(4 * T) for _ in range(3)]  # router_ksig, router_vval, router_q
    cur = g.op(4 * E * T, sub_tokens, w=HOST_NAME)                      # get_rows(token_embd, sub_tokens)
    pos = g.inp(4 * T)
    attn = _Attn(c, fa, v_trans)
    hd = p.layers[R].n_embd_head_k
    # ggml_pad of each lane's [1, 1, T] reshape to [hd, 1, T]
    kr, vr, qr = (g.op(4 * hd * T, g.view(x)) for x in lanes)
    router = attn.attend(qr, kr, vr, R)
    # cont(view_2d(router_out, 1, T)): a strided view, copied whole (ggml_nbytes) where the cont runs elsewhere
    slot = g.op(4 * T, g.view(router, 4 * hd * (T - 1) + 4))
    slot = g.op(slot.size, g.op(slot.size, g.view(slot), inplace=True), inplace=True)   # clamp, round
    ids = g.op(4 * T, slot)                                              # cast to I32
    out_ids = g.inp(4 * c.T_out)
    for il in range(n_real):
        lay = _Layer(p, il)
        d, fd, layer = c.dev[il], c.ffn_dev[il], p.layers[il]
        hk, nq, nkv = layer.n_embd_head_k, layer.n_head, layer.n_head_kv
        h = _norm(c, cur, il, rms=True, bias=False)
        qkv = g.op(4 * lay.width("attn_qkv.weight") * T, h, w=d)
        q, k, v = (g.op(4 * hk * n * T, g.view(qkv)) for n in (nq, nkv, nkv))   # cont(view_2d)
        q, k, v = (g.op(t.size, t, _delta(c, h, ids, lay, f"attn_{n}", d), inplace=True)
                   for t, n in ((q, "q"), (k, "k"), (v, "v")))
        q = g.op(q.size, g.view(q), pos, inplace=True)                   # RoPE of the 3-D reshape
        k = g.op(k.size, g.view(k), pos, inplace=True)
        y = _switched_mm(c, attn.attend(q, k, g.view(v), il), ids, lay, "attn_output", d)
        inp_sa = cur
        if il == n_real - 1:
            rows = 4 * E * c.T_out
            y, inp_sa = g.op(rows, y, out_ids), g.op(rows, inp_sa, out_ids)
            ids = g.view(g.op(4 * c.T_out, g.view(ids), out_ids))        # the kept rows' slots
        ffn_inp = g.op(y.size, y, inp_sa, inplace=True)
        h = _norm(c, ffn_inp, il, rms=True, bias=False)
        gate = _switched_mm(c, h, ids, lay, "ffn_gate", fd)
        up = _switched_mm(c, h, ids, lay, "ffn_up", fd)
        gu = g.op(gate.size, g.op(gate.size, gate, inplace=True), up, inplace=True)   # silu(g) * u
        down = _switched_mm(c, gu, ids, lay, "ffn_down", fd)
        cur = g.op(down.size, down, ffn_inp, inplace=True)
    h = _norm(c, cur, -1, rms=True, bias=False)
    h.out = True                                                         # result_norm (t_embd)
    logits = g.op(4 * p.n_vocab * c.T_out, h, w=c.dev[p.n_layer])
    g.expand(g.op(logits.size, logits, inplace=True, out=True))         # scaled by 1 / logit_scale
    return g, [(n, dv) for n, dv in attn.fa_nodes if n is not None]


def switch_compute_bytes(profile: ModelProfile, config: SplitConfig, layer_devices: list[str], names: list[str], *,
                         T: int, n_seqs: int, T_out: int, n_copies: int, pin_norm: bool,
                         ffn_devices: list[str] | None = None) -> dict[str, int]:
    """Compute buffer bytes of every backend in `names` for a `switch_replayable` profile."""
    return replay_compute_bytes(_graph, profile, config, layer_devices, names, T=T, n_seqs=n_seqs, T_out=T_out,
                                n_copies=n_copies, pin_norm=pin_norm, ffn_devices=ffn_devices)


def switch_replayable(profile: ModelProfile) -> bool:
    """A graniteswitch file whose layers have the fused QKV product and the switched LoRA tensors this graph reads,
    and the router layer last (gguf_arch places it: no tensors, a KV cache)."""
    if profile.arch != "graniteswitch" or len(profile.layers) < 2:
        return False
    *real, router = profile.layers
    need = ("attn_qkv.weight", "attn_output.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight",
            *(f"{n}.lora_{ab}" for n in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up",
                                         "ffn_down") for ab in "ab"))
    return router.has_kv and not router.tensors and all(
        layer.has_kv and {t.name.split(".", 2)[-1] for t in layer.tensors} >= set(need) for layer in real)
