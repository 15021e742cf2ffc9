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

from gpulab import SplitConfig, plan, read_profile
from gpulab.core.devices import Device
from gpulab.core.placement.compute import replay_for
from gpulab.core.placement.dense import dsa_full_layers
from gpulab.sources.arch_models import write_arch_model

MiB = 1024**2
TS31_Q8_FA = SplitConfig(tensor_split=(3, 1), n_ctx=2048, devices=("RPC0", "RPC1"), type_k="q8_0", type_v="q8_0",
                         flash_attn="on")
TS11 = SplitConfig(tensor_split=(1, 1), n_ctx=1024, devices=("RPC0", "RPC1"))
NGL4 = SplitConfig(n_gpu_layers=4, tensor_split=(1, 1, 1), n_ctx=1024)
NONE_FA_OFF = SplitConfig(split_mode="none", main_gpu=1, n_ctx=1024, flash_attn="off")
TS111_Q4_FA = SplitConfig(tensor_split=(1, 1, 1), n_ctx=4096, type_k="q4_0", type_v="q4_0", flash_attn="on")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("dsa")
    return {a: read_profile(write_arch_model(root / f"{a}.gguf", a)) for a in ("deepseek32", "glm-dsa")}


def rpc(n: int) -> list[Device]:
    return [Device(name=f"RPC{i}", total_bytes=64 << 30, free_bytes=64 << 30, source="rpc", kind="rpc")
            for i in range(n)]


@pytest.mark.parametrize("arch,config,expected", [
    ("deepseek32", TS31_Q8_FA, {"RPC0": 58.15, "RPC1": 26.0, "CPU": 26.12}),
    ("deepseek32", TS11, {"RPC0": 50.14, "RPC1": 47.11, "CPU": 18.12}),
    # layers on the host: the indexer and the attention of layers 4 and 5 run there
    ("deepseek32", NGL4, {"RPC0": 34.03, "RPC1": 33.03, "RPC2": 18.0, "CPU": 38.07}),
    # without flash attention: an f32 KQ mask, rebuilt from the top-k in f32
    ("deepseek32", NONE_FA_OFF, {"RPC1": 69.07, "CPU": 7.03}),
    ("deepseek32", TS111_Q4_FA, {"RPC0": 74.14, "RPC1": 74.14, "RPC2": 69.11, "CPU": 42.12}),
    # glm-dsa: deepseek32's graph (every layer a full indexer below 1M tokens of context), sigmoid gating
    ("glm-dsa", TS31_Q8_FA, {"RPC0": 58.17, "RPC1": 26.0, "CPU": 26.12}),
    ("glm-dsa", TS11, {"RPC0": 50.16, "RPC1": 47.11, "CPU": 18.12}),
    ("glm-dsa", NGL4, {"RPC0": 34.03, "RPC1": 33.03, "RPC2": 18.0, "CPU": 38.08}),
    ("glm-dsa", NONE_FA_OFF, {"RPC1": 69.09, "CPU": 7.03}),
    ("glm-dsa", TS111_Q4_FA, {"RPC0": 74.15, "RPC1": 74.15, "RPC2": 69.11, "CPU": 42.12}),
])
def test_dsa_compute_buffers_are_llama_cpps(models, arch, config, expected):
    profile = models[arch]
    assert replay_for(profile) == "dense"
    p = plan(profile, rpc(3), config)
    assert {d.name: round(d.compute_bytes / MiB, 2) for d in p.devices} == expected
    assert not p.doubts


@pytest.mark.parametrize("config,expected", [
    (TS11, {"RPC0": 50.16, "RPC1": 43.05, "CPU": 18.12}),
    (NGL4, {"RPC0": 34.03, "RPC1": 32.01, "RPC2": 18.0, "CPU": 38.08}),
    (TS111_Q4_FA, {"RPC0": 74.16, "RPC1": 74.16, "RPC2": 53.04, "CPU": 42.12}),
    (NONE_FA_OFF, {"RPC1": 69.09, "CPU": 7.03}),
])
def test_glm_dsa_shared_indexer_layers_reuse_the_last_top_k(models, config, expected):
    """GLM 5.2's shared indexer layers (attention.indexer.types 1,0,0,1,0,0 written into the matrix's glm-dsa model,
    u32 array; its indexer tensors kept: loaded, not read): llama.cpp's logged compute buffers, the same run on
    CPU RPC devices (branch dsa). Layers 1, 2, 4 and 5 run no indexer and mask with the last full layer's top-k,
    so the second device's buffer is 4 MiB below the all-full file's at -ts 1,1."""
    glm = models["glm-dsa"]
    shared = replace(glm, metadata={**glm.metadata, "glm-dsa.attention.indexer.types": [1, 0, 0, 1, 0, 0]})
    p = plan(shared, rpc(3), config)
    assert {d.name: round(d.compute_bytes / MiB, 2) for d in p.devices} == expected
    assert not p.doubts


def test_glm_dsa_indexer_layers_follow_its_types(models):
    """glm-dsa's loader: attention.indexer.types where the file has it; without it every layer is a full indexer
    below 1M tokens of context (GLM 5, 5.1), GLM 5.2's built-in pattern above (not read: not replayed, a doubt)."""
    glm = models["glm-dsa"]
    assert dsa_full_layers(glm) == [True] * 6
    shared = replace(glm, metadata={**glm.metadata, "glm-dsa.attention.indexer.types": [1, 0, 0, 1, 0, 0]})
    assert dsa_full_layers(shared) == [True, False, False, True, False, False]
    assert replay_for(shared) == "dense"
    v52 = replace(glm, metadata={**glm.metadata, "glm-dsa.context_length": 1048576})
    assert dsa_full_layers(v52) is None and replay_for(v52) is None
    (doubt,) = plan(v52, rpc(2), TS11).doubts
    assert doubt.term == "compute"
