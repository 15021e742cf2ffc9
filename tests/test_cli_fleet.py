"""`gpulab fleet plan|export` as a user meets it: the JSON object of issue 15, exit 0/1/2, the
table, the exports, and `%gpulab fleet` in a real IPython shell."""

from __future__ import annotations

import json

import pytest

from gpulab.cli import main
from gpulab.core.units import GiB
from gpulab.sources.synth import SynthSpec, write_model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("fleet")
    specs = {"chat": SynthSpec(n_layer=9, n_embd=512, n_ff=1024, n_head=8, n_head_kv=2, n_vocab=1024),
             "coder": SynthSpec(n_layer=6, n_embd=256, n_ff=512, n_head=8, n_head_kv=2, n_vocab=512),
             "embed": SynthSpec(n_layer=3, n_embd=256, n_ff=512, n_head=4, n_head_kv=4, n_vocab=512)}
    return root, {n: write_model(root / f"{n}.gguf", s) for n, s in specs.items()}


def _fleet(root, text: str):
    p = root / "fleet.toml"
    p.write_text(text)
    return p


FLEET = """
[[models]]
name = "chat"
model = "chat.gguf"
ctx = 2048
devices = ["SIM0", "SIM1"]

[[models]]
name = "coder"
model = "coder.gguf"
ctx = 1024
type_k = "q8_0"
type_v = "q8_0"

[[models]]
name = "embed"
model = "embed.gguf"
keep_loaded = false

[devices.SIM0]
keep_free = "1GiB"
"""


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_fleet_plan_json_is_the_issue_object(capsys, models):
    root, _ = models
    code, out, err = run(capsys, "fleet", "plan", _fleet(root, FLEET), "--sim", "4GiB,4GiB,2GiB", "--json")
    assert code == 0, err
    d = json.loads(out)
    assert set(d) >= {"models", "devices", "fits"} and d["fits"] is True
    assert [m["name"] for m in d["models"]] == ["chat", "coder", "embed"]
    for m in d["models"]:
        assert set(m) >= {"name", "devices", "config", "per_device"}
        assert set(m["config"]) >= {"n_gpu_layers", "tensor_split", "n_ctx", "type_k", "type_v"}
        for row in m["per_device"]:
            assert set(row) >= {"name", "weights_bytes", "kv_bytes", "compute_bytes"}
            assert row["name"] in m["devices"]
    chat = d["models"][0]
    assert chat["devices"] == ["SIM0", "SIM1"] and len(chat["config"]["tensor_split"]) == 2
    assert d["models"][1]["config"]["type_k"] == "q8_0" and d["models"][1]["config"]["n_ctx"] == 1024
    for dev in d["devices"]:
        assert set(dev) >= {"name", "free_bytes", "keep_free_bytes", "used_bytes", "fits"}
        assert dev["used_bytes"] <= dev["free_bytes"] - dev["keep_free_bytes"]
    assert d["devices"][0]["keep_free_bytes"] == GiB and d["devices"][0]["free_bytes"] == 4 * GiB
    # used = the per-model bytes on the device: resident models, plus the swappable one
    for dev in d["devices"]:
        resident = sum(r["used_bytes"] for m in d["models"] if m["keep_loaded"] for r in m["per_device"]
                       if r["name"] == dev["name"])
        swap = max([r["used_bytes"] for m in d["models"] if not m["keep_loaded"] for r in m["per_device"]
                    if r["name"] == dev["name"]], default=0)
        assert dev["used_bytes"] == resident + swap


def test_fleet_that_does_not_fit_exits_1_with_the_explanation(capsys, models):
    root, _ = models
    code, out, _ = run(capsys, "fleet", "plan", _fleet(root, FLEET), "--sim", "40MiB,40MiB,20MiB")
    assert code == 1
    assert "DOES NOT FIT" in out and "short by" in out
    code, out, _ = run(capsys, "fleet", "plan", _fleet(root, FLEET), "--sim", "40MiB,40MiB,20MiB", "--json")
    d = json.loads(out)
    assert code == 1 and d["fits"] is False and [m["name"] for m in d["models"]] == ["chat", "coder", "embed"]
    short = [a for a in d["advice"] if a["kind"] == "short"]
    assert short and all(a["bytes"] == next(x["used_bytes"] - x["free_bytes"] + x["keep_free_bytes"]
                                            for x in d["devices"] if x["name"] == a["device"]) for a in short)


@pytest.mark.parametrize("text, extra, fragment", [
    (FLEET.replace('ctx = 2048', 'ctx = "big"'), [], "ctx must be an integer"),
    (FLEET, ["--objective", "fastest"], "not one of fewest"),
    (FLEET.replace('"SIM0", "SIM1"', '"CUDA7"'), [], "pinned to CUDA7"),
    (FLEET.replace("chat.gguf", "missing.gguf"), [], "no such file"),
    ("[[models]\n", [], "not valid TOML"),
    (FLEET, ["--time-budget", "0"], "--time-budget takes seconds > 0"),
    (FLEET, ["--time-budget", "soon"], "--time-budget takes seconds > 0"),
])
def test_bad_input_exits_2(capsys, models, text, extra, fragment):
    root, _ = models
    code, _, err = run(capsys, "fleet", "plan", _fleet(root, text), "--sim", "4GiB,4GiB,2GiB", *extra)
    assert code == 2 and fragment in err and "Traceback" not in err


