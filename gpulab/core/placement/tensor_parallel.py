"""Split mode `tensor` (-sm tensor): every offloaded tensor cut across the devices, or copied to each.

llama.cpp (the vendored version) implements tensor parallelism with a *meta device*:
- `llama_prepare_model_devices` (src/llama.cpp) wraps the model's devices (with --device: those;
  otherwise every device whose buffer type is not the CPU's) into one `ggml_backend_meta_device`
  (named `Meta()` in this version: see meta_device_name). Layers are then assigned as in a
  layer split over that one device: -ngl chooses between the meta device and the CPU, and the
  input layer stays on the CPU.
- `llama_meta_device_get_split_state` (src/llama-model.cpp) decides per tensor: split along an
  axis (attn_q/k/v and ffn_up/gate, experts included, along their output rows = ne[1];
  attn_output and ffn_down along their input = ne[0], their partial sums all-reduced; the K/V
  caches along ne[0] in whole heads; output.weight along the vocabulary), or mirrored (norms,
  routers, shared experts, biases of the reduced products, a tied output's token_embd copy).
  The split of one segment of ne elements, for proportions scanned cumulatively from -ts rotated
  by the layer (`get_il_eff(il) % n_devices`; `n_layer % n_devices` outside the layers), is
  `high = ne * scan[j] / scan[-1]` in float32 (`ne * (j+1) / n` when -ts is absent or all
  zero: equal shares, not shares by free memory), rounded down to the granularity
  (`get_split_granularity`: whole heads for attention, lcm(block size, 128) for the FFN); the
  last device takes the rest.
- `ggml_backend_meta_alloc_ctx_tensors_from_buft` (ggml/src/ggml-backend-meta.cpp) then allocates
  each device's slices in one buffer of that device; the meta buffer's size, the figure llama.cpp
  logs as `Meta() model buffer size`, is the largest of them. Compute buffers are allocated
  at the meta buffer's size on every device (`ggml_backend_meta_buffer_type_alloc_buffer`).

Refusals, each with llama.cpp's words: an architecture `llm_arch_supports_sm_tensor` excludes
(llama_model_create; check_tensor_parallel), flash attention off (llama_init_from_model;
SplitConfig), no device (llama_prepare_model_devices). llama-server's --fit does not refuse: its
common_params_fit_impl throws "llama_params_fit is not implemented for SPLIT_MODE_TENSOR, abort",
common_fit_params turns that into a warning and the load goes on unfitted (gpulab's exports write
`-fit off` anyway). docs/multi-gpu.md also names a refusal of quantized KV caches; this version
has no such check and loads them (tested), so gpulab does not refuse them.

Not modelled (ConfigError): recurrent or hybrid layers, DeepSeek-V4's and Qwen3-Next's own
split rules, tensor overrides to a device other than the CPU.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..config import SplitConfig
from ..devices import HOST_NAME, Device
from ..errors import ConfigError
from ..float32 import cumsum_f32, f32
from ..ggml_types import block_size, row_bytes
from ..profile import LayerProfile, ModelProfile, TensorInfo

__all__ = ["TensorParallel", "meta_device_name", "check_tensor_parallel", "split_tensor", "plan_tensor_parallel",
           "layer_cuts", "SM_TENSOR_EXCLUDED_ARCHS"]

# llm_arch_supports_sm_tensor (src/llama-arch.cpp): the architectures it returns false for
SM_TENSOR_EXCLUDED_ARCHS = frozenset({
    "grok", "mpt", "plamo2", "minicpm3", "gemma3n", "mamba", "mamba2", "jamba", "falcon-h1", "olmo2",
    "olmoe", "deepseek2", "deepseek32", "hy_v4", "dots3note", "glm-dsa", "bitnet", "t5", "nemotron_h",
    "nemotron_h_moe", "granitehybrid", "minimax-01", "minimax-m2", "minimax-m3", "mistral4", "kimi-linear",
    "bailingmoe3", "kimi-k3", "glm5-next", "qwen3tts", "qwen4exp"})
# archs whose split rules gpulab does not mirror (own segments/granularities in get_split_segments)
_NOT_MODELLED_ARCHS = frozenset({"qwen3next", "qwen35", "qwen35moe", "deepseek4", "dflash"})

MIRRORED = -1          # GGML_BACKEND_SPLIT_AXIS_MIRRORED
PARTIAL = -2           # GGML_BACKEND_SPLIT_AXIS_PARTIAL: a full-size copy per device, summed later


def meta_device_name(devices: list[Device]) -> str:
    """The name llama.cpp gives the meta device, and logs its layers and buffers under: 'Meta()'.

    ggml_backend_meta_device_context's constructor means 'Meta(' + the devices' names + ')', but
    its body iterates the constructor parameter it has just moved into the member (the parameter
    shadows the member), so in this version every meta device is named 'Meta()'. gpulab names it as
    llama.cpp does, so plans and llama.cpp's log compare layer by layer; the members are
    TensorParallel.devices."""
    del devices
    return "Meta()"


def check_tensor_parallel(profile: ModelProfile, config: SplitConfig, devices: list[Device]) -> None:
    """The refusals llama.cpp makes for -sm tensor, before anything loads, with its words."""
    if profile.arch in SM_TENSOR_EXCLUDED_ARCHS:
        raise ConfigError(f"LLAMA_SPLIT_MODE_TENSOR not implemented for architecture '{profile.arch}' "
                          "(llama.cpp, llm_arch_supports_sm_tensor); use -sm layer")
    # flash attention off is refused by SplitConfig itself (llama_init_from_model's check)
    if not devices and config.n_gpu_layers != 0:
        raise ConfigError("LLAMA_SPLIT_MODE_TENSOR needs >= 1 devices (llama.cpp, llama_prepare_model_devices)")
    if profile.arch in _NOT_MODELLED_ARCHS:
        raise ConfigError(f"-sm tensor for '{profile.arch}' follows split rules gpulab does not model yet; "
                          "plan with -sm layer")
    if any(not layer.has_kv or layer.n_head_kv == 0 for layer in profile.layers):
        raise ConfigError("-sm tensor with recurrent or KV-sharing layers is not modelled by gpulab yet; "
                          "plan with -sm layer")


# -- llama_meta_device_get_split_state, for one tensor --------------------------------------------
def _rx(p: str) -> re.Pattern:
    return re.compile(p)


# the patterns of llama_meta_device_get_split_state, std::regex_match = fullmatch
_Q_W = _rx(r"blk\.\d*\.attn_q.weight")
_KV_W = _rx(r"blk\.\d*\.attn_(k|v).weight")
_QKV_W = _rx(r"blk\.\d*\.attn_qkv.weight")
_Q_B = _rx(r"blk\.\d*\.attn_q\.bias")
_KV_B = _rx(r"blk\.\d*\.attn_(k|v)\.bias")
_QKV_B = _rx(r"blk\.\d*\.attn_qkv.bias")
_QK_NORM = _rx(r"blk\.\d*\.attn_(q|k)_norm\.weight")
_KV_CACHE = _rx(r"cache_(k|v)_l\d*")
_SINKS = _rx(r"blk\.\d*\.attn_sinks.weight")
_OUT_W = _rx(r"blk\.\d*\.attn_output.weight")
_OUT_B = _rx(r"blk\.\d*\.attn_output.bias")
_GATE_ATTN = _rx(r"blk\.\d*\.attn_gate.weight")
_SSM = _rx(r"blk\.\d*\.ssm_.*")
_UP_W = _rx(r"blk\.\d*\.ffn_up(_exps)?.weight")
_UP_B = _rx(r"blk\.\d*\.ffn_up(_exps)?.bias")
_GATE_W = _rx(r"blk\.\d*\.ffn_gate(_exps)?.weight")
_GATE_B = _rx(r"blk\.\d*\.ffn_gate(_exps)?.bias")
_GATE_UP_W = _rx(r"blk\.\d*\.ffn_gate_up(_exps)?.weight")
_DOWN_W = _rx(r"blk\.\d*\.ffn_down(_exps)?.weight")
_DOWN_B = _rx(r"blk\.\d*\.ffn_down.bias")
_DOWN_EXPS_B = _rx(r"blk\.\d*\.ffn_down_exps.bias")
_OUTPUT_W = _rx(r"output\.weight")
_OUTPUT_B = _rx(r"output\.bias")


def _m(p: re.Pattern, name: str) -> bool:
    return p.fullmatch(name) is not None


@dataclass(frozen=True)
class _Ctx:
    """What get_split_state reads of the model: hparams per layer, every tensor by name."""
    profile: ModelProfile
    n_devices: int
    tensor_split: tuple[float, ...]          # -ts, n_devices entries (0 where not given)
    by_name: dict
    il_eff: tuple[int, ...]                  # get_il_eff(il) for every layer


def _context(profile: ModelProfile, n_devices: int, config: SplitConfig) -> _Ctx:
    ts = tuple(config.tensor_split[:n_devices]) + (0.0,) * max(0, n_devices - len(config.tensor_split))
    by_name = {t.name: t for t in (*profile.input_tensors, *profile.output_tensors,
                                   *(t for layer in profile.layers for t in layer.tensors))}
    il_eff: list[int] = []
    seen: dict[bool, int] = {}
    for layer in profile.layers:          # count only previous layers of the same kind (SWA or not)
        il_eff.append(seen.get(layer.is_swa, 0))
        seen[layer.is_swa] = seen.get(layer.is_swa, 0) + 1
    return _Ctx(profile, n_devices, ts, by_name, tuple(il_eff))


def _config(ctx: _Ctx, name: str) -> tuple[int, str | None, int, int]:
    """get_tensor_config: (axis, the tensor whose type sets the block size, il, rotation)."""
    if name.startswith("blk."):
        il = int(name[4:name.index(".", 4)])
        prefix, rotation = f"blk.{il}.", ctx.il_eff[il] % ctx.n_devices
    elif name.startswith("cache_"):
        il = int(name[name.index("_l", 6) + 2:])
        prefix, rotation = f"blk.{il}.", ctx.il_eff[il] % ctx.n_devices
    else:
        il, prefix, rotation = 0, "", ctx.profile.n_layer % ctx.n_devices

    def cfg(axis: int, suffix: str = "", fallback: str = "") -> tuple[int, str | None, int, int]:
        if not suffix:
            return axis, name, il, rotation
        ref = prefix + suffix
        if ref not in ctx.by_name and fallback:
            ref = prefix + fallback
        if ref not in ctx.by_name:
            raise ConfigError(f"-sm tensor: llama.cpp splits {name} like {prefix + suffix}, which this model "
                              "does not have (llama.cpp would assert); not modelled")
        return axis, ref, il, rotation

    if ctx.profile.arch == "hrm_text":
        return MIRRORED, name, 0, 0
    if _m(_Q_W, name) or _m(_KV_W, name) or _m(_QKV_W, name):
        return cfg(1, "attn_output.weight", "ssm_out.weight")
    if _m(_Q_B, name) or _m(_KV_B, name) or _m(_QKV_B, name):
        return cfg(0, "attn_output.weight", "ssm_out.weight")
    if _m(_QK_NORM, name):
        t = ctx.by_name.get(name)
        ne1 = t.shape[1] if t is not None and len(t.shape) > 1 else 1
        return cfg(MIRRORED if ne1 == 1 else 1, "attn_output.weight")
    if _m(_KV_CACHE, name) or _m(_SINKS, name):
        return cfg(0, "attn_output.weight")
    if _m(_OUT_W, name):
        return cfg(0)
    if _m(_OUT_B, name):
        return cfg(MIRRORED)
    if _m(_GATE_ATTN, name):
        return cfg(1, "attn_output.weight", "ssm_out.weight")
    if _m(_SSM, name):
        raise ConfigError(f"-sm tensor: the split of SSM tensors ({name}) is not modelled by gpulab yet")
    if _m(_UP_W, name) or _m(_GATE_W, name) or _m(_GATE_UP_W, name):
        return cfg(1, "ffn_down.weight", "ffn_down_exps.weight")
    if _m(_UP_B, name) or _m(_GATE_B, name):
        return cfg(0, "ffn_down.weight", "ffn_down_exps.weight")
    if _m(_DOWN_W, name):
        return cfg(0, "ffn_down.weight", "ffn_down_exps.weight")
    if _m(_DOWN_B, name):
        return cfg(MIRRORED)
    if _m(_DOWN_EXPS_B, name):
        return cfg(PARTIAL, "ffn_down_exps.weight")
    if _m(_OUTPUT_W, name):
        return cfg(1)
    if _m(_OUTPUT_B, name):
        return cfg(0)
    return cfg(MIRRORED)


def _segments(ctx: _Ctx, name: str, ne_axis: int, layer: LayerProfile) -> list[tuple[int, int]]:
    """get_split_segments (all archs but the Qwen3-Next family): [(elements, repeats)]."""
    if _m(_QKV_W, name) or _m(_QKV_B, name):
        n_q = layer.n_head * layer.n_embd_head_k
        n_k, n_v = layer.n_embd_k_gqa, layer.n_embd_v_gqa
        if ne_axis != n_q + n_k + n_v:
            raise ConfigError(f"-sm tensor: {name} is not Q+K+V wide; not modelled")
        return [(n_q, 1), (n_k, 2)] if n_k == n_v else [(n_q, 1), (n_k, 1), (n_v, 1)]
    if _m(_UP_W, name) or _m(_UP_B, name):
        n_ff = ctx.profile.n_ff
        return [(n_ff, 2)] if ne_axis == 2 * n_ff else [(ne_axis, 1)]   # Phi-3's fused up+gate
    if _m(_GATE_UP_W, name):
        return [(ne_axis // 2, 2)]
    return [(ne_axis, 1)]


def _granularity(ctx: _Ctx, name: str, blck: int, layer: LayerProfile, n_segments: int) -> list[int]:
    """get_split_granularity, regular attention layers."""
    n_gqa = layer.n_head // layer.n_head_kv
    n_embd_q = n_gqa * layer.n_embd_head_k
    perf = blck                 # head sizes like 80: grow only while no device would idle
    while perf < 128 and perf * ctx.n_devices < n_embd_q:
        perf *= 2
    g_q = math.lcm(n_embd_q, perf)
    g_head = g_q // layer.n_embd_head_k
    if _m(_SINKS, name):
        return [g_head]
    if _m(_Q_W, name) or _m(_Q_B, name):
        return [g_q]
    if _m(_OUT_W, name):
        return [g_head * layer.n_embd_head_v]
    if _m(_GATE_ATTN, name):
        t = ctx.by_name.get(name)
        return [g_head if t is not None and len(t.shape) > 1 and t.shape[1] == layer.n_head else g_q]
    g_kv = g_q // n_gqa
    g_v = (g_kv // layer.n_embd_head_k) * layer.n_embd_head_v
    if _m(_KV_W, name) or _m(_KV_B, name) or _m(_KV_CACHE, name):
        return [g_v if ("attn_v" in name or "cache_v" in name) else g_kv]
    if _m(_QKV_W, name) or _m(_QKV_B, name):
        return [g_q, g_kv, g_v] if n_segments == 3 else [g_q, g_kv]
    if any(_m(p, name) for p in (_UP_W, _UP_B, _GATE_W, _GATE_B, _GATE_UP_W, _DOWN_W)):
        return [math.lcm(blck, 128)]
    return [1] * n_segments


def split_tensor(ctx: _Ctx, name: str, shape: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
    """(axis or MIRRORED/PARTIAL, elements along the axis on each device): the split state
    llama_meta_device_get_split_state gives a tensor of this name and shape."""
    axis, ref, il, rotation = _config(ctx, name)
    n = ctx.n_devices
    if axis < 0:
        return axis, ()
    ref_t = ctx.by_name[ref] if ref in ctx.by_name else None
    blck = block_size(ref_t.ggml_type) if ref_t is not None else 1
    layer = ctx.profile.layers[il]
    ne_axis = shape[axis] if axis < len(shape) else 1
    segments = _segments(ctx, name, ne_axis, layer)
    gran = _granularity(ctx, name, blck, layer, len(segments))
    # tensor_split_scan: float, -ts rotated by `rotation`, summed in order
    scan = cumsum_f32(ctx.tensor_split[(j + rotation) % n] for j in range(n))
    per_dev = [0] * n
    for (ne_s, nr_s), g_s in zip(segments, gran):
        low = 0
        for j in range(n - 1):
            if scan[-1] == 0:
                high = ne_s * (j + 1) // n
            else:   # int64 * float / float: float32 arithmetic, truncated back to int64
                high = int(f32(f32(f32(ne_s) * scan[j]) / scan[-1]))
            high -= high % g_s
            per_dev[(j + rotation) % n] += (high - low) * nr_s
            low = high
        per_dev[(n - 1 + rotation) % n] += (ne_s - low) * nr_s
    return axis, tuple(per_dev)


def layer_cuts(profile: ModelProfile, config: SplitConfig, n_devices: int, il: int) -> list[tuple[str, str, tuple]]:
    """How -sm tensor treats each tensor of layer il and its K/V cache, for people:
    [(name, 'cut along ne[1] (output rows)' | 'cut along ne[0] (input)' | 'whole copy on each device',
    elements along the cut on each device)]."""
    ctx = _context(profile, n_devices, config)
    layer = profile.layers[il]
    shapes = [(t.name, t.shape) for t in layer.tensors]
    if layer.has_kv:
        shapes += [(f"cache_k_l{il}", (layer.n_embd_k_gqa, 1)), (f"cache_v_l{il}", (layer.n_embd_v_gqa, 1))]
    out = []
    for name, shape in shapes:
        axis, per_dev = split_tensor(ctx, name, shape)
        how = {0: "cut along ne[0] (input)", 1: "cut along ne[1] (output rows)"}.get(axis, "whole copy on each device")
        out.append((name, how, per_dev))
    return out


def _slice_bytes(t: TensorInfo, axis: int, per_dev: tuple[int, ...], n: int) -> list[int]:
    if axis < 0:
        return [t.n_bytes] * n
    ne = t.shape[axis]
    return [t.n_bytes * k // ne for k in per_dev]


@dataclass(frozen=True)
class TensorParallel:
    """What each device of the meta device holds under -sm tensor."""
    meta_name: str                              # 'Meta()', as llama.cpp logs it (meta_device_name)
    devices: tuple[str, ...]                    # the meta device's members, in order
    weights: tuple[int, ...]                    # bytes of weight slices and mirrors, per device
    mirrored: tuple[int, ...]                   # of which: whole copies (norms, routers, ...)
    experts: tuple[int, ...]                    # of which: MoE expert slices
    kv: tuple[int, ...]                         # KV cache bytes per device
    kv_heads: tuple[tuple[int, ...], ...]       # per layer with KV: K heads on each device
    layer_weights: tuple[tuple[int, ...], ...]  # per layer 0..n_layer (output last): bytes per device
    layer_kv: tuple[tuple[int, ...], ...]       # per layer 0..n_layer: KV bytes per device

    def share(self, name: str) -> float:
        """The device's share of the split weights and KV (for the layer map and speed)."""
        i = self.devices.index(name)
        total = sum(self.weights) + sum(self.kv)
        return (self.weights[i] + self.kv[i]) / total if total else 0.0


def plan_tensor_parallel(profile: ModelProfile, config: SplitConfig, devices: list[Device], layer_devices: list[str],
                      moved: dict, kv_cells: tuple[int, int]) -> TensorParallel:
    """Each device's slices of every tensor on the meta device (the layers `layer_devices` puts
    there), and of each such layer's K/V cache (unless -nkvo)."""
    meta = meta_device_name(devices)
    n = len(devices)
    ctx = _context(profile, n, config)
    weights, mirrored, experts, kv = [0] * n, [0] * n, [0] * n, [0] * n
    layer_w = [[0] * n for _ in range(profile.n_layer + 1)]
    layer_kv = [[0] * n for _ in range(profile.n_layer + 1)]
    kv_heads = []

    def put(t: TensorInfo, il: int, name: str | None = None) -> None:
        if moved.get(t.name, meta) != meta:     # a -ot rule sent it to the CPU
            return
        axis, per_dev = split_tensor(ctx, name or t.name, t.shape)
        for j, b in enumerate(_slice_bytes(t, axis, per_dev, n)):
            weights[j] += b
            layer_w[il][j] += b
            if axis < 0:
                mirrored[j] += b
            if t.is_expert:
                experts[j] += b

    for layer in profile.layers:
        if layer_devices[layer.index] != meta:
            continue
        for t in layer.tensors:
            put(t, layer.index)
        if config.offload_kqv:
            cells = kv_cells[1] if layer.is_swa else kv_cells[0]
            _, k_dev = split_tensor(ctx, f"cache_k_l{layer.index}", (layer.n_embd_k_gqa, cells))
            _, v_dev = split_tensor(ctx, f"cache_v_l{layer.index}", (layer.n_embd_v_gqa, cells))
            kv_heads.append(tuple(k // layer.n_embd_head_k for k in k_dev))
            for j in range(n):
                b = cells * (row_bytes(config.type_k, k_dev[j]) + row_bytes(config.type_v, v_dev[j]))
                kv[j] += b
                layer_kv[layer.index][j] += b
    if layer_devices[profile.n_layer] == meta:
        for t in profile.output_tensors:
            put(t, profile.n_layer)
        emb = profile.token_embd
        if profile.tied_output and emb is not None and emb.name not in moved:
            # TENSOR_DUPLICATED: the output matrix is token_embd under its own name, which no split
            # pattern matches: every device holds a whole copy
            put(emb, profile.n_layer)
    return TensorParallel(meta_name=meta, devices=tuple(d.name for d in devices), weights=tuple(weights),
                       mirrored=tuple(mirrored), experts=tuple(experts), kv=tuple(kv), kv_heads=tuple(kv_heads),
                       layer_weights=tuple(map(tuple, layer_w)), layer_kv=tuple(map(tuple, layer_kv)))


def check_overrides_for_tensor_parallel(targets: dict[int, str]) -> None:
    """Tensor overrides under -sm tensor: only the CPU is modelled (the meta device's members are
    not model devices of their own, and a whole tensor on one of them is not mirrored here)."""
    bad = sorted({t for t in targets.values() if t != HOST_NAME})
    if bad:
        raise ConfigError(f"-sm tensor with tensor overrides to {', '.join(bad)} is not modelled by gpulab; "
                          "only overrides to CPU are")
