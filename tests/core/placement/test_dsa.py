"""deepseek32's and glm-dsa's compute buffers (gpulab/core/placement/dense.py: _Mla masked by _Indexer) against
llama.cpp's.

The expected figures are the `compute buffer size` lines llama.cpp logged (MiB, two decimals) for the models of
gpulab.sources.arch_models on CPU RPC devices, as tests/integration/test_arch_matrix_vs_llama.py loads them (main's
matrix run before branch dsa). Sized as deepseek2's absorbed MLA before, they were up to 19.5 MiB low per device
(-ts 1,1,1 with a q4_0 cache: 55.03 MiB predicted against 74.14 logged on RPC0): the indexer's products, its
f32 scores over every cell and the mask rebuilt from the top-k.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from arch_settings import SETTINGS, rpc
from gpulab import plan
from gpulab.core.placement.compute import replay_for
from gpulab.core.placement.dense import dsa_full_layers

MiB = 1024**2


@pytest.mark.parametrize("arch,config,expected", [
    ("deepseek32", SETTINGS["ts-3-1-q8-fa"], {"RPC0": 58.15, "RPC1": 26.0, "CPU": 26.12}),
    ("deepseek32", SETTINGS["ts-1-1"], {"RPC0": 50.14, "RPC1": 47.11, "CPU": 18.12}),
    # layers on the host: the indexer and the attention of layers 4 and 5 run there
    ("deepseek32", SETTINGS["ngl4-ts-1-1-1"], {"RPC0": 34.03, "RPC1": 33.03, "RPC2": 18.0, "CPU": 38.07}),
    # without flash attention: an f32 KQ mask, rebuilt from the top-k in f32
    ("deepseek32", SETTINGS["none-main-1-fa-off"], {"RPC1": 69.07, "CPU": 7.03}),
    ("deepseek32", SETTINGS["ts-1-1-1-q4-fa"], {"RPC0": 74.14, "RPC1": 74.14, "RPC2": 69.11, "CPU": 42.12}),
    # glm-dsa: deepseek32's graph (every layer a full indexer below 1M tokens of context), sigmoid gating
    ("glm-dsa", SETTINGS["ts-3-1-q8-fa"], {"RPC0": 58.17, "RPC1": 26.0, "CPU": 26.12}),
    ("glm-dsa", SETTINGS["ts-1-1"], {"RPC0": 50.16, "RPC1": 47.11, "CPU": 18.12}),
    ("glm-dsa", SETTINGS["ngl4-ts-1-1-1"], {"RPC0": 34.03, "RPC1": 33.03, "RPC2": 18.0, "CPU": 38.08}),
    ("glm-dsa", SETTINGS["none-main-1-fa-off"], {"RPC1": 69.09, "CPU": 7.03}),
    ("glm-dsa", SETTINGS["ts-1-1-1-q4-fa"], {"RPC0": 74.15, "RPC1": 74.15, "RPC2": 69.11, "CPU": 42.12}),
])
def test_dsa_compute_buffers_are_llama_cpps(arch_models, arch, config, expected):
    profile = arch_models[arch]
    assert replay_for(profile) == "dense"
    p = plan(profile, rpc(3), config)
    assert {d.name: round(d.compute_bytes / MiB, 2) for d in p.devices} == expected
    assert not p.doubts


@pytest.mark.parametrize("config,expected", [
    (SETTINGS["ts-1-1"], {"RPC0": 50.16, "RPC1": 43.05, "CPU": 18.12}),
    (SETTINGS["ngl4-ts-1-1-1"], {"RPC0": 34.03, "RPC1": 32.01, "RPC2": 18.0, "CPU": 38.08}),
    (SETTINGS["ts-1-1-1-q4-fa"], {"RPC0": 74.16, "RPC1": 74.16, "RPC2": 53.04, "CPU": 42.12}),
    (SETTINGS["none-main-1-fa-off"], {"RPC1": 69.09, "CPU": 7.03}),
])
def test_glm_dsa_shared_indexer_layers_reuse_the_last_top_k(arch_models, config, expected):
    """GLM 5.2's shared indexer layers (attention.indexer.types 1,0,0,1,0,0 written into the matrix's glm-dsa model,
    u32 array; its indexer tensors kept: loaded, not read): llama.cpp's logged compute buffers, the same run on
    CPU RPC devices (branch dsa). Layers 1, 2, 4 and 5 run no indexer and mask with the last full layer's top-k,
    so the second device's buffer is 4 MiB below the all-full file's at -ts 1,1."""
    glm = arch_models["glm-dsa"]
    shared = replace(glm, metadata={**glm.metadata, "glm-dsa.attention.indexer.types": [1, 0, 0, 1, 0, 0]})
    p = plan(shared, rpc(3), config)
    assert {d.name: round(d.compute_bytes / MiB, 2) for d in p.devices} == expected
    assert not p.doubts


def test_glm_dsa_indexer_layers_follow_its_types(arch_models):
    """glm-dsa's loader: attention.indexer.types where the file has it; without it every layer is a full indexer
    below 1M tokens of context (GLM 5, 5.1), GLM 5.2's built-in pattern above (not read: not replayed, a doubt)."""
    glm = arch_models["glm-dsa"]
    assert dsa_full_layers(glm) == [True] * 6
    shared = replace(glm, metadata={**glm.metadata, "glm-dsa.attention.indexer.types": [1, 0, 0, 1, 0, 0]})
    assert dsa_full_layers(shared) == [True, False, False, True, False, False]
    assert replay_for(shared) == "dense"
    v52 = replace(glm, metadata={**glm.metadata, "glm-dsa.context_length": 1048576})
    assert dsa_full_layers(v52) is None and replay_for(v52) is None
    (doubt,) = plan(v52, rpc(2), SETTINGS["ts-1-1"]).doubts
    assert doubt.term == "compute"