def test_fleet_plan_table(capsys, models):
    root, _ = models
    code, out, _ = run(capsys, "fleet", "plan", _fleet(root, FLEET), "--sim", "4GiB,4GiB,2GiB")
    assert code == 0
    assert "chat" in out and "swappable" in out and "fleet fits" in out.splitlines()[-1]


def test_fleet_export_llama_swap(capsys, models):
    import yaml
    root, paths = models
    code, out, err = run(capsys, "fleet", "export", _fleet(root, FLEET), "--sim", "4GiB,4GiB,2GiB",
                         "--to", "llama-swap")
    assert code == 0, err
    doc = yaml.safe_load(out)
    assert set(doc["models"]) == {"chat", "coder", "embed"}
    chat = doc["models"]["chat"]["cmd"]
    assert chat.startswith("llama-server --port ${PORT} -m " + str(paths["chat"]))
    assert " --device SIM0,SIM1 " in chat and " -ts 0.75,1 " in chat and " -c 2048 " in chat   # SIM0 keeps 1 GiB free
    assert "-ctk q8_0 -ctv q8_0" in doc["models"]["coder"]["cmd"]
    assert doc["groups"]["fleet"] == {"swap": False, "exclusive": False, "persistent": True,
                                      "members": ["chat", "coder"]}
    assert doc["groups"]["swappable"]["members"] == ["embed"] and doc["groups"]["swappable"]["swap"] is True


def test_fleet_export_router_and_ollama(capsys, models):
    root, paths = models
    code, out, _ = run(capsys, "fleet", "export", _fleet(root, FLEET), "--sim", "4GiB,4GiB,2GiB",
                       "--to", "llama-server")
    assert code == 0
    assert "[chat]" in out and f"m = {paths['chat']}" in out and "device = SIM0,SIM1" in out
    assert "load-on-startup = true" in out.split("[embed]")[0]
    assert "load-on-startup" not in out.split("[embed]")[1]
    code, out, err = run(capsys, "fleet", "export", _fleet(root, FLEET), "--sim", "4GiB,4GiB,2GiB",
                         "--to", "ollama", "--json")
    d = json.loads(out)
    # SIM devices are not CUDA devices: Ollama cannot select them, which the gaps say
    assert any("CUDA_VISIBLE_DEVICES cannot select them" in g for g in d["gaps"])
    assert {m for i in d["data"]["instances"] for m in i["models"]} == {"chat", "coder", "embed"}
    assert "PARAMETER num_ctx 2048" in d["data"]["modelfiles"]["chat"]


def test_magic_fleet(models):
    from IPython.testing.globalipapp import start_ipython
    root, _ = models
    ip = start_ipython()
    ip.run_line_magic("load_ext", "gpulab")
    try:
        res = ip.run_line_magic("gpulab", f"fleet plan {_fleet(root, FLEET)} --sim 4GiB,4GiB,2GiB")
        assert res.plan.fits and res.exit_code == 0
        assert {r["model"] for r in res.rows} == {"chat", "coder", "embed"}
        assert res.figures and len(res.figures[0].data) == 3 * 3 + 1   # 3 models x 3 terms + the budget ticks
        lab = ip.run_line_magic("gpulab", f"fleet lab {_fleet(root, FLEET)} --sim 4GiB,4GiB,2GiB")
        assert lab.plan.to_dict() == res.plan.to_dict()
        lab.pin("coder", ["SIM2"])
        assert lab.plan.placement("coder").devices == ("SIM2",)
    finally:
        ip.run_line_magic("unload_ext", "gpulab")


def test_fleet_import_and_plan_from_a_llama_swap_config(capsys, models, tmp_path):
    root, paths = models
    code, out, err = run(capsys, "fleet", "export", _fleet(root, FLEET), "--sim", "4GiB,4GiB,2GiB",
                         "--to", "llama-swap")
    assert code == 0
    cfg = root / "config.yaml"
    cfg.write_text(out)
    code, out, err = run(capsys, "fleet", "import", cfg, "-o", tmp_path / "again.toml")
    assert code == 0 and "-ts" in err      # the split is left to the planner, and it says so
    from gpulab.storage.fleet_files import read_fleet
    again = read_fleet(tmp_path / "again.toml")
    assert [m.name for m in again.models] == ["chat", "coder", "embed"]
    assert again.model("chat").devices == ("SIM0", "SIM1") and again.model("embed").keep_loaded is False
    # and the config itself is a fleet for `fleet plan`
    code, out, _ = run(capsys, "fleet", "plan", cfg, "--sim", "4GiB,4GiB,2GiB", "--json")
    assert code == 0 and [m["name"] for m in json.loads(out)["models"]] == ["chat", "coder", "embed"]


