"""The throughput model's structure. Its accuracy against measured llama.cpp runs is checked in
tests/runtime (calibration) and recorded in docs/BENCHMARKS.md."""

from __future__ import annotations

import pytest

from gpulab import SplitConfig, parse_sim_spec, plan
from gpulab.core.speed import DeviceSpeed, LinkSpeed, SpeedModel, predict_speed
from gpulab.sources.synth import PRESETS, SynthSpec, write_model

from builders import make_profile

GB = 1e9
FAST = DeviceSpeed(bandwidth_bytes_per_s=1000 * GB, flops_per_s=100e12, overhead_s=0.0)


def uniform(n: int, link=LinkSpeed(latency_s=50e-6, bytes_per_s=25 * GB)) -> SpeedModel:
    return SpeedModel(devices={f"SIM{i}": FAST for i in range(n)}, link=link)


def test_spreading_over_more_devices_never_speeds_up_generation_in_layer_mode():
    prof = make_profile(n_layer=32, layer_bytes=128 * 2**20)
    speeds = []
    for n in (1, 2, 4, 8):
        p = plan(prof, parse_sim_spec(f"{n}x80GiB"), SplitConfig(tensor_split=(1,) * n))
        s = predict_speed(p, uniform(n))
        assert s.n_hops == n - 1
        speeds.append(s.tg_tokens_per_s)
    assert speeds == sorted(speeds, reverse=True) and speeds[-1] < speeds[0]


def test_generation_time_is_the_sum_of_device_times_plus_hops():
    prof = make_profile(n_layer=16, layer_bytes=64 * 2**20)
    p = plan(prof, parse_sim_spec("2x80GiB"), SplitConfig(tensor_split=(1, 1)))
    link = LinkSpeed(latency_s=1e-3, bytes_per_s=1e12)
    s = predict_speed(p, uniform(2, link), n_past=0)
    per_device = {n: b / FAST.bandwidth_bytes_per_s for n, b in s.bytes_per_token.items()}
    assert 1 / s.tg_tokens_per_s == pytest.approx(sum(per_device.values()) + 1e-3 + 4 * prof.n_embd / 1e12)
    assert s.roofline_tg_tokens_per_s == pytest.approx(1 / sum(per_device.values()))
    assert 0 < s.roofline_fraction < 1


def test_slower_device_costs_time_in_proportion_to_its_bytes():
    prof = make_profile(n_layer=16, layer_bytes=64 * 2**20)
    p = plan(prof, parse_sim_spec("2x80GiB"), SplitConfig(tensor_split=(1, 1)))
    slow = SpeedModel(devices={"SIM0": FAST, "SIM1": DeviceSpeed(FAST.bandwidth_bytes_per_s / 4, 100e12)})
    a, b = predict_speed(p, uniform(2), n_past=0), predict_speed(p, slow, n_past=0)
    assert b.tg_seconds["SIM1"] == pytest.approx(4 * a.tg_seconds["SIM1"])
    assert b.tg_seconds["SIM0"] == pytest.approx(a.tg_seconds["SIM0"])


def test_context_in_use_adds_kv_reads():
    prof = make_profile(n_layer=8)
    p = plan(prof, parse_sim_spec("80GiB"), SplitConfig(n_ctx=32768))
    short, long = predict_speed(p, uniform(1), n_past=0), predict_speed(p, uniform(1), n_past=32000)
    kv_per_token = 32000 * 8 * 2 * (8 * 128 * 2)
    assert long.bytes_per_token["SIM0"] - short.bytes_per_token["SIM0"] == kv_per_token


def test_moe_reads_only_the_experts_it_uses(tmp_path):
    spec = SynthSpec(arch="qwen3moe", n_layer=2, n_embd=256, n_ff=256, n_head=4, n_head_kv=2,
                     n_vocab=512, n_expert=8, n_expert_used=2, n_ff_exp=128)
    from gpulab import read_profile
    prof = read_profile(write_model(tmp_path / "moe.gguf", spec))
    layer = prof.layers[0]
    assert layer.expert_bytes > 0
    assert prof.active_bytes_per_layer[0] == layer.weights_bytes - layer.expert_bytes + layer.expert_bytes // 4


def test_bigger_ubatch_amortises_weight_reads_in_prompt_processing():
    prof = make_profile(n_layer=8, layer_bytes=256 * 2**20)
    slow_mem = SpeedModel(devices={"SIM0": DeviceSpeed(bandwidth_bytes_per_s=100 * GB, flops_per_s=1e15)})
    small = predict_speed(plan(prof, parse_sim_spec("80GiB"), SplitConfig(n_ubatch=32)), slow_mem)
    big = predict_speed(plan(prof, parse_sim_spec("80GiB"), SplitConfig(n_ubatch=512)), slow_mem)
    assert big.pp_tokens_per_s > 10 * small.pp_tokens_per_s


def test_sim_bandwidth_is_used_when_not_calibrated():
    prof = make_profile(n_layer=8)
    p = plan(prof, parse_sim_spec("80GiB:3000GB/s"), SplitConfig())
    s = predict_speed(p, bandwidth_hints={"SIM0": 3000 * GB}, n_past=0)
    # the host reads no weights per token (token_embd is a row lookup), so SIM0 is the roofline
    assert set(s.bytes_per_token) == {"SIM0"}
    assert s.roofline_tg_tokens_per_s == pytest.approx(0.8 * 3000 * GB / s.bytes_per_token["SIM0"])
