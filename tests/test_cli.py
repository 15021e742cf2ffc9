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
    assert d["tensor_parallel"]["devices"] == ["SIM0", "SIM1"]
    code, out, _ = run(capsys, "plan", model, "--sim", "24GiB,24GiB", "-sm", "tensor")
    assert code == 0 and "0-8,out (a slice of each)" in out and "all-reduces per token" in out
    code, _, err = run(capsys, "plan", model, "--sim", "24GiB,24GiB", "-sm", "tensor", "-fa", "off")
    assert code != 0 and "requires flash_attn" in err and "Traceback" not in err


def test_plan_table_and_policy(capsys, model):
    code, out, _ = run(capsys, "plan", model, "--sim", "8x24GiB", "--policy", "ollama-spread")
    assert code == 0
    assert "-ts 2,2,1,1,1,1,1,1" in out   # 10 layers (9 blocks + output) dealt over 8 devices
    assert "fits" in out.splitlines()[-1]


def test_plan_with_todays_ollama_policy(capsys, model):
    # gpulab.core.policies.ollama: a small model goes to the GPU with the most free memory, alone
    code, out, err = run(capsys, "plan", model, "--sim", "24GiB@10GiB,24GiB@20GiB", "--policy", "ollama")
    assert code == 0, err
    flags = next(line for line in out.splitlines() if line.startswith("flags:"))
    assert "--device SIM1" in flags and "-sm none -mg 0" in flags


@pytest.fixture(scope="module")
def moe_model(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("cli") / "moe.gguf",
                       SynthSpec(n_layer=6, n_embd=512, n_ff=1024, n_head=8, n_head_kv=4, n_vocab=1024, n_expert=8,
                                 n_expert_used=2, weight_type="Q8_0"))


def test_plan_moe_balance_prints_the_flags_and_what_each_rule_matched(capsys, moe_model):
    argv = ["plan", moe_model, "--sim", "36MiB,28MiB,20MiB", "-c", "512", "-b", "64", "-ub", "64",
            "--policy", "moe-balance"]
    code, out, err = run(capsys, *argv)
    assert code == 0, out + err
    flags = next(line for line in out.splitlines() if line.startswith("flags: "))
    assert " -ts " in flags and " -ot " in flags and "--n-cpu-moe" not in flags
    code, js, _ = run(capsys, *argv, "--json")
    d = json.loads(js)
    assert d["flags"] == flags[len("flags: "):]
    # one rule per -ot item, each naming the expert tensors it moved and their bytes
    assert [r["rule"] for r in d["rules"]] == list(d["config"]["tensor_overrides"])
    for r in d["rules"]:
        assert r["tensors"] and all("_exps." in t for t in r["tensors"]) and r["bytes"] > 0
        assert r["rule"] in out
    assert "tensor overrides (first match wins)" in out and "_exps.weight of blk" in out


def test_plan_moe_balance_on_a_dense_model_says_why_not(capsys, model):
    code, _, err = run(capsys, "plan", model, "--sim", "2x24GiB", "--policy", "moe-balance")
    assert code == 2 and "use --policy balanced" in err and len(err.strip().splitlines()) == 1


def test_inspect_ot_lists_what_each_rule_matches_first_match_wins(capsys, moe_model):
    code, out, err = run(capsys, "inspect", moe_model, "-ot", r"blk\.[0-2]\.ffn_.*_exps=CPU,attn_q=RPC1",
                         "-ncmoe", "4", "-ot", "nothing_here=CPU", "--json")
    assert code == 0
    rules = json.loads(out)["rules"]
    assert [(r["rule"], r["source"]) for r in rules] == [
        (r"blk\.[0-2]\.ffn_.*_exps=CPU", "-ot"), ("attn_q=RPC1", "-ot"), ("nothing_here=CPU", "-ot"),
        *((rf"blk\.{i}\.ffn_(up|down|gate|gate_up)_(ch|)exps=CPU", "-ncmoe") for i in range(4))]
    exps = [f"blk.{i}.ffn_{k}_exps.weight" for i in range(3) for k in ("gate", "up", "down")]
    assert rules[0]["tensors"] == exps and rules[1]["tensors"] == [f"blk.{i}.attn_q.weight" for i in range(6)]
    # -ncmoe's rules for layers 0-2 come after the -ot rule that took those tensors: nothing left
    assert [len(r["tensors"]) for r in rules[2:]] == [0, 0, 0, 0, 3]
    # bytes are the tensors' own: 8 experts x 512 x 1024 Q8_0 (34 bytes a block of 32)
    assert rules[0]["bytes"] == 9 * 8 * 512 * 1024 // 32 * 34
    assert "nothing_here=CPU' matches no tensor" in err and "-ncmoe" not in err
    code, out, _ = run(capsys, "inspect", moe_model, "-ot", r"blk\.[0-2]\.ffn_.*_exps=CPU")
    assert "ffn_gate_exps.weight, ffn_up_exps.weight, ffn_down_exps.weight of blk 0,1,2" in out
    assert "38.25 MiB" in out
