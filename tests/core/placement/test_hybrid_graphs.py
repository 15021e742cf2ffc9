"""Compute buffers of the hybrid and recurrent graphs replayed by branch hybrid3: rwkv7 (gpulab/core/placement/
recurrent.py, src/models/rwkv7.cpp: LayerNorms with biases, the gated time mix with its group norm, two token
shifts stored as one concat, the relu-squared channel mix) and the KDA/MLA hybrids of gpulab/core/placement/kda.py:
kimi-linear (src/models/kimi-linear.cpp), bailingmoe3 (src/models/bailingmoe3.cpp) and kimi-k3
(src/models/kimi-k3.cpp: attention residuals, SiTU).

The expected figures are llama.cpp's `compute buffer size` lines (MiB, two decimals) for the architecture
matrix's models (gpulab.sources.arch_models) on CPU RPC devices, as tests/integration/
test_arch_matrix_vs_llama.py loads them (branch hybrid3's run), to the log's rounding."""

from __future__ import annotations

import pytest

from gpulab import SplitConfig, plan, read_profile
from gpulab.core.devices import Device
from gpulab.core.placement.coverage import COMPUTE_EXACT
from gpulab.sources.arch_models import write_arch_model

MiB = 1024**2
SETTINGS = {
    "ts-3-1-q8-fa": SplitConfig(tensor_split=(3, 1), n_ctx=2048, devices=("RPC0", "RPC1"), type_k="q8_0",
                                type_v="q8_0", flash_attn="on"),
    "ts-1-1": SplitConfig(tensor_split=(1, 1), n_ctx=1024, devices=("RPC0", "RPC1")),
    "ngl4-ts-1-1-1": SplitConfig(n_gpu_layers=4, tensor_split=(1, 1, 1), n_ctx=1024),
    "none-main-1-fa-off": SplitConfig(split_mode="none", main_gpu=1, n_ctx=1024, flash_attn="off"),
    "ts-1-2-1-q8k-fa-off": SplitConfig(tensor_split=(1, 2, 1), n_ctx=4096, type_k="q8_0", flash_attn="off"),
    "ts-1-1-1-q4-fa": SplitConfig(tensor_split=(1, 1, 1), n_ctx=4096, type_k="q4_0", type_v="q4_0", flash_attn="on"),
}


def _rows(*per_setting: dict[str, float] | None) -> dict[str, dict[str, float] | None]:
    """llama.cpp's figures per setting (None: a setting llama.cpp refuses for the model)."""
    return dict(zip(SETTINGS, per_setting, strict=True))


LOGGED = {
    # 6 RWKV-7 layers, n_embd 1024, head 64, gate rank 128, n_ff 3072, n_vocab 8192: the first layer's V copied to
    # every later device, the channel mix's shifted input made on the next device at a boundary
    "rwkv7": _rows({"RPC0": 44.64, "RPC1": 26.0, "CPU": 10.02}, {"RPC0": 52.63, "RPC1": 64.65, "CPU": 10.02},
                   {"RPC0": 34.63, "RPC1": 32.63, "RPC2": 18.0, "CPU": 38.64}, {"RPC1": 36.63, "CPU": 4.0},
                   {"RPC0": 52.63, "RPC1": 64.65, "RPC2": 26.0, "CPU": 10.02},
                   {"RPC0": 52.63, "RPC1": 72.64, "RPC2": 62.64, "CPU": 10.02}),
    # 4 KDA layers (16 heads of 64, d_conv 4) and 2 absorbed-MLA layers (kv rank 256, no RoPE) over a K-only
    # cache, a leading dense layer, then 8 experts (2 used) without a shared expert; -ctk q8_0 with an f16 V
    # (the fifth setting) is refused by llama.cpp for MLA, and by gpulab (the matrix records both refusals)
    "kimi-linear": _rows({"RPC0": 44.07, "RPC1": 26.0, "CPU": 18.03}, {"RPC0": 40.02, "RPC1": 40.07, "CPU": 14.03},
                         {"RPC0": 18.25, "RPC1": 29.01, "RPC2": 18.0, "CPU": 31.01}, {"RPC1": 62.05, "CPU": 6.01},
                         None, {"RPC0": 52.02, "RPC1": 26.3, "RPC2": 50.07, "CPU": 26.03}),
    # the same layout with one low-rank gate product, a sigmoid decay gate with a lower bound, MLA with RoPE, a
    # low-rank Q and a head-wise output gate before wo, a shared expert, the output rows gathered after the norm
    "bailingmoe3": _rows({"RPC0": 50.07, "RPC1": 28.01, "CPU": 18.04}, {"RPC0": 43.02, "RPC1": 46.08, "CPU": 14.04},
                         {"RPC0": 18.3, "RPC1": 32.01, "RPC2": 20.0, "CPU": 37.06}, {"RPC1": 68.05, "CPU": 6.01},
                         None, {"RPC0": 55.02, "RPC1": 26.3, "RPC2": 53.03, "CPU": 26.04}),
    # kimi-linear's layout with attention residuals (the embeddings banked, mixed before every norm), one
    # full-rank KDA output gate, SiTU activations in the dense FFN and the experts (no shared expert)
    "kimi-k3": _rows({"RPC0": 54.02, "RPC1": 50.01, "CPU": 18.03}, {"RPC0": 50.02, "RPC1": 64.03, "CPU": 14.03},
                     {"RPC0": 16.57, "RPC1": 33.0, "RPC2": 24.0, "CPU": 35.01}, {"RPC1": 64.01, "CPU": 6.01},
                     None, {"RPC0": 62.02, "RPC1": 50.33, "RPC2": 76.03, "CPU": 26.03}),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("arch")
    return {a: read_profile(write_arch_model(root / f"{a}.gguf", a)) for a in LOGGED}


def rpc(n: int) -> list[Device]:
    return [Device(name=f"RPC{i}", total_bytes=64 << 30, free_bytes=64 << 30, source="rpc", kind="rpc")
            for i in range(n)]


@pytest.mark.parametrize("arch,setting", [(a, s) for a in LOGGED for s in SETTINGS if LOGGED[a][s] is not None])
def test_compute_buffers_match_llama_cpp_logs(models, arch, setting):
    p = plan(models[arch], rpc(3), SETTINGS[setting])
    logged = LOGGED[arch][setting]
    assert logged is not None
    assert {d.name: d.compute_bytes / MiB for d in p.devices} == \
        {k: pytest.approx(v, abs=0.006) for k, v in logged.items()}
    assert arch in COMPUTE_EXACT and not [d for d in p.doubts if d.term == "compute"]
