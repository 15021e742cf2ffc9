"""FleetLab through its Python state: every control change re-plans the fleet and redraws it."""

from __future__ import annotations

from builders import make_profile
from gpulab.core.devices import parse_sim_spec
from gpulab.core.fleet.model import Fleet, FleetModel
from gpulab.core.fleet.planner import plan_fleet
from gpulab.ui.fleet_lab import FleetLab

MiB = 1024**2


def _lab():
    profs = {"chat": make_profile(n_layer=24, layer_bytes=200 * MiB), "coder": make_profile(n_layer=16),
             "embed": make_profile(n_layer=6, layer_bytes=20 * MiB)}
    fleet = Fleet((FleetModel("chat", "c.gguf", ctx=4096), FleetModel("coder", "k.gguf", ctx=4096),
                   FleetModel("embed", "e.gguf", keep_loaded=False)))
    devices = parse_sim_spec("8GiB,8GiB,6GiB")
    return FleetLab(fleet, profs, devices), profs, devices


def _bars(lab, model, term="weights"):
    return next(t for t in lab.figure.data if t.name.startswith(f"{model} {term}"))


def test_the_lab_shows_the_fleet_plan():
    lab, profs, devices = _lab()
    expected = plan_fleet(lab.fleet, profs, devices)
    assert lab.plan.to_dict() == expected.to_dict()
    assert len(lab.figure.data) == 3 * 3 + 1
    chat = lab.plan.placement("chat")
    ys = dict(zip(_bars(lab, "chat").x, _bars(lab, "chat").y))
    assert all((ys[d] > 0) == (d in chat.devices) for d in ys)
    assert "fits" in lab.status.value


def test_pin_moves_a_model_and_redraws():
    lab, _, _ = _lab()
    lab.pin("coder", ["SIM2"])
    assert lab.plan.placement("coder").devices == ("SIM2",)
    ys = dict(zip(_bars(lab, "coder").x, _bars(lab, "coder").y))
    assert ys["SIM2"] > 0 and ys["SIM0"] == 0 and ys["SIM1"] == 0
    lab.pin("coder", [])
    assert lab.fleet.model("coder").devices == ()


def test_context_and_keep_loaded_replan():
    lab, _, _ = _lab()
    kv_before = sum(d.kv_bytes for d in lab.plan.placement("chat").plan.offload_devices)
    lab.set_ctx("chat", 16384)
    assert lab.plan.placement("chat").plan.config.n_ctx == 16384
    assert sum(d.kv_bytes for d in lab.plan.placement("chat").plan.offload_devices) == 4 * kv_before
    lab.set_keep_loaded("embed", True)
    assert lab.plan.placement("embed").resident
    assert "(swappable)" not in " ".join(t.name for t in lab.figure.data)


def test_an_infeasible_change_shows_the_explanation():
    lab, _, _ = _lab()
    lab.set_ctx("chat", 262144)
    assert not lab.plan.fits
    assert "DOES NOT FIT" in lab.status.value and "short by" in lab.status.value
    assert "DOES NOT FIT" in lab.figure.layout.title.text


def test_a_cluster_in_the_lab_shows_the_search_its_budget_and_progress():
    """12 models on 12 equal cards: the heuristic search; the status says what it did, the
    progress bar ends full, and a time budget set in the lab still gives a whole plan."""
    profs = {f"m{i}": make_profile(n_layer=8, layer_bytes=50 * MiB) for i in range(12)}
    fleet = Fleet(tuple(FleetModel(n, f"{n}.gguf") for n in profs))
    lab = FleetLab(fleet, profs, parse_sim_spec("12x2GiB"), time_budget=5.0)
    assert lab.plan.search == "heuristic" and lab.plan.fits
    assert "search: greedy, then branch and bound" in lab.status.value
    assert "12 device slots; no plan needs fewer than 12, gap 0.0%" in lab.status.value
    assert lab.progress.value == 1.0 and lab.time_budget.value == 5.0
    lab.time_budget.value = 0.5
    assert lab.plan.fits and len(lab.plan.placements) == 12


def test_contexts_offered_stop_at_the_training_context():
    from gpulab.ui.fleet_lab import ctx_choices
    assert ctx_choices(32768, 4096) == [512, 1024, 2048, 4096, 8192, 16384, 32768]
    assert ctx_choices(40960, 4096)[-2:] == [32768, 40960]     # the training context itself is offered
    assert ctx_choices(2048, 4096) == [512, 1024, 2048, 4096]  # the fleet file's choice stays
    assert ctx_choices(0, 4096)[-1] == 262144                  # unknown: the usual range
    lab, _, _ = _lab()                                         # make_profile: trained at 8192
    assert max(lab.rows["chat"]["ctx"].options) == 8192
