"""The throughput model's structure. Its accuracy against measured llama.cpp runs is checked in
tests/runtime/test_speed_calibration.py and recorded in docs/BENCHMARKS.md."""

from __future__ import annotations

import pytest

from builders import make_profile
from gpulab import SplitConfig, parse_sim_spec, plan
from gpulab.core.measure.speed import (
    DeviceSpeed,
    LinkSpeed,
    SpeedModel,
    design_row,
    fit_params,
    per_device_load,
    predict_speed,
    prediction_error,
)
from gpulab.sources.synth import SynthSpec, write_model

GB = 1e9
FAST = DeviceSpeed(bandwidth_bytes_per_s=1000 * GB, flops_per_s=100e12, overhead_s=0.0)


PCIE = LinkSpeed(latency_s=50e-6, bytes_per_s=25 * GB)


def uniform(n: int, link: LinkSpeed = PCIE) -> SpeedModel:
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
    # one hop (latency + activations), plus the embeddings in and the logits out over the link
    io = 4 * prof.n_embd + 4 * prof.n_vocab
    assert 1 / s.tg_tokens_per_s == pytest.approx(sum(per_device.values()) + 1e-3 + (4 * prof.n_embd + io) / 1e12)
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
    # the host reads no weights per token (token_embd is a row lookup), so SIM0 is the roofline;
    # the roofline is the theoretical bandwidth, the prediction 80% of it
    assert set(s.bytes_per_token) == {"SIM0"} and s.sources == {"SIM0": "spec"}
    assert s.roofline_tg_tokens_per_s == pytest.approx(3000 * GB / s.bytes_per_token["SIM0"])
    assert 0.5 < s.roofline_fraction < 0.8   # 80%, less the fixed overhead per token


def test_host_boundaries_are_not_hops_a_partial_offload_costs_what_a_full_one_does():
    prof = make_profile(n_layer=16, layer_bytes=64 * 2**20)
    devs = parse_sim_spec("2x80GiB")
    full = plan(prof, devs, SplitConfig(tensor_split=(1, 1)))
    partial = plan(prof, devs, SplitConfig(n_gpu_layers=9, tensor_split=(1, 1)))
    assert partial.layer_devices[0] == "CPU" and predict_speed(partial).n_hops == predict_speed(full).n_hops == 1
    one = plan(prof, devs[:1], SplitConfig())
    assert predict_speed(one).n_hops == 0 and predict_speed(plan(prof, devs, SplitConfig(n_gpu_layers=0))).n_hops == 0


def test_a_tied_output_matrix_is_read_every_token():
    tied = make_profile(n_layer=4, tied=True)
    p = plan(tied, parse_sim_spec("80GiB"), SplitConfig())
    weights, _, _ = per_device_load(p, 0)
    assert weights["SIM0"] == 4 * 60 * 2**20 + tied.output_weights_bytes
    assert tied.output_weights_bytes > tied.token_embd.n_bytes


def test_prompt_processing_computes_the_output_layer_for_one_token_per_batch():
    prof = make_profile(n_layer=2, layer_bytes=2**20, n_embd=1024, n_vocab=256000, n_head=1, n_head_kv=1, head_dim=8)
    compute_only = SpeedModel(devices={"SIM0": DeviceSpeed(1e18, 1e12, 0.0)}, link=LinkSpeed(0.0, 1e18))
    p = plan(prof, parse_sim_spec("80GiB"), SplitConfig(n_batch=512, n_ubatch=512))
    s = predict_speed(p, compute_only, n_prompt=512, n_gen=0)
    dense = 2 * 2 * 1024 * 1024     # two layers of one 1024 x 1024 matrix
    expected = (512 * dense + 2 * prof.output_params) / 1e12
    assert s.pp_seconds["SIM0"] == pytest.approx(expected, rel=0.02)   # + attention of a short prompt


