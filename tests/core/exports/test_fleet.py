"""Fleet exports checked against their consumers' own definitions:
- every llama-swap `cmd` is a llama-server command line whose options and values are the ones
  common/arg.cpp defines for llama-server (the real binary parses them in
  tests/integration/test_fleet_vs_llama.py, on RPC devices it can see);
- the router INI parses as common/preset.cpp's parse_ini_from_file reads it, and each key is one
  load_from_ini accepts (an option spelling without dashes, or a preset-only key);
- the Ollama instances cover every model once, one per device set, with their environment.

The llama-swap export is validated against llama-swap's published config-schema.json where a copy
is in tests/data/ (see test_llama_swap_export_validates_against_llama_swaps_schema).
"""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path

import pytest
import yaml

from builders import make_profile
from gpulab.core.devices import Device
from gpulab.core.exports.fleet import llama_swap_doc, ollama_fleet, router_ini, server_commands
from gpulab.core.fleet.from_tools import parse_preset_ini
from gpulab.core.fleet.model import Fleet, FleetModel, fleet_from_dict
from gpulab.core.fleet.planner import plan_fleet
from gpulab.storage.fleet_files import llama_swap_yaml
from llama_args import kv_cache_types_from_source, preset_only_keys_from_source, server_options_from_source
from llama_tools import vendored_src

GiB = 1024**3
MiB = 1024**2
SRC = vendored_src()
needs_src = pytest.mark.skipif(SRC is None, reason="the vendored llama.cpp source is not unpacked here "
                                                   "(GPULAB_LLAMA_CPP_SRC)")


def cuda(i: int, free: int = 20 * GiB) -> Device:
    return Device(f"CUDA{i}", 24 * GiB, free, "nvml", "gpu", uuid=f"GPU-{i:08x}-aaaa")


@pytest.fixture(scope="module")
def fplan():
    profs = {"chat": make_profile(n_layer=30, layer_bytes=700 * MiB), "coder": make_profile(n_layer=20),
             "draft": make_profile(n_layer=4, layer_bytes=20 * MiB), "embed": make_profile(n_layer=6)}
    fleet = Fleet((FleetModel("chat", "chat.gguf", ctx=8192, type_k="q8_0", type_v="q8_0", parallel=2),
                   FleetModel("coder", "coder.gguf", ctx=16384, devices=("CUDA2",)),
                   FleetModel("draft", "draft.gguf", ctx=2048, overrides=(r"blk\.0\.ffn_down\.weight=CPU",)),
                   FleetModel("embed", "embed.gguf", keep_loaded=False)),
                  keep_free={"CUDA0": 2 * GiB})
    devices = [cuda(0), cuda(1), cuda(2, 12 * GiB)]
    fp = plan_fleet(fleet, profs, devices)
    assert fp.fits and len(fp.placement("chat").devices) == 2
    return fp, devices


PATHS = {n: f"/models/{n}.gguf" for n in ("chat", "coder", "draft", "embed")}


def _check_value(hint, value, kv_types) -> bool:
    if hint in ("N", "INDEX", "PORT"):
        return bool(re.fullmatch(r"-?\d+", value)) or value in ("auto", "all")
    if hint == "N0,N1,N2,...":
        return bool(re.fullmatch(r"\d+(\.\d+)?(,\d+(\.\d+)?)*", value))
    if hint == "TYPE":
        return value in kv_types
    if hint.startswith(("{", "[")):
        return value in re.split(r"[,|]", hint.strip("{}[]"))
    return bool(value)   # names, paths, patterns


@needs_src
def test_llama_swap_cmds_are_llama_server_command_lines(fplan):
    fp, devices = fplan
    doc, gaps = llama_swap_doc(fp, PATHS, devices)
    assert gaps == []
    options = server_options_from_source(SRC)
    kv_types = kv_cache_types_from_source(SRC)
    for name, entry in doc["models"].items():
        argv = shlex.split(entry["cmd"].replace("${PORT}", "8080"))   # llama-swap's macro, then split
        assert argv[:3] == ["llama-server", "--port", "8080"]
        i = 1
        while i < len(argv):
            assert argv[i] in options, f"{name}: llama-server has no option {argv[i]}"
            hint = options[argv[i]]["hint"]
            if hint is not None:
                assert _check_value(hint, argv[i + 1], kv_types), f"{name}: {argv[i]} {argv[i + 1]!r} is not {hint}"
                i += 2
            else:
                i += 1
        # the plan's devices and split, as planned
        cfg = fp.placement(name).plan.config
        assert argv[argv.index("--device") + 1] == ",".join(fp.placement(name).devices)
        if len(fp.placement(name).devices) > 1:
            assert [float(x) for x in argv[argv.index("-ts") + 1].split(",")] == list(cfg.tensor_split)
        assert argv[argv.index("-c") + 1] == str(cfg.n_ctx)


