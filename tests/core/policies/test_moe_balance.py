"""The moe-balance policy (gpulab/core/policies/moe_balance.py) on MoE profiles shaped like real models.

Its agreement with llama.cpp's own placement is in tests/integration/test_overrides_vs_llama.py;
the spreads it reaches against --n-cpu-moe are recorded by bench/moe_balance.py.
"""

from __future__ import annotations

import pytest

from builders import make_moe_profile, make_profile
from gpulab import ConfigError, SplitConfig, parse_sim_spec, plan
from gpulab.core.overrides import parse_override_text
from gpulab.core.policies.apply import apply_policy
from gpulab.core.policies.moe_balance import expert_bytes_on, moe_balance, spread_bytes

GiB = 1024**3
CTX = SplitConfig(n_ctx=8192)


@pytest.fixture(scope="module")
def qwen30b():
    return make_moe_profile()          # Qwen3-30B-A3B-shaped, ~16 GiB at 4.5 bits per weight


def _largest_expert_tensor(prof) -> int:
    return max(t.n_bytes for layer in prof.layers for t in layer.tensors if t.is_expert)


def _fewest_ncmoe_that_fits(prof, devices, config):
    for n in range(prof.n_layer + 1):
        p = plan(prof, devices, config.replace(n_cpu_moe=n))
        if p.fits:
            return n, p
    raise AssertionError("no -ncmoe fits")


@pytest.mark.parametrize("sim", ["2x8GiB", "4x4GiB", "3x5GiB"])
def test_spread_is_smaller_than_n_cpu_moe_at_the_same_cpu_share(qwen30b, sim):
    devices = parse_sim_spec(sim)
    n, ncmoe = _fewest_ncmoe_that_fits(qwen30b, devices, CTX)
    assert n > 0, "the case must need the CPU"
    cpu_share = expert_bytes_on(ncmoe, "CPU")
    b = moe_balance(qwen30b, devices, CTX, cpu_expert_bytes_at_least=cpu_share)
    unit = _largest_expert_tensor(qwen30b)
    assert abs(b.cpu_expert_bytes - cpu_share) <= unit, "not the same CPU share"
    assert expert_bytes_on(b.plan, "CPU") == b.cpu_expert_bytes
    assert b.plan.fits
    # -ncmoe empties the first cards and leaves the last one full; whole tensors even it out
    assert spread_bytes(ncmoe) > 4 * unit
    assert b.spread_bytes <= unit < spread_bytes(ncmoe)


@pytest.mark.parametrize("sim", ["2x8GiB", "4x4GiB", "9GiB,4GiB,3GiB"])
def test_only_what_does_not_fit_goes_to_the_cpu(qwen30b, sim):
    devices = parse_sim_spec(sim)
    _, ncmoe = _fewest_ncmoe_that_fits(qwen30b, devices, CTX)
    b = moe_balance(qwen30b, devices, CTX)
    assert b.plan.fits
    assert 0 < b.cpu_expert_bytes < expert_bytes_on(ncmoe, "CPU")
    # every device is full to within one expert tensor: nothing more would fit anywhere
    left = [d.free_bytes - d.used_bytes for d in b.plan.offload_devices]
    assert max(left) <= _largest_expert_tensor(qwen30b)


def test_when_everything_fits_nothing_goes_to_the_cpu_and_uneven_cards_fill_evenly(qwen30b):
    devices = parse_sim_spec("16GiB,8GiB,6GiB")
    plain = plan(qwen30b, devices, CTX.replace(tensor_split=(16, 8, 6)))
    b = moe_balance(qwen30b, devices, CTX)
    assert b.cpu_expert_bytes == 0 and expert_bytes_on(b.plan, "CPU") == 0
    assert b.spread_bytes <= _largest_expert_tensor(qwen30b) < spread_bytes(plain)
    # experts moved to another card, as whole tensors
    assert b.plan.moved_tensors and all(t.endswith("_exps.weight") for t in b.plan.moved_tensors)
    assert set(b.plan.moved_tensors.values()) <= {"SIM0", "SIM1", "SIM2"}


def test_the_rules_are_llama_cpp_flags_that_give_the_same_plan(qwen30b):
    devices = parse_sim_spec("4x4GiB")
    cfg = apply_policy("moe-balance", qwen30b, devices, CTX)
    # what a user copies to llama-server: four equal GPUs share the dense part evenly, and the experts
    # that do not fit stay on the CPU, whole tensors of five layers
    assert cfg.tensor_split == (1.0, 1.0, 1.0, 1.0)
    assert cfg.tensor_overrides == (r"blk\.(0|1|37)\.(ffn_down_exps|ffn_gate_exps|ffn_up_exps)\.=CPU",
                                    r"blk\.(13|25)\.(ffn_gate_exps|ffn_up_exps)\.=CPU")
    rules = [r for item in cfg.tensor_overrides for r in parse_override_text(item)]
    assert rules and {r.target for r in rules} <= {"CPU", "SIM0", "SIM1", "SIM2", "SIM3"}
    p = plan(qwen30b, devices, cfg)
    # every rule moves whole expert tensors and nothing else; layers stay where -ts puts them
    assert all(m.tensors and all("_exps." in t for t in m.tensors) for m in p.rule_matches)
    assert p.layer_devices == plan(qwen30b, devices, cfg.replace(tensor_overrides=())).layer_devices
    # a layer's experts either stay with it or move whole: no tensor is split
    assert sum(m.n_bytes for m in p.rule_matches) == sum(
        t.n_bytes for layer in qwen30b.layers for t in layer.tensors if t.name in p.moved_tensors)


def test_partial_ngl_keeps_the_cpu_layers_and_balances_the_rest(qwen30b):
    devices = parse_sim_spec("2x6GiB")
    b = moe_balance(qwen30b, devices, CTX.replace(n_gpu_layers=30))
    assert b.plan.layer_devices[:19] == ("CPU",) * 19
    assert b.plan.fits and b.spread_bytes <= _largest_expert_tensor(qwen30b)


def test_refusals_say_why(qwen30b):
    devices = parse_sim_spec("2x8GiB")
    with pytest.raises(ConfigError, match="has none; use --policy balanced"):
        moe_balance(make_profile(n_layer=8), devices)
    for given in (dict(n_cpu_moe=4), dict(cpu_moe=True), dict(tensor_overrides=("exps=CPU",))):
        with pytest.raises(ConfigError, match="writes the expert rules itself"):
            moe_balance(qwen30b, devices, CTX.replace(**given))
    with pytest.raises(ConfigError, match="at least one offload device"):
        moe_balance(qwen30b, devices, CTX.replace(devices=("none",)))
