"""Throughput model: pp and tg tokens/s predicted for a Plan, before anything is loaded.

In layer split a sequence passes through the devices one after another (llama.cpp's scheduler
runs the graph splits in order), so a token costs the SUM of every device's time plus one hop
per boundary between offload devices; spreading a model over more devices never makes one
sequence faster and adds hops. Per device and step:

    tg step: max(bytes / bandwidth, FLOPs / FLOP rate) + overhead + layers x overhead per layer
             one token; bytes = weights of its layers (active experts only) + KV of the context
    pp step: max(bytes / bandwidth, FLOPs / FLOP rate) + overhead + layers x u x cost per layer-token
             one ubatch of u tokens; bytes = weights once; FLOPs = u x per-token FLOPs (the
             output layer only for the one token whose logits llama_batch_get_one asks for)

The overhead is what a device costs per step whatever it reads: launching its graph split,
setting its inputs, synchronising (for an RPC device, round trips); the per-layer part is the
launches and small ops of each layer (CUDA kernels, CPU threads meeting at every op). In pp the
small ops (norms, RoPE, softmax, quantizing activations for the matrix products) grow with the
tokens: a cost per layer and token, which matters on CPUs and hardly on GPUs.
A hop between two offload devices costs a latency plus the activations (n_embd x tokens x 4
bytes, F32) over the link. The way in from the host (token embeddings) and the way back
(logits) exist for one device as for many: their latency is part of a device's overhead, their
bytes go over the link; they are not hops (a partial offload, host layers first, has no more
transfers than a full one). One exception to the sum: a prompt longer than n_ubatch, fully
offloaded to several devices, runs as a pipeline (pipeline_parallel), so its ubatches overlap.

Split mode `tensor` is where splitting does speed one sequence up: every layer is cut across the
members of the meta device (gpulab.core.placement.tensor_parallel), which read their slices side by side, so
a step costs the SLOWEST member's slice (plus the host's part) instead of the sum; in exchange
each layer ends in two all-reduces (after attn_output and after ffn_down, whose partial sums
are added across devices), each a few copy-and-add stages over the link (allreduce_stages) of the
layer's activations. Fast links and memory-bound generation gain; slow links, small models
(latency per all-reduce against microseconds of reading) and prompts (bandwidth of T x n_embd
activations per all-reduce) lose.

Cheap: a pass over the layers and O(devices) arithmetic, recomputed on every slider move.

The same arithmetic, written as a linear function of the unknown device parameters
(`design_row`), is what calibration fits to measured runs (`fit_params`): per device seconds
per byte (1 / effective bandwidth), per FLOP, per step, per layer and step (tg), per layer and
token (pp); for the link the latency of a hop. The measuring and the cache live in gpulab.runtime.calibrate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..devices import HOST_NAME
from ..placement.plan import Plan
from ..placement.planner import kv_cell_bytes

__all__ = ["DeviceSpeed", "LinkSpeed", "SpeedModel", "SpeedPrediction", "predict_speed", "per_device_load",
           "pipeline_parallel", "allreduce_stages", "fit_allreduce_stage",
           "design_row", "fit_params", "speeds_from_params", "SOURCES", "DEFAULT_GPU", "DEFAULT_HOST",
           "prediction_error"]

GB = 1e9

# where a device's numbers come from, most trusted first
SOURCES = ("calibrated", "spec", "nvml", "default")


@dataclass(frozen=True)
class DeviceSpeed:
    bandwidth_bytes_per_s: float       # achievable memory bandwidth when reading weights
    flops_per_s: float                 # achievable matrix FLOP rate (prompt processing)
    overhead_s: float = 0.0            # fixed cost per step (tg token, pp ubatch) of this device's graph split
    source: str = "default"            # one of SOURCES
    layer_overhead_s: float = 0.0      # tg: cost per layer and step beyond its bytes and FLOPs (launches, syncs)
    layer_token_s: float = 0.0         # pp: cost per layer and token of the ops that are not matrix products
    peak_bandwidth_bytes_per_s: float | None = None   # theoretical bound (NVML, spec), for the roofline
    note: str = ""                     # for people: '7 measurements', 'RPC round trip 90 us'


@dataclass(frozen=True)
class LinkSpeed:
    latency_s: float = 20e-6           # per hop and step: copy launch + synchronisation
    bytes_per_s: float = 25 * GB       # PCIe 4.0 x16-ish; RPC over loopback is slower (calibrate)
    source: str = "default"
    # -sm tensor: per all-reduce stage (copies both ways, an ADD graph on each device); None: latency_s.
    # Over RPC a stage is several round trips through the client, far more than one hop's latency
    allreduce_latency_s: float | None = None

    @property
    def allreduce_stage_s(self) -> float:
        return self.latency_s if self.allreduce_latency_s is None else self.allreduce_latency_s


# Defaults when nothing is known: a mid-range GPU, a desktop CPU. Calibration replaces them.
# A GPU: about 10 kernels per layer at ~1.5 us with CUDA graphs; a CPU: threads meeting at each op.
DEFAULT_GPU = DeviceSpeed(bandwidth_bytes_per_s=500 * GB, flops_per_s=50e12, overhead_s=50e-6,
                          layer_overhead_s=15e-6, layer_token_s=0.05e-6)
DEFAULT_HOST = DeviceSpeed(bandwidth_bytes_per_s=20 * GB, flops_per_s=0.2e12, overhead_s=20e-6,
                           layer_overhead_s=20e-6, layer_token_s=5e-6)
ACHIEVABLE = 0.8   # of a theoretical bandwidth (NVML clock x bus width, a spec): what copies reach


def speed_from_bandwidth(peak: float, source: str, overhead_s: float | None = None) -> DeviceSpeed:
    """A GPU known only by its theoretical bandwidth: 80% of it is achievable, and a FLOP rate
    of 80 FLOPs per achievable byte (llama.cpp's quantized matrix kernels reach roughly this on
    current GPUs: pp512 of an 8B Q4_0 model in the ten thousands of tokens/s on an H100)."""
    bw = ACHIEVABLE * peak
    return DeviceSpeed(bw, 80 * bw, DEFAULT_GPU.overhead_s if overhead_s is None else overhead_s, source,
                       layer_overhead_s=DEFAULT_GPU.layer_overhead_s, layer_token_s=DEFAULT_GPU.layer_token_s,
                       peak_bandwidth_bytes_per_s=peak)


@dataclass(frozen=True)
class SpeedModel:
    devices: dict = field(default_factory=dict)   # device name -> DeviceSpeed ('CPU' for the host)
    link: LinkSpeed = LinkSpeed()

    def of(self, name: str, bandwidth_hint: float | None = None) -> DeviceSpeed:
        if name in self.devices:
            return self.devices[name]
        if name == HOST_NAME:
            return DEFAULT_HOST
        if bandwidth_hint:   # from a --sim spec or NVML's clock x bus width: 80% is achievable
            return speed_from_bandwidth(bandwidth_hint, "spec")
        return DEFAULT_GPU

    def sources(self) -> dict:
        return {name: sp.source for name, sp in self.devices.items()}


@dataclass(frozen=True)
class SpeedPrediction:
    tg_tokens_per_s: float
    pp_tokens_per_s: float
    roofline_tg_tokens_per_s: float    # bytes / bandwidth only (theoretical where known): no hops, no overheads
    tg_seconds: dict                   # device -> seconds per generated token
    pp_seconds: dict                   # device -> seconds for the whole prompt
    bytes_per_token: dict              # device -> bytes read per generated token
    n_hops: int
    hop_tg_seconds: float = 0.0        # all hops, per generated token
    hop_pp_seconds: float = 0.0        # all hops, whole prompt
    sources: dict = field(default_factory=dict)   # device -> where its speed comes from
    n_prompt: int = 0
    n_gen: int = 0
    pipelined: bool = False            # pp ran as a pipeline over the devices (pipeline_parallel)
    n_allreduce: int = 0               # -sm tensor: all-reduces per step (2 per layer); their time is in hop_*_seconds

    @property
    def roofline_fraction(self) -> float:
        return self.tg_tokens_per_s / self.roofline_tg_tokens_per_s if self.roofline_tg_tokens_per_s else 0.0


@dataclass
class _Load:
    weights: dict        # bytes read per step (active experts only), incl. the output layer
    kv: dict             # KV bytes read per token at the context in use
    flops: dict          # FLOPs per token of the repeating layers (attention at the context in use)
    out_flops: dict      # FLOPs of the output matrix for one token
    layers: dict         # layers placed (the output layer counts as one)


def _load(plan: Plan, n_past: int) -> _Load:
    prof, cfg = plan.profile, plan.config
    names = [d.name for d in plan.devices]
    ts = plan.tensor_parallel
    if ts is not None:
        names.append(ts.meta_name)
    ld = _Load(dict.fromkeys(names, 0), dict.fromkeys(names, 0), dict.fromkeys(names, 0.0),
               dict.fromkeys(names, 0.0), dict.fromkeys(names, 0))
    for dev in plan.layer_devices:
        ld.layers[dev] += 1
    active_bytes, active_params = prof.active_bytes_per_layer, prof.active_params_per_layer
    per_cell = kv_cell_bytes(prof, cfg) if n_past else ()   # read only when n_past
    for layer in prof.layers:
        dev = plan.layer_devices[layer.index]
        ld.weights[dev] += active_bytes[layer.index]
        ld.flops[dev] += 2.0 * active_params[layer.index]
        if layer.has_kv and n_past:
            kv_dev = dev if cfg.offload_kqv else HOST_NAME
            ctx = min(n_past, plan.kv_cells_swa if layer.is_swa else plan.kv_cells)
            ld.kv[kv_dev] += ctx * per_cell[layer.index]
            ld.flops[kv_dev] += 4.0 * ctx * layer.n_head * layer.n_embd_head_k   # QK^T and softmax(QK^T)V
    out = plan.layer_devices[prof.n_layer]
    # the output matrix is read for every token; tied: token_embd serves as it (duplicated on a device)
    ld.weights[out] += prof.output_weights_bytes
    ld.out_flops[out] += 2.0 * prof.output_params
    if ts is not None:
        _share_meta(plan, ld)
    return ld


def _share_meta(plan: Plan, ld: _Load) -> None:
    """-sm tensor: what the meta device does per token, done by its members side by side, each
    its slice of every layer: the bytes, FLOPs and KV of layer il in proportion to the bytes of
    that layer the member holds (TensorParallel.layer_weights; mirrored norms and routers are read by
    every member, so the shares add up to a little more than 1)."""
    ts, prof = plan.tensor_parallel, plan.profile
    assert ts is not None   # a -sm tensor plan
    meta = ts.meta_name
    on_meta = [i for i, d in enumerate(plan.layer_devices) if d == meta]
    totals = [prof.layers[i].weights_bytes if i < prof.n_layer else prof.output_weights_bytes for i in on_meta]
    n = len(ts.devices)
    w_frac = [0.0] * n
    kv_frac = [0.0] * n
    for i, total in zip(on_meta, totals):
        for j in range(n):
            w_frac[j] += ts.layer_weights[i][j] / total / len(on_meta) if total else 0.0
    kv_total = sum(ts.kv)
    for j in range(n):
        kv_frac[j] = ts.kv[j] / kv_total if kv_total else 0.0
        name = ts.devices[j]
        ld.weights[name] += ld.weights[meta] * w_frac[j]
        ld.flops[name] += ld.flops[meta] * w_frac[j]
        ld.out_flops[name] += ld.out_flops[meta] * w_frac[j]
        ld.kv[name] += ld.kv[meta] * kv_frac[j]
        ld.layers[name] += ld.layers[meta]
    for d in (ld.weights, ld.kv, ld.flops, ld.out_flops, ld.layers):
        d.pop(meta)


def allreduce_stages(n_devices: int) -> int:
    """Sequential copy-and-add stages of one all-reduce over n devices (ggml-backend-meta.cpp,
    allreduce_fallback): the devices beyond the largest power of two fold in first, a butterfly of
    log2 steps follows, and the result is copied back to the ones that folded in."""
    if n_devices < 2:
        return 0
    p = 1
    while p * 2 <= n_devices:
        p *= 2
    steps = p.bit_length() - 1
    return steps + (2 if n_devices > p else 0)


def _allreduce_seconds(plan: Plan, link: LinkSpeed, tokens: int, steps: int) -> tuple[int, float]:
    """(all-reduces per step, seconds for all of them over `steps` steps of `tokens` tokens in
    all): two per layer on the meta device (after attn_output and after ffn_down, whose partial
    sums are reduced), each a few stages of latency plus the layer's activations (F32, n_embd per
    token) over the link."""
    ts = plan.tensor_parallel
    if ts is None:
        return 0, 0.0
    n_layers = sum(1 for d in plan.layer_devices[:plan.profile.n_layer] if d == ts.meta_name)
    stages = allreduce_stages(len(ts.devices))
    n_ar = 2 * n_layers
    seconds = n_ar * stages * (steps * link.allreduce_stage_s + tokens * plan.profile.n_embd * 4 / link.bytes_per_s)
    return n_ar, seconds


def per_device_load(plan: Plan, n_past: int) -> tuple[dict, dict, dict]:
    """(bytes per token, FLOPs per token, KV bytes read per token) per device, at context n_past."""
    ld = _load(plan, n_past)
    flops = {n: ld.flops[n] + ld.out_flops[n] for n in ld.flops}
    return ld.weights, flops, ld.kv


def _hops(plan: Plan) -> int:
    """Boundaries between consecutive offload devices in the layer order (host boundaries are
    part of the devices' own overhead: see the module docstring)."""
    seq = [d for d in plan.layer_devices if d != HOST_NAME]
    return sum(1 for a, b in zip(seq, seq[1:]) if a != b)


def _io_bytes(plan: Plan, tokens: int, calls: int) -> float:
    """Bytes between the host and the offload devices per step: the token embeddings (F32,
    n_embd per token) into the first device holding layers, and the logits (F32, n_vocab, of
    the one token per llama_decode call that asks for them) back from the output layer's device."""
    seq = [d for d in plan.layer_devices if d != HOST_NAME]
    if not seq:
        return 0.0
    out = plan.layer_devices[plan.profile.n_layer] != HOST_NAME
    return 4.0 * (tokens * plan.profile.n_embd + (calls * plan.profile.n_vocab if out else 0))


def _pp_steps(plan: Plan, n_prompt: int) -> tuple[int, int]:
    """(ubatches, llama_decode calls) for a prompt of n_prompt tokens decoded in n_batch chunks
    (llama-bench's test_prompt), each split into ubatches of n_ubatch."""
    if n_prompt <= 0:
        return 0, 0
    nb = max(1, min(plan.config.n_batch, plan.config.n_ctx))
    u = plan.config.effective_n_ubatch
    full, rest = divmod(n_prompt, nb)
    return full * -(-nb // u) + -(-rest // u), full + (1 if rest else 0)


def _active(ld: _Load) -> list[str]:
    return [n for n in ld.weights if ld.weights[n] or ld.flops[n] or ld.out_flops[n] or ld.kv[n]]


def predict_speed(plan: Plan, model: SpeedModel | None = None, *, n_prompt: int = 512, n_gen: int = 128,
                  n_past: int | None = None, bandwidth_hints: dict | None = None) -> SpeedPrediction:
    """Predicted llama-bench pp{n_prompt} and tg{n_gen} for a plan.

    tg runs at context depth n_past (default: the middle of a tg{n_gen} run from an empty
    cache, as llama-bench's tg test does); pp at the middle of the prompt. bandwidth_hints:
    device -> bytes/s (theoretical) from Device specs, for devices the model does not know.
    """
    model = model or SpeedModel()
    hints = bandwidth_hints or {}
    n_past = n_gen // 2 if n_past is None else n_past
    tg_load = _load(plan, n_past)
    pp_load = _load(plan, n_prompt // 2) if n_prompt > 0 else None
    hops = _hops(plan)
    n_embd = plan.profile.n_embd
    steps, calls = _pp_steps(plan, n_prompt)
    link = model.link

    tg_s, pp_s, per_tok, sources, roof = {}, {}, {}, {}, {}
    for name in _active(tg_load):
        sp = model.of(name, hints.get(name))
        sources[name] = sp.source
        read = tg_load.weights[name] + tg_load.kv[name]
        per_tok[name] = read
        roof[name] = read / (sp.peak_bandwidth_bytes_per_s or sp.bandwidth_bytes_per_s)
        fixed = sp.overhead_s + tg_load.layers[name] * sp.layer_overhead_s   # per step
        tg_s[name] = max(read / sp.bandwidth_bytes_per_s,
                         (tg_load.flops[name] + tg_load.out_flops[name]) / sp.flops_per_s) + fixed
        if pp_load is not None:
            # weights (and the context's KV) are read once per ubatch; FLOPs scale with the tokens
            mem = steps * (pp_load.weights[name] + pp_load.kv[name]) / sp.bandwidth_bytes_per_s
            comp = (n_prompt * pp_load.flops[name] + calls * pp_load.out_flops[name]) / sp.flops_per_s
            pp_s[name] = (max(mem, comp) + steps * sp.overhead_s
                          + n_prompt * pp_load.layers[name] * sp.layer_token_s)
    # hops between offload devices, and the bytes to and from the host (their latency is part of
    # the devices' overhead)
    hop_tg = hops * link.latency_s + (hops * n_embd * 4 + _io_bytes(plan, 1, 1)) / link.bytes_per_s
    hop_pp = (hops * steps * link.latency_s
              + (hops * n_prompt * n_embd * 4 + _io_bytes(plan, n_prompt, calls)) / link.bytes_per_s)
    n_ar = 0
    roof_s = sum(roof.values())
    if plan.tensor_parallel is not None:
        # -sm tensor: the members run each layer side by side, so a step costs the slowest member,
        # plus the all-reduces that join their partial sums
        members = set(plan.tensor_parallel.devices)
        n_ar, ar_tg = _allreduce_seconds(plan, link, 1, 1)
        hop_tg += ar_tg
        roof_s = (sum(t for n, t in roof.items() if n not in members)
                  + max((t for n, t in roof.items() if n in members), default=0.0))
        if n_prompt > 0:
            hop_pp += _allreduce_seconds(plan, link, n_prompt, steps)[1]
        tg_total = (sum(t for n, t in tg_s.items() if n not in members)
                    + max((t for n, t in tg_s.items() if n in members), default=0.0) + hop_tg)
        pp_total = (sum(t for n, t in pp_s.items() if n not in members)
                    + max((t for n, t in pp_s.items() if n in members), default=0.0) + hop_pp) if n_prompt > 0 else 0.0
    else:
        tg_total = sum(tg_s.values()) + hop_tg
        pp_total = sum(pp_s.values()) + hop_pp if n_prompt > 0 else 0.0
    pipelined = n_prompt > 0 and steps > calls and pipeline_parallel(plan)
    if pipelined:
        # llama.cpp's pipeline parallelism: within one llama_decode the ubatches flow through the
        # devices like a pipeline, device d working on ubatch k+1 while d+1 works on ubatch k.
        # Per call: one pass through all stages, then one ubatch per time of the slowest stage.
        per_step = {n: t / steps for n, t in pp_s.items() if n != HOST_NAME}
        slowest = max(max(per_step.values(), default=0.0), hop_pp / steps)
        pp_total -= (steps - calls) * (sum(per_step.values()) + hop_pp / steps - slowest)
    return SpeedPrediction(
        tg_tokens_per_s=1.0 / tg_total if tg_total else 0.0,
        pp_tokens_per_s=n_prompt / pp_total if pp_total else 0.0,
        roofline_tg_tokens_per_s=1.0 / roof_s if roof_s else 0.0,
        tg_seconds=tg_s, pp_seconds=pp_s, bytes_per_token=per_tok, n_hops=hops,
        hop_tg_seconds=hop_tg, hop_pp_seconds=hop_pp if n_prompt > 0 else 0.0, sources=sources,
        n_prompt=n_prompt, n_gen=n_gen, pipelined=pipelined, n_allreduce=n_ar)


def pipeline_parallel(plan: Plan) -> bool:
    """Whether llama.cpp runs the ubatches of one llama_decode as a pipeline over the devices
    (llama_context ctor, `pipeline_parallel`): several offload devices holding layers, every
    layer offloaded, layer split, KV offloaded (and devices with async compute and events, as
    CUDA and RPC have). Only prompts longer than n_ubatch gain from it; one token never does.
    Between RPC servers it gains nothing (see below), so it is not counted there."""
    c = plan.config
    holders = {d for d in plan.layer_devices if d != HOST_NAME}
    # RPC devices have async compute and events, so llama.cpp turns the pipeline on; but a copy
    # between two RPC servers goes through this process (no cpy_tensor_async between them), and
    # ggml_backend_tensor_copy_async then synchronises the source: nothing overlaps. Measured:
    # docs/BENCHMARKS.md, "-ub 8" rows.
    rpc = any(d.startswith("RPC") for d in holders)
    return (len(holders) > 1 and HOST_NAME not in plan.layer_devices and c.split_mode == "layer"
            and c.offload_kqv and not rpc)


def prediction_error(pred: SpeedPrediction, *, pp_ts: float | None = None, tg_ts: float | None = None) -> dict:
    """Relative errors (predicted / measured - 1) of a prediction against measured tokens/s:
    {'pp': 0.08, 'tg': -0.12}; a test that was not measured is left out."""
    out = {}
    if pp_ts:
        out["pp"] = pred.pp_tokens_per_s / pp_ts - 1.0
    if tg_ts:
        out["tg"] = pred.tg_tokens_per_s / tg_ts - 1.0
    return out


# --- the model as a linear function of its parameters, for calibration ---------------------------
#
# Parameter names: 'a|KEY' seconds per byte (1 / effective bandwidth), 'o|KEY' seconds per step
# (tg token or pp ubatch: launching the device's graph split, its inputs, synchronising),
# 'l|KEY' seconds per layer and tg step, 'f|KEY' seconds per FLOP, 'q|KEY' seconds per layer and
# pp token, for the device cached as KEY;
# 'link|lat' seconds per hop and step, 'link|inv_bw' seconds per byte over the link. tg is
# fitted as memory-bound and pp as compute-bound (where each is on every device that matters).
# The same overheads for tg and pp keep a few calibration models enough to tell them apart.

def fit_allreduce_stage(plan: Plan, model: SpeedModel, tg_seconds: float, *, n_gen: int) -> float:
    """The seconds of one all-reduce stage that make predict_speed's tg of this -sm tensor plan
    take `tg_seconds` per token (measured), the devices' own figures held: what a tensor-split run
    tells about the link that layer-split runs do not. 0 when the devices alone are slower."""
    from dataclasses import replace
    if plan.tensor_parallel is None:
        raise ValueError("fit_allreduce_stage needs a -sm tensor plan")
    free = replace(model, link=replace(model.link, allreduce_latency_s=0.0))
    s = predict_speed(plan, free, n_prompt=0, n_gen=n_gen)
    stages = s.n_allreduce * allreduce_stages(len(plan.tensor_parallel.devices))
    if not stages or not s.tg_tokens_per_s:
        return 0.0
    return max(0.0, (tg_seconds - 1.0 / s.tg_tokens_per_s) / stages)


def design_row(plan: Plan, kind: str, key_of: dict, *, n_prompt: int = 0, n_gen: int = 0,
               n_past: int | None = None) -> dict:
    """{parameter: coefficient} such that the measured seconds of one test ('tg': per generated
    token; 'pp': the whole prompt) = sum(coefficient x parameter). key_of: device name -> cache key.
    Layer and none split only: a tensor split's time is a max over devices, not a linear sum."""
    if plan.tensor_parallel is not None:
        raise ValueError("calibration fits layer-split runs only; a -sm tensor run is not linear in the parameters")
    coef: dict[str, float] = {}

    def add(p: str, x: float) -> None:
        if x:
            coef[p] = coef.get(p, 0.0) + x

    hops = _hops(plan)
    n_embd = plan.profile.n_embd
    if kind == "tg":
        ld = _load(plan, n_gen // 2 if n_past is None else n_past)
        for name in _active(ld):
            add(f"a|{key_of[name]}", ld.weights[name] + ld.kv[name])
            add(f"o|{key_of[name]}", 1.0)
            add(f"l|{key_of[name]}", ld.layers[name])
        add("link|lat", hops)
        add("link|inv_bw", hops * n_embd * 4.0 + _io_bytes(plan, 1, 1))
    elif kind == "pp":
        if _pp_steps(plan, n_prompt)[0] > _pp_steps(plan, n_prompt)[1] and pipeline_parallel(plan):
            raise ValueError("a pipelined prompt (several ubatches per llama_decode over several devices) "
                             "is not a linear function of the parameters; fit its tg only")
        ld = _load(plan, n_prompt // 2)
        steps, calls = _pp_steps(plan, n_prompt)
        for name in _active(ld):
            add(f"f|{key_of[name]}", n_prompt * ld.flops[name] + calls * ld.out_flops[name])
            add(f"o|{key_of[name]}", steps)   # the same fixed cost per step as in tg
            add(f"q|{key_of[name]}", n_prompt * ld.layers[name])
        add("link|lat", steps * hops)
        add("link|inv_bw", hops * n_prompt * n_embd * 4.0 + _io_bytes(plan, n_prompt, calls))
    else:
        raise ValueError(f"kind must be 'tg' or 'pp', not {kind!r}")
    return coef


def _nnls(A, b, max_iter: int = 200):
    """min ||Ax - b|| subject to x >= 0 (Lawson and Hanson's active set method), numpy only."""
    import numpy as np
    n = A.shape[1]
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    w = A.T @ (b - A @ x)
    tol = 1e-10 * max(1.0, float(np.abs(A).max()) * float(np.abs(b).max()))
    for _ in range(max_iter):
        if passive.all() or not (w[~passive] > tol).any():
            break
        j = int(np.argmax(np.where(passive, -np.inf, w)))
        passive[j] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(A[:, passive], b, rcond=None)[0]
            if (z[passive] > 0).all():
                x = z
                break
            neg = passive & (z <= 0)
            alpha = float(np.min(x[neg] / (x[neg] - z[neg])))
            x = x + alpha * (z - x)
            passive &= x > tol
            x[~passive] = 0.0
        w = A.T @ (b - A @ x)
    return x


def fit_params(rows: list, priors: dict, *, fixed: dict | None = None, strength: float = 1e-4) -> dict:
    """Least squares over observations: rows = [(coefficients, seconds)]; relative residuals
    (each equation divided by its seconds); non-negative parameters; `fixed` parameters
    ({parameter: value}) moved to the known side; and a weak pull towards `priors`
    ({parameter: value}) that decides only what the data leave open (a device seen in a
    single configuration, the hop cost before any split was measured). The pull is measured
    in each parameter's own data scale (the value that alone would explain its observations),
    so a prior that is far off (a GPU default for a CPU behind RPC) does not bias what the data
    determine.

    Returns {parameter: value} for every parameter of the rows and the priors (fixed ones included)."""
    import numpy as np

    fixed = dict(fixed or {})
    rows = [({p: x for p, x in coef.items()}, float(t)) for coef, t in rows if t > 0]
    params = sorted(({p for coef, _ in rows for p in coef} | set(priors)) - set(fixed))
    missing = [p for p in params if p not in priors]
    if missing:
        raise ValueError(f"no prior for {', '.join(missing)}")
    if not params:
        return dict(fixed)
    known = [sum(x * fixed[p] for p, x in coef.items() if p in fixed) for coef, _ in rows]
    idx = {p: i for i, p in enumerate(params)}
    explain: dict[str, list] = {p: [] for p in params}
    for (coef, t), k in zip(rows, known):
        for p, x in coef.items():
            if p in idx and x > 0:
                explain[p].append(max(t - k, 1e-3 * t) / x)
    scale = np.array([float(np.median(explain[p])) if explain[p] else max(priors[p], 1e-12) for p in params])
    n_rows, n_par = len(rows), len(params)
    A = np.zeros((n_rows + n_par, n_par))
    b = np.zeros(n_rows + n_par)
    for i, ((coef, t), k) in enumerate(zip(rows, known)):
        for p, x in coef.items():
            if p in idx:
                A[i, idx[p]] = x * scale[idx[p]] / t
        b[i] = (t - k) / t
    lam = math.sqrt(strength)
    for j, p in enumerate(params):
        A[n_rows + j, j] = lam
        b[n_rows + j] = lam * priors[p] / scale[j]
    z = _nnls(A, b)
    out = {p: float(z[idx[p]] * scale[idx[p]]) for p in params}
    out.update(fixed)
    return out


_MIN_S_PER_BYTE = 1e-14    # 100 TB/s: a fitted 0 means 'not measurable here', not infinite speed
_MIN_S_PER_FLOP = 1e-17    # 100 PFLOP/s


def speeds_from_params(values: dict, key: str, base: DeviceSpeed, source: str = "calibrated",
                       note: str = "") -> DeviceSpeed:
    """The DeviceSpeed of cache key `key` from fitted parameter values (see fit_params); `base`
    supplies what the fit does not cover (the theoretical peak for the roofline)."""
    a = max(values.get(f"a|{key}", 1 / base.bandwidth_bytes_per_s), _MIN_S_PER_BYTE)
    f = max(values.get(f"f|{key}", 1 / base.flops_per_s), _MIN_S_PER_FLOP)
    return DeviceSpeed(bandwidth_bytes_per_s=1 / a, flops_per_s=1 / f,
                       overhead_s=values.get(f"o|{key}", base.overhead_s), source=source,
                       layer_overhead_s=values.get(f"l|{key}", base.layer_overhead_s),
                       layer_token_s=values.get(f"q|{key}", base.layer_token_s),
                       peak_bandwidth_bytes_per_s=base.peak_bandwidth_bytes_per_s, note=note)


def priors_for(key: str, sp: DeviceSpeed) -> dict:
    """fit_params priors for one device from its uncalibrated speed."""
    return {f"a|{key}": 1 / sp.bandwidth_bytes_per_s, f"o|{key}": sp.overhead_s,
            f"l|{key}": sp.layer_overhead_s, f"f|{key}": 1 / sp.flops_per_s, f"q|{key}": sp.layer_token_s}
