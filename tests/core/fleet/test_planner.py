"""The fleet planner: every model gets a device set and split, the sums per device fit the budget
(free less keep_free), pins hold, and an infeasible fleet is explained with exact bytes.

Every expected byte count here comes from gpulab.core.placement.planner.plan of the single model (the
planner that tests/integration checks against llama.cpp), never from a number written down."""

from __future__ import annotations

import re

import pytest

from builders import make_profile
from gpulab.core.config import SplitConfig
from gpulab.core.devices import Device, parse_sim_spec
from gpulab.core.errors import ConfigError
from gpulab.core.fleet.model import Fleet, FleetModel
from gpulab.core.fleet.planner import plan_fleet
from gpulab.core.placement.planner import plan
from gpulab.core.units import format_bytes

GiB = 1024**3
MiB = 1024**2


def _profiles():
    return {
        "big": make_profile(n_layer=24, layer_bytes=200 * MiB),     # ~5 GiB
        "mid": make_profile(n_layer=16, layer_bytes=150 * MiB),     # ~2.7 GiB
        "small": make_profile(n_layer=8, layer_bytes=50 * MiB),     # ~0.8 GiB
    }


def _alone(profile, device: Device, **cfg) -> int:
    """The model's bytes on one device, alone (what the fleet planner must add up)."""
    return plan(profile, [device], SplitConfig(devices=(device.name,), **cfg)).device(device.name).used_bytes


def _check_sums(fp):
    """Every device's used bytes are the sum of the models' plans on it (resident + the largest
    swappable), and each model's plan uses exactly its devices."""
    for d in fp.devices:
        resident = sum(p.bytes_on(d.name) for p in fp.placements if p.resident)
        swap = max((p.bytes_on(d.name) for p in fp.placements if not p.resident), default=0)
        assert d.used_bytes == resident + swap
        assert dict(d.by_model) == {p.name: p.bytes_on(d.name) for p in fp.placements if p.bytes_on(d.name)}
    for p in fp.placements:
        assert p.plan.config.devices == (p.devices or ("none",))
        if len(p.devices) > 1:
            assert len(p.plan.config.tensor_split) == len(p.devices)   # always an explicit -ts


def test_each_model_on_one_device_when_one_holds_it():
    profs = _profiles()
    devs = parse_sim_spec("8GiB,8GiB,8GiB")
    fleet = Fleet(tuple(FleetModel(n, f"{n}.gguf", ctx=4096) for n in profs))
    fp = plan_fleet(fleet, profs, devs)
    assert fp.fits and fp.search == "exhaustive"
    assert all(len(p.devices) == 1 for p in fp.placements)
    # fewest devices, then the most left on the tightest device: three models, three devices
    assert len({p.devices for p in fp.placements}) == 3
    for p in fp.placements:
        assert p.bytes_on(p.devices[0]) == _alone(profs[p.name], devs[0], n_ctx=4096)
    _check_sums(fp)
    assert fp.to_dict()["fits"] is True


def test_a_model_no_single_device_holds_is_split_and_the_sums_fit():
    profs = _profiles()
    devs = parse_sim_spec("4GiB,4GiB,4GiB")
    fleet = Fleet((FleetModel("big", "b.gguf"), FleetModel("small", "s.gguf")))
    fp = plan_fleet(fleet, {k: profs[k] for k in ("big", "small")}, devs)
    assert fp.fits
    big = fp.placement("big")
    assert len(big.devices) == 2
    assert fp.placement("small").devices and len(fp.placement("small").devices) == 1
    for d in fp.devices:
        assert d.used_bytes <= d.free_bytes
    _check_sums(fp)


