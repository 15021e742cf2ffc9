"""The throughput model against real llama.cpp on CPU RPC devices (issue 8).

Two RPC servers and the host are calibrated (gpulab.runtime.calibrate), then pp and tg are
predicted for splits of a model calibration never saw (another shape): -ts 1/1, 3/1, 1/3 and a
partial offload. They are measured in the same interleaved rounds as the calibration, so both
see the same load on a shared machine. The planner must place each as llama.cpp did; the errors
are written to test-artifacts/speed_error.json. Whether they are within 25% of measured, the
issue's bar, is a timing: bench/speed_model.py measures it with the load average, and
docs/BENCHMARKS.md records the distribution.
The cache and the fit are also checked without llama.cpp.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from builders import make_profile
from gpulab.core.config import SplitConfig
from gpulab.core.devices import HOST_NAME, Device, parse_sim_spec
from gpulab.core.measure.speed import DEFAULT_HOST, predict_speed
from gpulab.core.placement.planner import plan
from gpulab.runtime import llama_lib
from gpulab.runtime.calibrate import calibrate, update_from_run
from gpulab.sources.synth import SynthSpec, write_model
from gpulab.storage.speed_cache import SpeedCache, host_key_here, speed_model_for
from gpulab.storage.speed_cache import cache_key as device_key
from gpulab.ui.text import calibration_text

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
THREADS = 1            # the host's threads and every RPC server's, as in calibration
N_PROMPT, N_GEN = 32, 16

needs_rpc = pytest.mark.skipif(not llama_lib.rpc_supported(),
                               reason="llama-cpp-python built without RPC (CMAKE_ARGS=-DGGML_RPC=ON)")


# --- the cache and the fit, without llama.cpp ----------------------------------------------------

def _rpc(name: str, port: int) -> Device:
    ep = f"127.0.0.1:{port}"
    return Device(name=name, total_bytes=2**34, free_bytes=2**34, source="rpc", kind="rpc", description=ep,
                  endpoint=ep)


def test_speed_model_for_says_where_each_speed_comes_from(tmp_path):
    sim = parse_sim_spec("80GiB:3350GB/s,24GiB")
    nvml = Device(name="CUDA0", total_bytes=2**34, free_bytes=2**34, source="nvml", uuid="GPU-1",
                  pci_bus_id="00000000:01:00.0", bandwidth_bytes_per_s=1008e9)
    m = speed_model_for(sim + [nvml, _rpc("RPC0", 1)], n_threads=2, cache=SpeedCache(tmp_path / "none.json"))
    assert {n: sp.source for n, sp in m.devices.items()} == {
        "SIM0": "spec", "SIM1": "default", "CUDA0": "nvml", "RPC0": "default", HOST_NAME: "default"}
    assert m.devices["SIM0"].peak_bandwidth_bytes_per_s == 3350e9
    assert m.devices["SIM0"].bandwidth_bytes_per_s == pytest.approx(0.8 * 3350e9)
    assert m.devices[HOST_NAME] == DEFAULT_HOST
    assert "round trip" in m.devices["RPC0"].note
    # the key of a GPU is its PCI bus id, written the same by NVML and by llama.cpp
    assert device_key(nvml) == device_key(replace(nvml, source="llama", uuid="", pci_bus_id="0000:01:00.0"))
    assert device_key(sim[0]) is None and host_key_here(4).endswith(":t4")


def _observe_synthetic(cache: SpeedCache, truth: dict, prof, devices, configs) -> None:
    """Observations that a device with the given (s/byte, s/step, s/FLOP) would produce."""
    from gpulab.core.measure.speed import design_row
    key_of = {d.name: device_key(d, 1) for d in devices}
    for cfg in configs:
        p = plan(prof, [d for d in devices if d.kind != "cpu"], cfg)
        for kind in ("tg", "pp"):
            coef = design_row(p, kind, key_of, n_prompt=N_PROMPT, n_gen=N_GEN)
            coef = {(f"{k}|rpc" if k.startswith("link|") else k): v for k, v in coef.items()}
            seconds = sum(x * truth[k] for k, x in coef.items())
            cache.add(kind, coef, seconds, source="calibration", label=str(cfg.tensor_split))


def test_the_fit_recovers_known_device_parameters(tmp_path):
    devices = [_rpc("RPC0", 1), _rpc("RPC1", 2)]
    host = Device(name=HOST_NAME, total_bytes=0, free_bytes=0, source="host", kind="cpu")
    k0, k1 = device_key(devices[0]), device_key(devices[1])
    truth = {f"a|{k0}": 1 / 8e9, f"o|{k0}": 300e-6, f"l|{k0}": 30e-6, f"f|{k0}": 1 / 50e9, f"q|{k0}": 20e-6,
             f"a|{k1}": 1 / 12e9, f"o|{k1}": 500e-6, f"l|{k1}": 10e-6, f"f|{k1}": 1 / 40e9, f"q|{k1}": 40e-6,
             "link|lat|rpc": 200e-6, "link|inv_bw|rpc": 1 / 1e9}
    cache = SpeedCache(tmp_path / "speed.json")
    small = make_profile(n_layer=6, layer_bytes=5 * 2**20, out_bytes=2**20, n_vocab=32000, n_embd=2048)
    thin = make_profile(n_layer=24, layer_bytes=2**20, out_bytes=2**20, n_vocab=32000, n_embd=1024)
    big = make_profile(n_layer=8, layer_bytes=15 * 2**20, out_bytes=2**20, n_vocab=32000)
    one = [SplitConfig(devices=("RPC0",)), SplitConfig(devices=("RPC1",))]
    _observe_synthetic(cache, truth, small, devices + [host], one)
    _observe_synthetic(cache, truth, thin, devices + [host], one)
    _observe_synthetic(cache, truth, big, devices + [host], one + [SplitConfig(tensor_split=(1, 1))])
    cache.refit()
    m = cache.model_for(devices, n_threads=1)
    assert m.devices["RPC0"].source == "calibrated"
    assert m.devices["RPC0"].bandwidth_bytes_per_s == pytest.approx(8e9, rel=0.02)
    assert m.devices["RPC1"].overhead_s == pytest.approx(500e-6, rel=0.05)
    assert m.devices["RPC0"].layer_overhead_s == pytest.approx(30e-6, rel=0.05)
    assert m.devices["RPC1"].layer_token_s == pytest.approx(40e-6, rel=0.05)
    assert m.devices["RPC1"].flops_per_s == pytest.approx(40e9, rel=0.05)
    assert m.link.latency_s == pytest.approx(200e-6, rel=0.1)
    assert all(abs(r) < 0.01 for _, r in cache.residuals())
    # it survives a save and a fresh read
    cache.save()
    again = speed_model_for(devices, n_threads=1, cache=SpeedCache(cache.path))
    assert again.devices["RPC0"] == m.devices["RPC0"]


def test_plan_text_shows_predicted_speed_and_where_it_comes_from(tmp_path, monkeypatch, capsys):
    from gpulab.cli import main
    from gpulab.ui.text import plan_text
    monkeypatch.setenv("GPULAB_DATA_DIR", str(tmp_path))      # no calibration cached
    path = write_model(tmp_path / "m.gguf", SynthSpec(n_layer=4, n_embd=256, n_ff=512, n_head=8, n_head_kv=4))
    from gpulab.sources.read import read_profile
    devices = parse_sim_spec("24GiB:1008GB/s,24GiB")
    p = plan(read_profile(path), devices, SplitConfig(tensor_split=(1, 1)))
    text = plan_text(p, predict_speed(p, speed_model_for(devices)))
    lines = text.splitlines()
    assert lines[-1] == "fits" and "speed (predicted, pp512/tg128): tg " in lines[-3]
    assert "of the memory roofline" in lines[-3] and "1 hop between devices" in lines[-3]
    assert lines[-2].startswith("speed figures: spec: SIM0; default: SIM1") and "gpulab calibrate" in lines[-2]
    # the command line predicts it the same way
    assert main(["plan", str(path), "--sim", "24GiB:1008GB/s,24GiB", "-ts", "1,1"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-3:] == lines[-3:]


def test_calibrate_show_lists_the_cache(tmp_path, capsys):
    from gpulab.cli import main
    devices = [_rpc("RPC0", 1)]
    cache = SpeedCache(tmp_path / "speed.json")
    assert main(["calibrate", "--show", "--cache", str(cache.path)]) == 0
    assert "no device calibrated yet" in capsys.readouterr().out
    prof = make_profile(n_layer=6, layer_bytes=5 * 2**20, out_bytes=2**20, n_vocab=32000)
    key = device_key(devices[0])
    truth = {f"a|{key}": 1e-10, f"o|{key}": 1e-4, f"l|{key}": 1e-5, f"f|{key}": 1e-11, f"q|{key}": 1e-5,
             "link|lat|rpc": 0.0, "link|inv_bw|rpc": 1e-9}
    _observe_synthetic(cache, truth, prof, devices, [SplitConfig()])
    cache.refit()
    cache.save()
    assert main(["calibrate", "--show", "--cache", str(cache.path)]) == 0
    out = capsys.readouterr().out
    assert "rpc:127.0.0.1:1" in out and "GB/s" in out


# --- real llama.cpp on RPC devices ---------------------------------------------------------------

VALIDATION_SPEC = SynthSpec(n_layer=12, n_embd=1024, n_ff=3072, n_head=16, n_head_kv=4, n_vocab=512,
                            weight_type="Q4_0", name="speed-validation")
BASE = SplitConfig(n_ctx=N_PROMPT + 16, n_batch=N_PROMPT, n_ubatch=N_PROMPT)
SPLITS = {
    "-ts 1/1": BASE.replace(tensor_split=(1.0, 1.0)),
    "-ts 3/1": BASE.replace(tensor_split=(3.0, 1.0)),
    "-ts 1/3": BASE.replace(tensor_split=(1.0, 3.0)),
    "-ngl 7 -ts 1/1": BASE.replace(n_gpu_layers=7, tensor_split=(1.0, 1.0)),
}


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    from gpulab.runtime.rpc import start_servers
    tmp = tmp_path_factory.mktemp("speed")
    model = write_model(tmp / "validation.gguf", VALIDATION_SPEC)
    cache = SpeedCache(tmp / "speed.json")
    load = _loadavg()
    with start_servers(2, threads=THREADS) as cluster:
        cal = calibrate(cluster.endpoints, n_threads=THREADS, rounds=4, n_prompt=N_PROMPT, n_gen=N_GEN,
                        cache=cache, validate=[(k, model, cfg) for k, cfg in SPLITS.items()])
    return cal, cache, model, load


def _predict(cal, cache, model, label):
    from gpulab.sources.read import read_profile
    devices = [d for d in cal.devices if d.kind != "cpu"]
    best = cal.validation[label]
    p = plan(read_profile(model), devices, SPLITS[label])
    assert list(p.layer_devices) == list(best.run.report.layer_devices)   # the planner placed it as llama.cpp did
    return p, predict_speed(p, cache.model_for(cal.devices, THREADS), n_prompt=N_PROMPT, n_gen=N_GEN)


@needs_rpc
def test_calibration_is_cached_per_device(calibrated):
    cal, cache, _, _ = calibrated
    assert set(cal.speeds) == {"RPC0", "RPC1", HOST_NAME}
    assert all(sp.source == "calibrated" for sp in cal.speeds.values())
    data = json.loads(Path(cal.cache_path).read_text())
    keys = {f"rpc:{ep}" for ep in cal.rtt_s} | {host_key_here(THREADS)}
    assert keys <= set(data["devices"]) and all(data["devices"][k]["fit"] for k in keys)
    for sp in cal.speeds.values():   # one CPU core: GB/s and tens of GFLOP/s, not defaults
        assert 1e9 < sp.bandwidth_bytes_per_s < 200e9 and 1e9 < sp.flops_per_s < 2e12
    assert all(0 < r < 0.05 for r in cal.rtt_s.values()) and "rpc" in cal.links
    # the -sm tensor run: an all-reduce stage is several RPC round trips, kept with the link
    stage = cal.links["rpc"].allreduce_latency_s
    assert stage is not None and min(cal.rtt_s.values()) < stage < 1.0
    assert data["links"]["rpc"]["allreduce_latency_s"] == stage


@needs_rpc
def test_unseen_splits_are_placed_as_llama_cpp_placed_them_and_their_errors_recorded(calibrated):
    """How close the predictions come is a timing, so it is a benchmark (bench/speed_model.py, the
    issue's 25% bar, with the load average): here every unseen split is planned as llama.cpp placed
    it, predicted, and its errors written to test-artifacts/speed_error.json for the record."""
    cal, cache, model, load = calibrated
    rows = {}
    for label in SPLITS:
        best = cal.validation[label]
        _, s = _predict(cal, cache, model, label)   # asserts the placement
        assert s.tg_tokens_per_s > 0 and s.pp_tokens_per_s > 0
        rows[label] = {"tg_predicted": s.tg_tokens_per_s, "tg_measured": best.tg_ts,
                       "pp_predicted": s.pp_tokens_per_s, "pp_measured": best.pp_ts,
                       "tg_error": s.tg_tokens_per_s / best.tg_ts - 1, "pp_error": s.pp_tokens_per_s / best.pp_ts - 1,
                       "tg_llama_bench_mean": best.tg_mean_ts, "pp_llama_bench_mean": best.pp_mean_ts}
    # how much the rounds of one config disagree, over every config of this session: the noise
    # of these timings, against which a 25% bar can or cannot be judged
    noise = sorted(_spread(b) for b in list(cal.measurements.values()) + list(cal.validation.values()))
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "speed_error.json").write_text(json.dumps(
        {"rows": rows, "calibration": calibration_text(cal), "loadavg_before": load, "loadavg_after": _loadavg(),
         "cpus": os.cpu_count(), "round_spread_median": noise[len(noise) // 2],
         "round_spread": {k: _spread(b) for k, b in {**cal.measurements, **cal.validation}.items()}}, indent=1))


def _spread(best) -> float:
    """How much the rounds of one config disagree: (max - min) / median, the worse of tg and pp."""
    from gpulab.runtime.calibrate import _best_seconds
    worst = 0.0
    for kind in ("tg", "pp"):
        v = sorted(x for x in (_best_seconds(r, kind) for r in best.runs) if x)
        if len(v) > 1:
            worst = max(worst, (v[-1] - v[0]) / v[len(v) // 2])
    return worst


@needs_rpc
def test_a_measured_run_refines_the_calibration(calibrated, tmp_path):
    from gpulab.runtime.calibrate import _best_seconds
    cal, cache, model, _ = calibrated
    label = "-ts 3/1"
    p, before = _predict(cal, cache, model, label)
    best = cal.validation[label]
    mine = SpeedCache(tmp_path / "speed.json")
    mine.data = json.loads(Path(cal.cache_path).read_text())
    n = len(mine.observations)
    for run in best.runs:
        model_after = update_from_run(run, p, cache=mine)
    assert len(mine.observations) == n + 2 * len(best.runs) and mine.path.exists()
    assert set(model_after.devices) == {"RPC0", "RPC1"}          # the host held no layer of this run
    after = predict_speed(p, mine.model_for(cal.devices, THREADS), n_prompt=N_PROMPT, n_gen=N_GEN)
    for kind, was, now in (("tg", 1 / before.tg_tokens_per_s, 1 / after.tg_tokens_per_s),
                           ("pp", N_PROMPT / before.pp_tokens_per_s, N_PROMPT / after.pp_tokens_per_s)):
        # the seconds that relative least squares over these runs alone would predict
        t = [_best_seconds(r, kind) for r in best.runs]
        target = sum(1 / x for x in t) / sum(1 / x ** 2 for x in t)
        assert abs(now / target - 1) <= abs(was / target - 1) + 0.02, (kind, was, now, target)
    # without a plan, update_from_run plans the run again from its model file and report
    update_from_run(best.runs[0], cache=mine)
    assert len(mine.observations) == n + 2 * len(best.runs) + 2
