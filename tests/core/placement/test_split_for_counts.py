"""The strip's boundaries -> -ts: the -ts written for dragged layer counts must make llama.cpp's
rule (assign_layers: upper_bound of k / offloaded layers over the float32 split points) put
exactly those counts on each device, for any counts: zeros, long strips, many devices."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpulab.core.config import SplitConfig
from gpulab.core.devices import parse_sim_spec
from gpulab.core.errors import ConfigError
from gpulab.core.placement.planner import assign_layers, split_for_counts, split_points


def placed(counts: list[int], n_layer: int, ngl: int) -> list[int]:
    devs = parse_sim_spec(f"{len(counts)}x24GiB")
    cfg = SplitConfig(tensor_split=split_for_counts(counts), n_gpu_layers=ngl)
    names = assign_layers(n_layer, ngl, devs, split_points(devs, cfg))
    return [names.count(d.name) for d in devs]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=1, max_size=8).filter(lambda c: sum(c) > 0), st.integers(0, 60))
def test_the_counts_round_trip_through_llama_cpps_rule(counts, on_cpu):
    total = sum(counts)
    n_layer = total + on_cpu - 1          # the output layer is the last of the offloaded ones
    assert placed(counts, n_layer, total) == counts


def test_written_out_cases():
    assert split_for_counts([10, 5, 5, 5]) == (10.0, 5.0, 5.0, 5.0)
    assert split_for_counts([20, 5, 0, 0]) == (20.0, 5.0)          # llama.cpp pads -ts with zeros
    assert split_for_counts([0, 0]) == ()                          # all zero: the free-memory default
    # 129 layers (128 blocks + output) on 8 devices, the bench profile; one device left empty
    assert placed([17, 16, 16, 0, 16, 16, 16, 32], 128, 129) == [17, 16, 16, 0, 16, 16, 16, 32]
    assert placed([1, 128], 128, 129) == [1, 128]
    with pytest.raises(ConfigError, match="negative"):
        split_for_counts([3, -1])
