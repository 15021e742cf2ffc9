"""Run: one measured load of a model with a SplitConfig, in llama-bench's terms.

Produced by the runtime (gpulab.runtime.bench), stored by the results store, shown by the lab,
compared with the Plan by reconciliation. Plain data: bytes are ints, rates carry their unit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import SplitConfig
from .memory import PlannedMemory
from .report import LoadReport

__all__ = ["Throughput", "Run"]


@dataclass(frozen=True)
class Throughput:
    """One llama-bench test: pp (n_prompt > 0, n_gen == 0) or tg (n_gen > 0, n_prompt == 0)."""

    n_prompt: int
    n_gen: int
    samples_ns: tuple[int, ...]          # one per repetition, wall time of the timed part
    samples_ts: tuple[float, ...]        # tokens/s per repetition
    avg_ts: float
    stddev_ts: float

    @property
    def name(self) -> str:
        return f"pp{self.n_prompt}" if self.n_prompt else f"tg{self.n_gen}"


@dataclass(frozen=True)
class Run:
    model_path: str
    model_bytes: int
    config: SplitConfig
    report: LoadReport                   # what llama.cpp said it allocated, per device and buffer
    pp: Throughput | None = None
    tg: Throughput | None = None
    load_seconds: float = 0.0
    n_threads: int = 0
    devices: tuple[str, ...] = ()        # offload devices llama.cpp used, in its order
    nvml_peak_bytes: dict = field(default_factory=dict)   # device name -> peak used bytes during the run
    plan: PlannedMemory | None = None    # the prediction this run checks (Plan.memory())
    timestamp: str = ""                  # ISO 8601, UTC
    build: str = ""                      # llama.cpp build / commit as llama.cpp reports it
