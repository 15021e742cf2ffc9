"""Every architecture gpulab.sources.arch_models writes, against llama.cpp on CPU RPC devices.

For each architecture and setting (full and partial -ngl, unequal -ts, -sm none, contexts past the
sliding window, f16 and quantized caches with flash attention on and off):
  - the device of every layer must be llama.cpp's;
  - weights, KV and recurrent state per device within the log's rounding (32 KiB), and compute
    within 1 MiB, wherever the plan states no doubt of that term (gpulab.core.placement.coverage):
    a plan that is silent must be exact; where it states one, within the errors the doubts name,
    added up; compute within 1 MiB always for coverage.COMPUTE_EXACT.
Every figure is written to test-artifacts/arch_matrix.json; scripts/arch_coverage.py turns it into
docs/COVERAGE.md. One setting per architecture runs by default; the rest is marked slow
(`-m slow` runs it, `-m "not slow"` skips it). The whole matrix: see docs/BENCHMARKS.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from arch_settings import SETTINGS
from gpulab import ConfigError, LoadError, plan, read_profile
from gpulab.core.placement.coverage import COMPUTE_EXACT
from gpulab.sources.arch_models import ARCH_MODELS, write_arch_model
from gpulab.sources.host import host_device

KiB, MiB = 1024, 1024**2
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"

DEFAULT = "ts-3-1-q8-fa"  # of tests/arch_settings.py's SETTINGS, the one that runs by default
CASES = [pytest.param(a, c, marks=() if c == DEFAULT else pytest.mark.slow, id=f"{a}-{c}")
         for a in ARCH_MODELS for c in SETTINGS]

_rows: list[dict] = []


@pytest.fixture(scope="module")
def arch_paths(tmp_path_factory):
    """The models, written once per run (sparse files: milliseconds each)."""
    root = tmp_path_factory.mktemp("arch-models")
    return {a: write_arch_model(root / f"{a}.gguf", a) for a in ARCH_MODELS}


@pytest.mark.parametrize("arch,config_name", CASES)
def test_arch_matches_llama_cpp(arch, config_name, arch_paths, worker):
    config = SETTINGS[config_name]
    profile = read_profile(arch_paths[arch])
    devices = [d for d in worker.devices() if d.kind == "rpc"]
    try:
        predicted = plan(profile, devices, config, host_device())
    except ConfigError as e:       # gpulab refuses: llama.cpp must refuse the same load
        with pytest.raises(LoadError):
            worker.load(arch_paths[arch], config, check_fit=False)
        _rows.append({"arch": arch, "config": config_name, "refused": str(e)})
        return
    report, _ = worker.load(arch_paths[arch], config, check_fit=False)

    placement = list(report.layer_devices) == list(predicted.layer_devices)
    bounds = {"model": 32 * KiB, "kv": 32 * KiB, "state": 32 * KiB, "compute": 1 * MiB}
    for term, key in (("weights", "model"), ("kv", "kv"), ("state", "state"), ("compute", "compute")):
        stated = [x for x in predicted.doubts if x.term == term]
        if stated:
            # where several doubts apply their errors add (a quantized cache on the pipelined output
            # device); a doubt measured nowhere (0) says the term is not modelled: nothing to hold it to
            bounds[key] = 0 if any(x.bound_bytes == 0 for x in stated) else \
                max(bounds[key], sum(x.bound_bytes for x in stated))
    if arch in COMPUTE_EXACT:
        bounds["compute"] = 1 * MiB  # exact on this matrix, whatever doubts the plan keeps for settings outside it
    figures = []
    for d in predicted.devices:
        got = {k: report.bytes_on(d.name, k) for k in ("model", "kv", "state", "compute")}
        want = {"model": d.weights_bytes, "kv": d.kv_bytes, "state": d.state_bytes, "compute": d.compute_bytes}
        figures.append((d.name, want, got))
        _rows.append({"arch": arch, "config": config_name, "device": d.name, "predicted": want, "llama_cpp": got,
                      "placement": placement, "doubts": [x.text for x in predicted.doubts]})
    assert placement, f"placement differs from llama.cpp: {report.layer_devices} against {predicted.layer_devices}"
    for name, want, got in figures:
        for term, bound in bounds.items():
            if bound:
                assert abs(want[term] - got[term]) <= bound, \
                    f"{name} {term}: predicted {want[term]}, llama.cpp {got[term]}; doubts: {predicted.doubts}"


def teardown_module(module):
    """Merged into what earlier runs wrote: a run of a few cases (-k) replaces those cases only."""
    if _rows:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / "arch_matrix.json"
        done = {(r["arch"], r["config"]) for r in _rows}
        old = json.loads(path.read_text()) if path.exists() else []
        path.write_text(json.dumps([r for r in old if (r["arch"], r["config"]) not in done] + _rows, indent=1))
