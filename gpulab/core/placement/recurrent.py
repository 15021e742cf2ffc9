"""Compute buffers of recurrent and hybrid graphs: their ggml graph, replayed.

The closed forms of gpulab.core.placement.compute hold because attention layers leave ggml-alloc's buffer
the same from one layer to the next. Recurrent layers do not: a Mamba-2 layer's ssm_in product, its
convolution's concat and its scan output are of unlike sizes, so the holes they leave move from layer to
layer (a device's peak is at its second layer, not its first); and the scheduler runs a layer's trailing
weightless ops on the next device when that device's state reads come first in the graph (Mamba-2's
cont(z), LFM2's Hadamard rotation of an attention output, a host attention layer's KQ before a device's
short convolution), copying their inputs over and the result back. So the graph of these architectures is
built op by op in llama.cpp's order and handed to gpulab.core.placement.ggml_replay (the scheduler's split
and ggml-alloc):

  mamba, mamba2   llama_model_mamba::graph (src/models/mamba.cpp), llm_build_mamba_base::build_mamba_layer
                  and build_mamba2_layer (src/models/mamba-base.cpp)
  jamba           llama_model_jamba::graph (src/models/jamba.cpp): Mamba-1 or RoPE-less attention, dense FFN
  falcon-h1       llama_model_falcon_h1::graph: attention beside Mamba-2 in every layer, FFN with biases
  granitehybrid   llama_model_granite_hybrid::graph: Mamba-2 or attention with the output's bias
  nemotron_h(_moe) llama_model_nemotron_h::graph: Mamba-2, attention or a ReLU-squared FFN per layer
  lfm2, lfm2moe   llama_model_lfm2::graph, build_shortconv_block (src/models/lfm2.cpp), MoE past the
                  leading dense layers (lfm2moe.cpp)
  qwen3next, qwen35, qwen35moe
                  llama_model_qwen3next::graph (src/models/qwen3next.cpp), qwen35.cpp / qwen35moe.cpp (beta
                  and alpha products, a fused QKV attention), build_conv_state and the fused delta net
                  (src/models/delta-net-base.cpp), build_moe_ffn
  rwkv6qwen2      llm_build_rwkv6_base::build_rwkv6_time_mix (src/models/rwkv6-base.cpp), rwkv6qwen2.cpp
  arwkv7          llm_build_rwkv7_base::build_rwkv7_time_mix (src/models/rwkv7-base.cpp), arwkv7.cpp
  plamo2          llama_model_plamo2::graph, build_plamo2_mamba_layer / build_plamo2_attn_layer (plamo2.cpp)
  minimax-01      llama_model_minimax_01::graph (src/models/minimax-01.cpp): lightning attention
  shared          build_rs / build_inp_s_copy, build_rwkv_token_shift_load / _store, build_attn /
                  build_attn_mha, build_qkv, build_ffn, build_moe_ffn, build_inp_out_ids (src/llama-graph.cpp),
                  llama_kv_cache::cpy_k / cpy_v / get_k / get_v (src/llama-kv-cache.cpp); a norm named "norm"
                  is pinned to its layer's device under full offload or small ubatches
                  (llama_context::graph_get_cb); flash attention 'auto' and the fused delta net are turned off
                  when the scheduler puts them on another device than their layer's
                  (llama_context::resolve_fused_ops); a reshaped weight is no weight to the scheduler (pass 1
                  reads a source's buffer, and a view has none yet): the op takes its neighbours' device and
                  copies the weight there; a strided view sent to another device is copied as ggml_nbytes
                  counts it (Mamba's z)

Every device of the architecture matrix within the rounding of llama.cpp's log (tests/integration/
test_arch_matrix_vs_llama.py, CPU RPC devices), and tests/core/placement/test_recurrent.py and
test_recurrent_graphs.py. Not replayed: sliding-window caches (lfm2's iswa variant), op offload (CUDA), and
the branches no matrix model exercises (jamba's, granitehybrid's, nemotron_h's MoE layers, minimax-01's
softmax attention layers); such a profile falls back to the closed forms with a doubt (see `replayable`).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

from ..config import SplitConfig
from ..devices import HOST_NAME
from ..profile import ModelProfile
from .ggml_replay import Graph, Tensor, _a, per_profile, template

__all__ = ["RECURRENT_GRAPHS", "recurrent_compute_bytes", "replayable"]

_NEMOTRON_H = ("nemotron_h", "nemotron_h_moe")      # one graph (llama_model_nemotron_h_moe is a nemotron_h)
_QWEN3NEXT = ("qwen3next", "qwen35", "qwen35moe")   # one graph but for the linear attention's beta/alpha and FFN
RECURRENT_GRAPHS = frozenset({"mamba", "mamba2", "jamba", "falcon-h1", "granitehybrid", *_NEMOTRON_H, "lfm2",
                              "lfm2moe", *_QWEN3NEXT, "rwkv6qwen2", "arwkv7",
                              "plamo2", "minimax-01", "rwkv7"})
# the hyperparameters each graph reads from the GGUF ({arch}.<key>)
_SSM = ("ssm.conv_kernel", "ssm.inner_size", "ssm.state_size", "ssm.time_step_rank")
_KEYS = {**dict.fromkeys(("mamba", "mamba2", "jamba", "falcon-h1", "granitehybrid", *_NEMOTRON_H, "plamo2"), _SSM),
         **dict.fromkeys(("lfm2", "lfm2moe"), ("shortconv.l_cache",)),
         **dict.fromkeys(_QWEN3NEXT, (*_SSM, "ssm.group_count")), "rwkv6qwen2": ("wkv.head_size",), "minimax-01": (),
         "arwkv7": ("wkv.head_size",), "rwkv7": ("wkv.head_size",)}
_MOE_BUILT = frozenset({*_QWEN3NEXT, "lfm2moe", "minimax-01"})     # the graphs whose MoE layers are built here (_moe)
# the graphs whose attention is rotated (build_inp_pos)
_ROPE = frozenset({*_QWEN3NEXT, "lfm2", "lfm2moe", "falcon-h1", "granitehybrid", "plamo2"})
_MROPE = frozenset({"qwen35", "qwen35moe"})          # llama_model_rope_type: LLAMA_ROPE_TYPE_IMROPE
_RESERVE_ONE_SEQ = frozenset({"minimax-01"})         # reserved last as one sequence (llama_context::sched_reserve)
_QUANT_FREE = ("f32", "f16", "bf16")
_CACHE: dict[tuple, tuple[weakref.ref, dict[str, int]]] = {}
# bytes per element of a cache type, and elements per block (ggml_type_size / ggml_blck_size)
_TYPE = {"f32": (4, 1), "f16": (2, 1), "bf16": (2, 1), "q8_0": (34, 32), "q4_0": (18, 32), "q4_1": (20, 32),
         "q5_0": (22, 32), "q5_1": (24, 32), "iq4_nl": (18, 32)}


def _row(type_name: str, n: int) -> int:
    size, blck = _TYPE.get(type_name, (2, 1))
    return n // blck * size


class _Ctx:
    """What every graph builder needs: the graph, the ubatch, where each layer runs."""

    def __init__(self, profile: ModelProfile, config: SplitConfig, layer_devices: list[str], T: int, ns: int,
                 T_out: int, pin_norm: bool, ffn_devices: list[str] | None = None,
                 ffn_moved: tuple[tuple[int, str, str], ...] | None = None) -> None:
        self.g = Graph()
        self.p, self.config, self.dev = profile, config, layer_devices
        self.ffn_dev = ffn_devices or layer_devices       # where each layer's FFN weights are (tensor overrides)
        # each FFN weight a tensor override put away from its layer (placement.tensors.compute_sites), where given
        self.ffn_moved = {(il, name): dev for il, name, dev in ffn_moved} if ffn_moved is not None else None
        self.T, self.ns, self.T_out, self.pin = T, ns, T_out, pin_norm
        self.E = profile.n_embd
        self.shapes = {t.name: t.shape for layer in profile.layers for t in layer.tensors}
        self.wbytes = {t.name: t.n_bytes for layer in profile.layers for t in layer.tensors}
        self.names = self.shapes.keys()
        self.fused_gdn = True                    # cparams.fused_gdn_ar / _ch (llama_context::resolve_fused_ops)
        self.gdn_nodes: list[tuple[Tensor, str]] = []   # each fused delta net that could be unfused, its device
        # other fused ops resolve_fused_ops turns off where one lands off its layer's device (glm5-next's DeepSeek V4
        # hyper-connection ops): each kind's nodes with their layer's device, and the kinds turned off
        self.fused_nodes: dict[str, list[tuple[Tensor, str]]] = {}
        self.unfused: frozenset[str] = frozenset()
        self.v_first: Tensor | None = None        # RWKV-7: the first layer's V, read by every later layer
        self.rope_w: Tensor | None = None         # the rope factors every RoPE reads (placement.dense: dflash)

    def reshaped(self, il: int, name: str) -> Tensor:
        """A reshape of layer il's weight `name`: no weight to the scheduler's pass 1 (a view has no buffer
        yet), so the op reading it takes its neighbours' backend, and a copy of the weight where that is
        another device."""
        return self.g.view(self.g.ext(self.dev[il], self.wbytes[f"blk.{il}.{name}"]))

    def has(self, name: str, default: bool) -> bool:
        """Whether the file has tensor `name`; `default` for a profile without its tensor list (built in code)."""
        return name in self.names if self.names else default

    def at(self, il: int, name: str, ffn: bool = True) -> str:
        """Where the product of layer il's FFN weight `name` ('ffn_up_exps', 'ffn_gate_inp', ...) runs: where
        the weight is (ggml_backend_sched_backend_id_from_cur). Without the weights' list: the layer's FFN device
        for an expert or dense FFN matrix (`ffn`), else the layer's."""
        if self.ffn_moved is not None:
            return self.ffn_moved.get((il, name), self.dev[il])
        return self.ffn_dev[il] if ffn else self.dev[il]

    def norm(self, x: Tensor, il: int, size: int | None = None, ln: bool = False) -> Tensor:
        """build_norm (RMS, with a weight; `ln`: LLM_NORM, a LayerNorm with a weight and a bias): the norm named
        "norm" is pinned to its layer's device (llama_context::graph_get_cb) under full offload or small
        ubatches; the weight's MUL and the bias's ADD are in place, GGML_OP_NORM is not (ggml_op_can_inplace)."""
        d = self.dev[il] if il >= 0 else self.dev[self.p.n_layer]
        n = self.g.op(size or x.size, x, w=d if self.pin and il >= 0 else None, inplace=not ln)
        n = self.g.op(n.size, n, w=d, inplace=True)
        return self.g.op(n.size, n, w=d, inplace=True) if ln else n

    def rs(self, il: int, s_main: Tensor, s_extra: Tensor, rows: int,
           scan: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """llm_graph_context::build_rs: clear a state (in place on the cache), this ubatch's rows (or the
        scan that reads them), the other rows copied back."""
        g, d = self.g, self.dev[il]
        cache = g.view(g.ext(d))
        g.expand(g.set(d, g.view(cache)))
        out = scan(cache) if scan else g.op(rows, cache, s_main)
        g.expand(out)
        g.expand(g.set(d, g.op(0, cache, s_extra), g.view(g.ext(d))))
        return out


def _mamba1(c: _Ctx, s_main: Tensor, s_extra: Tensor, cur: Tensor, il: int) -> Tensor:
    """llm_build_mamba_base::build_mamba_layer (src/models/mamba-base.cpp): Mamba-1, one head per channel;
    B, C and dt RMS-normed where the layer has their norms (Jamba)."""
    g, d, T, ns = c.g, c.dev[il], c.T, c.ns
    md, arch = c.p.metadata, c.p.arch
    d_conv, d_inner = int(md[f"{arch}.ssm.conv_kernel"]), int(md[f"{arch}.ssm.inner_size"])
    d_state, dt_rank = int(md[f"{arch}.ssm.state_size"]), int(md[f"{arch}.ssm.time_step_rank"])
    conv = g.view(c.rs(il, s_main, s_extra, 4 * (d_conv - 1) * d_inner * ns))
    xz = g.op(4 * 2 * d_inner * T, g.view(cur), w=d)                # ssm_in
    # x and z: strided halves of each row (ggml_nbytes: what a copy of one to another device takes)
    x, z = (g.view(xz, 4 * d_inner + 4 * 2 * d_inner * (T - 1)) for _ in range(2))
    conv_x = g.op(4 * (d_conv - 1 + T // ns) * d_inner * ns, conv, g.view(x))   # concat(conv, x^T)
    g.expand(g.set(d, g.view(conv_x), g.view(g.ext(d))))
    x = g.op(4 * d_inner * T, conv_x, w=d)                          # ssm_conv
    x = g.op(x.size, g.op(x.size, x, w=d, inplace=True), inplace=True)   # silu(x + conv bias)
    x_db = g.op(4 * (dt_rank + 2 * d_state) * T, x, w=d)            # ssm_x
    dt, B, C = g.view(x_db), g.view(x_db), g.view(x_db)
    if f"blk.{il}.ssm_dt_norm.weight" in c.names:
        dt, B, C = (c.norm(v, il, 4 * n * T) for v, n in ((dt, dt_rank), (B, d_state), (C, d_state)))
    else:
        dt = g.op(4 * dt_rank * T, dt)                              # cont
    dt = g.op(4 * d_inner * T, g.op(4 * d_inner * T, dt, w=d), w=d, inplace=True)   # ssm_dt + bias
    x4 = g.view(x)
    ys = c.rs(il, s_main, s_extra, 0,
              lambda states: g.op(4 * (d_inner * T + d_state * d_inner * ns), g.view(states), x4, dt, B, C, s_main,
                                  w=d))
    g.expand(g.set(d, g.view(ys), g.view(g.ext(d))))
    yd = 4 * d_inner * T
    y = g.op(yd, g.view(ys, yd), g.op(yd, x, w=d, inplace=True), inplace=True)     # y + x * D
    y = g.op(yd, g.op(yd, z), y)                                     # swiglu_split(cont(z), y)
    return g.view(g.op(4 * c.E * T, y, w=d))                         # ssm_out


def _mamba2(c: _Ctx, s_main: Tensor, s_extra: Tensor, cur: Tensor, il: int) -> Tensor:
    """llm_build_mamba_base::build_mamba2_layer (src/models/mamba-base.cpp)."""
    g, d, T, ns = c.g, c.dev[il], c.T, c.ns
    md, arch = c.p.metadata, c.p.arch
    d_conv, d_inner = int(md[f"{arch}.ssm.conv_kernel"]), int(md[f"{arch}.ssm.inner_size"])
    d_state, n_head = int(md[f"{arch}.ssm.state_size"]), int(md[f"{arch}.ssm.time_step_rank"])
    n_group = int(md.get(f"{arch}.ssm.group_count", 1))
    conv_dim = d_inner + 2 * n_group * d_state
    d_in_proj = 2 * d_inner + 2 * n_group * d_state + n_head
    conv = g.view(c.rs(il, s_main, s_extra, 4 * (d_conv - 1) * conv_dim * ns))
    zx = g.view(g.op(4 * d_in_proj * T, cur, w=d))
    z = g.view(zx, 4 * d_inner + 4 * d_in_proj * (T - 1))
    xbc, dt = g.view(zx), g.view(zx)
    conv_x = g.op(4 * (d_conv - 1 + T // ns) * conv_dim * ns, conv, g.view(xbc))
    g.expand(g.set(d, g.view(conv_x), g.view(g.ext(d))))
    xbc = g.op(4 * conv_dim * T, conv_x, w=d)
    xbc = g.op(xbc.size, xbc, w=d, inplace=True)
    xbc = g.op(xbc.size, xbc, inplace=True)                    # silu
    x, B, C = g.view(xbc), g.view(xbc), g.view(xbc)
    dt = g.op(4 * n_head * T, g.op(4 * n_head * T, dt), w=d, inplace=True)
    ys = c.rs(il, s_main, s_extra, 0,
              lambda states: g.op(4 * (d_inner * T + d_state * d_inner * ns), g.view(states), x, dt, B, C, s_main,
                                  w=d))
    g.expand(g.set(d, g.view(ys), g.view(g.ext(d))))
    yd = 4 * d_inner * T
    y = g.op(yd, g.view(ys, yd), g.op(yd, x, w=d, inplace=True), inplace=True)     # y + x * D
    y = g.op(yd, g.op(yd, z), y)                                     # swiglu_split(cont(z), y)
    y = c.norm(g.view(y), il)                                        # grouped RMS norm
    return g.op(4 * c.E * T, g.view(y), w=d)                         # ssm_out


def _shortconv(c: _Ctx, s_main: Tensor, s_extra: Tensor, cur: Tensor, il: int) -> Tensor:
    """llama_model_lfm2::graph, build_shortconv_block (src/models/lfm2.cpp)."""
    g, d, T, ns, E = c.g, c.dev[il], c.T, c.ns, c.E
    l_cache = int(c.p.metadata[f"{c.p.arch}.shortconv.l_cache"])
    bcx = g.op(4 * 3 * E * T, g.view(cur), w=d)                      # in_proj
    b, cc, x = g.view(bcx), g.view(bcx), g.view(bcx)
    bx = g.view(g.op(4 * E * T, b, x, inplace=True))                 # transpose(b * x)
    conv = g.view(c.rs(il, s_main, s_extra, 4 * (l_cache - 1) * E * ns))
    bx = g.op(4 * (l_cache - 1 + T // ns) * E * ns, conv, bx)       # concat
    g.expand(g.set(d, g.view(bx), g.view(g.ext(d))))
    y = g.op(4 * E * T, cc, g.op(4 * E * T, bx, w=d), inplace=True)  # c * ssm_conv(bx)
    return g.view(g.op(4 * E * T, y, w=d))                           # out_proj


def _gated_delta_net(c: _Ctx, s_main: Tensor, s_extra: Tensor, cur: Tensor, il: int) -> Tensor:
    """llama_model_qwen3next::graph::build_layer_attn_linear (src/models/qwen3next.cpp; fused QKV and gate
    projections) and llama_model_qwen35(moe)'s, build_conv_state and the fused build_delta_net
    (src/models/delta-net-base.cpp)."""
    g, d, T, ns, E = c.g, c.dev[il], c.T, c.ns, c.E
    md, arch = c.p.metadata, c.p.arch
    d_conv, d_inner = int(md[f"{arch}.ssm.conv_kernel"]), int(md[f"{arch}.ssm.inner_size"])
    hk, nv, nk = int(md[f"{arch}.ssm.state_size"]), int(md[f"{arch}.ssm.time_step_rank"]), \
        int(md[f"{arch}.ssm.group_count"])
    hv = d_inner // nv
    ch = d_inner + 2 * nk * hk
    qkv = g.view(g.op(4 * ch * T, cur, w=d))
    z = g.op(4 * d_inner * T, cur, w=d)
    if arch == "qwen3next":
        ba = g.view(g.op(4 * 2 * nv * T, cur, w=d))
        beta = g.view(g.op(4 * nv * T, g.op(4 * nv * T, g.view(ba)), inplace=True))  # sigmoid(cont(b))
        alpha = g.op(4 * nv * T, g.op(4 * nv * T, g.view(ba)), w=d, inplace=True)     # cont(a) + dt bias
    else:
        # qwen35 (src/models/qwen35.cpp): beta and alpha products of their own, read through reshapes
        beta = g.op(4 * nv * T, g.view(g.op(4 * nv * T, cur, w=d)))                   # sigmoid
        alpha = g.op(4 * nv * T, g.view(g.op(4 * nv * T, cur, w=d)), w=d)             # + dt bias
    gate = g.view(g.op(alpha.size, g.op(alpha.size, alpha, inplace=True), w=d, inplace=True))   # softplus * A
    conv = g.view(c.rs(il, s_main, s_extra, 4 * (d_conv - 1) * ch * ns))
    ci = g.op(4 * (d_conv - 1 + T // ns) * ch * ns, conv, g.view(qkv))               # concat(states, qkv^T)
    g.expand(g.set(d, g.view(ci), g.view(g.ext(d))))
    state = g.view(c.rs(il, s_main, s_extra, 4 * hv * hv * nv * ns))
    co = g.op(4 * ch * T, g.op(4 * ch * T, ci, w=d), inplace=True)                    # silu(ssm_conv)
    q, k = (g.op(4 * hk * nk * T, g.op(4 * hk * nk * T, g.view(co)), inplace=True) for _ in range(2))  # l2 norms
    if nk != nv and (arch == "qwen3next" or not c.fused_gdn):
        # repeated to the V heads; qwen35's graph repeats only where the fused delta net is off (it is on
        # wherever the scheduler keeps it on its layer's device: llama_context::resolve_fused_ops)
        q, k = g.view(g.op(4 * hk * nv * T, g.view(q))), g.view(g.op(4 * hk * nv * T, g.view(k)))
    out = g.op(4 * hv * nv * (T + hv * ns), q, k, g.view(co), gate, beta, state)      # ggml_gated_delta_net
    if arch != "qwen3next" and nk != nv:
        c.gdn_nodes.append((out, d))
    g.expand(g.set(d, g.view(out), g.view(g.ext(d))))                                 # the new state
    y = c.norm(g.view(out), il, 4 * d_inner * T)
    y = g.op(y.size, y, g.op(y.size, g.view(z), inplace=True), inplace=True)          # * silu(z)
    return g.view(g.op(4 * E * T, g.view(y), w=d))                                    # ssm_out


def _rwkv6_time_mix(c: _Ctx, s_main: Tensor, s_extra: Tensor, cur: Tensor, x_prev: Tensor, il: int) -> Tensor:
    """llm_build_rwkv6_base::build_rwkv6_time_mix (src/models/rwkv6-base.cpp) as rwkv6qwen2 runs it: fused
    lerps, no time_mix_first (gated linear attention, sigmoid gate), K and V repeated to the heads."""
    g, d, T, ns, E = c.g, c.dev[il], c.T, c.ns, c.E
    md, arch = c.p.metadata, c.p.arch
    n_head, n_head_kv = E // int(md[f"{arch}.wkv.head_size"]), c.p.layers[il].n_head_kv
    w1 = c.shapes[f"blk.{il}.time_mix_w1.weight"][1]
    kv = c.shapes[f"blk.{il}.time_mix_key.weight"][1]
    sx = g.op(4 * E * T, x_prev, cur, inplace=True)                               # x_prev - x
    sx_v, cur_v = g.view(sx), g.view(cur)
    xxx = g.op(4 * E * T, g.op(4 * E * T, sx_v, w=d, inplace=True), cur_v, inplace=True)   # sx * lerp_x + x
    xxx = g.op(4 * w1 * T, g.op(4 * w1 * T, xxx, w=d), inplace=True)              # tanh(w1 xxx)
    xxx = g.op(4 * w1 * T, g.view(g.view(xxx)))                                  # cont(permute)
    xxx = g.op(4 * 5 * E * T, c.reshaped(il, "time_mix_w2.weight"), xxx)
    xxx = g.op(xxx.size, g.op(xxx.size, xxx, w=d, inplace=True), g.view(sx), inplace=True)  # (xxx + lerp) * sx
    xxx = g.op(xxx.size, xxx, g.view(cur), inplace=True)                          # + x
    xw, xk, xv, xr, xg = (g.view(xxx, 4 * E * T) for _ in range(5))
    r = g.op(4 * E * T, xr, w=d)
    k = g.op(4 * kv * T, xk, w=d)
    v = g.op(4 * kv * T, xv, w=d)
    gate = g.op(4 * E * T, g.op(4 * E * T, xg, w=d), inplace=True)               # sigmoid(time_mix_gate xg)
    if n_head_kv and n_head_kv != n_head:                                         # repeated to the heads
        k, v = g.op(4 * E * T, g.view(k)), g.op(4 * E * T, g.view(v))
    k, v, r = g.view(k), g.view(v), g.view(r)
    wd = c.shapes[f"blk.{il}.time_mix_decay_w1.weight"][1]
    w = g.op(4 * E * T, g.op(4 * wd * T, g.op(4 * wd * T, xw, w=d), inplace=True), w=d)   # w2 tanh(w1 xw)
    w = g.op(w.size, w, w=d, inplace=True)                                        # + decay
    for _ in range(3):                                                            # exp(-exp(w))
        w = g.op(w.size, w, inplace=True)
    w = g.view(w)
    k = g.op(4 * E * T, k, g.op(4 * E * T, k, w, inplace=True), inplace=True)    # k - k * w
    state = c.rs(il, s_main, s_extra, 4 * c.p.layers[il].n_embd_s * ns)
    out = g.op(4 * E * (T + E // n_head * ns), k, v, r, w, state)                 # ggml_gated_linear_attn
    g.expand(g.set(d, g.view(out), g.view(g.ext(d))))                             # the new state
    y = g.op(4 * E * T, g.view(g.view(out, 4 * E * T)), gate, inplace=True)       # * gate
    return g.view(g.op(4 * E * T, y, w=d))                                        # time_mix_output


def _rwkv7_time_mix(c: _Ctx, s_main: Tensor, s_extra: Tensor, cur: Tensor, x_prev: Tensor, il: int) -> Tensor:
    """llm_build_rwkv7_base::build_rwkv7_time_mix (src/models/rwkv7-base.cpp): the first layer's V (c.v_first)
    mixed into every later layer's; where the layer has them (rwkv7, not arwkv7) the gate's low-rank product
    (time_mix_g1/g2, a sixth lerp) and the group norm of the output (time_mix_ln)."""
    g, d, T, ns, E = c.g, c.dev[il], c.T, c.ns, c.E
    md, arch = c.p.metadata, c.p.arch
    head = int(md[f"{arch}.wkv.head_size"])
    sh = c.shapes
    e = 4 * E * T

    def lora(x: Tensor, name: str, tanh: bool = False) -> Tensor:                 # x2(x1 x): a low-rank product
        mid = g.op(4 * sh[f"blk.{il}.time_mix_{name}1.weight"][1] * T, x, w=d)
        return g.op(e, g.op(mid.size, mid, inplace=True) if tanh else mid, w=d)

    gating = f"blk.{il}.time_mix_g1.weight" in c.names
    n_lerp = 6 if gating else 5
    sx = g.op(e, x_prev, cur, inplace=True)                                       # x_prev - x
    sx = g.op(n_lerp * e, sx)                                                     # repeat: one per lerp
    xxx = g.op(n_lerp * e, g.op(n_lerp * e, sx, w=d, inplace=True), cur, inplace=True)   # sx * lerp_fused + x
    xr, xw, xk, xv, xa, xg = (g.view(xxx, e) for _ in range(6))
    r = g.op(e, xr, w=d)
    w = g.op(e, g.op(e, lora(xw, "w", tanh=True), w=d, inplace=True), inplace=True)   # sigmoid(w2 tanh(w1 xw) + w0)
    for _ in range(2):                                                            # exp(scale(.))
        w = g.op(e, w, inplace=True)
    k = g.op(e, xk, w=d)
    v = g.op(e, xv, w=d)
    if c.v_first is None:
        c.v_first = v
    else:
        mix = g.op(e, g.op(e, lora(xv, "v"), w=d, inplace=True), inplace=True)   # sigmoid(v2 v1 xv + v0)
        v = g.op(e, v, g.op(e, g.op(e, c.v_first, v, inplace=True), mix, inplace=True), inplace=True)
    a = g.op(e, g.op(e, lora(xa, "a"), w=d, inplace=True), inplace=True)         # sigmoid(a2 a1 xa + a0)
    kk = g.op(e, g.view(g.op(e, k, w=d, inplace=True)))                           # l2_norm(k * k_k)
    ka = g.op(e, k, w=d, inplace=True)                                            # k * k_a
    k = g.op(e, k, g.op(e, g.op(e, a, ka, inplace=True), ka, inplace=True), inplace=True)   # k + (a * ka - ka)
    r, w, k, v, a = (g.view(x) for x in (r, w, k, v, a))
    state = c.rs(il, s_main, s_extra, 4 * c.p.layers[il].n_embd_s * ns)
    neg = g.op(e, kk, inplace=True)
    out = g.op(4 * E * (T + head * ns), r, w, k, v, neg, g.op(e, kk, a, inplace=True), state)  # ggml_rwkv_wkv7
    g.expand(g.set(d, g.view(out), g.view(g.ext(d))))                             # the new state
    y = g.view(g.view(out, e))
    if f"blk.{il}.time_mix_ln.weight" in c.names:                                 # group norm, weight, bias
        y = g.op(e, g.op(e, g.view(g.op(e, y)), w=d, inplace=True), w=d, inplace=True)
    rk = g.op(e, g.op(e, k, r, inplace=True), c.reshaped(il, "time_mix_r_k.weight"), inplace=True)
    rk = g.op(4 * (E // head) * T, rk)                                            # sum_rows(k * r * r_k)
    y = g.op(e, y, g.view(g.op(e, v, rk, inplace=True)), inplace=True)
    if gating:                                                                    # * g2 sigmoid(g1 xg)
        mid = g.op(4 * sh[f"blk.{il}.time_mix_g1.weight"][1] * T, xg, w=d)
        y = g.op(e, y, g.op(e, g.op(mid.size, mid, inplace=True), w=d), inplace=True)
    return g.view(g.op(e, y, w=d))                                                # time_mix_output


def _plamo2_mamba(c: _Ctx, s_main: Tensor, s_extra: Tensor, cur: Tensor, il: int) -> Tensor:
    """llama_model_plamo2::graph::build_plamo2_mamba_layer (src/models/plamo2.cpp): Mamba with heads, z and x
    interleaved per head (made contiguous), dt, B and C RMS-normed, A and D reshaped weights."""
    g, d, T, ns = c.g, c.dev[il], c.T, c.ns
    md, arch = c.p.metadata, c.p.arch
    d_conv, d_inner = int(md[f"{arch}.ssm.conv_kernel"]), int(md[f"{arch}.ssm.inner_size"])
    d_state, n_heads = int(md[f"{arch}.ssm.state_size"]), int(md[f"{arch}.ssm.time_step_rank"])
    dt_dim = max(64, c.E // 16)
    conv = g.view(c.rs(il, s_main, s_extra, 4 * (d_conv - 1) * d_inner * ns))
    zx = g.op(4 * 2 * d_inner * T, g.view(g.op(4 * 2 * d_inner * T, g.view(cur), w=d)))   # cont(permute(ssm_in))
    x = g.op(4 * d_inner * T, g.view(zx))                                         # cont(x)
    z = g.view(zx)
    conv_x = g.op(4 * (d_conv - 1 + T // ns) * d_inner * ns, conv, g.view(x))   # concat(conv, x^T)
    g.expand(g.set(d, g.view(conv_x), g.view(g.ext(d))))
    x = g.op(4 * d_inner * T, g.op(4 * d_inner * T, conv_x, w=d), inplace=True)   # silu(ssm_conv)
    x_bcdt = g.op(4 * c.shapes[f"blk.{il}.ssm_x.weight"][1] * T, x, w=d)         # ssm_x
    B, C = c.norm(g.view(x_bcdt), il, 4 * d_state * T), c.norm(g.view(x_bcdt), il, 4 * d_state * T)
    dt = c.norm(g.view(x_bcdt), il, 4 * dt_dim * T)
    dt = g.op(4 * n_heads * T, g.op(4 * n_heads * T, dt, w=d), w=d, inplace=True)  # ssm_dt + bias
    x4, B, C = g.view(x), g.view(B), g.view(C)
    A = c.reshaped(il, "ssm_a")
    ys = c.rs(il, s_main, s_extra, 0,
              lambda states: g.op(4 * (d_inner * T + d_state * d_inner * ns), g.view(states), x4, dt, A, B, C,
                                  s_main))
    g.expand(g.set(d, g.view(ys), g.view(g.ext(d))))
    yd = 4 * d_inner * T
    y = g.op(yd, g.view(ys, yd), g.op(yd, x4, c.reshaped(il, "ssm_d"), inplace=True), inplace=True)  # y + x * D
    y = g.op(yd, g.op(yd, z), y)                                                  # swiglu_split(cont(z), y)
    return g.view(g.op(4 * c.E * T, g.view(y), w=d))                              # ssm_out


class _Lightning:
    """The inputs of minimax-01's lightning attention (llm_graph_input_la: the slopes, the decays of Q, K and of
    the diagonal blocks) and its layer (llama_model_minimax_01::graph, src/models/minimax-01.cpp)."""

    def __init__(self, c: _Ctx) -> None:
        g, T, ns = c.g, c.T, c.ns
        H = c.p.layers[0].n_head
        self.c, self.H = c, H
        self.slopes = g.inp(4 * H)
        self.q_decay, self.k_decay = g.inp(4 * H * T), g.inp(4 * H * T)
        self.diag_decay = g.inp(4 * (T // ns) * (T // ns) * H * ns)

    def __call__(self, s_main: Tensor, s_extra: Tensor, cur: Tensor, il: int) -> Tensor:
        c, H = self.c, self.H
        g, d, T, ns, E = c.g, c.dev[il], c.T, c.ns, c.E
        e = 4 * E * T
        layer = c.p.layers[il]
        c.rs(il, s_main, s_extra, 4 * layer.n_embd_r * ns)             # the (empty) conv state, expanded
        cur = g.view(cur)
        qkv_all = g.view(g.op(3 * e, g.op(3 * e, cur, w=d), inplace=True))   # silu(wqkv)
        q, k, v = g.view(qkv_all, e), g.view(qkv_all, e), g.view(qkv_all, e)
        kv_old = g.view(c.rs(il, s_main, s_extra, 4 * layer.n_embd_s * ns))

        def decay(x: Tensor) -> Tensor:                                 # exp(scale(x))
            return g.op(x.size, g.op(x.size, x, inplace=True), inplace=True)

        q_decay, k_decay, diag_decay = decay(self.q_decay), decay(self.k_decay), decay(self.diag_decay)
        none_diag = g.op(e, kv_old, g.view(g.op(e, q, q_decay)))         # kv_old x permute(q * q_decay)
        qk = g.op(diag_decay.size, g.view(k), g.view(q))                  # k^T q per head
        qk = g.op(qk.size, qk, diag_decay, inplace=True)
        v_trans = g.op(e, g.view(v))                                      # cont(permute(v))
        qkv = g.expand(g.op(e, none_diag, g.op(e, v_trans, qk), inplace=True))
        block_decay = g.view(decay(g.op(4 * H, self.slopes, inplace=True)))   # exp(scale(scale(slopes)))
        kv_old_s = g.op(kv_old.size, kv_old, block_decay, inplace=True)
        k_trans = g.op(e, g.view(g.op(e, k, k_decay)))                    # cont(permute(k * k_decay))
        kv_new = g.op(kv_old.size, kv_old_s, g.op(kv_old.size, k_trans, v_trans), inplace=True)
        g.expand(g.set(d, kv_new, g.view(g.ext(d))))                      # the new state
        qkv = c.norm(g.view(g.op(e, g.view(qkv))), il)                    # norm(cont(permute(qkv)))
        gate = g.op(e, g.op(e, cur, w=d), inplace=True)                   # sigmoid(wg)
        return g.view(g.op(e, g.op(e, gate, qkv, inplace=True), w=d))     # wo(gate * qkv)


def _ffn(c: _Ctx, h: Tensor, il: int, bias: bool = False) -> Tensor:
    """llm_graph_context::build_ffn (src/llama-graph.cpp), SiLU with a parallel gate: up, gate, swiglu_split,
    down; each product's bias the file has added in place (`bias`: the graph passes them)."""
    g, fd = c.g, c.ffn_dev[il]
    f = 4 * c.p.n_ff * (h.size // (4 * c.E))

    def mm(size: int, x: Tensor, name: str) -> Tensor:
        y = g.op(size, x, w=fd)
        return g.op(size, y, w=fd, inplace=True) if bias and f"blk.{il}.{name}.bias" in c.names else y

    return mm(h.size, g.op(f, mm(f, h, "ffn_gate"), mm(f, h, "ffn_up")), "ffn_down")   # down(swiglu(gate, up))


def _relu_sqr_ffn(c: _Ctx, h: Tensor, il: int) -> Tensor:
    """build_ffn without a gate, LLM_FFN_RELU_SQR (src/llama-graph.cpp; nemotron_h's FFN layers): up and its
    bias, relu and sqr in place, down and its bias."""
    g, fd = c.g, c.ffn_dev[il]
    f = 4 * c.shapes[f"blk.{il}.ffn_up.weight"][1] * (h.size // (4 * c.E))

    def mm(size: int, x: Tensor, name: str) -> Tensor:
        y = g.op(size, x, w=fd)
        return g.op(size, y, w=fd, inplace=True) if f"blk.{il}.{name}.bias" in c.names else y

    up = mm(f, h, "ffn_up")
    return mm(h.size, g.op(f, g.op(f, up, inplace=True), inplace=True), "ffn_down")


def _situ(g: Graph, gate: Tensor, up: Tensor, linear: bool) -> Tensor:
    """kimi_k3_situ (src/models/kimi-k3.cpp) and build_moe_ffn's LLM_FFN_SITU: beta tanh(gate / beta) *
    sigmoid(gate) * (lb tanh(up / lb) where `linear`, else up); scales, tanh, sigmoid and the products run in
    place where their input has no other reader left (ggml_op_can_inplace)."""
    a = g.op(gate.size, g.op(gate.size, g.op(gate.size, gate, inplace=True), inplace=True), inplace=True)
    a = g.op(a.size, a, g.op(gate.size, gate, inplace=True), inplace=True)
    if linear:
        up = g.op(up.size, g.op(up.size, g.op(up.size, up, inplace=True), inplace=True), inplace=True)
    return g.op(a.size, a, up, inplace=True)


def _moe(c: _Ctx, h: Tensor, il: int, *, gating: int = 1, probs_bias: bool = False, norm_w: bool = True,
         scale: bool = False, n_ff: int | None = None, shared: int = 0, shared_gate: bool = True,
         logits: Tensor | None = None, gated: bool = True, n_used: int | None = None,
         grove: bool = False, remap: bool = False, situ: bool | None = None) -> Tensor:
    """llm_graph_context::build_moe_ffn (src/llama-graph.cpp): the router, its gating (`gating`: 1 softmax,
    2 sigmoid, 3 softmax over the chosen weights: llama_expert_gating_func_type), the selection bias
    (exp_probs_b), top-k, the weights (normalized: norm_w; scaled: expert_weights_scale not 0 or 1), the experts
    (`n_ff` wide) and their sum; then a shared expert `shared` wide (0: none), gated by a sigmoid
    (qwen3next's build_layer_ffn) or added as it is (deepseek.cpp and the graphs like it). `logits`: the router's
    output where the graph computes it itself (probs_in: smallthinker's router reads the layer's input). Without
    gate_exps (`gated` False: ernie4_5-moe's files) the up product's activation runs in place. `grove`: GROVEMOE's
    selection by a sigmoid of the logits, and for its chunk experts where they are fewer than the router's
    (`remap`) the selected ids cast to f32, scaled and cast back. `situ`: LLM_FFN_SITU (kimi-k3) in place of
    the SwiGLU, its up product's tanh where True (situ_linear_beta > 0)."""
    g, E, p = c.g, c.E, c.p          # each weight's product runs where c.at says (-cmoe, -ot)
    md, arch = p.metadata, p.arch
    rows = h.size // (4 * E)
    n_exp, U = p.n_expert, n_used or p.n_expert_used
    if n_ff is None:
        n_ff = int(md.get(f"{arch}.expert_feed_forward_length", p.n_ff))
    if logits is None:
        logits = g.op(4 * n_exp * rows, h, w=c.at(il, "ffn_gate_inp", ffn=False))
    probs = logits if gating == 3 else g.op(logits.size, logits, inplace=True)       # softmax / sigmoid
    select = g.op(probs.size, probs, w=c.at(il, "exp_probs_b", ffn=False), inplace=True) if probs_bias \
        else probs                                                                    # + exp_probs_b
    if grove:
        select = g.op(logits.size, logits, inplace=True)                              # sigmoid(logits)
    sel = g.view(g.op(4 * n_exp * rows, select), 4 * U + 4 * n_exp * (rows - 1))     # argsort, its top-k view
    if remap:
        sel = g.op(4 * U * rows, g.op(4 * U * rows, g.op(4 * U * rows, sel), inplace=True))  # cast, scale, cast
    w = g.op(4 * U * rows, g.view(probs), sel)                                        # get_rows: the weights
    if gating == 3:
        w = g.view(g.op(w.size, g.view(w), inplace=True))                             # softmax of the chosen
    if norm_w:
        w2 = g.view(w)                                                                # reshape_2d
        wsum = g.op(_a(4 * rows), g.op(_a(4 * rows), w2), inplace=True)               # clamp(sum_rows)
        w = g.view(g.op(4 * U * rows, w2, wsum, inplace=True))                        # w / sum
    if scale:
        w = g.op(w.size, w, inplace=True)
    g.expand(w)
    x = g.view(h)
    f = 4 * n_ff * U * rows
    up = g.op(f, x, sel, w=c.at(il, "ffn_up_exps"))                                 # up first, then gate
    if situ is not None:
        act = _situ(g, g.op(f, x, sel, w=c.at(il, "ffn_gate_exps")), up, situ)
    else:
        act = g.op(f, g.op(f, x, sel, w=c.at(il, "ffn_gate_exps")), up) if gated \
            else g.op(f, up, inplace=True)                                           # swiglu_split(gate, up) / silu
    ex = g.op(4 * E * U * rows, act, sel, w=c.at(il, "ffn_down_exps"))
    ex = g.expand(g.op(ex.size, ex, w, inplace=True))                                 # * weights
    slots = [g.expand(g.view(ex, 4 * E + (rows - 1) * 4 * E * U)) for _ in range(U)]
    out = g.expand(g.op(4 * E * rows, slots[0], slots[1], inplace=True) if U > 1 else g.op(4 * E * rows, slots[0]))
    for v in slots[2:]:
        out = g.expand(g.op(out.size, out, v, inplace=True))
    if shared:
        fs = 4 * shared * rows
        up = g.op(fs, h, w=c.at(il, "ffn_up_shexp", ffn=False))                     # build_ffn: up, then gate
        sh = g.op(4 * E * rows, g.op(fs, g.op(fs, h, w=c.at(il, "ffn_gate_shexp", ffn=False)), up),
                  w=c.at(il, "ffn_down_shexp", ffn=False))
        if shared_gate:
            sg = g.op(_a(4 * rows), g.op(_a(4 * rows), h, w=c.at(il, "ffn_gate_inp_shexp", ffn=False)),
                      inplace=True)                                                   # sigmoid(shared gate)
            sh = g.op(sh.size, sh, sg, inplace=True)
        out = g.op(out.size, out, sh, inplace=True)
    return out


class _Cache:
    """One KV cache's graph inputs: its K and V row indices, its KQ mask, the Hadamard rotations of a quantized
    cache (llama_kv_cache::build_input_k_idxs / v_idxs / k_rot / v_rot, build_attn_inp_kq_mask). The rotations
    exist where every layer of the cache has one head size, a multiple of 64 (llama_kv_cache ctor: attn_rot_k /
    attn_rot_v; K rotates by the largest power of two dividing it, V by 64)."""

    def __init__(self, g: Graph, layers: list, n_kv: int, T: int, fa: bool, v_trans: bool,
                 config: SplitConfig) -> None:
        self.n_kv = n_kv
        self.k_idxs = g.inp(8 * T)
        self.v_idxs = g.inp(8 * T * (layers[0].n_embd_v_gqa if v_trans else 1))
        self.mask = g.inp(n_kv * T * (2 if fa else 4))
        hk, hv = {la.n_embd_head_k for la in layers}, {la.n_embd_head_v for la in layers}
        nrot = 64
        while len(hk) == 1 and next(iter(hk)) % (nrot * 2) == 0:
            nrot *= 2
        quant_k, quant_v = config.type_k not in _QUANT_FREE, config.type_v not in _QUANT_FREE
        self.k_rot = g.inp(4 * nrot * nrot) if quant_k and len(hk) == 1 and next(iter(hk)) % 64 == 0 else None
        self.v_rot = g.inp(4 * 64 * 64) if quant_v and len(hv) == 1 and next(iter(hv)) % 64 == 0 else None

    def rotate(self, g: Graph, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """build_attn's rotations of a quantized cache before the cache writes: Q and K by k_rot, V by v_rot
        (each a product of a reshaped view, viewed back)."""
        if self.k_rot is not None:
            q = g.view(g.op(q.size, self.k_rot, g.view(q)))
            k = g.view(g.op(k.size, self.k_rot, g.view(k)))
        if self.v_rot is not None:
            v = g.view(g.op(v.size, self.v_rot, g.view(v)))
        return q, k, v


class _Attn:
    """The inputs of the KV cache (llm_graph_input_attn_kv, or _iswa: a full and a sliding-window cache) and
    build_attn / build_attn_mha (src/llama-graph.cpp), llama_kv_cache's cpy_k / cpy_v / get_k / get_v
    (src/llama-kv-cache.cpp)."""

    def __init__(self, c: _Ctx, fa: bool, v_trans: bool) -> None:
        cfg, g, T, p = c.config, c.g, c.T, c.p
        self.c, self.fa, self.v_trans = c, fa, v_trans
        # KV cells per stream (llama_context ctor: n_ctx_seq), one stream per sequence unless unified (-kvu)
        n_ctx = -(-cfg.n_ctx // 256) * 256
        n_kv = n_ctx if cfg.kv_unified else -(-(n_ctx // c.ns) // 256) * 256
        self.n_stream = cfg.n_streams
        kv_layers = [la for la in p.layers if la.has_kv]
        self.swa = [bool(p.n_swa and la.is_swa) for la in p.layers]
        full = [la for la, w in zip(p.layers, self.swa) if la.has_kv and not w]
        self.caches = {False: _Cache(g, full or kv_layers, n_kv, T, fa, v_trans, cfg)}
        swa = [la for la, w in zip(p.layers, self.swa) if la.has_kv and w]
        if swa:
            # llama_kv_cache_iswa: the window's cells, pad(n_swa + n_ubatch, 256), unless --swa-full
            window = p.n_swa * (cfg.n_seq_max if cfg.kv_unified else 1) + cfg.effective_n_ubatch
            n_swa = n_kv if cfg.swa_full else min(n_kv, -(-window // 256) * 256)
            self.caches[True] = _Cache(g, swa, n_swa, T, fa, v_trans, cfg)
        self.fa_nodes: list[tuple[Tensor | None, str]] = []     # each flash-attention node and its layer's device

    def __call__(self, cur: Tensor, pos: Tensor | None, il: int, gated: bool = False, qk_norm: bool = True,
                 wo_bias: bool = False, qkv_views: bool = False) -> Tensor:
        """build_qkv's Q, K and V products (src/llama-graph.cpp), Q and K RMS-normed (`qk_norm`) and rotated
        (where `pos`: RoPE), attended (`attend`), the output product. gated: Q is twice as wide, its second half
        gates the attention output (qwen3next.cpp build_layer_attn). wo_bias: the graph adds the output's bias
        where the file has it. A fused QKV product (attn_qkv) is made contiguous part by part (build_qkv with
        reshape = false: qwen35) or, `qkv_views`, read through strided views (plamo2)."""
        c, g, T = self.c, self.c.g, self.c.T
        d, layer = c.dev[il], c.p.layers[il]
        hd, n_head, n_kv_head = layer.n_embd_head_k, layer.n_head, layer.n_head_kv
        q_size, kv_size = 4 * hd * n_head * T * (2 if gated else 1), 4 * hd * n_kv_head * T
        strided = False
        if f"blk.{il}.attn_qkv.weight" in c.names:
            qkv = g.op(q_size + 2 * kv_size, cur, w=d)
            if qkv_views:
                q_full, k, v, strided = qkv, g.view(qkv, kv_size), g.view(qkv, kv_size), True
            else:
                q_full = g.op(q_size, g.view(qkv))
                k = g.view(g.op(kv_size, g.view(qkv)))
                v = g.view(g.op(kv_size, g.view(qkv)))
        else:
            q_full = g.op(q_size, cur, w=d)
            k = g.view(g.op(kv_size, cur, w=d))
            v = g.view(g.op(kv_size, cur, w=d))
        gate = g.view(g.view(q_full), 4 * hd * n_head * T)
        q = g.view(q_full, 4 * hd * n_head * T)
        if qk_norm:
            q, k = c.norm(q, il), c.norm(k, il)
        if pos is not None:
            q, k = g.op(q.size, q, pos, inplace=True), g.op(k.size, k, pos, inplace=True)
        out = self.attend(q, k, v, il, v_cont=strided)
        if gated:
            gate = g.op(gate.size, g.op(gate.size, gate), inplace=True)     # sigmoid(cont(gate))
            out = g.op(gate.size, out, gate, inplace=True)
        out = g.op(4 * c.E * T, out, w=d)                                    # wo
        if wo_bias and f"blk.{il}.attn_output.bias" in c.names:
            out = g.op(out.size, out, w=d, inplace=True)
        return out

    def attend(self, q: Tensor, k: Tensor, v: Tensor, il: int, v_cont: bool = False,
               pos_bucket: Tensor | None = None) -> Tensor:
        """build_attn from the cache's rotations to the attention output, before wo: the cache writes and
        build_attn_mha. v_cont: V is a strided view (of a fused QKV product), which the transposed V cache copies
        contiguous first (llama_kv_cache::cpy_v's ggml_cont_2d). pos_bucket: T5's relative position bias
        (build_pos_bias) added to KQ, which rules flash attention out."""
        c, g, T = self.c, self.c.g, self.c.T
        d, layer, cfg = c.dev[il], c.p.layers[il], c.config
        hd, n_head, n_kv_head = layer.n_embd_head_k, layer.n_head, layer.n_head_kv
        hv = layer.n_embd_head_v          # the attention output's head size (minicpm3: V narrower than K)
        kv = self.caches[self.swa[il]]
        q, k, v = kv.rotate(g, q, k, v)
        g.expand(q)
        g.expand(v)
        g.expand(k)
        g.expand(g.set(d, g.view(k), kv.k_idxs))
        v_copy = v_cont and self.v_trans and kv.v_rot is None
        g.expand(g.set(d, g.op(v.size, v) if v_copy else g.view(v), kv.v_idxs))
        n_kv = kv.n_kv * self.n_stream                                       # the views span every stream
        kc = g.view(g.view(g.ext(d)), _row(cfg.type_k, hd) * n_kv_head * n_kv)
        vc = g.view(g.view(g.ext(d)), _row(cfg.type_v, hv) * n_kv_head * n_kv)
        qp = g.view(g.view(q))
        if self.fa and pos_bucket is None:
            out = g.op(4 * hv * n_head * T, qp, kc, vc, kv.mask)
            fa_node = out
            out = g.view(out)
        else:
            kq = g.op(4 * kv.n_kv * T * n_head, kc, qp)
            if pos_bucket is not None:
                # get_rows(attn_rel_b, pos_bucket) [n_head, n_kv * T] f32, then cont(permute): as large as KQ each
                bias = g.op(kq.size, g.op(kq.size, g.view(pos_bucket), w=d))
                kq = g.op(kq.size, kq, bias, inplace=True)
            kq = g.op(kq.size, kq, kv.mask, inplace=True)                    # soft_max_ext
            if not self.v_trans:
                vc = g.op(_row(cfg.type_v, hv) * n_kv_head * n_kv, g.view(vc))   # v_cont
            out = g.op(4 * hv * n_head * T, g.view(g.op(4 * hv * n_head * T, vc, kq)))   # cont(permute(kqv))
            fa_node = None
        g.expand(out)                  # build_attn_mha expands its result
        if kv.v_rot is not None:
            out = g.view(g.op(out.size, kv.v_rot, g.view(out)))
        self.fa_nodes.append((fa_node, d))
        return out


def _graph(c: _Ctx, fa: bool, v_trans: bool) -> tuple[Graph, list]:
    g, T, E, p = c.g, c.T, c.E, c.p
    tokens = g.inp(4 * T)
    g.expand(g.inp(4 * E * T))               # inp_embd: a text batch never reads it, it is allocated
    cur = g.expand(g.op(4 * E * T, tokens, w=HOST_NAME))              # get_rows(token_embd)
    if p.arch == "rwkv7":
        cur = c.norm(cur, 0, ln=True)                                 # tok_norm (LN0)
    attn = _Attn(c, fa, v_trans) if any(la.has_kv for la in p.layers) else None
    la = _Lightning(c) if p.arch == "minimax-01" else None
    s_copy = g.inp(4 * c.ns)
    s_main, s_extra = g.view(s_copy, 4 * c.ns), g.view(s_copy, 0)
    # positions: four per token for multi-section RoPE (llama_hparams::n_pos_per_embd)
    pos = g.inp(4 * T * (4 if p.arch in _MROPE else 1)) if attn is not None and p.arch in _ROPE else None
    out_ids = g.inp(4 * c.T_out)
    n_layer = p.n_layer
    for il in range(n_layer):
        last = il == n_layer - 1
        if p.arch in ("mamba", "mamba2"):
            y = (_mamba1 if p.arch == "mamba" else _mamba2)(c, s_main, s_extra, c.norm(cur, il), il)
            if last:
                y, cur = g.op(4 * E * c.T_out, y, out_ids), g.op(4 * E * c.T_out, cur, out_ids)
            cur = g.op(y.size, y, cur, inplace=True)                  # l_out
            continue
        if p.arch == "falcon-h1":
            # llama_model_falcon_h1::graph (src/models/falcon-h1.cpp): attention and Mamba-2 side by side on
            # the layer's norm (built twice), summed, the residual, the FFN with biases, the residual
            assert attn is not None
            y = attn(c.norm(cur, il), pos, il, qk_norm=False)
            y = g.op(y.size, y, _mamba2(c, s_main, s_extra, c.norm(cur, il), il), inplace=True)
            cur = g.op(y.size, y, cur, inplace=True)
            if last:
                cur = g.op(4 * E * c.T_out, cur, out_ids)
            cur = g.op(cur.size, _ffn(c, c.norm(cur, il), il, bias=True), cur, inplace=True)
            continue
        if p.arch == "granitehybrid":
            # llama_model_granite_hybrid::graph (src/models/granite-hybrid.cpp): Mamba-2 or attention (RoPE, the
            # output's bias), the residual, build_layer_ffn: the FFN with biases, the residual
            h = c.norm(cur, il)
            if p.layers[il].is_recurrent:
                y = _mamba2(c, s_main, s_extra, h, il)
            else:
                assert attn is not None
                y = attn(h, pos, il, qk_norm=False, wo_bias=True)
            if last:
                y, cur = g.op(4 * E * c.T_out, y, out_ids), g.op(4 * E * c.T_out, cur, out_ids)
            cur = g.op(y.size, y, cur, inplace=True)
            cur = g.op(cur.size, _ffn(c, c.norm(cur, il), il, bias=True), cur, inplace=True)
            continue
        if p.arch in _NEMOTRON_H:
            # llama_model_nemotron_h::graph (src/models/nemotron-h.cpp): each layer is Mamba-2, attention (no
            # RoPE, the output's bias) or an FFN, then the residual; the output rows are kept after the norm
            h = c.norm(cur, il)
            if p.layers[il].is_recurrent:
                y = _mamba2(c, s_main, s_extra, h, il)
            elif p.layers[il].has_kv:
                assert attn is not None
                y = attn(h, None, il, qk_norm=False, wo_bias=True)
            else:
                y = _relu_sqr_ffn(c, h, il)
            cur = g.op(y.size, y, cur, inplace=True)
            continue
        if p.arch == "minimax-01":
            # llama_model_minimax_01::graph: norm, lightning attention (or softmax attention, not built here), the
            # scaled normed input as the residual, the FFN norm, the MoE, the scaled normed input as the residual
            assert la is not None
            h = c.norm(cur, il)
            y = la(s_main, s_extra, h, il)
            if last:
                y, h = g.op(4 * E * c.T_out, y, out_ids), g.op(4 * E * c.T_out, h, out_ids)
            h = c.norm(g.op(y.size, y, g.op(h.size, h, inplace=True), inplace=True), il)   # norm(y + scale(h))
            ff = _moe(c, h, il, gated=c.has(f"blk.{il}.ffn_gate_exps.weight", True),
                      probs_bias=c.has(f"blk.{il}.exp_probs_b.bias", False))
            cur = g.op(h.size, ff, g.op(h.size, h, inplace=True), inplace=True)
            continue
        if p.arch == "plamo2":
            # llama_model_plamo2::graph (src/models/plamo2.cpp): norm, Mamba or attention (fused QKV read through
            # views, Q/K norms, RoPE), the post-mixer norm, the residual, the FFN norm, up and a SwiGLU of its two
            # halves, down, the post-FFN norm, the residual
            h = c.norm(cur, il)
            if p.layers[il].is_recurrent:
                y = _plamo2_mamba(c, s_main, s_extra, h, il)
            else:
                assert attn is not None
                y = attn(h, pos, il, qkv_views=True)
            if last:
                y, cur = g.op(4 * E * c.T_out, y, out_ids), g.op(4 * E * c.T_out, cur, out_ids)
            cur = g.op(y.size, c.norm(y, il), cur, inplace=True)
            rows, fd = cur.size // (4 * E), c.ffn_dev[il]
            up = g.op(4 * c.shapes[f"blk.{il}.ffn_up.weight"][1] * rows, c.norm(cur, il), w=fd)
            y = g.op(cur.size, g.op(up.size // 2, up), w=fd)                         # down(swiglu(up))
            cur = g.op(cur.size, c.norm(y, il), cur, inplace=True)
            continue
        if p.arch == "rwkv7":
            # llama_model_rwkv7::graph (src/models/rwkv7.cpp): LayerNorms with biases (the embeddings' first),
            # two token shifts (attention's, the channel mix's) read as one state, the time mix, the residual,
            # the FFN norm, both shifts written as one concat, the channel mix (relu-squared key), the residual
            # the views' ggml_nbytes (what a copy of one to another device takes): one token of each sequence
            # in the shift's rows of 2 n_embd, all tokens but the last (or the last) of each sequence
            ns, nst = c.ns, T // c.ns
            one_shift, one_tok = 4 * E * (1 + 2 * (ns - 1)), 4 * E * (1 + nst * (ns - 1))
            but_last = 4 * E * ((nst - 1) + nst * (ns - 1))
            inp = g.view(cur)
            shift = g.view(c.rs(il, s_main, s_extra, 4 * p.layers[il].n_embd_r * ns))
            att = c.norm(inp, il, ln=True)
            x_prev = g.op(4 * E * T, g.view(shift, one_shift), g.view(att, but_last))     # concat
            y = _rwkv7_time_mix(c, s_main, s_extra, att, x_prev, il)
            ffn_inp = g.op(4 * E * T, y, inp, inplace=True)
            ffn_norm = c.norm(ffn_inp, il, ln=True)
            x_prev = g.op(4 * E * T, g.view(shift, one_shift), g.view(ffn_norm, but_last))    # concat
            ts = g.op(4 * 2 * E * ns, g.view(att, one_tok), g.view(ffn_norm, one_tok))       # the last tokens
            g.expand(g.set(c.dev[il], g.view(ts), g.view(g.ext(c.dev[il]))))
            ffn_inp, ffn_norm, x_prev = g.view(ffn_inp), g.view(ffn_norm), g.view(x_prev)
            if last:
                ffn_inp, ffn_norm, x_prev = (g.op(4 * E * c.T_out, x, out_ids) for x in (ffn_inp, ffn_norm, x_prev))
            d, rows = c.dev[il], ffn_inp.size // (4 * E)
            # build_rwkv7_channel_mix: sx = x_prev - x, xk = sx * lerp_k + x, value(sqr(relu(key(xk))))
            xk = g.op(ffn_norm.size, g.op(ffn_norm.size, g.op(ffn_norm.size, x_prev, ffn_norm, inplace=True),
                                          w=d, inplace=True), ffn_norm, inplace=True)
            k = g.op(4 * c.shapes[f"blk.{il}.channel_mix_key.weight"][1] * rows, xk, w=d)
            k = g.op(k.size, g.op(k.size, k, inplace=True), inplace=True)
            cur = g.op(ffn_inp.size, g.op(ffn_inp.size, k, w=d), ffn_inp, inplace=True)
            continue
        if p.arch in ("rwkv6qwen2", "arwkv7"):
            # llama_model_rwkv6qwen2::graph (src/models/rwkv6qwen2.cpp): the token shift read, the norm, the
            # shifted input, the time mix, the token shift written, the residual, the SwiGLU FFN, the residual
            inp = g.view(cur)
            shift = g.view(c.rs(il, s_main, s_extra, 4 * p.layers[il].n_embd_r * c.ns))
            att = c.norm(inp, il)
            x_prev = g.op(4 * E * T, shift, g.view(att))                            # concat
            y = (_rwkv6_time_mix if p.arch == "rwkv6qwen2" else _rwkv7_time_mix)(c, s_main, s_extra, att, x_prev, il)
            g.expand(g.set(c.dev[il], g.view(g.view(att)), g.view(g.ext(c.dev[il]))))
            ffn_inp = g.op(4 * E * T, y, inp, inplace=True)
            ffn_inp = g.op(4 * E * c.T_out, g.view(ffn_inp), out_ids) if last else g.view(ffn_inp)
            cur = g.op(ffn_inp.size, _ffn(c, c.norm(ffn_inp, il), il), ffn_inp, inplace=True)
            continue
        if p.arch in _QWEN3NEXT:
            # llama_model_qwen3next::graph (and qwen35's, qwen35moe's): the norm expanded first, gated delta net
            # or gated attention, the residual, the post-attention norm, the MoE with its shared expert (qwen35:
            # a dense FFN), the residual
            h = g.expand(c.norm(cur, il))
            if p.layers[il].is_recurrent:
                y = _gated_delta_net(c, s_main, s_extra, h, il)
            else:
                assert attn is not None and pos is not None
                y = attn(h, pos, il, gated=True)
            cur = g.op(y.size, y, cur, inplace=True)
            h = c.norm(cur, il)
            moe = c.has(f"blk.{il}.ffn_gate_inp.weight", p.n_expert > 0)
            shared = int(p.metadata.get(f"{p.arch}.expert_shared_feed_forward_length", 0))
            cur = g.op(cur.size, _moe(c, h, il, shared=shared) if moe else _ffn(c, h, il), cur, inplace=True)
            continue
        # lfm2, lfm2moe, jamba: norm, recurrent block or attention, residual, FFN norm, dense SwiGLU FFN (lfm2moe:
        # MoE past its leading dense layers), residual
        h = c.norm(cur, il)
        if p.layers[il].is_recurrent:
            y = (_mamba1 if p.arch == "jamba" else _shortconv)(c, s_main, s_extra, h, il)
        else:
            assert attn is not None
            y = attn(h, pos, il, qk_norm=p.arch != "jamba")     # jamba: no RoPE, no Q/K norms
        if last:
            y, cur = g.op(4 * E * c.T_out, y, out_ids), g.op(4 * E * c.T_out, cur, out_ids)
        cur = g.op(y.size, cur, y, inplace=True)
        h = c.norm(cur, il)
        moe = c.has(f"blk.{il}.ffn_gate_inp.weight", p.n_expert > 0)
        ff = _moe(c, h, il, gating=int(p.metadata.get(f"{p.arch}.expert_gating_func", 1)),
                  probs_bias=c.has(f"blk.{il}.exp_probs_b.bias", False)) if moe else _ffn(c, h, il)
        cur = g.op(cur.size, cur, ff, inplace=True)
    out_dev = c.dev[n_layer]
    h = c.norm(cur, -1, cur.size, ln=p.arch == "rwkv7") if n_layer else cur
    if p.arch in (*_QWEN3NEXT, *_NEMOTRON_H):
        # the normed hidden state is an output (t_h_nextn, for MTP); the output rows are kept after the norm
        h.out = True
        h = g.op(4 * E * c.T_out, h, out_ids)
    g.expand(g.op(4 * p.n_vocab * c.T_out, h, w=out_dev, out=True))   # result_output
    return g, [(n, d) for n, d in (attn.fa_nodes if attn is not None else []) if n is not None]


def recurrent_compute_bytes(profile: ModelProfile, config: SplitConfig, layer_devices: list[str],
                            names: list[str], *, T: int, n_seqs: int, T_out: int, n_copies: int,
                            pin_norm: bool, ffn_devices: list[str] | None = None,
                            ffn_moved: tuple[tuple[int, str, str], ...] | None = None) -> dict[str, int]:
    """Compute buffer bytes of every backend in `names` for a `replayable` profile (`ffn_devices`: where tensor
    overrides put each layer's FFN weights, its experts for MoE; `ffn_moved`: each MoE weight an override moved,
    its product run where it is). Remembered per profile and arguments: a 48-layer MoE graph takes some 20 ms to
    replay."""
    return replay_compute_bytes(_graph, profile, config, layer_devices, names, T=T, n_seqs=n_seqs, T_out=T_out,
                                n_copies=n_copies, pin_norm=pin_norm, ffn_devices=ffn_devices, ffn_moved=ffn_moved)


GraphBuilder = Callable[[_Ctx, bool, bool], tuple[Graph, list]]


def replay_compute_bytes(build: GraphBuilder, profile: ModelProfile, config: SplitConfig,
                         layer_devices: list[str], names: list[str], *, T: int, n_seqs: int, T_out: int,
                         n_copies: int, pin_norm: bool, ffn_devices: list[str] | None = None,
                         ffn_moved: tuple[tuple[int, str, str], ...] | None = None) -> dict[str, int]:
    """The compute buffers of the graph `build` makes (with flash attention or not, V transposed or not; it
    returns the graph and each flash-attention node with its layer's device), scheduled and allocated, remembered
    per builder, profile and arguments. `ffn_moved`: the FFN weights tensor overrides put away from their layer
    ((layer, name, device): placement.tensors.compute_sites), each product run there; None: `ffn_devices` only."""
    key = (build, id(profile), config, tuple(layer_devices), tuple(names), T, n_seqs, T_out, n_copies, pin_norm,
           tuple(ffn_devices) if ffn_devices else None, ffn_moved)
    hit = _CACHE.get(key)
    if hit is not None and hit[0]() is profile:
        return dict(hit[1])

    def make(devs: list[str], ffn: list[str] | None, cfg: SplitConfig, fa: bool, fused_gdn: bool,
             unfused: frozenset[str], ns: int, moved: tuple | None) -> tuple[Graph, dict, list]:
        c = _Ctx(profile, cfg, devs, T, ns, T_out, pin_norm, ffn, moved)
        c.fused_gdn, c.unfused = fused_gdn, unfused
        # the KV cache transposes V when flash attention is off when it is made (llama_model::create_memory)
        g, fa_nodes = build(c, fa, cfg.flash_attn == "off")
        return g, {"fa": fa_nodes, "gdn": c.gdn_nodes, **{"fused " + k: v for k, v in c.fused_nodes.items()}}, []

    # the graph is built once per profile and settings, and scheduled for each placement (ggml_replay.template);
    # FFN weights moved by -ot (fit's overflow layers: another set on nearly every dry run) make a graph of their
    # own, not kept
    tkey = (build, T, T_out, pin_norm)
    fa = config.flash_attn != "off"
    keep = not ffn_moved
    run = template(make, profile, tkey, config, layer_devices, ffn_devices, fa, True, frozenset(), n_seqs,
                   ffn_moved, keep=keep).place(layer_devices, ffn_devices)
    # llama_context::resolve_fused_ops: flash attention ('auto'), the fused delta net or another fused op scheduled
    # away from its layer's device is turned off, and the reserve graph built again without it
    # (a quantized V cache turns 'auto' into 'on' before that: llama_init_from_model)
    fa_auto = config.flash_attn == "auto" and config.type_v in _QUANT_FREE
    moved = run.moved_checks()
    fa_off = fa_auto and "fa" in moved
    gdn_off = "gdn" in moved
    unfused = frozenset(k.split(" ", 1)[1] for k in moved if k.startswith("fused "))
    if fa_off or gdn_off or unfused:
        run = template(make, profile, tkey, config, layer_devices, ffn_devices, fa and not fa_off, not gdn_off,
                       unfused, n_seqs, ffn_moved, keep=keep).place(layer_devices, ffn_devices)
    tops = run.peaks(n_copies)
    out = {name: tops.get(name, 0) for name in names}
    if profile.arch in _RESERVE_ONE_SEQ and n_seqs > 1:
        # llama_context::sched_reserve reserves these graphs last with the ubatch as one sequence (the diagonal
        # decay grows with the tokens per sequence squared: [TAG_RESERVE_DIAG_DECAY]); a buffer only grows
        one = template(make, profile, tkey, config, layer_devices, ffn_devices, fa and not fa_off, True, frozenset(),
                       1, None).place(layer_devices, ffn_devices).peaks(n_copies)
        out = {name: max(out[name], one.get(name, 0)) for name in names}
    if len(_CACHE) > 256:
        _CACHE.clear()
    _CACHE[key] = (weakref.ref(profile), out)
    return dict(out)


@per_profile
def replayable(profile: ModelProfile) -> bool:
    """Whether `profile`'s compute buffers are replayed here: a graph of RECURRENT_GRAPHS whose hyperparameters
    the file carries, without a sliding window (lfm2's iswa graph is not built), and with the tensors the
    graph built here reads where the profile lists them: qwen3next's fused QKV and gate projections (a file
    with the mixed ssm_in projection runs another graph), the Mamba-2 layers' grouped norm (ssm_norm,
    optional), and no MoE layer (a router, ffn_gate_inp) but in the graphs whose MoE is built (_MOE_BUILT)."""
    arch = profile.arch
    if arch not in RECURRENT_GRAPHS or profile.n_swa or not all(f"{arch}.{k}" in profile.metadata
                                                               for k in _KEYS[arch]):
        return False
    if not any(layer.is_recurrent for layer in profile.layers):
        # not the model's graph (the MTP head of placement.mtp: graph_mtp is not built here), except nemotron_h's
        # graph, which builds what each layer is, recurrent or not (a file of FFN layers only)
        if arch not in _NEMOTRON_H or any(".nextn." in t.name for layer in profile.layers for t in layer.tensors):
            return False
    if arch == "minimax-01" and any(layer.has_kv for layer in profile.layers):
        return False           # its softmax attention layers are not built here
    if arch not in _MOE_BUILT and any(t.name.endswith(".ffn_gate_inp.weight")
                                      for layer in profile.layers for t in layer.tensors):
        return False           # the MoE branch of jamba's, granitehybrid's, nemotron_h's graph is not built here
    names = {t.name.split(".", 2)[-1] for layer in profile.layers if layer.is_recurrent for t in layer.tensors}
    if not any(layer.tensors for layer in profile.layers):
        # a profile without its tensor list (built in code): the graph as written here, where it reads no
        # tensor's shape
        return arch in ("mamba", "mamba2", "lfm2", "qwen3next")
    return {**dict.fromkeys(_QWEN3NEXT, "attn_qkv.weight" in names and "ssm_in.weight" not in names),
            "mamba2": "ssm_norm.weight" in names, "falcon-h1": "ssm_norm.weight" in names,
            "granitehybrid": "ssm_norm.weight" in names, "nemotron_h": "ssm_norm.weight" in names}.get(arch, True)
