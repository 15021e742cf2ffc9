"""graniteswitch's compute buffers (gpulab/core/placement/granite_switch.py) against llama.cpp's.

The expected figures are the `compute buffer size` lines llama.cpp logged (MiB, two decimals) for the model of
gpulab.sources.arch_models on CPU RPC devices, as tests/integration/test_arch_matrix_vs_llama.py loads it
(branch newarchs' matrix run). Sized as a llama-like graph before, the output device was 119 MiB too high at
-ts 1,2,1 -c 4096 (the router layer's cache counted as a full layer's attention) and the host 8 MiB.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from arch_settings import SETTINGS, rpc
from gpulab import plan
from gpulab.core.placement.granite_switch import switch_replayable

MiB = 1024**2


@pytest.mark.parametrize("config,expected", [
    # pipelined, a quantized cache and flash attention: the router's attention on the output device
    (SETTINGS["ts-3-1-q8-fa"], {"RPC0": 41.68, "RPC1": 34.18, "CPU": 10.2}),
    # one device: the router's view of the attention output (1 of 64 floats a row) stays where it was made
    (SETTINGS["none-main-1-fa-off"], {"RPC1": 46.26, "CPU": 3.02}),
    # -ts 1,1: the strided view of the router's output is copied whole (ggml_nbytes: 128 KiB) to the first
    # device, where the slot's cont runs
    (SETTINGS["ts-1-1"], {"RPC0": 37.54, "CPU": 6.08}),
])
def test_switch_compute_buffers_are_llama_cpps(arch_models, config, expected):
    switch = arch_models["graniteswitch"]
    assert switch_replayable(switch)
    p = plan(switch, rpc(3), config)
    got = {d.name: round(d.compute_bytes / MiB, 2) for d in p.devices if d.name in expected}
    assert got == expected
    assert not [d for d in p.doubts if d.term == "compute"]


def test_a_switch_file_without_its_lora_slots_is_not_replayed(arch_models):
    switch = arch_models["graniteswitch"]
    layers = (replace(switch.layers[0], tensors=tuple(t for t in switch.layers[0].tensors if ".lora_" not in t.name)),
              *switch.layers[1:])
    assert not switch_replayable(replace(switch, layers=layers))
