"""A fleet plan against real llama.cpp: three models written here, planned together on three CPU
RPC devices, then loaded AT THE SAME TIME in one gpulab worker, each with its plan's --device set
and -ts. llama.cpp's buffers per device, summed over the models, against the fleet plan:
  - weights and KV within 1% or 1 MiB, whichever is larger (per model too);
  - compute within the planner's stated error: 15%, above the largest error of the compute
    calibration grid (13.6%, docs/BENCHMARKS.md "Compute buffers").
The fleet goes through the same pipeline as `gpulab fleet plan`: a TOML file, model references
resolved from it, the single-model planner per model. Where llama-server is built from the
vendored source, every `cmd` of the llama-swap export is given to it on the same RPC servers,
and it parses all of it (--rpc, --device RPC0,RPC1, -ts ...).
"""

from __future__ import annotations

import shlex
import subprocess

import pytest

from builders import close_to_llama
from gpulab.core.exports.fleet import llama_swap_doc
from gpulab.core.fleet.planner import plan_fleet
from gpulab.sources.host import host_device
from gpulab.sources.model_refs import resolve_model
from gpulab.sources.read import read_profile
from gpulab.sources.synth import SynthSpec, write_model
from gpulab.storage.fleet_files import read_fleet
from llama_tools import NOT_BUILT, tools_bin

MiB = 1024**2
COMPUTE_TOLERANCE = 0.15

MODELS = {
    "chat": SynthSpec(arch="llama", n_layer=7, n_embd=512, n_ff=1536, n_head=8, n_head_kv=2, n_vocab=4096),
    "swa": SynthSpec(arch="gemma2", n_layer=6, n_embd=512, n_ff=1024, n_head=8, n_head_kv=4, n_vocab=8192,
                     sliding_window=256, tied_output=True),
    "coder": SynthSpec(arch="llama", n_layer=5, n_embd=1024, n_ff=2048, n_head=16, n_head_kv=4, n_vocab=4096,
                       weight_type="Q8_0"),
}

# chat is split over two devices; coder shares RPC1 with it; swa goes where the planner puts it
FLEET = """
version = 1

[[models]]
name = "chat"
model = "chat.gguf"
ctx = 1024
devices = ["RPC0", "RPC1"]

[[models]]
name = "swa"
model = "swa.gguf"
ctx = 2048
parallel = 2

[[models]]
name = "coder"
model = "coder.gguf"
ctx = 768
type_k = "q8_0"
type_v = "q8_0"
flash_attn = "on"
devices = ["RPC1"]
"""


@pytest.fixture(scope="module")
def cluster():
    from gpulab.runtime.rpc import start_servers
    from gpulab.runtime.worker import Worker
    with start_servers(3) as servers, Worker(servers.endpoints) as w:
        yield servers, w


@pytest.fixture(scope="module")
def fleet_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("fleet")
    for name, spec in MODELS.items():
        write_model(root / f"{name}.gguf", spec)
    path = root / "fleet.toml"
    path.write_text(FLEET)
    return path


@pytest.fixture(scope="module")
def planned(cluster, fleet_file):
    _, worker = cluster
    fleet = read_fleet(fleet_file)
    paths = {m.name: resolve_model(m.model, base=fleet_file.parent) for m in fleet.models}
    profiles = {n: read_profile(p) for n, p in paths.items()}
    devices = [d for d in worker.devices() if d.kind == "rpc"]
    assert [d.name for d in devices] == ["RPC0", "RPC1", "RPC2"]
    fp = plan_fleet(fleet, profiles, devices, host_device())
    assert fp.fits
    return fp, paths, devices


def test_fleet_loaded_together_matches_the_plan_per_device(cluster, planned):
    _, worker = cluster
    fp, paths, devices = planned
    assert fp.placement("chat").devices == ("RPC0", "RPC1") and len(fp.placement("chat").plan.config.tensor_split) == 2
    shared = [d for d in fp.devices if len(d.by_model) > 1]
    assert shared, "the test needs a device holding more than one model"

    opened = []
    try:
        for p in fp.placements:     # every model at once, each with its own --device set and -ts
            opened.append((p, worker.open(paths[p.name], p.plan.config)))
        for d in fp.devices:
            actual = {k: sum(m.report.bytes_on(d.name, k) for _, m in opened) for k in ("model", "kv", "compute")}
            planned_ = {k: sum(getattr(dp, a) for p, _ in opened for dp in p.plan.offload_devices if dp.name == d.name)
                        for k, a in (("model", "weights_bytes"), ("kv", "kv_bytes"), ("compute", "compute_bytes"))}
            assert close_to_llama(planned_["model"], actual["model"]), \
                f"{d.name} weights: {planned_['model']} vs {actual['model']}"
            assert close_to_llama(planned_["kv"], actual["kv"]), f"{d.name} KV: {planned_['kv']} vs {actual['kv']}"
            assert abs(planned_["compute"] - actual["compute"]) <= COMPUTE_TOLERANCE * actual["compute"] + 1, \
                f"{d.name} compute: {planned_['compute']} vs {actual['compute']}"
            # and the fleet's device row is that sum (resident models: no swappable one here)
            assert d.used_bytes == sum(dp.used_bytes for p, _ in opened for dp in p.plan.offload_devices
                                       if dp.name == d.name)
            if d.by_model:
                assert actual["model"] > 0
        for p, m in opened:          # each model's own share too
            for dp in p.plan.offload_devices:
                assert close_to_llama(dp.weights_bytes, m.report.bytes_on(dp.name, "model")), (p.name, dp.name)
                assert close_to_llama(dp.kv_bytes, m.report.bytes_on(dp.name, "kv")), (p.name, dp.name)
            # and nothing on the devices the plan did not give it
            for d in devices:
                if d.name not in p.devices:
                    assert m.report.bytes_on(d.name) == 0, (p.name, d.name)
    finally:
        for _, m in opened:
            m.close()


@pytest.mark.skipif(tools_bin() is None, reason=NOT_BUILT)
def test_llama_server_parses_every_llama_swap_cmd(cluster, planned):
    fp, paths, devices = planned
    doc, _ = llama_swap_doc(fp, paths, devices)
    for name, entry in doc["models"].items():
        argv = shlex.split(entry["cmd"].replace("${PORT}", "18080"))
        assert "--rpc" in argv and "--device" in argv
        r = subprocess.run([str(tools_bin() / "llama-server"), *argv[1:], "--version"], capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, f"llama-server rejected {name}: {argv}\n{r.stderr[-800:]}"
        assert "invalid" not in r.stderr.lower(), r.stderr[-800:]
