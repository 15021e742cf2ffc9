"""The two real models (SmolLM2-135M Q4_1, Gemma 3 270M Q4_K_M) against llama.cpp on CPU RPC devices, in
the settings where issue 22 found compute buffers off: quantized K caches, partial -ngl, 3 devices at
-ts 3,1,1, -sm none, several -ub. Placement exact; weights, KV within 32 KiB; compute within 1 MiB where
the plan states no compute doubt, within the doubts' errors where it does (as the architecture matrix,
tests/integration/test_arch_matrix_vs_llama.py): the exact bar of issue 27, beside
test_real_models_vs_llama.py's 10% one. Figures go to test-artifacts/real_models_exact.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gpulab import SplitConfig, plan, read_profile
from gpulab.sources.host import host_device

KiB, MiB = 1024, 1024**2
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"

CONFIGS = {
    "ts-1-1": SplitConfig(tensor_split=(1, 1), n_ctx=4096, devices=("RPC0", "RPC1")),
    "ts-3-1-1": SplitConfig(tensor_split=(3, 1, 1), n_ctx=4096),
    "q8k-fa-on": SplitConfig(tensor_split=(1, 1), n_ctx=4096, devices=("RPC0", "RPC1"), type_k="q8_0", flash_attn="on"),
    "q8k-f16v-fa-off": SplitConfig(tensor_split=(1, 1), n_ctx=2048, devices=("RPC0", "RPC1"), type_k="q8_0",
                                   flash_attn="off"),
    "ngl0": SplitConfig(n_gpu_layers=0, n_ctx=2048),
    "ngl15": SplitConfig(n_gpu_layers=15, tensor_split=(1, 1), n_ctx=2048, devices=("RPC0", "RPC1")),
    "none-ub256": SplitConfig(split_mode="none", main_gpu=1, n_ctx=4096, n_ubatch=256),
}
_rows: list[dict] = []


@pytest.mark.slow
@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("model", ["smollm2", "gemma3"])
def test_real_model_matches_llama_cpp(model, config_name, request, worker):
    path = request.getfixturevalue(model)
    config = CONFIGS[config_name]
    profile = read_profile(path)
    devices = [d for d in worker.devices() if d.kind == "rpc"]
    predicted = plan(profile, devices, config, host_device())
    report, _ = worker.load(path, config, check_fit=False)
    assert list(report.layer_devices) == list(predicted.layer_devices)
    compute_doubts = [x for x in predicted.doubts if x.term == "compute"]
    bound = sum(x.bound_bytes for x in compute_doubts) if compute_doubts else 1 * MiB
    failures = []
    for d in predicted.devices:
        got = {k: report.bytes_on(d.name, k) for k in ("model", "kv", "compute")}
        want = {"model": d.weights_bytes, "kv": d.kv_bytes, "compute": d.compute_bytes}
        _rows.append({"arch": model, "config": config_name, "device": d.name, "predicted": want, "llama_cpp": got,
                      "doubts": [x.text for x in predicted.doubts]})
        for term in ("model", "kv"):
            if abs(want[term] - got[term]) > 32 * KiB:
                failures.append(f"{d.name} {term}: predicted {want[term]}, llama.cpp {got[term]}")
        if abs(want["compute"] - got["compute"]) > bound:
            failures.append(f"{d.name} compute: predicted {want['compute']}, llama.cpp {got['compute']} "
                            f"({(want['compute'] - got['compute']) / MiB:+.2f} MiB); doubts: {compute_doubts}")
    assert not failures, "; ".join(failures)


def teardown_module(module):
    if _rows:
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "real_models_exact.json").write_text(json.dumps(_rows, indent=1))


# Logged compute buffers (llama.cpp's `sched_reserve: ... compute buffer size`, MiB as printed) where issue 22
# found misses, each asserted within 1 MiB and, here, with the value written out: the plan's doubts do not
# widen the bar. (model, config, device) -> logged MiB.
ROT = {   # Gemma 3 with a quantized K cache: the Hadamard rotation inputs (2 MiB with 4 pipeline copies)
    ("gemma3", SplitConfig(tensor_split=(1, 1), n_ctx=2048, n_ubatch=256, devices=("RPC0", "RPC1"),
                           type_k="q8_0", flash_attn="off")): {"RPC0": 29.77, "RPC1": 276.15, "CPU": 20.15},
    ("gemma3", SplitConfig(tensor_split=(1, 1), n_ctx=4096, n_ubatch=512, devices=("RPC0", "RPC1"),
                           type_k="q8_0", flash_attn="off")): {"RPC0": 91.54, "RPC1": 568.30, "CPU": 56.30},
    ("gemma3", SplitConfig(tensor_split=(1, 1), n_ctx=2048, n_ubatch=512, devices=("RPC0", "RPC1"),
                           type_k="q8_0", flash_attn="on")): {"RPC1": 532.33, "CPU": 20.34},
    ("gemma3", SplitConfig(tensor_split=(3, 1, 1), n_ctx=2048, n_ubatch=256, type_k="q8_0",
                           flash_attn="off")): {"RPC0": 29.77, "RPC1": 15.76, "RPC2": 276.15, "CPU": 20.15},
    ("gemma3", SplitConfig(split_mode="none", main_gpu=1, n_ctx=4096, type_k="q8_0")): {"RPC1": 513.25, "CPU": 8.02},
}
NGL0 = {  # -ngl 0: the host runs the whole graph; where the KQ mask's freed range leaves result_norm
    ("smollm2", SplitConfig(n_gpu_layers=0, n_ctx=1024, n_ubatch=512)): {"CPU": 98.25},
    ("smollm2", SplitConfig(n_gpu_layers=0, n_ctx=2048, n_ubatch=128)): {"CPU": 25.63},
    ("smollm2", SplitConfig(n_gpu_layers=0, n_ctx=2048, n_ubatch=512)): {"CPU": 102.51},
    ("smollm2", SplitConfig(n_gpu_layers=0, n_ctx=4096, n_ubatch=512)): {"CPU": 98.25},
    ("smollm2", SplitConfig(n_gpu_layers=0, n_ctx=1280, n_ubatch=256, flash_attn="off")): {"CPU": 49.13},
    ("smollm2", SplitConfig(n_gpu_layers=0, n_ctx=1536, n_ubatch=256, flash_attn="off")): {"CPU": 49.69},
    ("smollm2", SplitConfig(n_gpu_layers=0, n_ctx=3584, n_ubatch=256, flash_attn="off")): {"CPU": 49.69},
    ("gemma3", SplitConfig(n_gpu_layers=0, n_ctx=4096, n_ubatch=256, flash_attn="off")): {"CPU": 257.25},
}
FIRST = {  # Gemma 3 with flash attention: the hole below the FFN is the freed attention output (q wider than e)
    ("gemma3", SplitConfig(tensor_split=(1, 1), n_ctx=2048, n_ubatch=128, devices=("RPC0", "RPC1"))): {"RPC0": 8.14},
    ("gemma3", SplitConfig(tensor_split=(1, 1), n_ctx=4096, n_ubatch=512, devices=("RPC0", "RPC1"))): {"RPC0": 41.57},
    ("gemma3", SplitConfig(tensor_split=(3, 1, 1), n_ctx=4096, n_ubatch=512)): {"RPC0": 41.57, "RPC1": 25.54},
    # quantized K alone closes that hole (its rotation's products), K and V both leave it open
    ("gemma3", SplitConfig(tensor_split=(3, 1, 1), n_ctx=4096, n_ubatch=512, type_k="q8_0")): {"RPC0": 41.57,
                                                                                            "RPC1": 24.54},
    ("gemma3", SplitConfig(tensor_split=(3, 1, 1), n_ctx=4096, n_ubatch=512, type_k="q8_0", type_v="q8_0")):
        {"RPC0": 43.70, "RPC1": 26.60},
    ("gemma3", SplitConfig(tensor_split=(3, 1, 1), n_ctx=4096, n_ubatch=256, type_k="q4_0", type_v="q4_0")):
        {"RPC0": 22.41, "RPC1": 13.33},
}
TABLE = {**ROT, **NGL0, **FIRST}


@pytest.mark.slow
@pytest.mark.parametrize("key", list(TABLE), ids=[f"{m}-{i}" for i, (m, _) in enumerate(TABLE)])
def test_logged_compute_buffers_within_1_mib(key, request, worker):
    model, config = key
    path = request.getfixturevalue(model)
    predicted = plan(read_profile(path), [d for d in worker.devices() if d.kind == "rpc"], config, host_device())
    report, _ = worker.load(path, config, check_fit=False)
    by_name = {d.name: d.compute_bytes for d in predicted.devices}
    for name, logged_mib in TABLE[key].items():
        got = report.bytes_on(name, "compute")
        assert abs(got / MiB - logged_mib) < 0.01, f"{name}: llama.cpp now logs {got / MiB:.2f} MiB"
        assert abs(by_name[name] - got) <= 1 * MiB, \
            f"{name}: predicted {by_name[name] / MiB:.2f} MiB, logged {logged_mib}"
