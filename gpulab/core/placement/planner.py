"""The planner: llama.cpp's placement rules, mirrored in pure Python.

Every rule names the llama.cpp function it copies (llama.cpp as vendored by the pinned
llama-cpp-python, see pyproject.toml). Arithmetic on split points is done in float32, as
llama.cpp does, so that layers on a split boundary land where llama.cpp puts them.
"""

from __future__ import annotations

import dataclasses
import weakref
from bisect import bisect_right

from ..config import SplitConfig
from ..devices import HOST_NAME, Device
from ..errors import ConfigError
from ..float32 import cumsum_f32, f32
from ..ggml_types import row_bytes
from ..memory import DevicePlan
from ..overrides import effective_rules
from ..profile import ModelProfile
from .compute import estimate_compute_bytes, pipeline_copies, replay_for
from .coverage import doubts
from .plan import Plan
from .tensors import place_layers

__all__ = ["plan", "select_devices", "kv_cells", "kv_cell_bytes", "kv_layer_bytes", "split_points", "assign_layers",
           "split_for_counts", "state_cells", "state_bytes_per_layer"]

_PAD = 256  # llama_context: cparams.n_ctx = GGML_PAD(n_ctx, 256)


def _pad(x: int, n: int) -> int:
    return (x + n - 1) // n * n


def select_devices(devices: list[Device], config: SplitConfig) -> list[Device]:
    """llama_prepare_model_devices (src/llama.cpp): the devices a model may use, in order.

    Without --device: RPC servers first ("to minimize network transfers"), then GPUs.
    With --device: exactly those, in the order given. split_mode none keeps devices[main_gpu].
    """
    if config.devices == ("none",):
        chosen: list[Device] = []   # common/arg.cpp parse_device_list: 'none' is no offload device
    elif config.devices:
        by_name = {d.name: d for d in devices}
        missing = [n for n in config.devices if n not in by_name]
        if missing:
            raise ConfigError(f"unknown device(s) {', '.join(missing)}; available: "
                              f"{', '.join(by_name) or 'none'}")
        chosen = [by_name[n] for n in config.devices]
    else:
        gpus = [d for d in devices if d.kind == "gpu"]
        # integrated GPUs only where there is no discrete one; CPU, ACCEL and META never hold layers
        chosen = [d for d in devices if d.kind == "rpc"] + (gpus or [d for d in devices if d.kind == "igpu"])
    config.check_devices(len(chosen))
    if config.split_mode == "row" and chosen:
        _check_row_split(chosen)
    if config.split_mode == "none" and chosen:
        chosen = [chosen[config.main_gpu]]
    return chosen


# Backends whose registry exports "ggml_backend_split_buffer_type" in the vendored llama.cpp:
# SYCL and Hexagon. CUDA no longer does (tensor parallelism moved to split mode "tensor").
_ROW_SPLIT_BACKENDS = ("SYCL", "HTP")


def _check_row_split(devices: list[Device]) -> None:
    """make_gpu_buft_list (src/llama-model.cpp) throws for every device whose backend has no
    split buffer type, whatever n_gpu_layers is; gpulab refuses the same configurations."""
    refused = [d.name for d in devices if not d.name.startswith(_ROW_SPLIT_BACKENDS)]
    if refused:
        raise ConfigError(
            f"split_mode row is refused by this llama.cpp on {', '.join(refused)} "
            f"(\"device {refused[0]} does not support split buffers\"): only SYCL devices split rows; use -sm layer")
    raise ConfigError("split_mode row on SYCL devices is not modelled by gpulab yet; plan with -sm layer")


def split_points(devices: list[Device], config: SplitConfig) -> list[float]:
    """llama_model_base::load_tensors: cumulative split points normalised to 1, in float32.

    All-zero tensor_split: proportions are each device's free memory at load time.
    """
    n = len(devices)
    ts = list(config.tensor_split[:n]) + [0.0] * (n - len(config.tensor_split[:n]))
    raw = [d.free_bytes for d in devices] if not any(ts) else ts
    cum = cumsum_f32(raw)  # float split_sum += splits[i], sequentially
    if n == 0 or cum[-1] == 0:
        if n:
            raise ConfigError("every device has 0 bytes free, so llama.cpp's default split is undefined; "
                              "give -ts explicitly")
        return []
    return [f32(x / cum[-1]) for x in cum]