def test_keep_free_and_pins_are_respected():
    profs = _profiles()
    devs = parse_sim_spec("8GiB,8GiB")
    need = _alone(profs["big"], devs[0])
    # SIM0 could hold "big" alone, but not once 8 GiB - need + 1 byte must stay free
    fleet = Fleet((FleetModel("big", "b.gguf"), FleetModel("small", "s.gguf", devices=("SIM0",))),
                  keep_free={"SIM0": 8 * GiB - need + 1})
    fp = plan_fleet(fleet, {k: profs[k] for k in ("big", "small")}, devs)
    assert fp.fits
    assert fp.placement("small").devices == ("SIM0",)
    assert fp.placement("big").devices == ("SIM1",)
    assert fp.device("SIM0").keep_free_bytes == 8 * GiB - need + 1
    _check_sums(fp)


def test_balanced_leaves_at_least_as_much_on_the_tightest_device():
    profs = _profiles()
    devs = parse_sim_spec("8GiB,8GiB,6GiB")
    fleet = Fleet(tuple(FleetModel(n, f"{n}.gguf") for n in profs))
    fewest = plan_fleet(fleet, profs, devs)
    balanced = plan_fleet(fleet, profs, devs, objective="balanced")
    left = lambda fp: min(d.budget_bytes - d.used_bytes for d in fp.devices)   # noqa: E731
    assert fewest.fits and balanced.fits
    assert left(balanced) >= left(fewest)
    assert sum(len(p.devices) for p in fewest.placements) <= sum(len(p.devices) for p in balanced.placements)
    _check_sums(balanced)


def test_the_heuristic_beyond_the_exhaustive_limit_fits_an_easy_fleet_and_says_what_it_did():
    profs = _profiles()
    devs = parse_sim_spec("8GiB,8GiB,8GiB")
    fleet = Fleet(tuple(FleetModel(n, f"{n}.gguf") for n in profs))
    fp = plan_fleet(fleet, profs, devs, exhaustive_limit=0)
    assert fp.search == "heuristic" and fp.fits
    # three models, one device each: 3 slots, and no plan can use fewer
    assert fp.value == 3 and fp.bound == 3 and fp.gap == 0
    assert "explored" in fp.search_limit
    detail = fp.to_dict()["search_detail"]
    assert detail["value"] == 3 and detail["gap"] == 0 and detail["value_is"].startswith("device slots")
    _check_sums(fp)


def test_tg_objective_needs_a_model_of_the_fleet():
    profs = _profiles()
    fleet = Fleet(tuple(FleetModel(n, f"{n}.gguf") for n in profs))
    devs = parse_sim_spec("8GiB:1000GB/s,8GiB:300GB/s")
    fp = plan_fleet(fleet, profs, devs, objective="tg:mid")
    assert fp.fits
    assert fp.placement("mid").devices == ("SIM0",)    # the fast device, alone: no hop
    with pytest.raises(ConfigError, match="names no model"):
        plan_fleet(fleet, profs, devs, objective="tg:nope")
    with pytest.raises(ConfigError, match="not one of"):
        plan_fleet(fleet, profs, devs, objective="fastest")


def test_unknown_devices_are_bad_input():
    profs = _profiles()
    devs = parse_sim_spec("8GiB")
    with pytest.raises(ConfigError, match="pinned to CUDA3"):
        plan_fleet(Fleet((FleetModel("small", "s", devices=("CUDA3",)),)), profs, devs)
    with pytest.raises(ConfigError, match=r"\[devices.CUDA0\]: no such device"):
        plan_fleet(Fleet((FleetModel("small", "s"),), keep_free={"CUDA0": 1}), profs, devs)


