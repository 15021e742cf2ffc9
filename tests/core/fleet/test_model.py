"""The fleet description: issue 15's minimum spelling, every value checked, versioned, round-trips."""

from __future__ import annotations

import pytest

from gpulab.core.errors import ConfigError
from gpulab.core.fleet.model import FLEET_VERSION, Fleet, FleetModel, fleet_from_dict, fleet_to_dict, parse_model_ref
from gpulab.storage.files import tomllib
from gpulab.storage.fleet_files import fleet_text, read_fleet, write_fleet

GiB = 1024**3

MINIMUM = """
[[models]]
name = "chat"
model = "ollama:qwen3:30b"
ctx = 8192
[devices.CUDA0]
keep_free = "2GiB"
"""

FULL = """
version = 1

[[models]]
name = "chat"
model = "/models/chat.gguf"
ctx = 16384
type_k = "q8_0"
type_v = "q8_0"
parallel = 2
devices = ["CUDA0", "CUDA1"]

[[models]]
name = "coder"
model = "https://example.org/coder.gguf"
ctx = 8192
overrides = ["blk\\\\.[0-9]+\\\\.ffn_.*_exps\\\\.=CPU"]
keep_loaded = false

[[models]]
name = "embed"
model = "hf:ggml-org/embeddinggemma-300M-GGUF:Q8_0"

[devices.CUDA0]
keep_free = "2GiB"

[devices.CUDA2]
keep_free = "512MiB"
"""


def test_the_minimum_spelling_reads():
    f = fleet_from_dict(tomllib.loads(MINIMUM))
    assert f.version == FLEET_VERSION
    m = f.model("chat")
    assert (m.name, m.model, m.ctx, m.keep_loaded, m.devices) == ("chat", "ollama:qwen3:30b", 8192, True, ())
    assert m.ref.kind == "ollama" and (m.ref.name, m.ref.tag) == ("qwen3", "30b")
    assert f.keep_free == {"CUDA0": 2 * GiB}
    cfg = m.config()
    assert (cfg.n_ctx, cfg.type_k, cfg.n_seq_max, cfg.devices) == (8192, "f16", 1, ())


def test_every_field_reads_into_the_model_and_its_config():
    f = fleet_from_dict(tomllib.loads(FULL))
    chat, coder, embed = f.models
    assert chat.config().devices == ("CUDA0", "CUDA1") and chat.config().n_seq_max == 2
    assert chat.config().type_k == "q8_0" and chat.ctx == 16384
    assert coder.keep_loaded is False and coder.config().tensor_overrides == (r"blk\.[0-9]+\.ffn_.*_exps\.=CPU",)
    assert coder.ref.kind == "url"
    assert embed.ref.kind == "hf" and embed.ref.name == "ggml-org/embeddinggemma-300M-GGUF" and embed.ref.tag == "Q8_0"
    assert embed.ctx == 4096
    assert f.keep_free == {"CUDA0": 2 * GiB, "CUDA2": 512 * 1024**2}


@pytest.mark.parametrize("text", [MINIMUM, FULL])
def test_round_trip_through_toml(text, tmp_path):
    f = fleet_from_dict(tomllib.loads(text))
    path = write_fleet(tmp_path / "fleet.toml", f)
    again = read_fleet(path)
    assert again == f
    assert fleet_from_dict(fleet_to_dict(again)) == f
    assert fleet_text(again) == path.read_text()       # a second write changes nothing
    assert tomllib.loads(path.read_text())["version"] == FLEET_VERSION


def test_round_trip_keeps_odd_margins_exact():
    f = Fleet(models=(FleetModel("a", "a.gguf"),), keep_free={"SIM0": 1234567})
    assert fleet_from_dict(fleet_to_dict(f)) == f
    assert fleet_to_dict(f)["devices"]["SIM0"]["keep_free"] == 1234567