def test_plan_without_split_flags_shows_what_llama_server_fits_and_the_plain_split(capsys, model):
    from gpulab.core.config import SplitConfig
    from gpulab.core.devices import parse_sim_spec
    from gpulab.core.policies.server_fit import server_fit
    from gpulab.sources.read import read_profile
    code, out, err = run(capsys, "plan", model, "--sim", "2x600MiB", "-fitt", "595", "--json")
    d = json.loads(out)
    # llama-server's defaults where -c and -np are not given: -c 0, -np 4 -kvu
    expected = server_fit(read_profile(str(model)), parse_sim_spec("2x600MiB"),
                   SplitConfig(n_ctx=0, n_seq_max=4, kv_unified=True, fit_target=(595,)))
    assert d["fit"]["flags"] == expected.flags() and d["fit"]["status"] == "success"
    assert d["config"]["n_ctx"] == 4096 and d["config"]["tensor_split"] == []       # the plain split
    assert d["fit"]["plan"]["config"]["tensor_split"] == list(expected.config.tensor_split)
    code, out, _ = run(capsys, "plan", model, "--sim", "2x600MiB", "-fitt", "595")
    assert "llama-server / llama-cli (-fit on, their default) would load:" in out
    assert "plain layer split, no fit (llama-bench, llama-cpp-python" in out
    # given -ts, or -fit off, there is nothing for fit to choose: only the plan
    for flags in (["-ts", "1,1"], ["-fit", "off"], ["-ngl", "all"]):
        code, out, _ = run(capsys, "plan", model, "--sim", "2x600MiB", *flags)
        assert "would load" not in out
    # --policy fit plans fit's choice, and the export writes it out with -fit off
    code, out, _ = run(capsys, "export", model, "--sim", "2x600MiB", "-fitt", "595", "-c", "0", "--policy", "fit",
                       "--to", "llama-server")
    assert f"-c {expected.config.n_ctx}" in out and "-ngl " + str(expected.config.n_gpu_layers) in out
    assert out.rstrip().endswith("-fit off")


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
    # tensor overrides: what llama.cpp refuses (common/arg.cpp), and what gpulab cannot mirror
    (["plan", "{model}", "--sim", "2x24GiB", "-ot", r"blk\.[=CPU"], "does not compile"),
    (["inspect", "{model}", "-ot", r"blk\.(=CPU"], "does not compile"),
    (["plan", "{model}", "--sim", "2x24GiB", "-ot", "exps=CUDA7"], "is no device here (llama.cpp: unknown buffer"),
    (["plan", "{model}", "--sim", "2x24GiB", "-ot", "exps=CPU_Mapped"], "does not take CPU_Mapped"),
    (["plan", "{model}", "--sim", "2x24GiB", "-ot", "exps"], "has no '='"),
    (["plan", "{model}", "--sim", "2x24GiB", "-ot", "(?<=x)exps=CPU"], "cannot mirror"),
    (["plan", "{model}", "--sim", "2x24GiB", "-ncmoe", "-1"], "--n-cpu-moe -1: llama.cpp takes a count from 0"),
    (["inspect", "{model}", "-ncffn", "-2"], "--n-cpu-ffn -2"),
    (["plan", "{model}", "--sim", "24GiB", "--fit-dry-run"], "--fit-dry-run loads the model with llama.cpp"),
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


# What a `gpulab plan` / `gpulab inspect` process must not load: the fleet planner and exports, the
# notebook stack, llama.cpp, -sm tensor's rules, and numpy and gguf (the header walker and the planner
# need neither).
NOT_FOR_PLAN = ("numpy", "gguf", "gpulab.core.fleet", "gpulab.core.fleet.planner", "gpulab.core.exports.fleet",
                "gpulab.core.placement.tensor_parallel",
                "gpulab.runtime.worker", "gpulab.storage.overheads", "plotly", "ipywidgets", "anywidget",
                "llama_cpp", "pandas", "IPython")


@pytest.mark.parametrize("argv", [("plan", "--sim", "2x24GiB", "-c", "4096", "-fit", "off"), ("inspect",)])
def test_plan_and_inspect_processes_import_only_what_they_use(model, argv):
    """sys.modules of a child process that ran the command (a contract, not a timing)."""
    code = ("import json, sys\nfrom gpulab.cli import main\nrc = main(sys.argv[1:])\n"
            "print(json.dumps(sorted(sys.modules)))\nsys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code, argv[0], str(model), *argv[1:]],
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    loaded = set(json.loads(r.stdout.splitlines()[-1]))
    assert "gpulab.sources.gguf_header" in loaded   # the check sees what the command imported
    assert sorted(loaded & set(NOT_FOR_PLAN)) == []


def test_plan_cluster_compares_host_choices(smollm2, tmp_path):
    from gpulab.cli import main
    f = tmp_path / "c.toml"
    f.write_text('version = 1\nhead = "desk"\n[[hosts]]\nname = "desk"\ndevices = [{ spec = "250MiB:400GB/s" }]\n'
                 '[[hosts]]\nname = "box"\naddress = "10.0.0.2"\nlink = { gbit_per_s = 10.0, rtt_ms = 0.1 }\n'
                 'devices = [{ spec = "250MiB:400GB/s", port = 50052 }]\n')
    import contextlib
    import io
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["plan", str(smollm2), "-c", "4096", "--cluster", str(f)]) == 0
    text = out.getvalue()
    assert "*desk + box" in text and "why: spans 2 hosts: predicted tg" in text
