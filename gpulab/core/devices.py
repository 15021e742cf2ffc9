"""Device: one place llama.cpp can put layers, named as llama.cpp names it.

Simulated "what-if" devices come from a spec string; the other sources (NVML, the devices
llama.cpp sees, RPC endpoints) live in `gpulab.sources` and produce the same dataclass.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from .errors import DeviceSpecError
from .units import parse_bytes

__all__ = ["Device", "DeviceKind", "OFFLOAD_KINDS", "parse_sim_spec", "parse_endpoints", "split_endpoint",
           "HOST_NAME"]

HOST_NAME = "CPU"  # llama.cpp's name for the host device, and the last row of every plan

# enum ggml_backend_dev_type (CPU, GPU, IGPU, ACCEL, META), with RPC servers' GPU-type devices
# told apart: llama.cpp lists them first ("to minimize network transfers")
DeviceKind = Literal["gpu", "igpu", "rpc", "cpu", "accel", "meta"]
OFFLOAD_KINDS: frozenset[str] = frozenset({"gpu", "igpu", "rpc"})   # can hold layers


@dataclass(frozen=True)
class Device:
    name: str                 # 'CUDA0', 'RPC0', 'SIM1': what llama.cpp prints in its logs
    total_bytes: int
    free_bytes: int
    source: str               # 'nvml' | 'llama' | 'rpc' | 'sim' | 'host'
    kind: DeviceKind = "gpu"
    description: str = ""
    uuid: str = ""
    pci_bus_id: str = ""
    endpoint: str = ""        # 'host:port' for RPC devices
    bandwidth_bytes_per_s: float | None = None   # memory bandwidth, when known
    # runtime memory beyond llama.cpp's buffers (CUDA context, cuBLAS workspaces), learned from
    # NVML by earlier runs on this device (gpulab.storage.overheads); the planner counts it
    overhead_bytes: int = 0
    # overhead_bytes is gpulab's CUDA default (gpulab.core.placement.process.DEFAULT_CUDA_OVERHEAD_BYTES),
    # nothing learned on this GPU yet: shown as a default wherever it appears
    overhead_is_default: bool = False
    server_index: int = 0     # RPC: the device's index within its server (buffer type RPC<i>[endpoint])
    # the host: the weight types llama.cpp's CPU backend repacks into CPU_REPACK on this CPU
    # (ggml-cpu/repack.cpp, decided by the instruction sets the backend was built for)
    repack_types: tuple[str, ...] = ()
    host: str = ""            # the host it sits on, where a cluster description says (gpulab.core.cluster)

    def __post_init__(self) -> None:
        if self.total_bytes < 0 or self.free_bytes < 0:
            raise DeviceSpecError(f"device {self.name}: memory cannot be negative")
        if self.free_bytes > self.total_bytes:
            raise DeviceSpecError(
                f"device {self.name}: free memory ({self.free_bytes} B) exceeds total ({self.total_bytes} B)")

    @property
    def used_bytes(self) -> int:
        return self.total_bytes - self.free_bytes

    @property
    def is_offload(self) -> bool:
        """Can hold layers: a GPU, an integrated GPU or an RPC server's device (not the CPU, nor
        CPU helpers such as BLAS and AMX, nor the meta device of -sm tensor)."""
        return self.kind in OFFLOAD_KINDS


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """'host:port' -> (host, port), split where ggml-rpc's parse_endpoint splits (the first ':',
    so no IPv6 literals); DeviceSpecError for anything else."""
    host, sep, port = endpoint.strip().partition(":")
    p = int(port) if port.isdigit() else -1
    if not sep or not host or not 0 < p < 65536:
        raise DeviceSpecError(f"RPC endpoint {endpoint!r} is not HOST:PORT with a port from 1 to 65535 "
                              "(e.g. 127.0.0.1:50052)")
    return host, p


def parse_endpoints(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """'h1:50052,h2:50052' (llama.cpp's --rpc) or a list -> validated endpoints, in order."""
    if not value:
        return ()
    items = value.split(",") if isinstance(value, str) else [str(x) for x in value]
    out = tuple(x.strip() for x in items if x.strip())
    for e in out:
        split_endpoint(e)
    return out


# '24GiB', '24GiB@20GiB' (total@free), optionally ':1008GB/s' (memory bandwidth)
_SIM_ITEM = re.compile(r"^(?P<total>[^@:]+)(?:@(?P<free>[^@:]+))?(?::(?P<bw>[^@:]+)/s)?$")


def parse_sim_spec(spec: str) -> list[Device]:
    """'24GiB,24GiB,12GiB@10GiB' -> three simulated devices SIM0..SIM2.

    Each item is TOTAL[@FREE][:BANDWIDTH/s]; free defaults to total. An 'Nx' prefix repeats
    an item: '8x24GiB' is eight 24 GiB devices.
    """
    if not spec or not spec.strip():
        raise DeviceSpecError("empty device spec (try e.g. --sim 24GiB,24GiB or --sim 8x80GiB)")
    devices: list[Device] = []
    for raw in spec.split(","):
        item = raw.strip().replace(" ", "")
        count = 1
        rep = re.match(r"^(\d+)[x*](.+)$", item)
        if rep:
            count, item = int(rep.group(1)), rep.group(2)
            if count < 1 or count > 256:
                raise DeviceSpecError(f"bad repeat count in device spec item {raw.strip()!r}")
        m = _SIM_ITEM.match(item)
        try:
            if m is None or not re.search(r"[a-zA-Z]$", m.group("total")):  # '24' is a typo, not 24 bytes
                raise ValueError(item)
            total = parse_bytes(m.group("total"))
            free = parse_bytes(m.group("free")) if m.group("free") else total
            bw = float(parse_bytes(m.group("bw"))) if m.group("bw") else None
        except ValueError:
            raise DeviceSpecError(
                f"cannot parse device spec item {raw.strip()!r}: expected TOTAL[@FREE][:BW/s], "
                "e.g. '24GiB', '24GiB@20GiB', '80GiB:3350GB/s', '8x24GiB'") from None
        if free > total:
            raise DeviceSpecError(f"device spec item {raw.strip()!r}: free exceeds total")
        for _ in range(count):
            i = len(devices)
            devices.append(Device(name=f"SIM{i}", total_bytes=total, free_bytes=free, source="sim",
                                  kind="gpu", description="simulated", bandwidth_bytes_per_s=bw))
    return devices
