"""gpulab.core.policies.context: the largest context that fits, and the table against the KV type."""

from __future__ import annotations

import pytest

from builders import MiB, make_profile
from gpulab.core.config import SplitConfig
from gpulab.core.devices import parse_sim_spec
from gpulab.core.placement.planner import plan
from gpulab.core.policies.context import ctx_table, largest_ctx


def _left(p):
    return [d.free_bytes - d.used_bytes for d in p.offload_devices]


@pytest.mark.parametrize("np_", [1, 2])
def test_the_largest_context_fits_and_one_step_more_does_not(np_):
    prof = make_profile(n_layer=20, layer_bytes=100 * MiB)
    prof = prof.__class__(**{**prof.__dict__, "n_ctx_train": 131072})
    devs = parse_sim_spec("3GiB,2GiB")
    cfg = SplitConfig(n_seq_max=np_, fit_target=(256,))
    n = largest_ctx(prof, devs, cfg)
    step = 256 * np_
    assert n > 0 and n % step == 0 and n < 131072 * np_
    assert min(_left(plan(prof, devs, cfg.replace(n_ctx=n)))) >= 256 * MiB
    assert min(_left(plan(prof, devs, cfg.replace(n_ctx=n + step)))) < 256 * MiB


def test_the_training_context_caps_it_and_nothing_fitting_is_0():
    prof = make_profile(n_layer=4, layer_bytes=10 * MiB)
    assert largest_ctx(prof, parse_sim_spec("80GiB"), SplitConfig()) == prof.n_ctx_train
    assert largest_ctx(prof, parse_sim_spec("80GiB"), SplitConfig(), max_ctx=5000) == 4864
    big = make_profile(n_layer=40, layer_bytes=500 * MiB)
    assert largest_ctx(big, parse_sim_spec("4GiB"), SplitConfig()) == 0


def test_quantized_kv_holds_more_context():
    prof = make_profile(n_layer=20, layer_bytes=100 * MiB)
    prof = prof.__class__(**{**prof.__dict__, "n_ctx_train": 262144})
    rows = ctx_table(prof, parse_sim_spec("3GiB,3GiB"), SplitConfig(flash_attn="off", fit_target=(512,)))
    by = {r.type_k: r.n_ctx for r in rows}
    assert list(by) == ["f16", "q8_0", "q4_0"]
    assert 0 < by["f16"] < by["q8_0"] < by["q4_0"]
