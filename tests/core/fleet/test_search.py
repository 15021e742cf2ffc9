"""The fleet search at cluster size (gpulab.core.fleet.search): against the exhaustive search on
fleets small enough for it, and the same plan whichever order equal cards are listed in."""

from __future__ import annotations

import pytest

from gpulab.core.devices import parse_sim_spec
from gpulab.core.fleet.model import Fleet, FleetModel
from gpulab.core.fleet.planner import plan_fleet
from gpulab.testing import MiB, heuristic_vs_exhaustive, make_profile


@pytest.mark.parametrize("objective", ["fewest", "balanced", "tg"])
def test_the_heuristic_fits_whenever_the_exhaustive_search_does_and_is_within_5_percent(objective):
    fits, missed, losses = heuristic_vs_exhaustive(objective, 6, seed=28)
    assert fits >= 3            # the seed gives fleets that fit (and some that do not)
    assert missed == 0
    assert max(losses) <= 0.05, sorted(losses)


def _equal_cards_plan(order):
    profs = {"big": make_profile(n_layer=32, layer_bytes=400 * MiB),      # ~12.5 GiB: two 8 GiB cards
             "mid": make_profile(n_layer=24, layer_bytes=200 * MiB),
             "mid2": make_profile(n_layer=24, layer_bytes=200 * MiB),
             "small": make_profile(n_layer=12, layer_bytes=100 * MiB)}
    fleet = Fleet(tuple(FleetModel(n, f"{n}.gguf", ctx=4096) for n in profs))
    devices = parse_sim_spec("12x8GiB")
    return plan_fleet(fleet, profs, [devices[i] for i in order], advise=False)


@pytest.mark.parametrize("objective_order", [list(range(11, -1, -1)), [5, 0, 11, 3, 8, 1, 10, 2, 7, 4, 9, 6]])
def test_equal_cards_get_the_same_plan_whichever_order_they_are_listed_in(objective_order):
    ref = _equal_cards_plan(list(range(12)))
    other = _equal_cards_plan(objective_order)
    assert ref.search == other.search == "heuristic" and ref.fits and other.fits
    # the same models on the same cards; a split model's -ts follows the order its cards are
    # listed in (llama.cpp's device order: the output layer goes to the last), so its bytes per
    # card are compared as a multiset, the others card by card
    assert {p.name: sorted(p.devices) for p in ref.placements} == {p.name: sorted(p.devices) for p in other.placements}
    assert {p.name: sorted(d.used_bytes for d in p.plan.offload_devices) for p in ref.placements} == \
        {p.name: sorted(d.used_bytes for d in p.plan.offload_devices) for p in other.placements}
    single = {d for p in ref.placements if len(p.devices) == 1 for d in p.devices}
    assert {d.name: d.used_bytes for d in ref.devices if d.name in single} == \
        {d.name: d.used_bytes for d in other.devices if d.name in single}
    # 'big' is split over two cards, the others take one each: the first five cards by name
    assert {p.name: len(p.devices) for p in ref.placements} == {"big": 2, "mid": 1, "mid2": 1, "small": 1}
    assert sorted(d for p in ref.placements for d in p.devices) == ["SIM0", "SIM1", "SIM2", "SIM3", "SIM4"]


def test_a_spent_time_budget_still_returns_the_first_greedy_plan_whole():
    """A budget that ends before the improvement starts: the first greedy pass still runs to its
    end, so every model has its plan, the plan says the budget stopped it, and progress was told."""
    seen = []
    profs = {f"m{i}": make_profile(n_layer=8, layer_bytes=50 * MiB) for i in range(10)}
    fleet = Fleet(tuple(FleetModel(n, f"{n}.gguf") for n in profs))
    fp = plan_fleet(fleet, profs, parse_sim_spec("10x2GiB"), objective="balanced", time_budget=1e-9,
                    progress=lambda f, text: seen.append((f, text)))
    assert fp.search == "heuristic" and fp.fits and len(fp.placements) == 10
    assert fp.search_limit.endswith("stopped at the time budget (1e-09 s)")
    assert all(p.devices for p in fp.placements)
    assert [t for _, t in seen][:2] == ["greedy 1/10 models", "greedy 2/10 models"]
    assert all(0.0 <= f <= 1.0 for f, _ in seen)
