"""One device resolver for every front end, and the processes it starts.

    with Session() as s:
        choice = s.devices(rpc="127.0.0.1:50052", for_load=True)
        choice.devices, choice.host, choice.note, choice.worker, choice.can_load

The CLI opens a Session per command, the magics one per kernel, the lab takes one (or opens its
own). The rules, the same everywhere:
- `sim`: what-if devices, plan only; exclusive with every other source.
- `virtual=N`: N llama.cpp RPC servers on this machine's CPU, started here, then as `rpc`.
- `rpc` endpoints: registered with llama.cpp only in a worker process (gpulab.runtime.worker):
  a dying RPC server aborts the process that registered it, and ggml cannot unregister one.
  Their devices are llama.cpp's view from that worker, listed first, as llama.cpp does.
- the GPUs: NVML's (its UUIDs and PCI ids survive renumbering), or llama.cpp's own list with
  `llama_devices=True` (from the worker).
- `for_load`: a worker is made ready for loads (with no endpoints: a plain one);
  `virtual_if_no_gpu`: with no GPU and no other source, 2 virtual devices (the lab, `%gpulab bench`).
Each device carries the runtime overhead learned for it (gpulab.storage.overheads).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from ..core.devices import Device, parse_endpoints
from ..core.errors import DeviceSpecError
from ..sources.detect import detect_devices

if TYPE_CHECKING:
    from .worker import Worker

__all__ = ["Session", "DeviceChoice"]


@dataclass(frozen=True)
class DeviceChoice:
    devices: tuple[Device, ...]     # offload devices, in llama.cpp's order
    host: Device | None             # system memory as llama.cpp's 'CPU'
    note: str                       # one line: where the devices came from
    warnings: tuple[str, ...]
    worker: object | None           # the Worker that loads on these devices, if any
    can_load: bool
    why_not: str = ""               # why nothing can be loaded (plan only), when not can_load

    @property
    def all_devices(self) -> list[Device]:
        return list(self.devices) + ([self.host] if self.host else [])


class Session:
    """Workers by endpoint set and virtual clusters, closed together (also at exit)."""

    def __init__(self, *, probe=None, env=None, worker_factory=None):
        self._probe = probe          # a DeviceProbe for tests; None: the real NVML
        self._env = env
        self._worker_factory = worker_factory   # endpoints -> a Runtime; None: gpulab's Worker
        self._workers: dict[tuple[str, ...], Worker] = {}
        self._clusters: list = []

    def worker(self, endpoints: Sequence[str] = ()):
        """The worker for this set of RPC endpoints (one per set, kept until close)."""
        key = tuple(endpoints)
        w = self._workers.get(key)
        if w is None:
            if self._worker_factory is None:
                from .worker import Worker
                w = Worker(key)
            else:
                w = self._worker_factory(key)
            self._workers[key] = w
        return w

    def virtual(self, n: int) -> tuple[str, ...]:
        """Start n RPC servers on this machine's CPU; their endpoints."""
        from .rpc import start_servers
        cluster = start_servers(int(n))
        self._clusters.append(cluster)
        return tuple(cluster.endpoints)

    def devices(self, *, sim: str | None = None, rpc: str | Sequence[str] | None = None,
                llama_devices: bool = False, virtual: int | None = None, for_load: bool = False,
                virtual_if_no_gpu: bool = False) -> DeviceChoice:
        endpoints = parse_endpoints(rpc)
        if sim is not None:
            if endpoints or llama_devices or virtual:
                raise DeviceSpecError("--sim replaces device detection: drop --rpc / --llama-devices / --virtual")
            found = detect_devices(sim=sim)
            return DeviceChoice(found.devices, found.host, found.source_note, found.warnings, None, False,
                                "simulated devices cannot load a model (plan only)")
        if virtual:
            endpoints = self.virtual(virtual) + endpoints
        worker = self.worker(endpoints) if (endpoints or llama_devices or for_load) else None
        seen: list[Device] | None = None

        def from_worker() -> list[Device]:
            nonlocal seen
            assert worker is not None   # only asked for where there is one
            if seen is None:
                seen = list(worker.devices())
            return seen

        found = detect_devices(
            rpc_devices=(lambda: [d for d in from_worker() if d.kind == "rpc"]) if endpoints else None,
            llama_devices=(lambda: [d for d in from_worker() if d.is_offload and d.kind != "rpc"])
            if llama_devices else None,
            probe=self._probe, env=self._env)
        if virtual_if_no_gpu and not found.devices and not virtual:
            return self.devices(virtual=2, for_load=for_load)
        devices = tuple(_with_overhead(d) for d in found.devices)
        note = found.source_note
        if virtual:
            note = (f"{virtual} virtual devices: llama.cpp RPC servers on {', '.join(endpoints[:virtual])} served "
                    f"by this machine's CPU; " + note)
        return DeviceChoice(devices, found.host, note, found.warnings, worker, worker is not None,
                            "" if worker is not None else "no worker (plan only)")

    def close(self) -> None:
        # workers first: they have the servers registered and must not outlive them mid-call
        for stop in [*(w.close for w in self._workers.values()), *(c.stop for c in self._clusters)]:
            try:
                stop()
            except Exception:  # noqa: BLE001 - best effort at exit
                pass
        self._workers.clear()
        self._clusters.clear()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _with_overhead(d: Device) -> Device:
    """The learned overhead; for a CUDA GPU with none learned yet, gpulab's labelled default.
    Detected devices only: --sim plans skip the learned overheads (imported here, off their path)."""
    from ..storage.overheads import learned_overhead
    over = learned_overhead(d)
    if over:
        return replace(d, overhead_bytes=over)
    if d.kind == "gpu" and (d.source == "nvml" or d.name.startswith("CUDA")):
        from ..core.placement.process import DEFAULT_CUDA_OVERHEAD_BYTES
        return replace(d, overhead_bytes=DEFAULT_CUDA_OVERHEAD_BYTES, overhead_is_default=True)
    return d