def assign_layers(n_layer: int, n_gpu_layers: int, devices: list[Device],
                  points: list[float]) -> list[str]:
    """Device name of each layer 0..n_layer (the last is the output layer).

    llama_model_base::load_tensors: i_gpu_start = max(n_layer + 1 - ngl, 0); layer il goes to
    upper_bound(splits, float(il - i_gpu_start) / act_gpu_layers); below i_gpu_start: CPU.
    """
    ngl = n_gpu_layers if n_gpu_layers >= 0 else n_layer + 1   # llama_model::n_gpu_layers
    i_gpu_start = max(n_layer + 1 - ngl, 0)
    act = min(ngl, n_layer + 1) if devices else 0
    if act == 0:
        return [HOST_NAME] * (n_layer + 1)
    # fit's dry runs ask for the same split again and again (only its -ot rules change)
    key = (n_layer, i_gpu_start, act, tuple(d.name for d in devices), tuple(points))
    got = _ASSIGNED.get(key)
    if got is None:
        names = [HOST_NAME] * (n_layer + 1)
        # float(il - i_gpu_start) / act_gpu_layers, in float32 like llama.cpp
        pts = [f32(x) for x in points]
        last = len(devices) - 1
        for k in range(act):
            i = bisect_right(pts, f32(k / act))   # std::upper_bound
            names[i_gpu_start + k] = devices[min(i, last)].name
        if len(_ASSIGNED) > 256:
            _ASSIGNED.clear()
        got = _ASSIGNED[key] = tuple(names)
    return list(got)


_ASSIGNED: dict[tuple, tuple[str, ...]] = {}


def split_for_counts(counts: list[int] | tuple[int, ...]) -> tuple[float, ...]:
    """The -ts that puts exactly counts[i] offloaded layers on device i (counts sum to the layers
    offloaded, the output layer included).

    The counts themselves: split point i is then float32(c_i) / float32(total) with c_i the running
    sum, and assign_layers' fraction of layer c_i is float32(c_i) / float32(total), the same two
    float32 operands, so upper_bound sends layer c_i - 1 to device i and layer c_i past it. A device
    with 0 layers repeats the previous point and upper_bound skips it. Trailing zeros are dropped
    (llama.cpp pads -ts with zeros); an all-zero list is () (the free-memory default)."""
    ts = [float(c) for c in counts]
    if any(c < 0 for c in ts):
        raise ConfigError(f"layer counts must not be negative: {list(counts)}")
    while ts and ts[-1] == 0.0:
        ts.pop()
    return tuple(ts)


