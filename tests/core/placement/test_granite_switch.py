"""graniteswitch's compute buffers (gpulab/core/placement/granite_switch.py) against llama.cpp's.

The expected figures are the `compute buffer size` lines llama.cpp logged (MiB, two decimals) for the model of
gpulab.sources.arch_models on CPU RPC devices, as tests/integration/test_arch_matrix_vs_llama.py loads it
(branch newarchs' matrix run). Sized as a llama-like graph before, the output device was 119 MiB too high at
-ts 1,2,1 -c 4096 (the router layer's cache counted as a full layer's attention) and the host 8 MiB.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from gpulab import SplitConfig, plan, read_profile
from gpulab.core.devices import Device
from gpulab.core.placement.granite_switch import switch_replayable
from gpulab.sources.arch_models import write_arch_model

MiB = 1024**2


@pytest.fixture(scope="module")
def switch(tmp_path_factory):
    return read_profile(write_arch_model(tmp_path_factory.mktemp("switch") / "graniteswitch.gguf", "graniteswitch"))


def rpc(n: int) -> list[Device]:
    return [Device(name=f"RPC{i}", total_bytes=64 << 30, free_bytes=64 << 30, source="rpc", kind="rpc")
            for i in range(n)]


@pytest.mark.parametrize("config,expected", [
    # pipelined, a quantized cache and flash attention: the router's attention on the output device
    (SplitConfig(tensor_split=(3, 1), n_ctx=2048, devices=("RPC0", "RPC1"), type_k="q8_0", type_v="q8_0",
                 flash_attn="on"), {"RPC0": 41.68, "RPC1": 34.18, "CPU": 10.2}),
    # one device: the router's view of the attention output (1 of 64 floats a row) stays where it was made
    (SplitConfig(split_mode="none", main_gpu=1, n_ctx=1024, flash_attn="off"), {"RPC1": 46.26, "CPU": 3.02}),
    # -ts 1,1: the strided view of the router's output is copied whole (ggml_nbytes: 128 KiB) to the first
    # device, where the slot's cont runs
    (SplitConfig(tensor_split=(1, 1), n_ctx=1024, devices=("RPC0", "RPC1")), {"RPC0": 37.54, "CPU": 6.08}),
])
def test_switch_compute_buffers_are_llama_cpps(switch, config, expected):
    assert switch_replayable(switch)
    p = plan(switch, rpc(3), config)
    got = {d.name: round(d.compute_bytes / MiB, 2) for d in p.devices if d.name in expected}
    assert got == expected
    assert not [d for d in p.doubts if d.term == "compute"]


def test_a_switch_file_without_its_lora_slots_is_not_replayed(switch):
    layers = (replace(switch.layers[0], tensors=tuple(t for t in switch.layers[0].tensors if ".lora_" not in t.name)),
              *switch.layers[1:])
    assert not switch_replayable(replace(switch, layers=layers))