def test_infeasible_fleet_is_explained_with_exact_bytes():
    """Four models pinned to one device: three resident, one swappable. The device is short by
    exactly the bytes the planner gives each model alone; the advice names the model whose
    swapping out makes it fit, a context that does, and a KV type's saving, all in bytes."""
    profs = _profiles()
    profs["small2"] = make_profile(n_layer=6, layer_bytes=50 * MiB)
    dev = parse_sim_spec("64GiB")[0]
    ctx = 8192
    alone = {n: _alone(p, dev, n_ctx=ctx) for n, p in profs.items()}
    # the swappable one: at least as large as 'small' on SIM0, so 'small' fits in its place
    assert alone["mid"] >= alone["small"]
    keep = 2 * GiB
    budget = alone["big"] + alone["small2"] + alone["mid"] + MiB     # fits if 'small' were swappable
    dev = Device("SIM0", 64 * GiB, budget + keep, "sim")
    fleet = Fleet((FleetModel("big", "b", ctx=ctx, devices=("SIM0",)),
                   FleetModel("small", "s", ctx=ctx, devices=("SIM0",)),
                   FleetModel("small2", "s2", ctx=ctx, devices=("SIM0",)),
                   FleetModel("mid", "m", ctx=ctx, devices=("SIM0",), keep_loaded=False)),
                  keep_free={"SIM0": keep})
    fp = plan_fleet(fleet, profs, [dev])
    assert not fp.fits
    assert [p.name for p in fp.placements] == ["big", "small", "small2", "mid"]    # nobody dropped
    d = fp.device("SIM0")
    used = alone["big"] + alone["small"] + alone["small2"] + alone["mid"]
    assert d.used_bytes == used
    assert d.deficit_bytes == used - budget == alone["small"] - MiB
    short = [a for a in fp.advice if a.kind == "short"]
    assert len(short) == 1 and short[0].device == "SIM0" and short[0].bytes == alone["small"] - MiB
    assert f"short by {format_bytes(alone['small'] - MiB)}:" in short[0].text    # people's units; bytes in .bytes
    assert not re.search(r"\d B\b", " ".join(a.text for a in fp.advice))          # no raw byte counts

    # swappable: exactly the resident models whose swapping out fits (resident - x + max(x, mid) <= budget)
    resident = ["big", "small", "small2"]
    expected = {x for x in resident
                if sum(alone[r] for r in resident if r != x) + max(alone[x], alone["mid"]) <= budget}
    assert "small" in expected
    assert {a.model for a in fp.advice if a.kind == "swappable"} == expected

    # shrink: the largest context that saves the deficit on SIM0, and no larger one does
    deficit = d.deficit_bytes
    for a in (a for a in fp.advice if a.kind == "shrink" and a.device and "ctx =" in a.text):
        new_ctx = int(a.text.split("ctx = ")[1].split(" ")[0])
        saved = alone[a.model] - _alone(profs[a.model], dev, n_ctx=new_ctx)
        assert saved == a.bytes >= deficit
        if new_ctx + 256 < ctx:
            assert alone[a.model] - _alone(profs[a.model], dev, n_ctx=new_ctx + 256) < deficit
    # a change to one model that makes the whole fleet fit is true when re-planned
    from dataclasses import replace
    for a in (a for a in fp.advice if a.kind == "shrink" and not a.device):
        m = fleet.model(a.model)
        change = (dict(type_k="q8_0", type_v="q8_0") if "q8_0" in a.text
                  else dict(ctx=int(a.text.split("ctx = ")[1].split(" ")[0])))
        other = replace(fleet, models=tuple(replace(x, **change) if x is m else x for x in fleet.models))
        assert plan_fleet(other, profs, [dev]).fits
    q8 = [a for a in fp.advice if a.kind == "shrink" and a.device and "q8_0" in a.text and a.model == "big"]
    assert q8 and q8[0].bytes == alone["big"] - _alone(profs["big"], dev, n_ctx=ctx, type_k="q8_0", type_v="q8_0")
    assert [a["kind"] for a in fp.to_dict()["advice"]][0] == "short"


