"""The architecture matrix's settings, its CPU RPC devices and its models, shared by
tests/integration/test_arch_matrix_vs_llama.py and the placement tests that hold gpulab to the figures llama.cpp
logged in that matrix (tests/core/placement)."""

from __future__ import annotations

from pathlib import Path

from gpulab import SplitConfig, read_profile
from gpulab.core.devices import Device
from gpulab.core.placement.plan import Plan
from gpulab.core.profile import ModelProfile
from gpulab.sources.arch_models import write_arch_model

MiB = 1024**2

SETTINGS = {
    # unequal split, quantized cache, flash attention: the matrix runs this one by default
    "ts-3-1-q8-fa": SplitConfig(tensor_split=(3, 1), n_ctx=2048, devices=("RPC0", "RPC1"), type_k="q8_0",
                                type_v="q8_0", flash_attn="on"),
    "ts-1-1": SplitConfig(tensor_split=(1, 1), n_ctx=1024, devices=("RPC0", "RPC1")),
    "ngl4-ts-1-1-1": SplitConfig(n_gpu_layers=4, tensor_split=(1, 1, 1), n_ctx=1024),
    "none-main-1-fa-off": SplitConfig(split_mode="none", main_gpu=1, n_ctx=1024, flash_attn="off"),
    # past every sliding window here (512 at most), quantized K, transposed V
    "ts-1-2-1-q8k-fa-off": SplitConfig(tensor_split=(1, 2, 1), n_ctx=4096, type_k="q8_0", flash_attn="off"),
    "ts-1-1-1-q4-fa": SplitConfig(tensor_split=(1, 1, 1), n_ctx=4096, type_k="q4_0", type_v="q4_0", flash_attn="on"),
}


def rpc(n: int) -> list[Device]:
    """n CPU RPC devices of 64 GiB, named as llama.cpp names them (RPC0, RPC1, ...)."""
    return [Device(name=f"RPC{i}", total_bytes=64 << 30, free_bytes=64 << 30, source="rpc", kind="rpc")
            for i in range(n)]


class ArchModels:
    """Each architecture's model (gpulab.sources.arch_models), written under root and read on first use."""

    def __init__(self, root: Path) -> None:
        self._root = root
        self._read: dict[str, ModelProfile] = {}

    def __getitem__(self, arch: str) -> ModelProfile:
        if arch not in self._read:
            self._read[arch] = read_profile(write_arch_model(self._root / f"{arch}.gguf", arch))
        return self._read[arch]


def servers(config: SplitConfig) -> int:
    """The RPC devices a placement test plans a setting over: those it names (--device), else three."""
    return len(config.devices) or 3


def logged(*per_setting: dict[str, float] | None) -> dict[str, dict[str, float] | None]:
    """llama.cpp's figures for one model, one per setting in SETTINGS' order (None: a setting llama.cpp refuses)."""
    return dict(zip(SETTINGS, per_setting, strict=True))


def off_by_more_than_a_mib(plan: Plan, measured: dict[str, int]) -> dict[str, tuple[int, int]]:
    """The devices whose planned compute buffer is more than 1 MiB from llama.cpp's: {device: (planned, logged)}."""
    got = {d.name: d.compute_bytes for d in plan.devices}
    return {name: (got[name], want) for name, want in measured.items() if abs(got[name] - want) > MiB}
