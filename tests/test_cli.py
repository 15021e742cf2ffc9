"""The command line as a user meets it: exit codes, one-line errors, JSON a script can read."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from gpulab.cli import main
from gpulab.sources.synth import SynthSpec, write_model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("cli") / "m.gguf",
                       SynthSpec(n_layer=9, n_embd=256, n_ff=512, n_head=8, n_head_kv=2, n_vocab=512))


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_plan_json_is_one_object_with_every_layer(capsys, model):
    code, out, err = run(capsys, "plan", model, "--sim", "24GiB,24GiB", "-ts", "1,2", "-c", "1024", "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d["model"]["n_layer"] == 9 and d["config"]["tensor_split"] == [1.0, 2.0]
    assert [x["device"] for x in d["layers"]] == ["SIM0"] * 4 + ["SIM1"] * 6   # upper_bound of il/10
    assert [x["name"] for x in d["devices"]] == ["SIM0", "SIM1", "CPU"] and d["fits"] is True


def test_plan_with_split_mode_tensor(capsys, model):
    code, out, err = run(capsys, "plan", model, "--sim", "24GiB,24GiB", "-sm", "tensor", "-ts", "3,1", "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d["config"]["split_mode"] == "tensor" and {x["device"] for x in d["layers"]} == {"Meta()"}
    assert d["tensor_split"]["devices"] == ["SIM0", "SIM1"]
    code, out, _ = run(capsys, "plan", model, "--sim", "24GiB,24GiB", "-sm", "tensor")
    assert code == 0 and "0-8,out (a slice of each)" in out and "all-reduces per token" in out
    code, _, err = run(capsys, "plan", model, "--sim", "24GiB,24GiB", "-sm", "tensor", "-fa", "off")
    assert code != 0 and "requires flash_attn" in err and "Traceback" not in err


def test_plan_table_and_policy(capsys, model):
    code, out, _ = run(capsys, "plan", model, "--sim", "8x24GiB", "--policy", "ollama-spread")
    assert code == 0
    assert "-ts 2,2,1,1,1,1,1,1" in out   # 10 layers (9 blocks + output) dealt over 8 devices
    assert "fits" in out.splitlines()[-1]


def test_plan_that_does_not_fit_exits_1_and_names_the_deficit(capsys, model):
    code, out, _ = run(capsys, "plan", model, "--sim", "24GiB,1MiB", "-ts", "1,1")
    assert code == 1
    assert "DOES NOT FIT: SIM1: needs" in out


def test_inspect_json_lists_layers(capsys, model):
    code, out, _ = run(capsys, "inspect", model, "--json")
    d = json.loads(out)
    assert code == 0 and d["n_layer"] == 9 and len(d["layers"]) == 9
    assert d["layers"][0]["n_head_kv"] == 2 and d["tied_output"] is False


@pytest.mark.parametrize("argv,fragment", [
    (["plan", "{model}", "--sim", "24GiB,24GiB", "-ts", "1,1,1"], "3 entries but there are only 2"),
    (["plan", "{model}", "--sim", "24GiB,24GiB", "-ts", "1,nan"], "finite"),
    (["plan", "{model}", "--sim", "24GiB,24GiB", "-ts=-1,1"], "finite"),
    (["plan", "{model}", "--sim", "24GiB,24GiB", "-sm", "none", "-mg", "2"], "main_gpu 2 is out of range"),
    (["plan", "{model}", "--sim", "24XB"], "cannot parse device spec item"),
    (["plan", "{model}", "--sim", "24GiB", "--device", "CUDA7"], "unknown device"),
    (["inspect", "{notgguf}"], "GGUF"),
    (["inspect", "{truncated}"], "truncated"),
    (["inspect", "{missing}"], "missing.gguf"),
    (["inspect", "http://127.0.0.1:9/model.gguf"], "127.0.0.1:9"),
])
def test_bad_input_is_one_line_exit_2_no_traceback(capsys, tmp_path, model, argv, fragment):
    notgguf = tmp_path / "notgguf.gguf"
    notgguf.write_bytes(b"this is not a model at all" * 10)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(model.read_bytes()[:1000])
    subs = {"model": model, "notgguf": notgguf, "truncated": truncated, "missing": tmp_path / "missing.gguf"}
    code, out, err = run(capsys, *[a.format(**subs) for a in argv])
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpulab: error: "), err
    assert fragment.lower() in lines[0].lower()


def test_entry_point_prints_no_traceback(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 60)
    r = subprocess.run([sys.executable, "-m", "gpulab", "inspect", str(bad)], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.startswith("gpulab: error:")


def test_devices_without_gpu_says_so_and_lists_the_host(capsys):
    code, out, _ = run(capsys, "devices", "--json")
    d = json.loads(out)
    assert code == 0 and d["host"]["name"] == "CPU"
    if not d["devices"]:
        assert "no GPU found" in d["note"]
