from __future__ import annotations

import pytest

from builders import make_profile
from gpulab import ConfigError, SplitConfig, parse_sim_spec, plan
from gpulab.core.policies.apply import apply_policy, policy_split

GiB = 1024**3
MiB = 1024**2


def test_ollama_spread_deals_a_61_block_model_over_8_gpus_as_8_8_8_8_8_8_7_7():
    prof = make_profile(n_layer=61, layer_bytes=50 * MiB)
    assert policy_split("ollama-spread", prof, parse_sim_spec("8x24GiB")) == (8, 8, 8, 8, 8, 8, 7, 7)


def test_ollama_spread_puts_layers_on_every_gpu_even_for_a_small_model():
    prof = make_profile(n_layer=61, layer_bytes=50 * MiB)
    p = plan(prof, parse_sim_spec("8x24GiB"), apply_policy("ollama-spread", prof, parse_sim_spec("8x24GiB")))
    assert all(d.n_layers > 0 for d in p.offload_devices)


def test_pack_uses_the_fewest_devices_that_fit():
    prof = make_profile(n_layer=32, layer_bytes=300 * MiB)    # ~10 GiB + KV
    devs = parse_sim_spec("24GiB@8GiB,24GiB@20GiB,24GiB@9GiB")
    ts = policy_split("pack", prof, devs)
    assert ts[0] == 0 and ts[2] == 0 and ts[1] > 0
    assert plan(prof, devs, SplitConfig(tensor_split=ts)).fits
    big = make_profile(n_layer=32, layer_bytes=800 * MiB)     # ~25 GiB: needs two
    ts = policy_split("pack", big, devs)
    assert sum(1 for x in ts if x) == 2 and plan(big, devs, SplitConfig(tensor_split=ts)).fits


def test_balanced_leaves_equal_headroom_within_one_layer():
    prof = make_profile(n_layer=80, layer_bytes=900 * MiB)
    devs = parse_sim_spec("80GiB@70GiB,80GiB@40GiB,48GiB")
    p = plan(prof, devs, apply_policy("balanced", prof, devs))
    left = [d.free_bytes - d.used_bytes for d in p.offload_devices]
    layer = prof.layers[0].weights_bytes + p.device("SIM0").kv_bytes // p.device("SIM0").n_layers
    assert max(left) - min(left) <= 1.5 * layer


def test_llama_policy_is_the_default_split_and_unknown_policy_is_refused():
    prof = make_profile()
    assert policy_split("llama", prof, parse_sim_spec("2x24GiB")) == ()
    with pytest.raises(ConfigError, match="unknown policy"):
        policy_split("fastest", prof, parse_sim_spec("2x24GiB"))
