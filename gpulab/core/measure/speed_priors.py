"""What the throughput model knows of a device before it is calibrated, and the keys its
calibration is kept under (pure: the host's CPU model and thread count come in as arguments).

Uncalibrated speeds come, in order, from a spec (--sim 80GiB:3350GB/s), NVML's theoretical
bandwidth (memory clock x bus width), an RPC round trip measured earlier, else the defaults of
gpulab.core.measure.speed. The cache itself is gpulab.storage.speed_cache.
"""

from __future__ import annotations

from ..devices import HOST_NAME, Device
from .speed import DEFAULT_GPU, DEFAULT_HOST, DeviceSpeed, LinkSpeed, speed_from_bandwidth

__all__ = ["host_key", "device_key", "kind_of_key", "pci_bus_id", "uncalibrated_speed", "uncalibrated_from_info",
           "rpc_default", "link_default", "RPC_DEFAULT_RTT"]


def host_key(cpu_model: str, n_threads: int) -> str:
    """The host's key: its CPU model and the threads it ran with (a speed per thread count)."""
    return f"cpu:{cpu_model}:t{int(n_threads)}"


def pci_bus_id(bus_id: str) -> str:
    """'00000000:01:00.0' (NVML) and '0000:01:00.0' (llama.cpp) -> '0000:01:00.0'."""
    parts = bus_id.strip().lower().split(":")
    if len(parts) == 3:
        try:
            return f"{int(parts[0], 16):04x}:{parts[1]}:{parts[2]}"
        except ValueError:
            pass
    return bus_id.strip().lower()


def device_key(d: Device, host: str) -> str | None:
    """The cache key of a device; `host` is the host's key (host_key); None for simulated
    devices (never calibrated). GPUs by PCI bus id, else UUID, else name and description: the
    identity that survives renumbering by CUDA_VISIBLE_DEVICES."""
    if d.kind == "cpu" or d.name == HOST_NAME:
        return host
    if d.source == "sim":
        return None
    if d.kind == "rpc" or d.endpoint:
        return f"rpc:{d.endpoint or d.description}"
    if d.pci_bus_id:
        return f"pci:{pci_bus_id(d.pci_bus_id)}"
    if d.uuid:
        return f"uuid:{d.uuid}"
    return f"dev:{d.name}:{d.description}"


def kind_of_key(key: str) -> str:
    return "cpu" if key.startswith("cpu:") else "rpc" if key.startswith("rpc:") else "gpu"



RPC_DEFAULT_RTT = 150e-6      # loopback TCP round trip incl. the server's dispatch, when not measured


def rpc_default(rtt: float | None, endpoint: str = "") -> DeviceSpeed:
    # a step on an RPC device: inputs set, graph computed, result fetched: about three round trips
    r = rtt if rtt else RPC_DEFAULT_RTT
    note = f"RPC round trip {r * 1e6:.0f} us" + ("" if rtt else " (assumed)")
    return DeviceSpeed(DEFAULT_GPU.bandwidth_bytes_per_s, DEFAULT_GPU.flops_per_s, 3 * r + 50e-6, "default",
                       layer_overhead_s=DEFAULT_GPU.layer_overhead_s, layer_token_s=DEFAULT_GPU.layer_token_s,
                       note=note)


def link_default(kind: str, rtt: float | None = None, endpoint: str = "") -> LinkSpeed:
    if kind == "rpc":
        loopback = endpoint.startswith(("127.", "localhost", "[::1]", "::1")) or not endpoint
        return LinkSpeed(latency_s=2 * (rtt or RPC_DEFAULT_RTT), bytes_per_s=(1e9 if loopback else 0.1e9))
    return LinkSpeed()


def uncalibrated_speed(d: Device, info: dict | None = None) -> DeviceSpeed:
    """What is known of a device without calibration: its spec (--sim ...:BW/s), NVML's
    theoretical bandwidth, an RPC round trip measured earlier, else the defaults."""
    info = info or {}
    if d.kind == "cpu" or d.name == HOST_NAME:
        return DEFAULT_HOST
    if d.bandwidth_bytes_per_s:
        return speed_from_bandwidth(d.bandwidth_bytes_per_s, "spec" if d.source == "sim" else "nvml")
    if info.get("peak_bandwidth_bytes_per_s"):
        return speed_from_bandwidth(info["peak_bandwidth_bytes_per_s"], "nvml")
    if d.kind == "rpc":
        return rpc_default(info.get("rtt_s"), d.endpoint)
    return DEFAULT_GPU


def uncalibrated_from_info(key: str, info: dict) -> DeviceSpeed:
    kind = kind_of_key(key)
    if kind == "cpu":
        return DEFAULT_HOST
    if info.get("peak_bandwidth_bytes_per_s"):
        return speed_from_bandwidth(info["peak_bandwidth_bytes_per_s"], "nvml")
    if kind == "rpc":
        return rpc_default(info.get("rtt_s"))
    return DEFAULT_GPU
