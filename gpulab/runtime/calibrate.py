"""Device characteristics for the throughput model: measured, cached per device, refined by runs.

    cal = calibrate(["127.0.0.1:50052", "127.0.0.1:50053"], n_threads=1)   # ~30 s for 2 RPC CPUs
    model = speed_model_for(devices)     # gpulab.storage.speed_cache: calibrated, else spec/NVML/defaults
    predict_speed(plan, model)           # gpulab.core.measure.speed
    update_from_run(run)                 # a measured Run refines the devices it used

What `calibrate` measures, in one worker process (gpulab.runtime.worker: a dying RPC server
aborts the process that uses it):
- every device (the offload devices llama.cpp sees, and the host with -ngl 0 and n_threads
  threads): tg and pp of two synthetic models of different size, all layers on that device.
  tg: t = bytes / bandwidth + c per token gives the effective bandwidth and the overhead per
  step (for one device the way in from the host and the logits back are part of c); pp:
  t = FLOPs / F + e per ubatch gives the effective FLOP rate.
- every pair of consecutive offload devices: the larger model split 1/1. What it costs beyond
  the two single-device parts is the hop cost.
- RPC servers: the round trip of one protocol request (measured before the worker connects: a
  server serves one client at a time); the prior of their overhead. GPUs: NVML's theoretical
  bandwidth (memory clock x bus width) is the prior and the peak of the roofline.
A measurement is the fastest repetition of a config in each of `rounds` interleaved rounds (the
one least disturbed by other processes), then the median over rounds (measure_best).

Every observation is stored with its coefficients (gpulab.core.measure.speed.design_row) in
<data dir>/speed.json, and the parameters of all devices are one least-squares fit over all
stored observations, so a run measured later (`update_from_run`) refines the devices it used.
Cache keys: the host by CPU model and thread count; RPC devices by endpoint (the server's own
thread count is not visible to a client: calibrate again after restarting it differently);
GPUs by PCI bus id, else UUID, else name and description.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.config import SplitConfig
from ..core.devices import HOST_NAME, Device
from ..core.measure.speed import SpeedModel, design_row
from ..core.measure.speed_priors import link_default
from ..core.run import Run
from ..sources.host import cpu_model
from ..storage.speed_cache import SpeedCache, cache_key, host_key_here
from .rpc import round_trip

if TYPE_CHECKING:
    from .worker import RemoteModel

__all__ = ["Calibration", "calibrate", "update_from_run", "measure_best", "Best",
           "CALIBRATION_MODELS"]


# --- calibration --------------------------------------------------------------------------------

def _spec(n_layer: int, n_embd: int, weight_type: str):
    from ..sources.synth import SynthSpec
    return SynthSpec(n_layer=n_layer, n_embd=n_embd, n_ff=3 * n_embd, n_head=16, n_head_kv=4, n_vocab=512,
                     weight_type=weight_type, name=f"gpulab-calibration-{n_layer}x{n_embd}")


# (n_layer, n_embd) at Q4_0: 41 MB in 6 layers, 41 MB in 24 thin layers (the same bytes, four
# times the layers: the per-layer overhead), 85 MB in 8 layers (the bandwidth). All larger than
# a CPU's last-level cache (32 MiB here), so what tg measures is memory, not cache. The last is
# the one split over device pairs for the hop cost.
CALIBRATION_MODELS = ((6, 1024), (24, 512), (8, 1280))


@dataclass
class Calibration:
    speeds: dict                       # device name -> DeviceSpeed (calibrated)
    links: dict                        # 'rpc' / 'local' -> LinkSpeed
    keys: dict                         # device name -> cache key
    rtt_s: dict                        # RPC endpoint -> round trip seconds
    residuals: list                    # (label, fitted / measured - 1) of the calibration points
    seconds: float
    cache_path: str
    runs: list = field(default_factory=list)   # (label, Run) of every measurement
    n_threads: int = 1
    devices: list = field(default_factory=list)        # the Devices calibrated, the host last
    validation: dict = field(default_factory=dict)     # label -> Best, for calibrate(validate=...)
    measurements: dict = field(default_factory=dict)   # label -> Best of every calibration config


@dataclass
class Best:
    """Several measurements of one config reduced to one figure per test (see measure_best)."""
    run: Run                           # the Run of the first round
    runs: list = field(default_factory=list)   # every round's Run
    stat: str = "median"

    def seconds(self, kind: str) -> float | None:
        """tg: seconds per generated token; pp: seconds for the whole prompt. Each round's
        fastest repetition, then the median over rounds ('median') or the fastest ('best')."""
        v = sorted(x for x in (_best_seconds(r, kind) for r in self.runs) if x)
        if not v:
            return None
        return v[0] if self.stat == "best" else (v[(len(v) - 1) // 2] + v[len(v) // 2]) / 2

    @property
    def tg_s(self) -> float | None:
        return self.seconds("tg")

    @property
    def pp_s(self) -> float | None:
        return self.seconds("pp")

    @property
    def tg_ts(self) -> float:
        s = self.tg_s
        return 1.0 / s if s else 0.0

    @property
    def pp_ts(self) -> float:
        s = self.pp_s
        return self.run.pp.n_prompt / s if s and self.run.pp else 0.0

    @property
    def tg_mean_ts(self) -> float:
        """llama-bench's figure (mean over repetitions), averaged over the rounds."""
        v = [r.tg.avg_ts for r in self.runs if r.tg]
        return sum(v) / len(v) if v else 0.0

    @property
    def pp_mean_ts(self) -> float:
        v = [r.pp.avg_ts for r in self.runs if r.pp]
        return sum(v) / len(v) if v else 0.0