def kv_cells(profile: ModelProfile, config: SplitConfig) -> tuple[int, int]:
    """(cells per full-attention layer, cells per SWA layer), summed over streams.

    llama_context ctor: n_ctx padded to 256, n_ctx_seq = pad(n_ctx / n_seq_max, 256) per stream, or
    n_ctx in one stream with a unified cache (-kvu);
    llama_kv_cache_iswa: size_swa = pad(min(size_base, n_swa (x n_seq_max when unified) + n_ubatch), 256)
    unless --swa-full.
    """
    n_ctx = _pad(config.n_ctx, _PAD)
    n_ctx_seq = n_ctx if config.kv_unified else _pad(n_ctx // config.n_seq_max, _PAD)
    n_stream = config.n_streams
    base = n_ctx_seq
    swa = base
    if profile.n_swa and not config.swa_full:
        # a unified cache keeps n_swa cells for each sequence (llama_kv_cache_iswa ctor)
        n_swa = profile.n_swa * (config.n_seq_max if config.kv_unified else 1)
        swa = _pad(min(base, n_swa + config.effective_n_ubatch), _PAD)
    return base * n_stream, swa * n_stream


def kv_layer_bytes(profile: ModelProfile, config: SplitConfig) -> tuple[int, ...]:
    """Bytes of each layer's KV cache: its cells (the window's on a sliding-window layer) times its cell's bytes;
    an indexer's key cache holds every cell, whatever the layer (llama_kv_cache_dsa_iswa builds its
    llama_kv_cache_dsa, and so its indexer cache, without a window: src/llama-kv-cache-dsa-iswa.cpp)."""
    full_cells, swa_cells = kv_cells(profile, config)
    per_cell = kv_cell_bytes(profile, config)
    idx = kv_cell_bytes(profile, config, indexer=True)
    return tuple((swa_cells if layer.is_swa else full_cells) * (per_cell[layer.index] - idx[layer.index])
                 + full_cells * idx[layer.index] for layer in profile.layers)


def kv_cell_bytes(profile: ModelProfile, config: SplitConfig, indexer: bool = False) -> tuple[int, ...]:
    """Bytes of one KV cell (K row + V row) of each layer; 0 for layers without a KV cache.

    llama_kv_cache ctor: K is n_embd_k_gqa(il) of type_k; V is n_embd_v_gqa(il) of type_v, or,
    when V is transposed (no flash attention), padded to the widest V row (n_embd_v_gqa_max);
    MLA caches K only (has_v = !is_mla): its K row is key_length (kv_lora_rank + the RoPE part).
    An indexer cache (llama_kv_cache_dsa and _msa ctors) is one more llama_kv_cache of the same types and
    cells, with one KV head: K indexer_head_size, V n_embd_head_v where the model has V; llama_memory_hybrid_idx's
    (glm5-next, qwen4exp) is K only ("fool llama_kv_cache into thinking this is a MLA cache"). `indexer`: that
    part only.
    """
    v_trans = not _flash_attn_on(config)
    key = (config.type_k, config.type_v, v_trans, indexer)
    hit = _KV_BYTES.get(id(profile))
    if hit is not None and hit[0]() is profile and key in hit[1]:
        return hit[1][key]
    by_shape: dict[tuple[int, int, int, int], int] = {}
    idx_v = profile.arch not in _IDX_K_ONLY_ARCHS
    out = []
    for layer in profile.layers:
        if not layer.has_kv:
            out.append(0)
            continue
        shape = (0 if indexer else layer.n_embd_k_gqa, 0 if not layer.has_v or indexer else
                 profile.max_n_embd_v_gqa if v_trans else layer.n_embd_v_gqa,
                 layer.n_embd_k_idx, layer.n_embd_head_v if layer.n_embd_k_idx and layer.has_v and idx_v else 0)
        b = by_shape.get(shape)
        if b is None:
            b = by_shape[shape] = sum(row_bytes(t, n) for t, n in zip((config.type_k, config.type_v) * 2, shape))
        out.append(b)
    if hit is None or hit[0]() is not profile:   # cached per profile and KV types: fit re-plans often
        pid = id(profile)
        hit = _KV_BYTES[pid] = (weakref.ref(profile, lambda _r: _KV_BYTES.pop(pid, None)), {})
    cells = hit[1][key] = tuple(out)
    return cells


_KV_BYTES: dict[int, tuple] = {}
# The archs whose indexer cache is llama_memory_hybrid_idx's (src/llama-memory-hybrid-idx.cpp): no V rows
_IDX_K_ONLY_ARCHS = frozenset({"glm5-next", "qwen4exp"})

_STATE_ELT = 4   # create_memory: recurrent_type_r and recurrent_type_s are GGML_TYPE_F32


def state_cells(config: SplitConfig) -> int:
    """create_memory: recurrent_rs_size = max(1, n_seq_max) cells (times 1 + n_rs_seq rows, n_rs_seq 0)."""
    return max(1, config.n_seq_max)


def state_bytes_per_layer(profile: ModelProfile, config: SplitConfig) -> tuple[int, ...]:
    """llama_memory_recurrent ctor: r_l [n_embd_r, cells] and s_l [n_embd_s, cells] f32 per recurrent layer."""
    n = state_cells(config)
    return tuple(_STATE_ELT * (layer.n_embd_r + layer.n_embd_s) * n for layer in profile.layers)


_FLASH_ATTN_FORCED_OFF = frozenset({"grok"})
# Archs whose graph llama.cpp cannot build with flash attention on (or auto): the context aborts
_FLASH_ATTN_ABORTS = frozenset({"plm"})


def _flash_attn_on(config: SplitConfig) -> bool:
    # 'auto' resolves to on wherever the device supports it (CPU, CUDA, RPC all do)
    return config.flash_attn != "off"


def plan(profile: ModelProfile, devices: list[Device], config: SplitConfig | None = None,
         host: Device | None = None, *, n_outputs: int | None = None) -> Plan:
    """Predict llama.cpp's placement and per-device memory for `config` on `devices`.

    `devices` are the offload devices (GPUs, RPC servers, simulated); `host` is the CPU with
    system memory (None: unknown, then the host row has 0 free and is never "over-full").
    """
    config = (config or SplitConfig()).with_ctx(profile.n_ctx_train)   # -c 0: the training context
    if config.type_k != config.type_v and (profile.arch == "deepseek4" or any(
            layer.has_kv and not layer.has_v for layer in profile.layers)):
        # llama_init_from_model (src/llama-context.cpp): MLA, and DeepSeek-V4's K-only caches
        # (llama_kv_cache_dsv4), keep one cache; it refuses the load
        raise ConfigError(f"{profile.arch} keeps K alone (MLA), and llama.cpp refuses different K ({config.type_k}) "
                          f"and V ({config.type_v}) cache types for it; give -ctk and -ctv the same type")
    if profile.arch in _FLASH_ATTN_ABORTS and config.flash_attn != "off":
        # llama_context's reserve (auto tries flash attention first) aborts: plm.cpp gives build_attn a 2-D V,
        # which llama_kv_cache::cpy_v (src/llama-kv-cache.cpp) reads as n_tokens heads of one token when V is
        # not transposed: GGML_ASSERT(a->ne[0] == b->ne[0]) in ggml_set_rows
        raise ConfigError(f"llama.cpp aborts building {profile.arch}'s graph with flash attention "
                          f"(flash_attn={config.flash_attn}); use -fa off")
    if profile.arch in _FLASH_ATTN_FORCED_OFF and config.flash_attn != "off":
        # llama_init_from_model (src/llama-context.cpp): "flash_attn is not compatible with Grok - forcing
        # off"; then a quantized V cache is refused
        if config.type_v not in ("f32", "f16", "bf16"):
            raise ConfigError(f"llama.cpp turns flash attention off for {profile.arch}, and a quantized V cache "
                              f"(type_v={config.type_v}) needs it; use -ctv f16")
        config = dataclasses.replace(config, flash_attn="off")
    used = select_devices(devices, config)
    rules = effective_rules(config)
    tensor_mode = config.split_mode == "tensor" and bool(used)
    if config.split_mode == "tensor":
        # -sm tensor's rules (and their regexes) load only for -sm tensor plans
        from .tensor_parallel import (
            check_overrides_for_tensor_parallel,
            check_tensor_parallel,
        )

        check_tensor_parallel(profile, config, used)
        check_overrides_for_tensor_parallel({i: r.target for i, r in enumerate(rules)})
    # -sm tensor: llama_prepare_model_devices makes the devices one meta device, and layers are
    # assigned to it (or the CPU, by -ngl) as in a layer split over that one device
    layer_used = [_meta_device(used)] if tensor_mode else used
    points = [1.0] if tensor_mode else split_points(used, config)
    layer_devices = assign_layers(profile.n_layer, config.n_gpu_layers, layer_used, points)

    names = [d.name for d in layer_used] + [HOST_NAME]
    kv = dict.fromkeys(names, 0)
    state = dict.fromkeys(names, 0)
    n_layers = dict.fromkeys(names, 0)
    out_dev = layer_devices[profile.n_layer]

    # every tensor's buffer: its layer's device unless a tensor override decides
    # (llama_model_loader::create_tensor), and the host's buffers as llama.cpp allocates them
    # the host's pinned buffer type: the first model device's (make_cpu_buft_list); the meta
    # device has one only where all its members share it (ggml_backend_meta_device_get_host_buffer_type)
    host_buft_from = used if tensor_mode else used[:1]
    # with the sites of each layer's FFN: both depend on the layer split and rules only (cached)
    tp, (ffn_sites, stray, ffn_parts, ffn_moved) = place_layers(
        profile, rules, layer_devices, layer_used, list(devices),
        host_buffer=bool(host_buft_from) and all(d.kind in ("gpu", "igpu") for d in host_buft_from)
        and not config.no_host,
        use_extra_bufts=config.use_extra_bufts,
        repack_types=frozenset(host.repack_types) if host is not None else frozenset())
    weights = {n: tp.weights.get(n, 0) for n in names}

    full_cells, swa_cells = kv_cells(profile, config)
    per_layer_kv = kv_layer_bytes(profile, config)
    per_state = state_bytes_per_layer(profile, config)
    for layer in profile.layers:
        dev = layer_devices[layer.index]
        n_layers[dev] += 1
        # llama_kv_cache ctor: a layer's K/V live on model.dev_layer(il) when offloading, whatever
        # the tensor overrides moved; llama_memory_recurrent ctor: the same for r_l/s_l
        kv_dev = dev if config.offload_kqv else HOST_NAME
        kv[kv_dev] += per_layer_kv[layer.index]
        state[kv_dev] += per_state[layer.index]

    # the graph runs the trunk only (MTP off): nextn layers take part in placement, not in compute
    # (place_layers' FFN sites are the trunk's)
    trunk = profile.trunk
    graph_devices = list(layer_devices[:trunk.n_layer]) + [layer_devices[-1]]
    compute = estimate_compute_bytes(trunk, config, graph_devices, names,
                                     ffn_devices=ffn_sites if tp.moved else None, stray=stray,
                                     ffn_parts=ffn_parts, ffn_moved=ffn_moved, n_outputs=n_outputs)
    experts = {n: tp.expert_weights.get(n, 0) for n in names}
    split = None
    if tensor_mode:
        # each member of the meta device: its slices and mirrors (the meta figures replaced);
        # compute buffers are allocated at the meta buffer's size on every member
        meta = names[0]
        from .tensor_parallel import plan_tensor_parallel

        split = plan_tensor_parallel(profile, config, used, layer_devices, tp.moved, (full_cells, swa_cells))
        names = [d.name for d in used] + [HOST_NAME]
        for i, d in enumerate(used):
            weights[d.name], kv[d.name], experts[d.name] = split.weights[i], split.kv[i], split.experts[i]
            n_layers[d.name], compute[d.name] = n_layers[meta], compute.get(meta, 0)

    by_name = {d.name: d for d in used}
    rows = []
    for name in names:
        is_host = name == HOST_NAME
        src = host if is_host else by_name[name]
        rows.append(DevicePlan(
            name=name,
            total_bytes=src.total_bytes if src else 0,
            free_bytes=src.free_bytes if src else 0,
            weights_bytes=weights[name], kv_bytes=kv[name], compute_bytes=compute.get(name, 0),
            state_bytes=state.get(name, 0),
            # learned from NVML by earlier runs (CUDA context, workspaces): what "fits" must leave
            overhead_bytes=src.overhead_bytes if src is not None and not is_host else 0,
            overhead_is_default=bool(src is not None and not is_host and src.overhead_is_default),
            n_layers=n_layers[name], has_output=out_dev == name or (split is not None and out_dev == split.meta_name
                                                                   and not is_host),
            is_host=is_host, expert_bytes=experts[name],
            mapped_bytes=tp.mapped_bytes if is_host else 0, repack_bytes=tp.repack_bytes if is_host else 0))
    from ..units import format_bytes
    defaults = tuple(f"{r.name}: counts a base cost of {format_bytes(r.overhead_bytes)}, gpulab's default for a CUDA "
                     "device (nothing learned on it yet; a run with NVML replaces it)"
                     for r in rows if r.overhead_is_default)
    return Plan(profile=profile, config=config, devices=tuple(rows), layer_devices=tuple(layer_devices),
                split_points=tuple(points), kv_cells=full_cells, kv_cells_swa=swa_cells,
                moved_tensors=tp.moved, rule_matches=tp.matches, notes=tuple(tp.notes) + defaults,
                tensor_parallel=split,
                doubts=doubts(profile, config, layer_devices, output_shares_layers=(
                    pipeline_copies(config, graph_devices, len(layer_used)) > 1
                    and out_dev in graph_devices[:trunk.n_layer]),
                    replayed=replay_for(trunk, stray, ffn_parts, ffn_moved) is not None))


def _meta_device(used: list[Device]) -> Device:
    """The meta device llama.cpp makes of `used` (ggml_backend_meta_device_get_memory: the sums)."""
    from .tensor_parallel import meta_device_name

    return Device(name=meta_device_name(used), total_bytes=sum(d.total_bytes for d in used),
                  free_bytes=sum(d.free_bytes for d in used), source="meta", kind="meta")
