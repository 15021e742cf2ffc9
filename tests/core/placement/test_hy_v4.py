"""hy_v4's compute buffers and cache (gpulab/core/placement/hy_v4.py, gguf_arch's indexer rows) against llama.cpp's.

The expected figures are the `compute buffer size` and KV lines llama.cpp logged (MiB, two decimals) for the model
of gpulab.sources.arch_models on CPU RPC devices, as tests/integration/test_arch_matrix_vs_llama.py loads it
(branch newarchs' matrix run). Sized as deepseek2's absorbed MLA before, the second device was 15.01 MiB low at
-ts 1,1 (the hyper-connections' f32 copies and reductions).
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from gpulab import SplitConfig, plan, read_profile
from gpulab.core.devices import Device
from gpulab.core.placement.hy_v4 import hy_v4_replayable
from gpulab.sources.arch_models import write_arch_model

MiB = 1024**2
TS11 = SplitConfig(tensor_split=(1, 1), n_ctx=1024, devices=("RPC0", "RPC1"))


@pytest.fixture(scope="module")
def hy(tmp_path_factory):
    return read_profile(write_arch_model(tmp_path_factory.mktemp("hy") / "hy_v4.gguf", "hy_v4"))


def rpc(n: int) -> list[Device]:
    return [Device(name=f"RPC{i}", total_bytes=64 << 30, free_bytes=64 << 30, source="rpc", kind="rpc")
            for i in range(n)]


@pytest.mark.parametrize("config,expected", [
    (TS11, {"RPC0": 42.03, "RPC1": 58.04, "CPU": 14.04}),
    # layers on the host: the reduce of the output's copies runs on the last layer's device and its view is
    # copied to the output device, where the product reuses the copy in place
    (SplitConfig(n_gpu_layers=4, tensor_split=(1, 1, 1), n_ctx=1024),
     {"RPC0": 31.01, "RPC1": 31.01, "RPC2": 18.0, "CPU": 33.01}),
])
def test_hy_v4_compute_buffers_are_llama_cpps(hy, config, expected):
    assert hy_v4_replayable(hy)
    p = plan(hy, rpc(3), config)
    assert {d.name: round(d.compute_bytes / MiB, 2) for d in p.devices} == expected


def test_hy_v4_cache_without_an_indexer_is_the_plain_mla_cache(hy):
    # create_memory (src/llama-model.cpp): attention.indexer.top_k 0 makes a llama_kv_cache, K 320 only (MLA);
    # llama.cpp logs 2.50 and 1.25 MiB at -ts 1,1 -c 1024 (4 and 2 layers)
    p = plan(hy, rpc(2), TS11)
    assert p.device("RPC0").kv_bytes == 4 * 1024 * 320 * 2 and p.device("RPC1").kv_bytes == 2 * 1024 * 320 * 2
    assert not p.doubts


def test_hy_v4_with_the_dsa_indexer_is_not_replayed_and_says_so(hy):
    dsa = replace(hy, metadata={**hy.metadata, "hy_v4.attention.indexer.top_k": 64})
    assert not hy_v4_replayable(dsa)
    (doubt,) = plan(dsa, rpc(2), TS11).doubts
    assert doubt.term == "compute" and "does not build" in doubt.text


def test_hy_v4_indexer_cache_rows_follow_its_indexer_types():
    """With an indexer (top_k > 0) create_memory makes a llama_kv_cache_dsa whose indexer cache holds the layers
    attention.indexer.types marks full (hy-v4.cpp's loader; none are without the key); without one, none."""
    from gpulab.sources.gguf_arch import _indexer_rows

    def fail(msg: str) -> Exception:
        return ValueError(msg)

    kv = {"hy_v4.attention.indexer.key_length": 128, "hy_v4.attention.indexer.top_k": 64,
          "hy_v4.attention.indexer.types": 1}
    assert _indexer_rows("hy_v4", kv, 4, 3, [False] * 4, [False] * 4, 320, fail) == [128, 128, 128, 0]
    no_indexer = {**kv, "hy_v4.attention.indexer.top_k": 0}
    assert _indexer_rows("hy_v4", no_indexer, 4, 3, [False] * 4, [False] * 4, 320, fail) == [0] * 4