def measure_best(worker, items, *, rounds: int = 1, repetitions: int = 2, n_prompt: int = 32, n_gen: int = 16,
                 n_threads: int = 1, stat: str = "median", keep_loaded: bool = False, progress=None) -> dict:
    """{label: Best} for items [(label, model path, SplitConfig)], each measured in `rounds`
    interleaved rounds. A round's figure is its fastest repetition, the one least disturbed by
    other processes; over rounds the median (stat='median': what the machine gives under its
    current load, stable when that load is) or the fastest (stat='best').

    keep_loaded: load every item once (Worker.open) and keep them all loaded through the rounds,
    so a round costs only its measuring (and its warm-up only the first time); else load for
    every measurement (Worker.measure). Not with RPC devices: an RPC server serves one client
    at a time with a listen backlog of 1, so while this worker holds a model on it, the
    reachability checks of the next load (gpulab.runtime.model) find it unreachable."""
    out: dict[str, Best] = {}
    opened: dict[str, RemoteModel] = {}
    done, total = 0, max(1, rounds * len(items) + (len(items) if keep_loaded else 0))

    def tick(label: str) -> None:
        nonlocal done
        if progress is not None:
            progress(label, done / total)
        done += 1

    kw: dict[str, Any] = dict(n_prompt=n_prompt, n_gen=n_gen, repetitions=repetitions, n_threads=n_threads, nvml=False)
    try:
        if keep_loaded:
            for label, path, cfg in items:
                tick(label)
                opened[label] = worker.open(path, cfg)
        for r in range(rounds):
            for label, path, cfg in items:
                tick(label)
                if keep_loaded:
                    run = opened[label].measure(warmup=r == 0, **kw)
                else:
                    run = worker.measure(path, cfg, **kw)
                out.setdefault(label, Best(run, [], stat)).runs.append(run)
    finally:
        for m in opened.values():
            try:
                m.close()
            except Exception:  # noqa: BLE001 - a worker that died has nothing left to close
                pass
    return out


def _best_seconds(run, kind: str, stat: str = "best") -> float | None:
    t = run.tg if kind == "tg" else run.pp
    if t is None or not t.samples_ts:
        return None
    ts = max(t.samples_ts) if stat == "best" else t.avg_ts
    n = t.n_gen if kind == "tg" else t.n_prompt
    return (1.0 / ts) if kind == "tg" else (n / ts)


def _run_plan(profile, devices: list[Device], config: SplitConfig, layer_devices) -> object:
    """The plan llama.cpp carried out: the planner's, with llama.cpp's reported placement."""
    from ..core.placement.planner import plan
    host = next((d for d in devices if d.kind == "cpu"), None)
    offload = [d for d in devices if d.is_offload]
    p = plan(profile, offload, config, host)
    if layer_devices and len(layer_devices) == len(p.layer_devices):
        p = replace(p, layer_devices=tuple(layer_devices))
    return p


def _observe(cache: SpeedCache, p, run, key_of: dict, *, source: str, label: str, stat: str = "best",
             tg_s: float | None = None, pp_s: float | None = None) -> int:
    n = 0
    for kind, seconds in (("tg", tg_s if tg_s is not None else _best_seconds(run, "tg", stat)),
                          ("pp", pp_s if pp_s is not None else _best_seconds(run, "pp", stat))):
        if not seconds:
            continue
        t = run.tg if kind == "tg" else run.pp
        try:
            coef = design_row(p, kind, key_of, n_prompt=t.n_prompt, n_gen=t.n_gen)
        except ValueError:   # a pipelined prompt: not linear in the parameters, not fitted
            continue
        coef = _with_link_class(coef, key_of, p)
        cache.add(kind, coef, seconds, source=source, label=label)
        n += 1
    return n