def test_design_row_is_the_prediction_as_a_linear_function():
    """What calibration fits is exactly what predict_speed computes (with tg memory-bound and
    pp compute-bound), so fitted parameters predict as they were fitted."""
    prof = make_profile(n_layer=12, layer_bytes=32 * 2**20, n_vocab=32000)
    sp = [DeviceSpeed(200 * GB, 0.5e12, 300e-6, layer_overhead_s=20e-6, layer_token_s=1e-6),  # tg memory-,
          DeviceSpeed(100 * GB, 0.8e12, 100e-6, layer_overhead_s=5e-6, layer_token_s=3e-6)]   # pp compute-bound
    link = LinkSpeed(150e-6, 2 * GB)
    model = SpeedModel(devices={"SIM0": sp[0], "SIM1": sp[1]}, link=link)
    values = {"a|k0": 1 / sp[0].bandwidth_bytes_per_s, "o|k0": sp[0].overhead_s, "f|k0": 1 / sp[0].flops_per_s,
              "a|k1": 1 / sp[1].bandwidth_bytes_per_s, "o|k1": sp[1].overhead_s, "f|k1": 1 / sp[1].flops_per_s,
              "l|k0": sp[0].layer_overhead_s, "l|k1": sp[1].layer_overhead_s,
              "q|k0": sp[0].layer_token_s, "q|k1": sp[1].layer_token_s,
              "link|lat": link.latency_s, "link|inv_bw": 1 / link.bytes_per_s}
    key_of = {"SIM0": "k0", "SIM1": "k1", "CPU": "host"}
    for cfg in (SplitConfig(tensor_split=(1, 3)), SplitConfig(n_ctx=256, n_batch=64, n_ubatch=64)):
        p = plan(prof, parse_sim_spec("2x80GiB"), cfg)
        s = predict_speed(p, model, n_prompt=256, n_gen=32)
        for kind, seconds in (("tg", 1 / s.tg_tokens_per_s), ("pp", 256 / s.pp_tokens_per_s)):
            row = design_row(p, kind, key_of, n_prompt=256, n_gen=32)
            assert sum(x * values[k] for k, x in row.items()) == pytest.approx(seconds, rel=1e-9), kind


def test_fit_recovers_parameters_and_keeps_them_non_negative():
    truth = {"a|d": 1 / (50 * GB), "o|d": 2e-4, "link|lat": 0.0}
    rows = [({"a|d": b, "o|d": 1.0, "link|lat": h}, b * truth["a|d"] + truth["o|d"])
            for b, h in ((1e8, 0), (3e8, 0), (2e8, 1))]
    priors = {"a|d": 1 / (500 * GB), "o|d": 5e-5, "link|lat": 1e-3}
    got = fit_params(rows, priors)
    assert got["a|d"] == pytest.approx(truth["a|d"], rel=1e-3) and got["o|d"] == pytest.approx(2e-4, rel=1e-2)
    assert got["link|lat"] == pytest.approx(0.0, abs=1e-6)
    # the hop would come out negative from this noise: it is pinned at zero, not below
    noisy = rows[:2] + [(rows[2][0], rows[2][1] * 0.9)]
    assert min(fit_params(noisy, priors).values()) >= 0.0
    # a parameter the data leave open keeps its prior
    got = fit_params(rows[:1], {**priors, "x|unseen": 7.0})
    assert got["x|unseen"] == pytest.approx(7.0, rel=1e-3)
    with pytest.raises(ValueError, match="no prior"):
        fit_params(rows, {"a|d": 1.0})


def test_prediction_error_is_relative_to_measured():
    prof = make_profile(n_layer=4)
    s = predict_speed(plan(prof, parse_sim_spec("80GiB"), SplitConfig()), uniform(1))
    err = prediction_error(s, tg_ts=s.tg_tokens_per_s / 2, pp_ts=None)
    assert err == {"tg": pytest.approx(1.0)}


def test_long_prompts_over_several_gpus_run_as_a_pipeline_but_not_over_rpc():
    from dataclasses import replace as dc_replace

    from gpulab.core.measure.speed import pipeline_parallel
    prof = make_profile(n_layer=16, layer_bytes=64 * 2**20, n_head=1, n_head_kv=1, head_dim=8)
    devs = parse_sim_spec("2x80GiB")
    cfg = SplitConfig(tensor_split=(1, 1), n_batch=2048, n_ubatch=256)
    p = plan(prof, devs, cfg)
    assert pipeline_parallel(p)
    model = SpeedModel(devices={"SIM0": FAST, "SIM1": FAST}, link=LinkSpeed(0.0, 1e15))
    one_call = predict_speed(p, model, n_prompt=256)         # one ubatch: nothing to overlap
    four = predict_speed(p, model, n_prompt=1024)             # four ubatches in one llama_decode
    assert not one_call.pipelined and four.pipelined
    # the first ubatch passes both stages, the next three cost one slowest stage each
    stage = [t / 4 for t in four.pp_seconds.values()]
    assert 1024 / four.pp_tokens_per_s == pytest.approx(sum(stage) + 3 * max(stage), rel=1e-3)
    assert four.pp_tokens_per_s > 1.4 * one_call.pp_tokens_per_s
    assert not pipeline_parallel(plan(prof, devs, cfg.replace(n_gpu_layers=10)))   # host layers: no pipeline
    rpc = dc_replace(p, layer_devices=tuple("RPC0" if d == "SIM0" else "RPC1" for d in p.layer_devices))
    assert not pipeline_parallel(rpc)   # copies between RPC servers synchronise


