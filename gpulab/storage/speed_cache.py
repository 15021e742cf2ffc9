"""<data dir>/speed.json: what calibrations and runs measured of each device, and the fit.

    cache = SpeedCache()                       # gpulab.storage.paths.data_dir() / "speed.json"
    cache.model_for(devices, n_threads)        # a SpeedModel: calibrated where known, else priors

Measuring is gpulab.runtime.calibrate's; the priors and keys are gpulab.core.measure.speed_priors'.
"""

from __future__ import annotations

import os
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

from ..core.devices import HOST_NAME, Device
from ..core.measure.speed import DeviceSpeed, LinkSpeed, SpeedModel, fit_params, priors_for, speeds_from_params
from ..core.measure.speed_priors import device_key, host_key, link_default, uncalibrated_from_info, uncalibrated_speed
from ..sources.host import cpu_model, default_threads
from .files import read_json, write_json
from .paths import data_dir

__all__ = ["SpeedCache", "speed_model_for", "cache_key", "host_key_here", "MAX_OBSERVATIONS"]

MAX_OBSERVATIONS = 500


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def host_key_here(n_threads: int | None = None) -> str:
    """This host's key at n_threads (default: llama-bench's, the physical cores)."""
    return host_key(cpu_model(), int(n_threads) if n_threads else default_threads())


def cache_key(d: Device, n_threads: int | None = None) -> str | None:
    """The cache key of a device on this host (see gpulab.core.measure.speed_priors.device_key)."""
    return device_key(d, host_key_here(n_threads))