def _with_link_class(coef: dict, key_of: dict, p) -> dict:
    """Hops over RPC and hops between local GPUs are fitted apart: 'link|lat' -> 'link|lat|rpc'."""
    cls = "rpc" if any(key_of.get(d, "").startswith("rpc:") for d in set(p.layer_devices)) else "local"
    return {(f"{k}|{cls}" if k.startswith("link|") else k): v for k, v in coef.items()}


def calibrate(endpoints=(), *, devices: list[str] | None = None, n_threads: int = 1, host: bool = True,
              hops: bool = True, rounds: int = 1, repetitions: int = 2, n_prompt: int = 32, n_gen: int = 16,
              stat: str = "median", validate=(), keep_loaded: bool = False,
              weight_type: str = "Q4_0", models=CALIBRATION_MODELS, cache: SpeedCache | None = None,
              work_dir: str | os.PathLike | None = None, progress=None, keep_runs: bool = False) -> Calibration:
    """Measure the devices llama.cpp sees (with these RPC endpoints registered) and the host,
    store the observations in the cache, refit, save; the Calibration.

    devices: names of the offload devices to calibrate (default: all). n_threads: the host's
    threads (the key of its entry). rounds: measure every config this many times, interleaved
    (more rounds on a busy machine); stat: how rounds combine (see measure_best).
    validate: more (label, model path, SplitConfig) to measure in the same interleaved rounds but
    not to fit, so that a check of the predictions sees the load the calibration saw; their
    results are in Calibration.validation. progress(what, fraction).
    """
    from ..sources.read import read_profile
    from ..sources.synth import write_model
    from .worker import Worker

    t0 = time.monotonic()
    cache = cache if cache is not None else SpeedCache()
    rtt = {ep: round_trip(ep) for ep in endpoints}

    def report(what: str, fraction: float) -> None:
        if progress is not None:
            progress(what, fraction)

    with tempfile.TemporaryDirectory(prefix="gpulab-calibrate-", dir=work_dir) as tmp:
        paths = [write_model(Path(tmp) / f"cal-{nl}x{ne}.gguf", _spec(nl, ne, weight_type)) for nl, ne in models]
        profiles = [read_profile(p) for p in paths]
        ctx = max(n_prompt, n_gen) + 16
        base = SplitConfig(n_ctx=ctx, n_batch=n_prompt, n_ubatch=n_prompt)
        with Worker(list(endpoints)) as w:
            seen = w.devices()
            offload = [d for d in seen if d.is_offload]
            if devices is not None:
                missing = set(devices) - {d.name for d in offload}
                if missing:
                    from ..core.errors import ConfigError
                    raise ConfigError(f"no device {', '.join(sorted(missing))} among "
                                      f"{', '.join(d.name for d in offload) or 'none'}")
                offload = [d for d in offload if d.name in devices]
            host_dev = next((d for d in seen if d.kind == "cpu"),
                            Device(name=HOST_NAME, total_bytes=0, free_bytes=0, source="host", kind="cpu"))
            host_key = host_key_here(n_threads)
            key_of = {d.name: cache_key(d) for d in offload}
            key_of[HOST_NAME] = host_key
            # (label, model index, config)
            configs = []
            for i, _ in enumerate(paths):
                if host:
                    configs.append((f"{HOST_NAME} m{i}", i, base.replace(n_gpu_layers=0)))
                for d in offload:
                    configs.append((f"{d.name} m{i}", i, base.replace(devices=(d.name,))))
            if hops:
                for a, b in zip(offload, offload[1:]):
                    configs.append((f"{a.name}/{b.name} m{len(paths) - 1}", len(paths) - 1,
                                    base.replace(devices=(a.name, b.name), tensor_split=(1.0, 1.0))))
                if len(offload) >= 2:
                    # -sm tensor over the first pair: the cost of an all-reduce stage (not fitted
                    # with the rest: a tensor split's time is a max over devices, see below)
                    a, b = offload[:2]
                    configs.append((f"{a.name}+{b.name} tensor m{len(paths) - 1}", len(paths) - 1,
                                    base.replace(devices=(a.name, b.name), split_mode="tensor")))
            extra = [(f"validate {label}", str(path), cfg) for label, path, cfg in validate]
            best = measure_best(w, [(label, paths[i], cfg) for label, i, cfg in configs] + extra, rounds=rounds,
                                repetitions=repetitions, n_prompt=n_prompt, n_gen=n_gen, n_threads=n_threads,
                                stat=stat, keep_loaded=keep_loaded, progress=report)
            report("fit", 1.0)
        all_devices = offload + [host_dev]
        # a fresh calibration replaces what was measured of these devices before
        cache.drop({key_of[d.name] for d in offload} | ({key_of[HOST_NAME]} if host else set()))
        for d in offload:
            key = key_of[d.name]
            if key is not None:   # a device with no identity on this host (cache_key) is not kept
                cache.note_device(key, d, rtt_s=rtt.get(d.endpoint))
        cache.note_device(host_key, host_dev, description=cpu_model(), threads=n_threads)
        _note_link_bandwidth(cache, best, profiles, offload, key_of)
        runs = []
        tensor_runs = []
        for label, i, cfg in configs:
            b = best[label]
            runs.append((label, b.run))
            if cfg.split_mode == "tensor":
                tensor_runs.append((profiles[i], cfg, b))
                continue
            p = _run_plan(profiles[i], all_devices, cfg, b.run.report.layer_devices)
            _observe(cache, p, b.run, key_of, source="calibration", label=label, tg_s=b.tg_s, pp_s=b.pp_s)
        cache.refit()
        for prof, cfg, b in tensor_runs:
            _note_allreduce(cache, prof, cfg, b, all_devices, n_threads, n_gen)
        cache.save()
    names = [d.name for d in offload] + ([HOST_NAME] if host else [])
    speeds = {n: cache.speed(key_of[n]) for n in names if cache.speed(key_of[n])}
    links = {cls: cache.link(cls) for cls in cache.data["links"] if cache.link(cls)}
    return Calibration(speeds=speeds, links=links, keys={n: key_of[n] for n in names}, rtt_s=rtt,
                       residuals=cache.residuals(source="calibration"), seconds=time.monotonic() - t0,
                       cache_path=str(cache.path), runs=runs if keep_runs else [], n_threads=n_threads,
                       devices=all_devices,
                       validation={label: best[f"validate {label}"] for label, _, _ in validate},
                       measurements={label: best[label] for label, _, _ in configs})