# -- split mode tensor ---------------------------------------------------------------------------
def test_allreduce_stages_follow_the_meta_backends_butterfly():
    from gpulab.core.measure.speed import allreduce_stages
    # 2, 4, 8: log2 butterfly steps; 3, 5, 6: fold in the excess, butterfly, copy back
    assert [allreduce_stages(n) for n in (1, 2, 3, 4, 5, 6, 8)] == [0, 1, 3, 2, 4, 4, 3]


def test_tensor_split_generation_costs_the_slowest_member_plus_two_allreduces_per_layer():
    from builders import make_llama_profile
    prof = make_llama_profile(n_layer=8, n_embd=2048, n_ff=8192, n_head=16, n_head_kv=4, n_vocab=8192)
    link = LinkSpeed(latency_s=1e-4, bytes_per_s=1e12)
    p = plan(prof, parse_sim_spec("2x80GiB"), SplitConfig(split_mode="tensor"))
    s = predict_speed(p, uniform(2, link), n_past=0)
    assert s.n_allreduce == 16 and s.n_hops == 0
    members = [s.tg_seconds["SIM0"], s.tg_seconds["SIM1"]]
    io = (4 * prof.n_embd + 4 * prof.n_vocab) / 1e12
    allreduces = 16 * (1e-4 + 4 * prof.n_embd / 1e12)
    assert 1 / s.tg_tokens_per_s == pytest.approx(max(members) + allreduces + io)
    # each member reads about half the layers' bytes (mirrored norms on both)
    assert s.bytes_per_token["SIM0"] == pytest.approx(p.device("SIM0").weights_bytes, rel=0.01)


def test_tensor_split_speeds_generation_up_only_over_a_fast_link():
    from builders import make_llama_profile
    prof = make_llama_profile(n_layer=8, n_embd=2048, n_ff=8192, n_head=16, n_head_kv=4, n_vocab=8192)
    slow_gpu = DeviceSpeed(bandwidth_bytes_per_s=100 * GB, flops_per_s=100e12)
    for latency, faster in ((2e-6, True), (1e-3, False)):
        model = SpeedModel(devices={"SIM0": slow_gpu, "SIM1": slow_gpu},
                           link=LinkSpeed(latency_s=latency, bytes_per_s=50 * GB))
        layer = predict_speed(plan(prof, parse_sim_spec("2x80GiB"), SplitConfig(tensor_split=(1, 1))), model)
        tensor = predict_speed(plan(prof, parse_sim_spec("2x80GiB"), SplitConfig(split_mode="tensor")), model)
        assert (tensor.tg_tokens_per_s > layer.tg_tokens_per_s) == faster, (latency, tensor, layer)


def test_the_allreduce_stage_is_recovered_from_a_tensor_split_runs_time():
    from builders import make_llama_profile
    from gpulab.core.measure.speed import fit_allreduce_stage
    prof = make_llama_profile(n_layer=6, n_embd=1024, n_ff=4096, n_head=16, n_head_kv=4)
    p = plan(prof, parse_sim_spec("3x80GiB"), SplitConfig(split_mode="tensor"))
    truth = uniform(3, LinkSpeed(latency_s=50e-6, bytes_per_s=25 * GB, allreduce_latency_s=2.5e-3))
    measured = 1 / predict_speed(p, truth, n_prompt=0, n_gen=16).tg_tokens_per_s
    guess = uniform(3, LinkSpeed(latency_s=50e-6, bytes_per_s=25 * GB))     # a hop's latency: far too little
    assert fit_allreduce_stage(p, guess, measured, n_gen=16) == pytest.approx(2.5e-3)
    with pytest.raises(ValueError):
        fit_allreduce_stage(plan(prof, parse_sim_spec("3x80GiB"), SplitConfig()), guess, measured, n_gen=16)
