"""A llama-swap config.yaml or a llama-server --models-preset INI read as a fleet's starting point;
gpulab's own exports read back into the fleet they came from (pinned where they were planned)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import yaml

from builders import make_profile
from gpulab.core.devices import Device
from gpulab.core.errors import ConfigError
from gpulab.core.exports.fleet import llama_swap_doc, router_ini
from gpulab.core.fleet.from_tools import fleet_from_llama_swap, fleet_from_router_ini
from gpulab.core.fleet.model import Fleet, FleetModel
from gpulab.core.fleet.planner import plan_fleet
from gpulab.storage.fleet_files import llama_swap_yaml

GiB = 1024**3
MiB = 1024**2


@pytest.fixture(scope="module")
def planned():
    profs = {"chat": make_profile(n_layer=30, layer_bytes=700 * MiB), "coder": make_profile(n_layer=20),
             "embed": make_profile(n_layer=6)}
    fleet = Fleet((FleetModel("chat", "/m/chat.gguf", ctx=8192, type_k="q8_0", type_v="q8_0", parallel=2),
                   FleetModel("coder", "/m/coder.gguf", ctx=16384, overrides=(r"blk\.0\.ffn_down\.weight=CPU",)),
                   FleetModel("embed", "/m/embed.gguf", keep_loaded=False, flash_attn="off")))
    devices = [Device(f"CUDA{i}", 24 * GiB, 20 * GiB, "nvml", "gpu") for i in range(3)]
    fp = plan_fleet(fleet, profs, devices)
    assert fp.fits and len(fp.placement("chat").devices) == 2
    paths = {m.name: m.model for m in fleet.models}
    # what an export reads back as: the same fleet, each model pinned where it was planned
    pinned = replace(fleet, models=tuple(replace(m, devices=fp.placement(m.name).devices) for m in fleet.models))
    return fp, paths, devices, pinned


def test_llama_swap_export_reads_back_as_the_fleet(planned):
    fp, paths, devices, pinned = planned
    doc, _ = llama_swap_doc(fp, paths, devices)
    fleet, notes = fleet_from_llama_swap(yaml.safe_load(llama_swap_yaml(doc)))
    assert fleet == pinned
    assert any("chat: -ts" in n and "planner chooses the split" in n for n in notes)


def test_router_ini_export_reads_back_as_the_fleet(planned):
    fp, paths, devices, pinned = planned
    text, _ = router_ini(fp, paths, devices)
    fleet, notes = fleet_from_router_ini(text)
    assert fleet == pinned


def test_a_hand_written_llama_swap_config():
    doc = yaml.safe_load(r"""
macros:
  server: /opt/llama/llama-server --port ${PORT} --jinja
  models: /srv/models
models:
  chat:
    cmd: ${server} -m ${models}/qwen3-30b.gguf --ctx-size=32768 -ctk q8_0 -ctv q8_0 -ngl 99 -ts 3,1
  coder:
    cmd: |
      ${server} -hf ggml-org/Qwen2.5-Coder-7B-GGUF:Q4_K_M
      -c 8192 --device CUDA1 -fa on
  draft:
    cmd: ${server} -m ${models}/draft.gguf -b 1024 -ub 256 -np 4 -kvu -nkvo
groups:
  together:
    swap: false
    members: [chat, coder]
""")
    fleet, notes = fleet_from_llama_swap(doc)
    chat, coder, draft = fleet.models
    assert (chat.model, chat.ctx, chat.type_k, chat.n_gpu_layers, chat.keep_loaded) == (
        "/srv/models/qwen3-30b.gguf", 32768, "q8_0", 99, True)
    assert coder.model == "hf:ggml-org/Qwen2.5-Coder-7B-GGUF:Q4_K_M" and coder.devices == ("CUDA1",)
    assert coder.flash_attn == "on" and coder.keep_loaded is True
    assert draft.keep_loaded is False        # not in a swap: false group: llama-swap swaps it
    cfg = draft.config()     # every flag of the flag table reaches the fleet
    assert (cfg.n_batch, cfg.n_ubatch, cfg.n_seq_max, cfg.kv_unified, cfg.offload_kqv) == (1024, 256, 4, True, False)
    assert any("--jinja" in n for n in notes) and any("-ts 3,1" in n for n in notes)


@pytest.mark.parametrize("doc, match", [
    ({}, "needs a `models:` map"),
    ({"models": {"a": {"cmd": "llama-server -m ${nope}"}}}, "unknown macro"),
    ({"models": {"a": {"cmd": "llama-server -c 1024"}}}, "no -m MODEL"),
    ({"models": {"a": {"cmd": "llama-server -m m.gguf -c lots"}}}, "not a number"),
    ({"models": {"a": {"proxy": "http://x"}}}, "has no cmd"),
])
def test_bad_llama_swap_configs(doc, match):
    with pytest.raises(ConfigError, match=match):
        fleet_from_llama_swap(doc)


def test_router_ini_global_section_and_bad_lines():
    fleet, _ = fleet_from_router_ini("version = 1\n[*]\nc = 4096\n[a]\nmodel = /m/a.gguf\nload-on-startup = true\n"
                                     "[b]\nm = /m/b.gguf\nc = 1024 ; comment\n")
    a, b = fleet.models
    assert (a.ctx, a.keep_loaded, b.ctx, b.keep_loaded) == (4096, True, 1024, False)
    with pytest.raises(ConfigError, match="line 2"):
        fleet_from_router_ini("[a]\nthis is not ini\n")


def test_a_projector_and_a_draft_go_out_to_llama_swap_and_the_router_and_come_back():
    """--mmproj / -md and the draft's flags: imported into the fleet's process keys, written back
    by both exports, and read back as the same fleet (before, imports named them as left out)."""
    from gpulab.core.fleet.model import Companions
    from gpulab.core.placement.process import ProjectorProfile

    proj = ProjectorProfile("P", "mlp", weights_bytes=600 * MiB, has_vision=True, has_audio=False)
    m = FleetModel("vl", "/m/vl.gguf", ctx=8192, mmproj="/m/mmproj-vl.gguf", mmproj_offload=False, draft="/m/d.gguf",
                   draft_flags=("-ngld", "99", "-ctkd", "q8_0", "-ctvd", "q8_0"),
                   companions=Companions(draft=make_profile(n_layer=4, layer_bytes=20 * MiB), projector=proj))
    devices = [Device(f"CUDA{i}", 24 * GiB, 20 * GiB, "nvml", "gpu") for i in range(2)]
    fp = plan_fleet(Fleet((m,)), {"vl": make_profile(n_layer=20)}, devices)
    pinned = Fleet((replace(m, devices=fp.placement("vl").devices),))
    doc, _ = llama_swap_doc(fp, {"vl": m.model}, devices)
    cmd = doc["models"]["vl"]["cmd"]
    assert "--mmproj /m/mmproj-vl.gguf --no-mmproj-offload -md /m/d.gguf -ngld 99 -ctkd q8_0 -ctvd q8_0" in cmd
    fleet, notes = fleet_from_llama_swap(yaml.safe_load(llama_swap_yaml(doc)))
    assert fleet == pinned and not any("mmproj" in n or "-md" in n for n in notes), notes
    text, _ = router_ini(fp, {"vl": m.model}, devices)
    assert "mmproj = /m/mmproj-vl.gguf" in text and "md = /m/d.gguf" in text and "ngld = 99" in text
    assert fleet_from_router_ini(text)[0] == pinned