def _schema_path() -> Path:
    """llama-swap's published config-schema.json (mostlygeek/llama-swap, MIT): $GPULAB_LLAMA_SWAP_SCHEMA,
    tests/data/ or the shared data folder beside the checkout. Not vendored into this repository: a copy
    of another project's file belongs in the steering repo's shared/, where the CEO may place it."""
    repo = Path(__file__).resolve().parents[3]
    candidates = [Path(os.environ["GPULAB_LLAMA_SWAP_SCHEMA"])] if os.environ.get("GPULAB_LLAMA_SWAP_SCHEMA") else []
    candidates += [repo / "tests" / "data" / "llama-swap-config-schema.json",
                   repo.parent / "shared" / "data" / "llama-swap-config-schema.json"]
    return next((c for c in candidates if c.is_file()), candidates[-1])


SCHEMA = _schema_path()


@pytest.mark.skipif(not SCHEMA.is_file(), reason="llama-swap's config-schema.json is not at hand (set "
                    "GPULAB_LLAMA_SWAP_SCHEMA, or place mostlygeek/llama-swap's file in ../shared/data/)")
def test_llama_swap_export_validates_against_llama_swaps_schema(fplan):
    jsonschema = pytest.importorskip("jsonschema")
    fp, devices = fplan
    doc, _ = llama_swap_doc(fp, PATHS, devices)
    # draft-07, as its $schema says
    validator = jsonschema.Draft7Validator(json.loads(SCHEMA.read_text()), format_checker=jsonschema.FormatChecker())
    validator.validate(yaml.safe_load(llama_swap_yaml(doc)))
    # and the check has teeth: a group member that is not a list fails
    with pytest.raises(jsonschema.ValidationError):
        validator.validate({**doc, "groups": {"fleet": {"swap": "no", "members": "chat"}}})


def test_llama_swap_yaml_round_trips_and_groups_what_runs_together(fplan):
    fp, devices = fplan
    doc, _ = llama_swap_doc(fp, PATHS, devices)
    assert yaml.safe_load(llama_swap_yaml(doc)) == doc
    assert doc["groups"]["fleet"]["members"] == ["chat", "coder", "draft"]
    assert doc["groups"]["fleet"]["swap"] is False
    assert doc["groups"]["swappable"] == {"swap": True, "exclusive": False, "members": ["embed"]}
    assert doc["hooks"] == {"on_startup": {"preload": ["chat", "coder", "draft"]}}
    assert "${PORT}" in doc["models"]["chat"]["cmd"] and "'${PORT}'" not in doc["models"]["chat"]["cmd"]


def test_llama_swap_yaml_writes_shared_lists_in_full_without_anchors(fplan):
    fp, devices = fplan
    doc, _ = llama_swap_doc(fp, PATHS, devices)
    assert doc["hooks"]["on_startup"]["preload"] is doc["groups"]["fleet"]["members"]   # one list, two keys
    text = llama_swap_yaml(doc)
    assert "&id" not in text and "*id" not in text
    assert text.count("  - chat\n") == 2        # the members and the preload list, each written out


@needs_src
def test_router_ini_keys_are_the_ones_load_from_ini_accepts(fplan):
    fp, devices = fplan
    text, gaps = router_ini(fp, PATHS, devices)
    parsed = parse_preset_ini(text)       # common/preset.cpp parse_ini_from_file's grammar
    assert parsed.pop("default") == {"version": "1"}      # load_from_ini skips 'version'
    assert set(parsed) == {"chat", "coder", "draft", "embed"}
    options = server_options_from_source(SRC)
    by_key = {flag.lstrip("-"): flag for flag in options}   # get_map_key_opt: every spelling, no dashes
    preset_only = set(preset_only_keys_from_source(SRC))
    assert "load-on-startup" in preset_only
    kv_types = kv_cache_types_from_source(SRC)
    for name, keys in parsed.items():
        for key, value in keys.items():
            assert key in by_key or key in preset_only, f"[{name}] {key}: load_from_ini would throw 'not recognized'"
            hint = options[by_key[key]]["hint"] if key in by_key else None
            if hint is None:
                assert value in ("true", "false"), f"[{name}] {key} is a flag: true or false"
            else:
                assert _check_value(hint, value, kv_types), f"[{name}] {key} = {value!r} is not {hint}"
        assert keys["m"] == PATHS[name]
        assert keys["device"] == ",".join(fp.placement(name).devices)
        assert ("load-on-startup" in keys) == fp.placement(name).resident
    # server_commands and the INI say the same thing
    for name, argv in server_commands(fp, PATHS, devices).items():
        assert argv[argv.index("-c") + 1] == parsed[name]["c"]
    assert any("pin" in g for g in gaps)     # a swappable model can push out a resident one