@pytest.mark.parametrize("doc, match", [
    ({"models": []}, "at least one"),
    ({"models": [{"name": "a"}]}, "'model' is required"),
    ({"models": [{"name": "a", "model": "m", "ctxx": 1}]}, "unknown key.*ctxx"),
    ({"models": [{"name": "a", "model": "m", "ctx": 0}]}, "ctx must be an integer >= 1"),
    ({"models": [{"name": "a", "model": "m", "ctx": "8k"}]}, "ctx must be an integer"),
    ({"models": [{"name": "a", "model": "m", "type_k": "q9"}]}, "type_k 'q9' is not a KV cache type"),
    ({"models": [{"name": "a", "model": "m", "devices": "CUDA0,CUDA1"}]}, None),   # one string: one device name
    ({"models": [{"name": "a", "model": "m", "devices": ["CUDA0", "CUDA0"]}]}, "twice"),
    ({"models": [{"name": "a", "model": "m", "keep_loaded": "yes"}]}, "keep_loaded must be true or false"),
    ({"models": [{"name": "a", "model": "m"}, {"name": "a", "model": "n"}]}, "more than once"),
    ({"models": [{"name": "a b", "model": "m"}]}, "name must be"),
    ({"models": [{"name": "a", "model": "ollama:"}]}, "not an Ollama name"),
    ({"models": [{"name": "a", "model": "hf:nouser"}]}, "not a llama.cpp cache entry"),
    ({"models": [{"name": "a", "model": "m", "overrides": ["no-equals"]}]}, r"models\[0\] \(.a.\)"),
    ({"models": [{"name": "a", "model": "m"}], "devices": {"CUDA0": {"keep_free": "lots"}}}, "keep_free must be"),
    ({"models": [{"name": "a", "model": "m"}], "devices": {"CUDA0": {"margin": "1GiB"}}}, "unknown key.*margin"),
    ({"models": [{"name": "a", "model": "m"}], "version": 99}, "version 99"),
    ({"models": [{"name": "a", "model": "m"}], "gpus": {}}, "unknown top-level"),
])
def test_bad_input_names_the_problem(doc, match):
    if match is None:
        assert fleet_from_dict(doc).models[0].devices == ("CUDA0,CUDA1",)
        return
    with pytest.raises(ConfigError, match=match):
        fleet_from_dict(doc)


def test_read_fleet_reports_the_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[[models]]\nname = \n")
    with pytest.raises(ConfigError, match="bad.toml is not valid TOML"):
        read_fleet(bad)
    with pytest.raises(ConfigError, match="cannot read the fleet"):
        read_fleet(tmp_path / "missing.toml")
    bad.write_text("[[models]]\nname = 'x'\n")
    with pytest.raises(ConfigError, match="bad.toml: models\\[0\\].*'model' is required"):
        read_fleet(bad)


def test_model_references():
    assert parse_model_ref("ollama:qwen3").tag == "latest"
    r = parse_model_ref("ollama:user/model:7b")
    assert (r.kind, r.name, r.tag) == ("ollama", "user/model", "7b")
    # a host with a port: its ':' is not a tag (Ollama's ParseNameBare)
    r = parse_model_ref("ollama:localhost:5000/team/model")
    assert (r.name, r.tag) == ("localhost:5000/team/model", "latest")
    assert parse_model_ref("ollama:localhost:5000/team/model:q4").tag == "q4"
    assert parse_model_ref("hf:org/repo").tag == ""
    assert parse_model_ref("hf:org/repo:q4_k_m").tag == "Q4_K_M"
    assert parse_model_ref("http://host/m.gguf").kind == "url"
    assert parse_model_ref("models/m.gguf").kind == "path"


# one value other than the default for every row of the flag table, as a fleet TOML spells it
# (a new row fails test_every_setting_round_trips_through_a_fleet_toml until it has one here)
EXAMPLES = {"n_gpu_layers": 20, "split_mode": "none", "main_gpu": 1, "devices": ["CUDA1"], "ctx": 2048,
            "n_batch": 1024, "n_ubatch": 256, "type_k": "q8_0", "type_v": "q8_0", "flash_attn": "on",
            "offload_kqv": False, "parallel": 3, "kv_unified": True, "swa_full": True, "op_offload": False,
            "overrides": ["blk\\.1\\.ffn_up\\.weight=CPU"], "cpu_moe": True, "n_cpu_moe": 2, "n_cpu_ffn": 1,
            "no_host": True, "use_extra_bufts": False, "fit": "off", "fit_target": [2048], "fit_ctx": 8192}