def _note_allreduce(cache: SpeedCache, profile, config: SplitConfig, best, devices: list[Device], n_threads: int,
                    n_gen: int) -> None:
    """The seconds of one all-reduce stage (gpulab.core.measure.speed.fit_allreduce_stage) from a -sm tensor
    run, the devices' fitted figures held, kept with the link class: over RPC a stage is several
    round trips through the client, much more than a layer split's hop."""
    from ..core.measure.speed import fit_allreduce_stage
    from ..core.placement.planner import plan as make_plan
    if best.tg_s is None:
        return
    p = make_plan(profile, [d for d in devices if d.kind != "cpu"], config)
    if p.tensor_parallel is None:   # not a -sm tensor plan: no all-reduce to fit
        return
    members = [d for d in devices if d.name in p.tensor_parallel.devices]
    cls = "rpc" if any(d.kind == "rpc" for d in members) else "local"
    stage = fit_allreduce_stage(p, cache.model_for(devices, n_threads), best.tg_s, n_gen=n_gen)
    cache.data["links"].setdefault(cls, {})["allreduce_latency_s"] = stage


def _note_link_bandwidth(cache: SpeedCache, best: dict, profiles: list, offload: list, key_of: dict) -> None:
    """The bandwidth into each device, from loads: a load onto a device sends its weights over
    the link (RPC: set_tensor over the network; GPU: host-to-device copies), a load onto the host
    maps them. (load on the device - load on the host) / bytes, for the larger model; the median
    over devices, per link class. Left unset where it cannot be told (no host load, a load not
    slower than the host's, as with an RPC server's tensor cache)."""
    i = len(profiles) - 1
    host = best.get(f"{HOST_NAME} m{i}")
    if host is None:
        return
    weights = sum(profiles[i].active_bytes_per_layer) + profiles[i].output_weights_bytes
    by_cls: dict[str, list] = {}
    for d in offload:
        b = best.get(f"{d.name} m{i}")
        if b is None:
            continue
        extra = min(r.load_seconds for r in b.runs) - min(r.load_seconds for r in host.runs)
        if extra > 0:
            bw = weights / extra
            if 1e6 < bw < 1e12:
                by_cls.setdefault("rpc" if key_of[d.name].startswith("rpc:") else "local", []).append(bw)
    for cls, vals in by_cls.items():
        vals.sort()
        cache.data["links"].setdefault(cls, {})["bytes_per_s_measured"] = vals[len(vals) // 2]


# --- learning from runs -------------------------------------------------------------------------

def _run_keys(run, devices: list[Device] | None = None) -> dict:
    """Device name -> cache key for the devices of a Run."""
    keys = {HOST_NAME: host_key_here(run.n_threads or None)}
    by_name = {d.name: d for d in devices or ()}
    endpoints: dict[str, str] = {}
    for b in run.report.buffers:   # 'RPC0[127.0.0.1:50052]'
        if "[" in b.buffer_type and b.buffer_type.endswith("]"):
            endpoints.setdefault(b.device, b.buffer_type[b.buffer_type.index("[") + 1:-1])
    uuids = getattr(run, "device_uuids", {}) or {}
    for name in list(run.devices) + [d for d in run.report.layer_devices if d != HOST_NAME]:
        if name in keys:
            continue
        if name in by_name and (key := cache_key(by_name[name])):
            keys[name] = key
        elif name in endpoints:
            keys[name] = f"rpc:{endpoints[name]}"
        elif name in uuids:
            keys[name] = f"uuid:{uuids[name]}"
        else:
            keys[name] = f"dev:{name}:"
    return keys


def update_from_run(run, plan=None, *, devices: list[Device] | None = None, cache: SpeedCache | None = None,
                    stat: str = "best", save: bool = True) -> SpeedModel:
    """Add a measured Run's pp and tg to the cache as observations of the devices it used, refit,
    save; returns the refitted SpeedModel for the devices that held its layers.

    plan: the Plan of the run (its profile and config are used; the placement is llama.cpp's,
    from the run's report). Default: planned again from the model file. devices: the Device
    objects the run used (for their keys; default: from the run's report). stat: 'best' (the
    fastest repetition, as calibration uses) or 'mean' (llama-bench's average)."""
    if run.config.split_mode == "tensor":
        from ..core.errors import ConfigError
        raise ConfigError("a -sm tensor run does not refine device speeds (its time is the slowest member's plus "
                          "the all-reduces, not a sum the fit can use); `gpulab calibrate` measures the all-reduce "
                          "stage with a tensor-split run of its own")
    cache = cache if cache is not None else SpeedCache()
    cpu = getattr(run, "cpu_info", "")
    if cpu and HOST_NAME in run.report.layer_devices[:-1] and _norm(cpu) not in _norm(cpu_model()) \
            and _norm(cpu_model()) not in _norm(cpu):
        from ..core.errors import ConfigError
        raise ConfigError(f"this run's host CPU ({cpu}) is not this machine's ({cpu_model()}): "
                          "its host layers cannot refine this machine's calibration")
    if plan is None:
        from ..sources.read import read_profile
        names = list(dict.fromkeys(list(run.devices) + [d for d in run.report.layer_devices if d != HOST_NAME]))
        devs = [Device(name=n, total_bytes=1 << 50, free_bytes=1 << 50, source="run", kind="gpu") for n in names]
        devs.append(Device(name=HOST_NAME, total_bytes=0, free_bytes=0, source="host", kind="cpu"))
        plan = _run_plan(read_profile(run.model_path), devs, run.config, run.report.layer_devices)
    elif run.report.layer_devices and len(run.report.layer_devices) == len(plan.layer_devices):
        plan = replace(plan, layer_devices=tuple(run.report.layer_devices))
    key_of = _run_keys(run, devices)
    for d in devices or ():
        k = cache_key(d, run.n_threads or None)
        if k:
            cache.note_device(k, d)
    ts = ",".join(f"{x:g}" for x in run.config.tensor_split) or "default"
    label = f"run {Path(run.model_path).name} -ngl {run.config.n_gpu_layers} -ts {ts}"
    _observe(cache, plan, run, key_of, source="run", label=label, stat=stat)
    cache.refit()
    if save:
        cache.save()
    speeds = {}
    used = set(plan.layer_devices)
    for name, key in key_of.items():
        if name not in used:
            continue
        sp = cache.speed(key)
        if sp is not None:
            speeds[name] = sp
    rpc = any(k.startswith("rpc:") for k in key_of.values())
    link = cache.link("rpc" if rpc else "local") or link_default("rpc" if rpc else "local")
    return SpeedModel(devices=speeds, link=link)


def _norm(s: str) -> str:
    return " ".join(s.lower().split())
