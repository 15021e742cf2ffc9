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


def test_contexts_offered_stop_at_the_training_context():
    from gpulab.ui.fleet_lab import ctx_choices
    assert ctx_choices(32768, 4096) == [512, 1024, 2048, 4096, 8192, 16384, 32768]
    assert ctx_choices(40960, 4096)[-2:] == [32768, 40960]     # the training context itself is offered
    assert ctx_choices(2048, 4096) == [512, 1024, 2048, 4096]  # the fleet file's choice stays
    assert ctx_choices(0, 4096)[-1] == 262144                  # unknown: the usual range
    lab, _, _ = _lab()                                         # make_profile: trained at 8192
    assert max(lab.rows["chat"]["ctx"].options) == 8192
