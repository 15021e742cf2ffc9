"""The `ollama` policy pinned on cases read from Ollama v0.33.0-rc2 (server/sched.go, llm/llama_server.go,
llm/server.go, server/routes.go); each test names the Go function it mirrors."""

from __future__ import annotations

from dataclasses import replace

import pytest

from builders import make_profile
from gpulab import ConfigError, parse_sim_spec, plan
from gpulab.core.devices import Device
from gpulab.core.policies.apply import ALL_POLICIES, POLICIES, apply_policy, policy_split
from gpulab.core.policies.ollama import OllamaSettings, automatic_batch, default_num_ctx, ollama, predict_server_vram
from gpulab.core.policies.server_fit import server_fit

GiB = 1024**3
MiB = 1024**2


def small():
    return make_profile(n_layer=32, layer_bytes=300 * MiB)     # ~10 GiB of weights


def gpu(i: int, free: int, total: int | None = None, name: str = "SIM", kind: str = "gpu") -> Device:
    return Device(name=f"{name}{i}", total_bytes=total or free, free_bytes=free, source="sim", kind=kind)


def test_a_model_that_fits_one_gpu_goes_to_the_one_with_most_free_memory_alone():
    # server/sched.go bestSingleGPUFit + singleLlamaServerGPUPlacement: one GPU, --split-mode none --main-gpu 0
    devs = parse_sim_spec("24GiB@14GiB,24GiB@22GiB,24GiB@18GiB")
    r = ollama(small(), devs)
    assert r.gpus == ("SIM1",)
    assert r.config.devices == ("SIM1",) and r.config.split_mode == "none" and r.config.main_gpu == 0
    assert r.args[-4:] == ("--split-mode", "none", "--main-gpu", "0")
    p = plan(small(), devs, r.config)
    assert p.fits and [d.name for d in p.offload_devices if d.n_layers] == ["SIM1"]


def test_equal_gpus_the_first_one_wins():
    # server/sched.go betterPlacementGPU: only strictly more free memory replaces the current best
    assert ollama(small(), parse_sim_spec("2x24GiB")).gpus == ("SIM0",)


