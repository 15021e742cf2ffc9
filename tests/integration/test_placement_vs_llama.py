"""The planner against real llama.cpp: same model, same settings, compare with its log.

Models are written here (gpulab.sources.synth) in several shapes; llama.cpp loads them on up to
three RPC devices served by CPU processes, so this runs on any machine. The loads run in a
gpulab worker process (see gpulab.runtime.worker for why). For every case:
  - the device of every layer (and the output layer) must be exactly llama.cpp's;
  - weights and KV bytes per device within 1% or 1 MiB, whichever is larger (the host's weights as
    llama.cpp allocates them: the CPU_Mapped span of the file and the CPU_REPACK copies).
Compute buffers are an estimate; their error is recorded in test-artifacts/compute_error.json
(and docs/BENCHMARKS.md), not asserted tighter than a sanity bound here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from builders import close_to_llama
from gpulab import SplitConfig, plan, read_profile
from gpulab.sources.host import host_device
from gpulab.sources.synth import SynthSpec

MiB = 1024**2
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"

# Sizes chosen so that every rule moves more bytes than the 1 MiB tolerance: a layer is several
# MiB, and a tied token_embd (duplicated on the output device) is 8 MiB.
MODELS = {
    # GQA, odd layer count, untied output
    "llama-gqa-7": SynthSpec(arch="llama", n_layer=7, n_embd=512, n_ff=1536, n_head=8, n_head_kv=2, n_vocab=4096),
    # MHA, tied output (token_embd duplicated on the output device)
    "llama-mha-tied-5": SynthSpec(arch="llama", n_layer=5, n_embd=512, n_ff=1024, n_head=8, n_head_kv=8,
                                  n_vocab=8192, tied_output=True),
    # quantized weights, 13 layers
    "llama-q8-13": SynthSpec(arch="llama", n_layer=13, n_embd=1024, n_ff=2048, n_head=16, n_head_kv=4,
                             n_vocab=4096, weight_type="Q8_0"),
    # sliding-window attention layers get a smaller KV cache; gemma2 always ties its output
    "gemma2-swa-6": SynthSpec(arch="gemma2", n_layer=6, n_embd=512, n_ff=1024, n_head=8, n_head_kv=4,
                              n_vocab=8192, sliding_window=256, tied_output=True),
    # mixture of experts
    "qwen3moe-5": SynthSpec(arch="qwen3moe", n_layer=5, n_embd=512, n_ff=512, n_head=8, n_head_kv=2,
                            n_vocab=4096, n_expert=8, n_expert_used=2, n_ff_exp=256),
}

CONFIGS = {
    "ts-1-1-1": SplitConfig(tensor_split=(1, 1, 1), n_ctx=512),
    "ts-3-0-1": SplitConfig(tensor_split=(3, 0, 1), n_ctx=512),
    "ts-1-2-two-devices": SplitConfig(tensor_split=(1, 2), n_ctx=768, devices=("RPC1", "RPC2")),
    "default-split": SplitConfig(n_ctx=512),
    "ngl-0": SplitConfig(n_gpu_layers=0, n_ctx=512),
    "ngl-1-output-only": SplitConfig(n_gpu_layers=1, tensor_split=(1, 1, 1), n_ctx=512),
    "ngl-3-partial": SplitConfig(n_gpu_layers=3, tensor_split=(1, 1, 1), n_ctx=512),
    "none-main-1": SplitConfig(split_mode="none", main_gpu=1, n_ctx=1024),
    "kv-q8-ctx-2000": SplitConfig(tensor_split=(2, 1, 1), n_ctx=2000, type_k="q8_0", type_v="q8_0", flash_attn="on"),
    "kv-q4-no-fa-k": SplitConfig(tensor_split=(1, 1, 2), n_ctx=1024, type_k="q4_0", flash_attn="on"),
    "no-kv-offload": SplitConfig(tensor_split=(1, 1, 1), n_ctx=512, offload_kqv=False),
    # llama-server's default KV layout: 4 slots sharing one unified cache of n_ctx cells
    "np4-kvu": SplitConfig(tensor_split=(1, 1, 1), n_ctx=2048, n_seq_max=4, kv_unified=True),
    # the same 4 sequences without -kvu: 4 streams of n_ctx / 4 cells
    "np4-streams": SplitConfig(tensor_split=(1, 1, 1), n_ctx=2048, n_seq_max=4),
    # llama.cpp caps n_ubatch at n_batch: the SWA cache is sized with 512, not 2048
    "ubatch-over-batch": SplitConfig(tensor_split=(1, 1, 1), n_ctx=4096, n_batch=512, n_ubatch=2048),
}

_compute_errors: list[dict] = []


@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_plan_matches_llama_cpp(model_name, config_name, model_paths, worker):
    config = CONFIGS[config_name]
    profile = read_profile(model_paths[model_name])
    # free memory as llama.cpp sees it now: the default split is proportional to it
    devices = [d for d in worker.devices() if d.kind == "rpc"]
    assert [d.name for d in devices] == ["RPC0", "RPC1", "RPC2"]
    predicted = plan(profile, devices, config, host_device())

    report, _ = worker.load(model_paths[model_name], config)

    assert list(report.layer_devices) == list(predicted.layer_devices), "placement differs from llama.cpp"
    for d in predicted.devices:
        # the host's weights as llama.cpp allocates them: the CPU_Mapped file span and CPU_REPACK copies
        assert close_to_llama(d.weights_bytes, report.bytes_on(d.name, "model")), \
            f"{d.name} weights: predicted {d.weights_bytes}, llama.cpp {report.bytes_on(d.name, 'model')}"
        assert close_to_llama(d.kv_bytes, report.bytes_on(d.name, "kv")), \
            f"{d.name} KV: predicted {d.kv_bytes}, llama.cpp {report.bytes_on(d.name, 'kv')}"
        actual_compute = report.bytes_on(d.name, "compute")
        if actual_compute:
            _compute_errors.append({"model": model_name, "config": config_name, "device": d.name,
                                    "predicted": d.compute_bytes, "llama_cpp": actual_compute,
                                    "rel_error": (d.compute_bytes - actual_compute) / actual_compute})


def teardown_module(module):
    if _compute_errors:
        ARTIFACTS.mkdir(exist_ok=True)
        errs = sorted(abs(e["rel_error"]) for e in _compute_errors)
        summary = {"n": len(errs), "median_abs_rel_error": errs[len(errs) // 2], "max_abs_rel_error": errs[-1],
                   "within_10pct": sum(e <= 0.10 for e in errs) / len(errs)}
        (ARTIFACTS / "compute_error.json").write_text(json.dumps({"summary": summary, "cases": _compute_errors},
                                                                 indent=1))


def test_row_split_is_refused_by_both(model_paths, worker):
    from gpulab import ConfigError, LoadError
    config = SplitConfig(split_mode="row", tensor_split=(1, 1, 1), n_ctx=512)
    devices = [d for d in worker.devices() if d.kind == "rpc"]
    with pytest.raises(ConfigError, match="does not support split buffers"):
        plan(read_profile(model_paths["llama-gqa-7"]), devices, config)
    with pytest.raises(LoadError, match="does not support split buffers"):   # llama.cpp itself, unplanned
        worker.load(model_paths["llama-gqa-7"], config, check_fit=False)
