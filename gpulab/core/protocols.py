"""The two seams where gpulab meets hardware, as Protocols: real implementations and the tests'
fakes both satisfy them, and are passed in as arguments (never patched in as globals).

- DeviceProbe: what lists the GPUs (gpulab.sources.nvml.NvmlProbe; tests pass a fake NVML).
- Runtime: what loads and measures a model on llama.cpp devices (gpulab.runtime.worker.Worker;
  the UI tests use a fake that answers with canned llama.cpp reports).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Protocol, runtime_checkable

from .config import SplitConfig
from .devices import Device
from .memory import PlannedMemory
from .report import LoadReport
from .run import Run

__all__ = ["DeviceProbe", "Runtime", "Progress"]

Progress = Callable[[str, float], object]     # (phase, fraction): 'load', 'warmup', 'pp', 'tg'


@runtime_checkable
class DeviceProbe(Protocol):
    def available(self) -> bool: ...

    def cuda_devices(self, env: Mapping[str, str] | None = None) -> tuple[list[Device], list[str]]:
        """The GPUs CUDA will number (CUDA0...), honouring CUDA_VISIBLE_DEVICES, and warnings."""
        ...

    def shutdown(self) -> None: ...


@runtime_checkable
class Runtime(Protocol):
    def devices(self) -> list[Device]:
        """The devices llama.cpp sees, the CPU included."""
        ...

    def try_devices(self) -> list[Device] | None:
        """devices(), or None at once while a load or a measurement holds the runtime."""
        ...

    def load(self, path: str | os.PathLike, config: SplitConfig, *, dry_run: bool = False,
             use_devices: bool = True, check_fit: bool = True) -> tuple[LoadReport, dict]: ...

    def measure(self, path: str | os.PathLike, config: SplitConfig | None = None, *, n_prompt: int = 512,
                n_gen: int = 128, repetitions: int = 5, n_threads: int | None = None, warmup: bool = True,
                progress: Progress | None = None, seed: int | None = None, nvml: bool = True,
                plan: PlannedMemory | None = None) -> Run: ...

    def close(self) -> None: ...