def test_the_single_gpu_rule_is_80_percent_of_free_memory_against_the_guess():
    # server/sched.go bestSingleGPUFit: skip a GPU when predicted > available*80/100
    prof = small()
    s = OllamaSettings(num_ctx=4096)
    guess = predict_server_vram(prof, 4096)
    enough = -(-guess * 100 // 80)
    assert enough * 80 // 100 >= guess and (enough - 2) * 80 // 100 < guess
    fits = ollama(prof, [gpu(0, 12 * GiB), gpu(1, enough, 24 * GiB)], s)
    assert fits.gpus == ("SIM1",)
    spread = ollama(prof, [gpu(0, 12 * GiB), gpu(1, enough - 2, 24 * GiB)], s)
    assert spread.gpus == ("SIM0", "SIM1") and spread.config.split_mode == "layer"


def test_a_model_too_big_for_one_gpu_spreads_and_fit_chooses_the_split():
    # server/sched.go bestGPUGroupByAvailableMemory: every GPU visible, no -ts or -ngl from Ollama
    # (llm/llama_server.go startLlamaServer); llama-server's common_params_fit splits the layers
    prof = make_profile(n_layer=32, layer_bytes=500 * MiB)   # ~16 GiB
    devs = parse_sim_spec("12GiB,12GiB")
    r = ollama(prof, devs)
    assert r.gpus == ("SIM0", "SIM1") and "-ngl" not in r.args and "-ts" not in r.args
    assert r.launch.n_gpu_layers == -1 and r.launch.tensor_split == ()
    assert r.config == server_fit(prof, devs, r.launch).config
    p = plan(prof, devs, r.config)
    assert p.fits and all(d.n_layers > 0 for d in p.offload_devices)


def test_a_model_too_big_for_all_gpus_is_a_partial_offload_chosen_by_fit():
    # Ollama passes no -ngl (NumGPU -1), so llama-server's fit lowers -ngl until the margins hold
    prof = make_profile(n_layer=32, layer_bytes=600 * MiB)   # ~19 GiB on 2 x 8 GiB
    r = ollama(prof, parse_sim_spec("8GiB,8GiB"))
    assert r.fit.status == "success"
    assert 0 < r.config.n_gpu_layers < prof.n_layer + 1
    assert plan(prof, parse_sim_spec("8GiB,8GiB"), r.config).fits


def test_sched_spread_uses_every_gpu_even_for_a_small_model():
    # server/sched.go selectLlamaServerPlacement: bestSingleGPUFit only when !envconfig.SchedSpread()
    r = ollama(small(), parse_sim_spec("2x24GiB"), OllamaSettings(sched_spread=True))
    assert r.gpus == ("SIM0", "SIM1") and r.config.split_mode == "layer"


def test_gpus_are_grouped_by_library_and_the_group_with_most_free_memory_wins():
    # ml/device.go ByLibrary + server/sched.go bestGPUGroupByAvailableMemory (sum of free per group)
    prof = make_profile(n_layer=32, layer_bytes=500 * MiB)   # fits no single GPU
    devs = [gpu(0, 12 * GiB, name="CUDA"), gpu(0, 20 * GiB, name="Vulkan"), gpu(1, 12 * GiB, name="CUDA")]
    assert ollama(prof, devs).gpus == ("CUDA0", "CUDA1")
    devs = [gpu(0, 8 * GiB, name="CUDA"), gpu(0, 20 * GiB, name="Vulkan"), gpu(1, 8 * GiB, name="CUDA")]
    assert ollama(prof, devs).gpus == ("Vulkan0",)


def test_a_discrete_gpu_is_chosen_before_an_integrated_one_with_more_memory():
    # server/sched.go betterPlacementGPU: candidate.Integrated != current.Integrated -> the discrete one
    devs = [gpu(0, 64 * GiB, kind="igpu"), gpu(1, 20 * GiB)]
    assert ollama(small(), devs).gpus == ("SIM1",)


def test_main_gpu_puts_the_model_on_that_gpu_alone_and_an_unknown_one_is_refused():
    # server/sched.go bestExplicitMainGPU; llama.cpp refuses a main_gpu past the visible devices
    r = ollama(small(), parse_sim_spec("24GiB,20GiB"), OllamaSettings(main_gpu=1))
    assert r.gpus == ("SIM1",) and r.config.main_gpu == 0 and r.config.split_mode == "none"
    with pytest.raises(ConfigError, match="main_gpu 5"):
        ollama(small(), parse_sim_spec("24GiB,20GiB"), OllamaSettings(main_gpu=5))


def test_num_gpu_is_passed_as_ngl_and_fit_keeps_it():
    # llm/llama_server.go startLlamaServer: -ngl only when NumGPU >= 0; fit leaves a user's -ngl alone
    r = ollama(small(), parse_sim_spec("8GiB,8GiB"), OllamaSettings(num_gpu=10))
    assert ("-ngl", "10") == r.args[r.args.index("-ngl"):r.args.index("-ngl") + 2]
    assert r.config.n_gpu_layers == 10
    cpu = ollama(small(), parse_sim_spec("8GiB,8GiB"), OllamaSettings(num_gpu=0))
    assert cpu.gpus == () and cpu.config.n_gpu_layers == 0


def test_default_context_follows_the_vram_tiers_and_is_capped_at_training_context():
    # server/routes.go Serve (47/23 GiB tiers, less OLLAMA_GPU_OVERHEAD); llm/server.go NewLlamaServer cap
    assert default_num_ctx(parse_sim_spec("16GiB")) == 4096
    assert default_num_ctx(parse_sim_spec("24GiB")) == 32768
    assert default_num_ctx(parse_sim_spec("24GiB"), gpu_overhead=2 * GiB) == 4096
    assert default_num_ctx(parse_sim_spec("2x24GiB")) == 262144
    prof = small()   # n_ctx_train 8192
    assert ollama(prof, parse_sim_spec("16GiB")).config.n_ctx == 4096
    assert ollama(prof, parse_sim_spec("2x24GiB")).config.n_ctx == prof.n_ctx_train


def test_context_is_num_ctx_times_num_parallel_and_fit_does_not_shrink_it():
    # llm/llama_server.go startLlamaServer: -c NumCtx*numParallel -np numParallel (explicit: fit keeps it)
    r = ollama(small(), parse_sim_spec("24GiB"), OllamaSettings(num_ctx=2048, num_parallel=3))
    assert r.args[:4] == ("-c", "6144", "-np", "3")
    assert r.config.n_ctx == 6144 and r.config.n_seq_max == 3


def test_the_guess_is_file_size_plus_an_f16_kv_cache():
    # llm/llama_server.go PredictServerVRAM: 2 * layers * kvHeads * (embd / heads) * ctx * 2
    prof = replace(small(), file_bytes=7 * GiB)
    assert predict_server_vram(prof, 1000) == 7 * GiB + 2 * 32 * 8 * (4096 // 32) * 1000 * 2


def test_automatic_batch_by_context_and_headroom():
    # server/sched.go automaticGenerationBatch, generationBatchFits, constrainedCUDAWithoutFlashAttention
    devs = parse_sim_spec("24GiB")
    assert automatic_batch(4096, 1 * GiB, 24 * GiB, "auto", devs) == 512
    assert automatic_batch(8192, 1 * GiB, 24 * GiB, "auto", devs) == 1024
    assert automatic_batch(65536, 1 * GiB, 24 * GiB, "auto", devs) == 2048
    assert automatic_batch(65536, 16 * GiB, 24 * GiB, "auto", devs) == 1024   # > 60%, <= 75%
    assert automatic_batch(65536, 19 * GiB, 24 * GiB, "auto", devs) == 512    # > 75%
    cuda = [gpu(0, 8 * GiB, name="CUDA")]
    assert automatic_batch(8192, 1 * GiB, 8 * GiB, "off", cuda) == 256
    assert automatic_batch(4096, 1 * GiB, 8 * GiB, "off", cuda) == 512
    r = ollama(small(), parse_sim_spec("24GiB"), OllamaSettings(num_ctx=8192))
    assert r.config.n_batch == r.config.n_ubatch == 1024


def test_an_offloaded_projector_raises_fits_margin_unless_the_user_set_it():
    # llm/llama_server.go extraEnvsForStart / mmprojFitTargetMiB / shouldDisableMMProjOffload
    devs = parse_sim_spec("24GiB")
    r = ollama(small(), devs, OllamaSettings(mmproj_bytes=800 * MiB))
    assert r.config.fit_target == (1024 + 800,) and r.env == (("LLAMA_ARG_FIT_TARGET", "1824"),)
    assert ollama(small(), devs, OllamaSettings(mmproj_bytes=800 * MiB, fit_target_mib=300)).config.fit_target == (300,)
    partial = ollama(small(), devs, OllamaSettings(mmproj_bytes=800 * MiB, num_gpu=5))   # partial-text-offload
    assert partial.config.fit_target == () and partial.env == ()


def test_ollama_is_a_whole_config_policy_like_fit():
    prof = small()
    devs = parse_sim_spec("24GiB@14GiB,24GiB@22GiB")
    assert "ollama" in ALL_POLICIES and "ollama" not in POLICIES
    assert apply_policy("ollama", prof, devs) == ollama(prof, devs).config
    with pytest.raises(ConfigError, match="unknown policy"):
        policy_split("ollama", prof, devs)
    # ollama-spread (Ollama <= 0.12) used both GPUs for the same model; today's Ollama uses one
    assert all(policy_split("ollama-spread", prof, devs))
