"""gpulab.core.policies.server_fit: common_params_fit's rules on hand-built profiles and simulated devices.

Against llama.cpp's own fit (llama-fit-params on RPC devices): tests/integration/test_fit_vs_llama.py.
"""

from __future__ import annotations

import re

import pytest

from builders import MiB, make_hand_moe_profile, make_profile
from gpulab.core.config import SplitConfig, parse_mib_list, parse_ngl
from gpulab.core.devices import parse_sim_spec
from gpulab.core.errors import ConfigError
from gpulab.core.placement.planner import plan
from gpulab.core.policies.server_fit import (
    UINT32_MAX,
    fit_margins,
    overflow_pattern,
    server_config,
    server_fit,
    server_would_fit,
    user_placement,
)


def _moe_profile():
    return make_hand_moe_profile(n_layer=8, expert_bytes=40 * MiB, dense_bytes=4 * MiB)


def _left(p, i):
    d = p.offload_devices[i]
    return d.free_bytes - (d.weights_bytes + d.kv_bytes + d.compute_bytes)


def test_nothing_to_change_keeps_the_settings_and_resolves_c_0():
    prof = make_profile(n_layer=10, layer_bytes=50 * MiB)
    devs = parse_sim_spec("2x24GiB")
    r = server_fit(prof, devs, SplitConfig(n_ctx=0))
    assert r.status == "unchanged" and r.ok
    assert r.config.n_ctx == prof.n_ctx_train and r.config.n_gpu_layers == -1 and r.config.fit == "off"
    assert r.flags(devs) == f"-c {prof.n_ctx_train} -ngl -1"
    assert "no changes needed" in r.reasons[-2]


def test_one_device_shrinks_the_context_in_steps_of_256_and_no_further():
    prof = make_profile(n_layer=10, layer_bytes=50 * MiB)
    need = plan(prof, parse_sim_spec("80GiB"), SplitConfig(n_ctx=4096)).offload_devices[0].used_bytes
    devs = parse_sim_spec(f"{(need + 1104 * MiB) // MiB}MiB")     # 80 MiB above what -c 4096 needs
    r = server_fit(prof, devs, SplitConfig(n_ctx=0))
    assert r.status == "success" and r.changed == ("n_ctx",)
    assert r.config.n_ctx % 256 == 0 and 4096 < r.config.n_ctx < prof.n_ctx_train
    assert _left(plan(prof, devs, r.config), 0) >= 1024 * MiB
    assert "entire model can be fit by reducing context" in r.reasons


def test_an_explicit_c_0_is_full_context_and_fit_ctx_is_the_floor():
    prof = make_profile(n_layer=10, layer_bytes=50 * MiB)
    devs = parse_sim_spec("1600MiB,1600MiB")
    full = server_fit(prof, devs, SplitConfig(n_ctx=0), n_ctx_min=UINT32_MAX)
    assert full.config.n_ctx == prof.n_ctx_train
    assert any("user has requested full context size" in x for x in full.reasons)
    floor = server_fit(prof, devs, SplitConfig(n_ctx=0, fit_ctx=6144))
    assert floor.config.n_ctx >= 6144


def test_dense_layers_fill_the_last_device_first_and_every_device_meets_its_target():
    prof = make_profile(n_layer=30, layer_bytes=400 * MiB)
    devs = parse_sim_spec("4GiB,6GiB,3GiB")
    r = server_fit(prof, devs, SplitConfig(n_ctx=0, fit_target=(512, 256, 768)))
    assert r.status == "success" and set(r.changed) >= {"n_gpu_layers", "tensor_split"}
    assert r.config.n_gpu_layers == sum(r.layers_per_device) < prof.n_layer + 1
    assert r.config.tensor_split == tuple(float(x) for x in r.layers_per_device)
    p = plan(prof, devs, r.config)
    for i, margin in enumerate((512, 256, 768)):
        assert _left(p, i) >= margin * MiB
        # one more layer on that device would not have fitted (false position stops at the edge)
        more = list(r.layers_per_device)
        more[i] += 1
        bigger = plan(prof, devs, r.config.replace(n_gpu_layers=sum(more), tensor_split=tuple(map(float, more))))
        assert _left(bigger, i) < margin * MiB
    assert re.fullmatch(r"-c \d+ -ngl \d+ -ts \d+,\d+,\d+", r.flags(devs))


def test_user_settings_make_fit_give_up_after_the_context_step():
    prof = make_profile(n_layer=30, layer_bytes=200 * MiB)
    devs = parse_sim_spec("2x3GiB")
    for cfg, why in ((SplitConfig(n_ctx=0, n_gpu_layers=20), "n_gpu_layers already set by user to 20"),
                     (SplitConfig(n_ctx=0, n_gpu_layers=-2), "n_gpu_layers already set by user to -2"),
                     (SplitConfig(n_ctx=0, tensor_split=(1, 1)), "tensor_split already set by user"),
                     (SplitConfig(n_ctx=0, tensor_overrides=(r"blk\.0\.=CPU",)), "tensor_buft_overrides already set")):
        r = server_fit(prof, devs, cfg)
        assert r.status == "failure" and why in r.reasons[-1] and r.flags(devs) == ""
        # llama-server still loads the reduced context fit chose before giving up
        assert r.config.n_ctx == 4096 and r.config.n_gpu_layers == cfg.n_gpu_layers


