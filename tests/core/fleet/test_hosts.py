"""The fleet planner on a cluster: a model stays within one host unless it must span, and the plan
says why it spans. Two hosts of two 3 GiB devices each; a model of 2.5 GiB, one of 4.9 GiB and one
of 7.8 GiB (layers, embeddings and output, made by hand)."""

from __future__ import annotations

from gpulab.core.cluster import cluster_from_dict
from gpulab.core.devices import Device
from gpulab.core.fleet.model import Fleet, FleetModel
from gpulab.core.fleet.planner import host_spans, plan_fleet, spanning
from gpulab.testing import MiB, make_profile

HOST = Device(name="CPU", total_bytes=64 << 30, free_bytes=64 << 30, source="host", kind="cpu")
DEV = {"spec": "3GiB", "device": "CUDA0"}


def _devices():
    c = cluster_from_dict({"head": "desk", "hosts": [
        {"name": "desk", "devices": [{"spec": "3GiB"}, {"spec": "3GiB"}]},
        {"name": "box", "address": "10.0.0.2", "link": {"gbit_per_s": 10, "rtt_ms": 0.1},
         "devices": [{**DEV, "port": 50052}, {**DEV, "port": 50053}]}]})
    devices, _ = c.devices()
    return devices


def test_a_model_that_fits_one_host_stays_there():
    devices = _devices()
    assert [(d.name, d.host) for d in devices] == [("RPC0", "box"), ("RPC1", "box"), ("SIM0", "desk"),
                                                   ("SIM1", "desk")]
    profiles = {"a": make_profile(n_layer=30, layer_bytes=60 * MiB),
                "b": make_profile(n_layer=30, layer_bytes=150 * MiB)}
    fleet = Fleet((FleetModel("a", "a.gguf", ctx=1024), FleetModel("b", "b.gguf", ctx=1024)))
    fp = plan_fleet(fleet, profiles, devices, HOST)
    assert fp.fits
    hosts = {pl.name: {d.host for d in devices if d.name in pl.devices} for pl in fp.placements}
    assert len(hosts["b"]) == 1 and len(pl_devices(fp, "b")) == 2      # 4.9 GiB: both devices of one host
    assert len(hosts["a"]) == 1 and hosts["a"] != hosts["b"]
    assert host_spans(devices, {pl.name: pl.plan for pl in fp.placements}) == 0
    assert spanning(fp, devices) == {}


def test_a_model_that_must_span_says_why():
    devices = _devices()
    profiles = {"big": make_profile(n_layer=40, layer_bytes=180 * MiB)}    # 7.8 GiB: three devices at least
    fp = plan_fleet(Fleet((FleetModel("big", "big.gguf", ctx=1024),)), profiles, devices, HOST)
    assert fp.fits and len(pl_devices(fp, "big")) >= 3
    assert spanning(fp, devices) == {
        "big": "big spans hosts box + desk: no plan within one host holds it (spanning is the last resort)"}


def test_staying_on_one_host_beats_headroom():
    """Without the host rule, fewest devices then leximin headroom would pair the 4 GiB device of
    desk with a 3 GiB device of box (the split leaves the most on the tightest device)."""
    c = cluster_from_dict({"head": "desk", "hosts": [
        {"name": "desk", "devices": [{"spec": "4GiB"}, {"spec": "2GiB"}]},
        {"name": "box", "address": "10.0.0.2", "link": {"gbit_per_s": 10, "rtt_ms": 0.1},
         "devices": [{**DEV, "port": 50052}, {**DEV, "port": 50053}]}]})
    devices, _ = c.devices()
    profiles = {"b": make_profile(n_layer=30, layer_bytes=150 * MiB)}
    fp = plan_fleet(Fleet((FleetModel("b", "b.gguf", ctx=1024),)), profiles, devices, HOST)
    assert fp.fits and len(pl_devices(fp, "b")) == 2
    assert len({d.host for d in devices if d.name in pl_devices(fp, "b")}) == 1
    assert spanning(fp, devices) == {}


def pl_devices(fp, name):
    return fp.placement(name).devices