def test_an_unpinned_model_on_a_short_device_is_moved_where_it_fits():
    profs = _profiles()
    devs = parse_sim_spec("4GiB,4GiB")
    # 'mid' pinned to SIM0 together with 'small' pinned there too; SIM1 is empty
    big_free = _alone(profs["mid"], devs[0]) + MiB
    devs = [Device("SIM0", 4 * GiB, big_free, "sim"), devs[1]]
    fleet = Fleet((FleetModel("mid", "m", devices=("SIM0",)), FleetModel("small", "s", devices=("SIM0",))))
    fp = plan_fleet(fleet, profs, devs)
    assert not fp.fits
    moves = {a.model: a for a in fp.advice if a.kind == "move"}
    assert "small" in moves and moves["small"].device == "SIM1" and "unpin" in moves["small"].text
    assert moves["small"].bytes == _alone(profs["small"], devs[1])


def test_a_cpu_only_model_takes_no_device_and_the_rest_still_plan():
    profs = _profiles()
    devs = parse_sim_spec("8GiB,8GiB")
    fleet = Fleet((FleetModel("big", "b"), FleetModel("small", "s", n_gpu_layers=0), FleetModel("mid", "m")))
    fp = plan_fleet(fleet, profs, devs)
    assert fp.fits and fp.placement("small").devices == ()
    assert fp.placement("small").plan.config.devices == ("none",)
    assert all(len(fp.placement(n).devices) == 1 for n in ("big", "mid"))
    assert fp.placement("big").devices != fp.placement("mid").devices    # leximin: both devices used
    _check_sums(fp)


def test_a_models_draft_and_projector_are_counted_on_its_devices_as_the_process_plan_counts_them():
    """mmproj / draft in the fleet: the fleet planner adds what gpulab.core.policies.process plans for
    the same pasted command, per device (DevicePlan.process_bytes), and chooses devices with them."""
    from dataclasses import replace

    from gpulab.core.command_line import parse_command
    from gpulab.core.fleet.model import Companions
    from gpulab.core.placement.process import ProjectorProfile
    from gpulab.core.policies.process import plan_command

    main, draft = make_profile(n_layer=16, layer_bytes=150 * MiB), make_profile(n_layer=4, layer_bytes=20 * MiB)
    proj = ProjectorProfile("P", "mlp", weights_bytes=600 * MiB, has_vision=True, has_audio=False)
    m = FleetModel("chat", "A.gguf", ctx=4096, parallel=1, mmproj="P.gguf", draft="D.gguf",
                   draft_flags=("-ngld", "99"), companions=Companions(draft=draft, projector=proj))
    devices = parse_sim_spec("4GiB,4GiB")
    # the model alone (3.1 GiB) takes one 4 GiB device; with its projector (600 MiB) and draft (668 MiB) two
    alone = plan_fleet(Fleet((FleetModel("chat", "A.gguf", ctx=4096, parallel=1),)), {"chat": main}, devices)
    assert alone.placement("chat").plan.config.devices == ("SIM0",)
    fp = plan_fleet(Fleet((m,)), {"chat": main}, devices)
    pl = fp.placement("chat").plan
    assert fp.fits and pl.config.devices == ("SIM0", "SIM1")
    ts = ",".join(f"{x:g}" for x in pl.config.tensor_split)
    ref = plan_command(parse_command(["llama-server", "-m", "A", "--mmproj", "P", "-md", "D", "-ngld", "99",
                                      "-dev", "SIM0,SIM1", "-ts", ts, "-c", "4096", "-np", "1", "-fit", "off"]),
                       main, devices, draft=draft, projector=proj).process
    for name in ("SIM0", "SIM1"):
        r, d = ref.row(name), pl.device(name)
        assert d.process_bytes == r.draft_bytes + r.projector_bytes, name
        # (the main model's own rows are the fleet's plan of it: its outputs as plan() counts them)
        assert fp.device(name).used_bytes == d.buffer_bytes + r.draft_bytes + r.projector_bytes, name
    assert ref.row("SIM0").projector_bytes == 600 * MiB and ref.row("SIM1").projector_bytes == 0
    # without the companions read, the fleet says so rather than count nothing
    with pytest.raises(ConfigError, match=r"^chat: the fleet counts its draft and projector from the file"):
        plan_fleet(Fleet((replace(m, companions=None),)), {"chat": main}, devices)
