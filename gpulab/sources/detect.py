"""Which devices to plan for: simulated, NVML's GPUs, RPC servers, or what llama.cpp sees.

    ds = detect_devices()                                # NVML GPUs (none on a CPU-only machine)
    ds = detect_devices(sim="24GiB,24GiB")               # what-if devices, no detection at all
    ds = detect_devices(rpc_devices=worker_rpc_devices)  # RPC servers first, then the GPUs
    ds.devices, ds.host, ds.warnings, ds.source_note

The sources that need llama.cpp come in as functions (`rpc_devices`, `llama_devices`): this
module never loads it; gpulab.runtime.session passes a worker's answers. Never raises for a
machine without GPUs: the result then has no devices and a note that says how to plan anyway.
It raises GpulabError only for what the caller asked and cannot have (a bad --sim spec).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from ..core.devices import Device, parse_sim_spec
from ..core.errors import DeviceError, GpulabError
from ..core.protocols import DeviceProbe
from .host import host_device

__all__ = ["DeviceSet", "detect_devices", "NO_GPU_HINT"]

NO_GPU_HINT = "plan with --sim 24GiB,24GiB or --rpc HOST:PORT"


@dataclass(frozen=True)
class DeviceSet:
    devices: tuple[Device, ...]   # in llama.cpp's order: RPC servers, then GPUs
    host: Device | None           # system memory, llama.cpp's 'CPU' device
    warnings: tuple[str, ...]
    source_note: str              # one line for people: where the devices came from


def _checked(devices: Sequence[object], origin: str) -> list[Device]:
    bad = [d for d in devices if not isinstance(d, Device)]
    if bad:
        raise GpulabError(f"{origin} returned {type(bad[0]).__name__}, not gpulab Device")
    return list(devices)  # type: ignore[arg-type]


def _rpc_first(devices: list[Device]) -> list[Device]:
    # llama_model_load_from_file_impl (src/llama.cpp) inserts the RPC devices at the front of
    # model->devices, after collecting all GPU-type devices in registration order.
    return [d for d in devices if d.kind == "rpc"] + [d for d in devices if d.kind != "rpc"]


def _count(n: int, what: str) -> str:
    return f"{n} {what}" + ("" if n == 1 else "s")


def _describe(devices: Sequence[Device]) -> str:
    models = Counter(d.description or d.name for d in devices)
    return ", ".join(f"{m} x{n}" if n > 1 else m for m, n in models.items())


def detect_devices(*, sim: str | None = None, rpc_devices: Callable[[], Sequence[Device]] | None = None,
                   llama_devices: Callable[[], Sequence[Device]] | None = None, use_nvml: bool = True,
                   probe: DeviceProbe | None = None, env: Mapping[str, str] | None = None) -> DeviceSet:
    """The devices to plan for, in llama.cpp's order, plus the host memory.

    sim            a spec such as '24GiB,24GiB' (see parse_sim_spec): replaces detection entirely.
    rpc_devices    () -> the RPC servers' devices as llama.cpp names them; they come first.
    llama_devices  () -> llama.cpp's own GPUs, taken instead of NVML's.
    use_nvml       take the GPUs from NVML (the default); `probe` replaces the real NvmlProbe.
    env            where CUDA_VISIBLE_DEVICES / CUDA_DEVICE_ORDER are read (default os.environ).
    """
    host = host_device()
    if sim is not None:
        devices = parse_sim_spec(sim)
        return DeviceSet(tuple(devices), host, (),
                         f"simulated: {_count(len(devices), 'device')} from {sim.strip()!r}")

    warnings: list[str] = []
    rpc_devs = _checked(rpc_devices(), "rpc_devices") if rpc_devices is not None else []
    gpus: list[Device] = []
    why_none, origin = "NVML not used", ""
    if llama_devices is not None:
        gpus = [d for d in _checked(llama_devices(), "llama_devices") if d.is_offload and d.kind != "rpc"]
        why_none, origin = "llama.cpp sees no GPU", "llama.cpp"
    elif use_nvml:
        origin = "NVML"
        own_probe = probe is None
        if probe is None:
            from .nvml import NvmlProbe
            probe = NvmlProbe()
        try:
            if probe.available():
                gpus, probe_warnings = probe.cuda_devices(env)
                warnings.extend(probe_warnings)
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
        endpoints = list(dict.fromkeys(d.endpoint for d in rpc_devs if d.endpoint))
        parts.append(_count(len(rpc_devs), "RPC device") + f" ({', '.join(endpoints)})")
    if gpus:
        parts.append(f"{origin}: {_count(len(gpus), 'GPU')} ({_describe(gpus)})")
    if not gpus:
        if devices:
            parts.append(f"no GPU found ({why_none})")
        else:
            parts.append(f"no GPU found ({why_none}); {NO_GPU_HINT}")
    return DeviceSet(tuple(devices), host, tuple(warnings), "; ".join(parts))