class SpeedCache:
    """<data dir>/speed.json: device info and fits by key, the observations they come from.

    {"version": 1,
     "devices": {key: {"name", "kind", "description", "endpoint", "rtt_s", "peak_bandwidth_bytes_per_s",
                       "fit": {"bandwidth_bytes_per_s", "flops_per_s", "overhead_s", "layer_overhead_s",
                               "layer_token_s"},
                       "n_observations", "updated"}},
     "links": {"rpc" | "local": {"latency_s", "bytes_per_s", "n_observations", "allreduce_latency_s"}},
     "observations": [{"kind": "tg"|"pp", "seconds", "coef": {param: x}, "keys": [...],
                       "source": "calibration"|"run", "label", "at"}]}
    """

    VERSION = 1

    def __init__(self, path: str | os.PathLike | None = None):
        if path is None:
            path = data_dir() / "speed.json"
        self.path = Path(path)
        self.data = self._read()

    def _read(self) -> dict:
        data = read_json(self.path)
        if isinstance(data, dict) and data.get("version") == self.VERSION:
            data.setdefault("devices", {})
            data.setdefault("links", {})
            data.setdefault("observations", [])
            return data
        return {"version": self.VERSION, "devices": {}, "links": {}, "observations": []}

    def save(self) -> Path:
        return write_json(self.path, self.data)

    # -- devices --
    @property
    def devices(self) -> dict:
        return self.data["devices"]

    @property
    def observations(self) -> list:
        return self.data["observations"]

    def note_device(self, key: str, d: Device | None = None, **info) -> None:
        e = self.devices.setdefault(key, {})
        if d is not None:
            e.update(name=d.name, kind=d.kind, description=d.description, endpoint=d.endpoint)
            if d.bandwidth_bytes_per_s and d.source != "sim":
                e["peak_bandwidth_bytes_per_s"] = d.bandwidth_bytes_per_s
        e.update({k: v for k, v in info.items() if v is not None})

    def speed(self, key: str | None) -> DeviceSpeed | None:
        """The calibrated speed of a key, None when it has no fit."""
        e = (self.devices.get(key) if key else None) or {}
        fit = e.get("fit")
        if not fit:
            return None
        n = e.get("n_observations", 0)
        return DeviceSpeed(fit["bandwidth_bytes_per_s"], fit["flops_per_s"], fit["overhead_s"], "calibrated",
                           layer_overhead_s=fit.get("layer_overhead_s", 0.0),
                           layer_token_s=fit.get("layer_token_s", 0.0),
                           peak_bandwidth_bytes_per_s=e.get("peak_bandwidth_bytes_per_s"),
                           note=f"{n} measurement{'s' if n != 1 else ''}, {e.get('updated', '?')}")

    def link(self, kind: str) -> LinkSpeed | None:
        ln = self.data["links"].get(kind)
        if not ln or "latency_s" not in ln:
            return None
        return LinkSpeed(ln["latency_s"], ln["bytes_per_s"], "calibrated",
                         allreduce_latency_s=ln.get("allreduce_latency_s"))

    # -- observations --
    def add(self, kind: str, coef: dict, seconds: float, *, source: str, label: str = "") -> None:
        keys = sorted({p.split("|", 1)[1] for p in coef if not p.startswith("link|")})
        self.observations.append({"kind": kind, "seconds": seconds, "coef": coef, "keys": keys,
                                  "source": source, "label": label, "at": _now()})
        del self.observations[:-MAX_OBSERVATIONS]

    def drop(self, keys) -> int:
        """Forget the observations that involve any of these keys (a fresh calibration)."""
        keys = set(keys)
        before = len(self.observations)
        self.data["observations"] = [o for o in self.observations if not keys & set(o["keys"])]
        return before - len(self.observations)

    def refit(self) -> dict:
        """One least-squares fit over all observations; stores every key's speeds and the links."""
        rows = [(o["coef"], o["seconds"]) for o in self.observations if o["seconds"] > 0]
        keys = sorted({k for o in self.observations for k in o["keys"]})
        priors: dict = {}
        for k in keys:
            priors.update(priors_for(k, uncalibrated_from_info(k, self.devices.get(k, {}))))
        link_params = {p for coef, _ in rows for p in coef if p.startswith("link|")}
        classes = {p.split("|")[2] for p in link_params}
        fixed = {}
        for cls in classes:
            rtt = next((e.get("rtt_s") for e in self.devices.values() if e.get("rtt_s")), None)
            default = link_default(cls, rtt)
            priors[f"link|lat|{cls}"] = default.latency_s
            # the link's bandwidth is measured (from loads, see calibrate) or assumed, not fitted:
            # the activations it carries are too small here for the fit to see it
            bw = self.data["links"].get(cls, {}).get("bytes_per_s_measured") or default.bytes_per_s
            fixed[f"link|inv_bw|{cls}"] = 1 / bw
        values = fit_params(rows, priors, fixed=fixed)
        now = _now()
        for k in keys:
            base = uncalibrated_from_info(k, self.devices.get(k, {}))
            sp = speeds_from_params(values, k, base)
            e = self.devices.setdefault(k, {})
            e["fit"] = {"bandwidth_bytes_per_s": sp.bandwidth_bytes_per_s, "flops_per_s": sp.flops_per_s,
                        "overhead_s": sp.overhead_s, "layer_overhead_s": sp.layer_overhead_s,
                        "layer_token_s": sp.layer_token_s}
            e["n_observations"] = sum(1 for o in self.observations if k in o["keys"])
            e["updated"] = now
        for cls in classes:
            ln = self.data["links"].setdefault(cls, {})
            ln.update(latency_s=values.get(f"link|lat|{cls}", 0.0), bytes_per_s=1 / values[f"link|inv_bw|{cls}"],
                      n_observations=sum(1 for coef, _ in rows if f"link|lat|{cls}" in coef))
        return values

    def residuals(self, source: str | None = None) -> list[tuple[str, float]]:
        """(label, predicted/measured - 1) of stored observations under the current fit."""
        values = self._values()
        out = []
        for o in self.observations:
            if source and o["source"] != source:
                continue
            pred = sum(x * values.get(p, 0.0) for p, x in o["coef"].items())
            out.append((f"{o['label']} {o['kind']}", pred / o["seconds"] - 1.0))
        return out

    def _values(self) -> dict:
        vals = {}
        for k, e in self.devices.items():
            fit = e.get("fit")
            if fit:
                vals[f"a|{k}"] = 1 / fit["bandwidth_bytes_per_s"]
                vals[f"o|{k}"] = fit["overhead_s"]
                vals[f"l|{k}"] = fit.get("layer_overhead_s", 0.0)
                vals[f"q|{k}"] = fit.get("layer_token_s", 0.0)
                vals[f"f|{k}"] = 1 / fit["flops_per_s"]
        for cls, ln in self.data["links"].items():
            if "latency_s" not in ln:
                continue
            vals[f"link|lat|{cls}"] = ln["latency_s"]
            vals[f"link|inv_bw|{cls}"] = 1 / ln["bytes_per_s"]
        return vals

    def model_for(self, devices, n_threads: int | None = None) -> SpeedModel:
        """A SpeedModel for these devices (the host is added when absent)."""
        speeds: dict[str, DeviceSpeed] = {}
        devices = list(devices)
        if not any(d.kind == "cpu" or d.name == HOST_NAME for d in devices):
            devices.append(Device(name=HOST_NAME, total_bytes=0, free_bytes=0, source="host", kind="cpu"))
        kinds = set()
        rtt = None
        endpoint = ""
        for d in devices:
            key = cache_key(d, n_threads)
            info = self.devices.get(key, {}) if key else {}
            sp = self.speed(key) or uncalibrated_speed(d, info)
            if d.bandwidth_bytes_per_s and sp.peak_bandwidth_bytes_per_s is None:
                sp = replace(sp, peak_bandwidth_bytes_per_s=d.bandwidth_bytes_per_s)
            speeds[d.name] = sp
            if d.kind == "rpc":
                kinds.add("rpc")
                rtt = rtt or info.get("rtt_s")
                endpoint = endpoint or d.endpoint
            elif d.kind != "cpu":
                kinds.add("local")
        cls = "rpc" if "rpc" in kinds else "local"
        link = self.link(cls) or link_default(cls, rtt, endpoint)
        return SpeedModel(devices=speeds, link=link)


def speed_model_for(devices, *, n_threads: int | None = None, cache: SpeedCache | None = None) -> SpeedModel:
    """The SpeedModel for these devices: calibrated where the cache knows them, else from their
    spec (--sim 80GiB:3350GB/s), NVML's clock x bus width, an RPC round trip, or the defaults.
    Each DeviceSpeed says which in `source`. n_threads: the host's threads (default: llama-bench's)."""
    return (cache or SpeedCache()).model_for(devices, n_threads)
