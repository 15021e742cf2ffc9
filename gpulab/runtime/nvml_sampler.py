"""A small background sampler of GPU memory during a load and a measurement (NVML).

    with NvmlSampler() as s:          # nothing happens where NVML is not available
        ...load, measure...
    s.peak_bytes        # {'CUDA0': bytes this run used at most}
    s.baseline_bytes    # {'CUDA0': device used bytes before}
    s.per_process       # True: the peaks are this process's own usage as the driver reports it

What "used" means: where the driver reports per-process usage (nvmlDeviceGetComputeRunningProcesses:
usedGpuMemory, not on WDDM or MIG without privileges) the peak is this process's own memory, CUDA
context included. Otherwise it is the device's used memory minus what was used when sampling began,
which also counts other processes' changes. Names are llama.cpp's CUDA names (CUDA_VISIBLE_DEVICES
and CUDA_DEVICE_ORDER applied, see gpulab.sources.nvml.cuda_order).
"""

from __future__ import annotations

import os
import threading

__all__ = ["NvmlSampler"]


class NvmlSampler:
    def __init__(self, probe=None, interval_s: float = 0.05, pid: int | None = None):
        self._probe = probe
        self.interval_s = interval_s
        self.pid = os.getpid() if pid is None else pid
        self.available = False
        self.reason: str | None = None           # why there are no samples, when there are none
        self.baseline_bytes: dict[str, int] = {}
        self.peak_bytes: dict[str, int] = {}
        self.uuids: dict[str, str] = {}
        self.per_process = False
        self.n_samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._names: list[tuple[str, str]] = []  # (CUDA name, uuid)

    def _snapshot(self) -> dict[str, tuple[int | None, int | None]]:
        """{name: (device used bytes, this process's used bytes or None)}"""
        by_uuid = {}
        for g in self._probe.devices():
            by_uuid[g.uuid] = g
            for m in g.mig_devices:
                by_uuid[m.uuid] = m
        out = {}
        for name, uuid in self._names:
            g = by_uuid.get(uuid)
            if g is None:
                continue
            mine = [p.used_bytes for p in g.processes if p.pid == self.pid]
            own = mine[0] if mine and mine[0] is not None else None
            out[name] = (g.used_bytes, own)
        return out

    def sample(self) -> None:
        """One sample now (the thread calls this; tests may too)."""
        snap = self._snapshot()
        self.n_samples += 1
        for name, (used, own) in snap.items():
            if own is not None:
                if not self.per_process:       # switch to per-process figures once the driver gives them
                    self.per_process = True
                    self.peak_bytes = {}
                value = own
            elif self.per_process:
                continue
            else:
                if used is None:
                    continue
                value = max(0, used - self.baseline_bytes.get(name, used))
            self.peak_bytes[name] = max(self.peak_bytes.get(name, 0), value)

    def start(self) -> NvmlSampler:
        if self._probe is None:
            from ..sources.nvml import NvmlProbe
            self._probe = NvmlProbe()
        if not self._probe.available():
            self.reason = self._probe.unavailable_reason or "NVML is not available"
            return self
        try:
            devices, _ = self._probe.cuda_devices()
        except Exception as e:  # noqa: BLE001 - sampling is best effort, never fails a run
            self.reason = f"NVML: {e}"
            return self
        self._names = [(d.name, d.uuid) for d in devices]
        self.uuids = dict(self._names)
        if not self._names:
            self.reason = "NVML sees no GPU"
            return self
        self.available = True
        try:
            for name, (used, _own) in self._snapshot().items():
                if used is not None:
                    self.baseline_bytes[name] = used
        except Exception as e:  # noqa: BLE001
            self.available, self.reason = False, f"NVML: {e}"
            return self
        self._thread = threading.Thread(target=self._loop, name="gpulab-nvml-sampler", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sample()
            except Exception as e:  # noqa: BLE001
                self.reason = f"NVML sampling stopped: {e}"
                return

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(5)
            self._thread = None
            try:
                self.sample()   # one last sample, so a short run has at least one
            except Exception:  # noqa: BLE001
                pass

    def __enter__(self) -> NvmlSampler:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