def test_fit_off_changes_nothing():
    prof = make_profile(n_layer=30, layer_bytes=200 * MiB)
    r = server_fit(prof, parse_sim_spec("2x4GiB"), SplitConfig(n_ctx=0, fit="off"))
    assert r.status == "off" and r.config == r.given and r.flags() == ""


def test_moe_experts_go_to_the_cpu_and_each_rule_names_a_layer():
    prof = _moe_profile()
    devs = parse_sim_spec("2x1300MiB")
    r = server_fit(prof, devs, SplitConfig(n_ctx=0, fit_target=(1024,)))
    assert r.status == "success", r.reasons
    assert r.overrides and all(t in ("CPU", "SIM0", "SIM1") for _, t in r.overrides)
    assert any("with only dense weights in device memory" in x for x in r.reasons)
    p = plan(prof, devs, r.config)
    assert p.moved_tensors, "the -ot rules moved no expert"
    for i in range(2):
        assert _left(p, i) >= 1024 * MiB - 1
    text = r.flags(devs)
    assert text.count(' -ot "') == 1 and text.endswith('"')


def test_overflow_patterns_are_fit_cpps():
    assert overflow_pattern(3, 4) == r"blk\.3\.ffn_(up|down|gate_up|gate)_(ch|)exps"
    assert overflow_pattern(12, 1) == r"blk\.12\.ffn_(gate|up|gate_up|down).*"
    assert overflow_pattern(0, 3) == r"blk\.0\.ffn_down.*"


def test_flags_parse_as_common_arg_does():
    assert parse_ngl("auto") == -1 and parse_ngl("all") == -2 and parse_ngl("7") == 7
    with pytest.raises(ConfigError, match="'auto' or 'all'"):
        parse_ngl("most")
    assert parse_mib_list("512,2048") == (512, 2048) and parse_mib_list("1/2") == (1, 2)
    assert fit_margins(SplitConfig(fit_target=(512,)), 3) == [512 * MiB] * 3
    assert fit_margins(SplitConfig(fit_target=(10, 20)), 3) == [10 * MiB, 20 * MiB, 1024 * MiB]
    assert fit_margins(SplitConfig(), 2) == [1024 * MiB] * 2
    with pytest.raises(ConfigError):
        SplitConfig(fit="maybe")


def test_near_boundary_decisions_are_reported():
    prof = make_profile(n_layer=30, layer_bytes=200 * MiB)
    devs = parse_sim_spec("2x4GiB")
    r = server_fit(prof, devs, SplitConfig(n_ctx=0, fit_target=(512,)))
    # fit settles on 16 + 14 layers; SIM0's 16th lands 12 MiB under its target, inside what gpulab's
    # compute buffers may be off by: that decision, and no other (SIM1's 14 layers leave 117 MiB), is flagged
    assert (r.config.n_gpu_layers, r.config.tensor_split) == (30, (16.0, 14.0))
    assert r.near_boundary == (
        "16 layers on SIM0: projected 3572.0 MiB vs target 3584.0 MiB, within gpulab's compute-buffer "
        "uncertainty (12.1 MiB): fit's dry run may decide the other way",)
    # with a 1 GiB margin no decision is that close
    assert server_fit(prof, devs, SplitConfig(n_ctx=0, fit_target=(1024,))).near_boundary == ()


def test_llama_servers_defaults_fill_what_was_not_given():
    given = SplitConfig(n_ctx=4096, n_seq_max=2)
    assert server_config(given, ctx_given=False, parallel_given=False) == (
        SplitConfig(n_ctx=0, n_seq_max=4, kv_unified=True), None)
    assert server_config(given, ctx_given=True, parallel_given=True) == (given, None)
    # an explicit -c 0 asks for the full context: fit may not shrink it
    assert server_config(SplitConfig(n_ctx=0), ctx_given=True, parallel_given=True)[1] == UINT32_MAX


def test_fit_places_the_weights_only_where_the_user_did_not():
    two, one = parse_sim_spec("2x24GiB"), parse_sim_spec("1x24GiB")
    assert server_would_fit(SplitConfig(), two)
    assert not server_would_fit(SplitConfig(fit="off"), two)
    assert not server_would_fit(SplitConfig(n_gpu_layers=10), one)
    assert not server_would_fit(SplitConfig(tensor_split=(1.0, 1.0)), two)
    assert server_would_fit(SplitConfig(split_mode="none"), two)      # one device: fit places its layers
    # row (SYCL devices only) is refused with several devices, not with one
    assert user_placement(SplitConfig(split_mode="row"), 2) == (
        "changing weight allocation for LLAMA_SPLIT_MODE_ROW not implemented, abort")
    assert user_placement(SplitConfig(split_mode="row"), 1) is None
    assert not server_would_fit(SplitConfig(split_mode="tensor"), two)
    assert not server_would_fit(SplitConfig(tensor_overrides=("blk\\.0\\..*=CPU",)), one)