SPLIT_CONFIG_NAME = {"ctx": "n_ctx", "parallel": "n_seq_max", "overrides": "tensor_overrides"}


def test_every_setting_round_trips_through_a_fleet_toml(tmp_path):
    from gpulab.core.settings import SETTINGS
    assert {SPLIT_CONFIG_NAME.get(k, k) for k in EXAMPLES} == {s.attr for s in SETTINGS} - {"tensor_split"}
    for key, value in EXAMPLES.items():
        doc = {"models": [{"name": "m", "model": "m.gguf", key: value}]}
        path = write_fleet(tmp_path / f"{key}.toml", fleet_from_dict(doc))
        back = read_fleet(path)
        assert tomllib.loads(path.read_text())["models"][0][key] == value, key
        got = getattr(back.models[0].config(), SPLIT_CONFIG_NAME.get(key, key))
        assert (list(got) if isinstance(got, tuple) else got) == value, key


def test_a_setting_of_the_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"models\[0\] \('m'\): kv_unified must be true or false, got 'yes'"):
        fleet_from_dict({"models": [{"name": "m", "model": "m.gguf", "kv_unified": "yes"}]})
    with pytest.raises(ConfigError, match="unknown key.*tensor_split"):
        fleet_from_dict({"models": [{"name": "m", "model": "m.gguf", "tensor_split": [1, 1]}]})


def test_a_models_projector_draft_and_mtp_round_trip_and_read_as_a_pasted_command(tmp_path):
    doc = {"models": [{"name": "vl", "model": "A.gguf", "mmproj": "mmproj-A.gguf", "mmproj_offload": False,
                       "draft": "D.gguf", "draft_flags": "-ngld 99 -devd CUDA1 -ctkd q8_0 -ctvd q8_0"},
                      {"name": "glm", "model": "G.gguf", "spec_type": "draft-mtp"}]}
    f = fleet_from_dict(doc)
    vl = f.model("vl")
    assert vl.draft_flags == ("-ngld", "99", "-devd", "CUDA1", "-ctkd", "q8_0", "-ctvd", "q8_0")
    cmd = vl.command()
    assert cmd.projector.path == "mmproj-A.gguf" and not cmd.projector.offload
    assert cmd.draft.path == "D.gguf" and cmd.draft.config.devices == ("CUDA1",)
    assert cmd.draft.config.n_gpu_layers == 99 and cmd.draft.config.type_k == "q8_0"
    assert f.model("glm").command().spec_types == ("draft-mtp",)
    written = fleet_to_dict(f)["models"]
    assert written[0]["draft_flags"] == "-ngld 99 -devd CUDA1 -ctkd q8_0 -ctvd q8_0"
    assert written[0]["mmproj_offload"] is False and written[1] == {"name": "glm", "model": "G.gguf", "ctx": 4096,
                                                                   "spec_type": "draft-mtp"}
    path = write_fleet(tmp_path / "f.toml", f)
    assert read_fleet(path) == f


@pytest.mark.parametrize("extra, match", [
    ({"draft": "D.gguf", "draft_flags": "-c 8192"}, r"draft_flags: -c set\(s\) the main model; give it as its own key"),
    ({"draft_flags": "-ngld 99"}, r"draft_flags without draft: llama-server loads no draft model"),
    ({"draft": "D.gguf", "draft_flags": "--no-such-flag"}, r"--no-such-flag: not a flag of the vendored llama-server"),
    ({"mmproj_offload": "no"}, r"mmproj_offload must be true or false"),
])
def test_bad_process_keys_are_named(extra, match):
    with pytest.raises(ConfigError, match=r"^models\[0\] \('m'\): " + match):
        fleet_from_dict({"models": [{"name": "m", "model": "A.gguf", **extra}]})