def test_fleet_plan_tg_objective(capsys, models):
    root, _ = models
    text = FLEET.replace('devices = ["SIM0", "SIM1"]\n', "")
    code, out, err = run(capsys, "fleet", "plan", _fleet(root, text), "--sim", "4GiB:300GB/s,4GiB:3000GB/s,2GiB",
                         "--objective", "tg:chat", "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d["objective"] == "tg:chat"
    assert d["models"][0]["devices"] == ["SIM1"]     # the fastest device, alone: no hop


CLUSTER = "".join(f"""
[[models]]
name = "{n}{i}"
model = "{n}.gguf"
ctx = 1024
""" for i in range(6) for n in ("chat", "coder", "embed"))


def test_fleet_plan_on_a_cluster_says_what_the_search_did(capsys, models):
    """18 models on 16 equal cards: beyond the exhaustive search; the text and --json say the
    heuristic's limit, its value and the bound (every model fits on one card: 18 slots, and no
    plan needs fewer), and a time budget still returns a whole plan."""
    root, _ = models
    path = _fleet(root, CLUSTER)
    code, out, err = run(capsys, "fleet", "plan", path, "--sim", "16x4GiB", "--json", "--time-budget", "30")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["search"] == "heuristic" and doc["fits"] is True
    assert len(doc["models"]) == 18 and all(len(m["devices"]) == 1 for m in doc["models"])
    detail = doc["search_detail"]
    assert detail["value"] == 18 and detail["bound"] == 18 and detail["gap"] == 0
    assert "branch and bound" in detail["limit"]
    code, out, _ = run(capsys, "fleet", "plan", path, "--sim", "16x4GiB", "--objective", "balanced")
    assert code == 0
    line = [x for x in out.splitlines() if "left on the tightest device" in x]
    assert len(line) == 1 and "gap" in line[0]


def test_the_progress_line_goes_to_a_terminal_and_is_cleared():
    import io

    from gpulab.commands.fleet import _Progress
    stream = io.StringIO()
    bar = _Progress(True, stream)
    bar(0.5, "greedy 3/18 models")
    assert "fleet plan [##########..........]  50% greedy 3/18 models" in stream.getvalue()
    bar.clear()
    assert stream.getvalue().endswith("\r")
    quiet = io.StringIO()
    _Progress(False, quiet)(0.5, "x")
    assert quiet.getvalue() == ""


def test_a_fleet_models_projector_and_draft_are_read_and_counted(capsys, models):
    """mmproj and draft paths in the fleet TOML (relative to it): gpulab fleet reads them and counts
    them on the model's devices (per_device process_bytes), and the llama-swap export writes them."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent))
    from projectors import write_projector
    root, _ = models
    write_projector(root / "mmproj-chat.gguf", projector_type="mlp", image_size=336, patch_size=14, n_embd=256,
                    n_ff=1024, n_head=4, n_layer=2, proj_dim=512)
    text = ('[[models]]\nname = "chat"\nmodel = "chat.gguf"\nctx = 2048\nmmproj = "mmproj-chat.gguf"\n'
            'draft = "embed.gguf"\ndraft_flags = "-ngld 99"\n')
    code, out, err = run(capsys, "fleet", "plan", _fleet(root, text), "--sim", "4GiB", "--json")
    assert code == 0, err
    row = json.loads(out)["models"][0]["per_device"][0]
    assert row["process_bytes"] > 0
    assert row["used_bytes"] == row["weights_bytes"] + row["kv_bytes"] + row["compute_bytes"] + row["process_bytes"]
    code, out, err = run(capsys, "fleet", "export", _fleet(root, text), "--sim", "4GiB", "--to", "llama-swap")
    assert code == 0, err
    assert f"--mmproj {root / 'mmproj-chat.gguf'} -md {root / 'embed.gguf'} -ngld 99" in out
    bad = text.replace("mmproj-chat.gguf", "missing.gguf")
    code, out, err = run(capsys, "fleet", "plan", _fleet(root, bad), "--sim", "4GiB")
    assert code == 2 and "missing.gguf" in err, err


def test_fleet_plan_on_a_cluster_says_why_a_model_spans(smollm2, tmp_path, capsys):
    from gpulab.cli import main
    (tmp_path / "fleet.toml").write_text(f'version = 1\n[[models]]\nname = "chat"\nmodel = "{smollm2}"\nctx = 512\n')
    (tmp_path / "c.toml").write_text(
        'version = 1\nhead = "desk"\n[[hosts]]\nname = "desk"\ndevices = [{ spec = "150MiB" }]\n'
        '[[hosts]]\nname = "box"\naddress = "10.0.0.2"\nlink = { gbit_per_s = 1.0, rtt_ms = 1.0 }\n'
        'devices = [{ spec = "150MiB", port = 50052 }]\n')
    code = main(["fleet", "plan", str(tmp_path / "fleet.toml"), "--cluster", str(tmp_path / "c.toml"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 0
    assert "chat spans hosts box + desk: no plan within one host holds it (spanning is the last resort)" in err
