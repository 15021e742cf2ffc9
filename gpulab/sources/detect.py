"""Which devices to plan for: simulated, NVML's GPUs, RPC servers, or what llama.cpp sees.

    ds = detect_devices()                          # NVML GPUs (none on a CPU-only machine)
    ds = detect_devices(sim="24GiB,24GiB")         # what-if devices, no detection at all
    ds = detect_devices(rpc=["127.0.0.1:50052"])   # RPC servers first, then the GPUs
    ds.devices, ds.host, ds.warnings, ds.source_note

Never raises for a machine without GPUs: the result then has no devices and a note that
says how to plan anyway. It raises GpulabError only for what the caller asked and cannot
have (a bad --sim spec, RPC without the RPC runtime).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from ..core.devices import HOST_NAME, Device, parse_sim_spec
from ..errors import DeviceError, DeviceSpecError, GpulabError, RuntimeUnavailableError

__all__ = ["DeviceSet", "detect_devices", "host_device", "NO_GPU_HINT"]

NO_GPU_HINT = "plan with --sim 24GiB,24GiB or --rpc HOST:PORT"


@dataclass(frozen=True)
class DeviceSet:
    devices: tuple[Device, ...]   # in llama.cpp's order: RPC servers, then GPUs
    host: Device | None           # system memory, llama.cpp's 'CPU' device
    warnings: tuple[str, ...]
    source_note: str              # one line for people: where the devices came from


def host_device(meminfo_path: str = "/proc/meminfo",
                cgroup_dir: str = "/sys/fs/cgroup") -> Device | None:
    """System memory as the 'CPU' device: MemTotal / MemAvailable, capped by a cgroup v2 limit.

    In a container /proc/meminfo shows the whole machine, but the kernel kills the process
    at memory.max, so that limit is what a CPU-side load can really use. None if nothing
    can be read (never raises).
    """
    total = free = None
    try:
        fields = {}
        with open(meminfo_path, encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if parts and parts[0].isdigit():
                    fields[key.strip()] = int(parts[0]) * (1024 if parts[1:2] == ["kB"] else 1)
        total = fields.get("MemTotal")
        free = fields.get("MemAvailable", fields.get("MemFree"))
    except OSError:
        pass
    note = ""
    if total is None or free is None:
        try:   # not Linux, or no /proc: free pages rather than 'available', an underestimate
            page = os.sysconf("SC_PAGE_SIZE")
            total = page * os.sysconf("SC_PHYS_PAGES")
            free = page * os.sysconf("SC_AVPHYS_PAGES")
            note = " (sysconf)"
        except (AttributeError, ValueError, OSError):
            return None
    limit = _read_int(os.path.join(cgroup_dir, "memory.max"))
    if limit is not None and 0 < limit < total:
        current = _read_int(os.path.join(cgroup_dir, "memory.current")) or 0
        total, free = limit, min(free, max(limit - current, 0))
        note += " (cgroup memory.max)"
    free = max(0, min(free, total))
    return Device(name=HOST_NAME, total_bytes=total, free_bytes=free, source="host", kind="cpu",
                  description="system memory" + note)


def _read_int(path: str) -> int | None:
    try:
        with open(path, encoding="ascii") as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None   # 'max' = no limit


def _endpoints(rpc: str | Sequence[str] | None) -> list[str]:
    if rpc is None:
        return []
    items = rpc.split(",") if isinstance(rpc, str) else list(rpc)
    out = [str(e).strip() for e in items if str(e).strip()]
    for e in out:
        host, sep, port = e.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise DeviceSpecError(f"RPC endpoint {e!r} is not HOST:PORT (e.g. 127.0.0.1:50052)")
    return out


def _rpc_devices(endpoints: list[str]) -> list[Device]:
    try:
        from ..runtime import rpc as rpc_runtime   # llama.cpp's RPC backend; heavy, so lazy
    except ImportError as exc:
        raise RuntimeUnavailableError(
            f"RPC devices need gpulab.runtime.rpc and llama-cpp-python built with "
            f"CMAKE_ARGS=\"-DGGML_RPC=ON\", which this install lacks ({exc})") from exc
    devices = list(rpc_runtime.register(endpoints))
    _check_devices(devices, "gpulab.runtime.rpc.register")
    return devices


def _llama_devices() -> list[Device]:
    try:
        from ..runtime import llama_lib
    except ImportError as exc:
        raise RuntimeUnavailableError(
            f"use_llama needs gpulab.runtime.llama_lib and llama-cpp-python ({exc})") from exc
    devices = list(llama_lib.llama_devices())
    _check_devices(devices, "gpulab.runtime.llama_lib.llama_devices")
    return devices


def _check_devices(devices: list[Any], origin: str) -> None:
    bad = [d for d in devices if not isinstance(d, Device)]
    if bad:
        raise GpulabError(f"{origin} returned {type(bad[0]).__name__}, not gpulab Device")


def _rpc_first(devices: list[Device]) -> list[Device]:
    # llama_model_load_from_file_impl (src/llama.cpp) inserts the RPC devices at the front of
    # model->devices, after collecting all GPU-type devices in registration order.
    return [d for d in devices if d.kind == "rpc"] + [d for d in devices if d.kind != "rpc"]


def _count(n: int, what: str) -> str:
    return f"{n} {what}" + ("" if n == 1 else "s")


def _describe(devices: Sequence[Device]) -> str:
    models = Counter(d.description or d.name for d in devices)
    return ", ".join(f"{m} x{n}" if n > 1 else m for m, n in models.items())


def detect_devices(*, sim: str | None = None, rpc: str | Sequence[str] | None = None,
                   use_nvml: bool = True, use_llama: bool = False, probe: Any = None,
                   env: Mapping[str, str] | None = None) -> DeviceSet:
    """The devices to plan for, in llama.cpp's order, plus the host memory.

    sim        a spec such as '24GiB,24GiB' (see parse_sim_spec): replaces detection entirely.
    rpc        'host:port' endpoints (a list, or one comma-separated string), registered with
               llama.cpp through gpulab.runtime.rpc; they come first, as in llama.cpp.
    use_nvml   take the GPUs from NVML (the default); `probe` replaces the real NvmlProbe.
    use_llama  take the GPUs from llama.cpp itself (gpulab.runtime.llama_lib) instead of NVML.
    env        where CUDA_VISIBLE_DEVICES / CUDA_DEVICE_ORDER are read (default os.environ).
    """
    host = host_device()
    if sim is not None:
        if rpc or use_llama:
            raise DeviceSpecError("--sim replaces device detection; drop --rpc / use_llama, or --sim")
        devices = parse_sim_spec(sim)
        return DeviceSet(tuple(devices), host, (),
                         f"simulated: {_count(len(devices), 'device')} from {sim.strip()!r}")

    warnings: list[str] = []
    endpoints = _endpoints(rpc)
    rpc_devs = _rpc_devices(endpoints) if endpoints else []

    gpus: list[Device] = []
    why_none, origin = "NVML not used", ""
    if use_llama:
        found = _llama_devices()
        # llama.cpp's list holds the RPC servers once registered (take them from there, not
        # twice), and its own CPU device, which gpulab keeps apart as `host`.
        if any(d.kind == "rpc" for d in found):
            rpc_devs = [d for d in found if d.kind == "rpc"]
        gpus = [d for d in found if d.kind not in ("cpu", "rpc")]
        why_none = "llama.cpp sees no GPU"
        origin = "llama.cpp"
    elif use_nvml:
        origin = "NVML"
        own_probe = probe is None
        if own_probe:
            from .nvml import NvmlProbe
            probe = NvmlProbe()
        try:
            if probe.available():
                if hasattr(probe, "cuda_devices"):
                    gpus, probe_warnings = probe.cuda_devices(env)
                    warnings.extend(probe_warnings)
                else:
                    gpus = list(probe.as_devices())
                why_none = "NVML sees no GPU visible to CUDA" if gpus == [] else ""
            else:
                why_none = "NVML unavailable"
        except DeviceError as exc:     # the driver answered init, then failed: say so, go on
            warnings.append(str(exc))
            why_none = "NVML failed"
        finally:
            if own_probe:
                probe.shutdown()

    devices = _rpc_first(rpc_devs + gpus)
    parts = []
    if rpc_devs:
        parts.append(_count(len(rpc_devs), "RPC server") + f" ({', '.join(endpoints)})")
    if gpus:
        parts.append(f"{origin}: {_count(len(gpus), 'GPU')} ({_describe(gpus)})")
    if not gpus:
        if devices:
            parts.append(f"no GPU found ({why_none})")
        else:
            parts.append(f"no GPU found ({why_none}); {NO_GPU_HINT}")
    return DeviceSet(tuple(devices), host, tuple(warnings), "; ".join(parts))