def test_ollama_one_instance_per_device_set(fplan):
    fp, devices = fplan
    text, data, gaps = ollama_fleet(fp, PATHS, devices)
    sets = {p.devices for p in fp.placements}
    assert len(data["instances"]) == len(sets)
    assert sorted(m for i in data["instances"] for m in i["models"]) == ["chat", "coder", "draft", "embed"]
    ports = [i["port"] for i in data["instances"]]
    assert len(set(ports)) == len(ports)
    for inst in data["instances"]:
        env = inst["env"]
        # CUDA_VISIBLE_DEVICES by UUID (what gpulab.core.exports.render.cuda_visible_devices writes)
        assert env["CUDA_VISIBLE_DEVICES"] == ",".join(f"GPU-{int(d[4:]):08x}-aaaa" for d in inst["devices"])
        assert env["OLLAMA_HOST"] == f"127.0.0.1:{inst['port']}"
        resident = sum(fp.placement(m).resident for m in inst["models"])
        assert int(env["OLLAMA_MAX_LOADED_MODELS"]) == resident + (resident < len(inst["models"]))
        assert f"env {' '.join(f'{k}={shlex.quote(v)}' for k, v in env.items())} ollama serve &" in text
    chat = data["modelfiles"]["chat"]
    assert "PARAMETER num_ctx 4096" in chat      # -c 8192 with -np 2: Ollama's num_ctx is per sequence
    assert "PARAMETER num_gpu 31" in chat        # all 30 blocks and the output layer
    assert any("no per-model pinning" in g for g in gaps) and any("tensor_split" in g for g in gaps)
    assert any("draft" in g and "-ot" in g for g in gaps)     # Ollama cannot place single tensors


def test_router_names_with_a_tag_are_said_to_change():
    from gpulab.core.exports.fleet import _router_name
    assert _router_name("chat") == "chat"
    assert _router_name("qwen3:30b") == "qwen3:30B"
    assert _router_name("org/model:model-q4_k_m") == "org/model:Q4_K_M"
    profs = {"qwen3:30b": make_profile(n_layer=4)}
    fp = plan_fleet(Fleet((FleetModel("qwen3:30b", "m.gguf"),)), profs, [cuda(0)])
    _, gaps = router_ini(fp, {"qwen3:30b": "/m.gguf"}, [cuda(0)])
    assert any("'qwen3:30B'" in g for g in gaps)


def test_rpc_devices_are_named_as_the_exported_process_sees_them():
    """ggml-rpc names devices RPC<n> by a counter over the servers a process registers, and each
    cmd registers only the servers it uses: the planned RPC1 is RPC0 in a process given one server."""
    devs = [Device(f"RPC{i}", 8 * GiB, 8 * GiB, "rpc", "rpc", endpoint=f"127.0.0.1:5005{i}") for i in range(3)]
    profs = {"a": make_profile(n_layer=8, layer_bytes=20 * MiB), "b": make_profile(n_layer=6, layer_bytes=20 * MiB)}
    fleet = Fleet((FleetModel("a", "a.gguf", devices=("RPC2", "RPC0")), FleetModel("b", "b.gguf", devices=("RPC1",))))
    fp = plan_fleet(fleet, profs, devs)
    cmds = server_commands(fp, {"a": "/a.gguf", "b": "/b.gguf"}, devs)
    a, b = cmds["a"], cmds["b"]
    assert a[a.index("--rpc") + 1] == "127.0.0.1:50052,127.0.0.1:50050"
    assert a[a.index("--device") + 1] == "RPC0,RPC1"        # RPC2 registered first, then RPC0
    assert b[b.index("--rpc") + 1] == "127.0.0.1:50051" and b[b.index("--device") + 1] == "RPC0"
    _, gaps = llama_swap_doc(fp, {"a": "/a.gguf", "b": "/b.gguf"}, devs)
    assert gaps == []                                       # no server is shared
    shared = Fleet((FleetModel("a", "a.gguf", devices=("RPC0",)), FleetModel("b", "b.gguf", devices=("RPC0",))))
    fp = plan_fleet(shared, profs, devs)
    _, gaps = llama_swap_doc(fp, {"a": "/a.gguf", "b": "/b.gguf"}, devs)
    assert any("127.0.0.1:50050 is used by a, b" in g for g in gaps)


def test_settings_beyond_the_fixed_keys_reach_the_exports():
    fleet = fleet_from_dict({"models": [{"name": "chat", "model": "chat.gguf", "ctx": 4096, "n_batch": 1024,
                                         "n_ubatch": 256, "kv_unified": True, "parallel": 2}]})
    devices = [cuda(0)]
    fp = plan_fleet(fleet, {"chat": make_profile(n_layer=8)}, devices)
    doc, _ = llama_swap_doc(fp, {"chat": "/models/chat.gguf"}, devices)
    cmd = doc["models"]["chat"]["cmd"].split()
    for flags in (["-b", "1024"], ["-ub", "256"], ["-np", "2"]):
        i = cmd.index(flags[0])
        assert cmd[i:i + 2] == flags
    assert "-kvu" in cmd
