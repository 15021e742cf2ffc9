"""The %gpulab magics, run through a real IPython shell (IPython.testing.globalipapp)."""

from __future__ import annotations

from html import escape as html_escape

import pytest

pytest.importorskip("IPython")
pytest.importorskip("ipywidgets")

from IPython.core.error import UsageError
from IPython.testing.globalipapp import start_ipython
from IPython.utils.capture import capture_output

import gpulab
from gpulab import cli
from gpulab.magics import build_parser

PLOTLY = "application/vnd.plotly.v1+json"


@pytest.fixture(scope="module")
def ip():
    from IPython.testing.globalipapp import get_ipython
    shell = start_ipython() or get_ipython()
    shell.run_line_magic("load_ext", "gpulab")
    yield shell
    shell.run_line_magic("unload_ext", "gpulab")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from gpulab.sources.synth import SynthSpec, write_model
    return str(write_model(tmp_path_factory.mktemp("m") / "tiny.gguf",
                           SynthSpec(n_layer=6, n_embd=256, n_ff=512, n_vocab=512)))


def magic(ip, line):
    return ip.run_line_magic("gpulab", line)


def test_help_on_the_magic_lists_every_command(ip):
    doc = ip.find_line_magic("gpulab").__doc__
    for cmd in ("devices", "inspect", "plan", "lab", "bench", "monitor", "export"):
        assert f"--- %gpulab {cmd} ---" in doc
    assert "-ngl N|auto|all" in doc and "--sim SPEC" in doc
    with capture_output() as cap:                       # what `%gpulab?` shows
        ip.run_line_magic("pinfo", "%gpulab")
    assert "--- %gpulab plan ---" in cap.stdout and "--tensor-split" in cap.stdout


# flags only one front end has: --json prints on a terminal; figures, --virtual and an opt-in store
# belong to notebooks
_CLI_ONLY = {"--json", "--no-store"}
_MAGIC_ONLY = {"--no-figures", "--virtual"}


def _options(parser) -> dict[str, set[str]]:
    from gpulab.commands import command_parsers
    return {name: {o for a in p._actions for o in a.option_strings} for name, p in command_parsers(parser).items()}


def test_every_command_has_the_same_flags_in_both_front_ends(ip):
    cli_opts, magic_opts = _options(cli.build_parser()), _options(build_parser())
    shared = set(cli_opts) & set(magic_opts)
    assert {"devices", "inspect", "plan", "export", "bench", "sweep", "tune", "alloc", "calibrate"} <= shared
    for name in shared:
        assert cli_opts[name] - _CLI_ONLY == magic_opts[name] - _MAGIC_ONLY, name


def test_a_setting_declared_once_is_in_the_cli_the_magic_and_the_lab(ip, model):
    """Every row of gpulab.core.settings, --no-op-offload among them, shows in `gpulab plan --help`,
    in `%gpulab plan?`, and as a control of the lab that reaches the plan's config."""
    import subprocess
    import sys

    from gpulab.core.settings import SETTINGS
    help_text = subprocess.run([sys.executable, "-m", "gpulab", "plan", "--help"], capture_output=True,
                               text=True).stdout
    with capture_output() as cap:
        ip.run_cell("%gpulab plan?")
    lab = magic(ip, f"lab {model} --sim 2x24GiB --no-op-offload")
    try:
        assert lab.config.op_offload is False
        for st in SETTINGS:
            assert st.flags[-1] in help_text and st.flags[-1] in cap.stdout, st.flags
        ctl = lab.setting_controls["op_offload"]
        assert ctl.description == "--no-op-offload" and ctl.value is True
        ctl.value = False
        assert lab.plan.config.op_offload is True
        assert "--no-op-offload" not in lab.export_html.value
        ctl.value = True
        assert "--no-op-offload" in lab.export_html.value      # exported as llama-server spells it
    finally:
        lab.close()


def test_devices_as_html_and_dataframe(ip):
    r = magic(ip, "devices --sim 2x24GiB,12GiB@10GiB")
    html = r._repr_html_()
    assert "SIM0" in html and "SIM2" in html and "<table" in html
    df = r.to_dataframe()
    assert list(df["device"])[:3] == ["SIM0", "SIM1", "SIM2"]
    assert int(df["free_bytes"][2]) == 10 * 1024**3


def test_inspect(ip, model):
    r = magic(ip, f"inspect {model}")
    assert len(r.to_dataframe()) == 6 and "n_layer 6" in r._repr_html_()


def test_inspect_with_a_rule_shows_what_it_matches(ip, model):
    r = magic(ip, rf"inspect {model} -ot blk\.[0-1]\.ffn_(up|down)=CPU")
    html = r._repr_html_()
    assert "ffn_up.weight, ffn_down.weight of blk 0,1" in html and "first match wins" in html
    assert [len(x["tensors"]) for x in r.data["rules"]] == [4]


def test_plan_matches_the_planner_and_shows_figures(ip, model):
    with capture_output() as cap:
        r = magic(ip, f"plan {model} --sim 2x1GiB -ts 1,3 -c 2048 -ctk q8_0 -ngl 5")
    from gpulab.sources.detect import host_device
    want = gpulab.plan(gpulab.read_profile(model), gpulab.parse_sim_spec("2x1GiB"),
                       gpulab.SplitConfig(tensor_split=(1, 3), n_ctx=2048, type_k="q8_0", n_gpu_layers=5),
                       host_device())
    assert r.plan.layer_devices == want.layer_devices
    assert [d.kv_bytes for d in r.plan.devices] == [d.kv_bytes for d in want.devices]
    figs = [o for o in cap.outputs if PLOTLY in o.data]
    assert len(figs) == 2                                   # layer map and memory bars, no browser
    df = r.to_dataframe()
    assert list(df["device"]) == ["SIM0", "SIM1", "CPU"]
    assert "fits" in r._repr_html_()


def test_plan_shows_what_the_command_line_shows(ip, model):
    """With no -ts/-ngl, `gpulab plan` prints fit's section, then the plain split, then the speed
    line: the notebook shows the same sections in the same order, and fit's memory figure first."""
    from gpulab.ui.text import FIT_HEAD, PLAIN_HEAD
    with capture_output() as cap:
        r = magic(ip, f"plan {model} --sim 2x8GiB")
    assert r.text.startswith(FIT_HEAD) and PLAIN_HEAD in r.text and "speed (predicted" in r.text
    page = r._repr_html_()
    at = 0
    for mark in (html_escape(FIT_HEAD), "fit&#x27;s log:", "<table", html_escape(PLAIN_HEAD), "<table",
                 "speed (predicted"):
        assert mark in page[at:], mark
        at = page.index(mark, at) + 1
    titles = [o.data[PLOTLY]["layout"]["title"]["text"] for o in cap.outputs if PLOTLY in o.data]
    assert len(titles) == 3 and titles[0].startswith("llama-server (fit): ")


def test_results_are_the_cell_value(ip, model):
    ip.run_cell(f"%gpulab plan {model} --sim 3x24GiB --policy pack --no-figures", store_history=True)
    r = ip.user_ns["_"]
    assert r.plan.config.tensor_split == (1.0, 0.0, 0.0)
    assert r.to_dataframe()["n_layers"].tolist()[:3] == [6, 0, 0]


def test_bad_input_is_a_usage_error_not_a_traceback(ip, model):
    with pytest.raises(UsageError, match="cannot parse tensor split"):
        magic(ip, f"plan {model} --sim 2x24GiB -ts x")
    with pytest.raises(UsageError, match="invalid choice"):
        magic(ip, f"plan {model} --sim 2x24GiB -ctk q3")
    with pytest.raises(UsageError, match="no such file|not|No such"):
        magic(ip, "plan /nonexistent.gguf --sim 24GiB")
    with pytest.raises(UsageError):
        magic(ip, "frobnicate")
    with capture_output() as cap:
        assert magic(ip, "plan -h") is None
    assert "--tensor-split" in cap.stdout


def test_export(ip, model):
    r = magic(ip, f"export {model} --sim 2x24GiB -ts 3,1 -c 8192")
    assert "llama-server" in r.texts and "-ts 3,1" in r.texts["llama-server"]
    assert "-c 8192" in r.texts["llama-server"]
    assert set(r.to_dataframe()["target"]) >= {"llama-server", "python", "ollama"}
    assert "llama-cpp-python" in r._repr_html_() and "Ollama" in r._repr_html_()


def test_lab_takes_the_flags(ip, model):
    from gpulab.ui.lab import SplitLab
    lab = magic(ip, f"lab {model} --sim 2x24GiB -ts 1,2 -c 2048 -ngl 3")
    assert isinstance(lab, SplitLab)
    assert lab.config.tensor_split == (1.0, 2.0) and lab.config.n_ctx == 2048 and lab.config.n_gpu_layers == 3
    lab.close()
    lab = magic(ip, f"lab {model} --sim 2x24GiB --policy pack --monitor")
    assert lab.config.tensor_split == (1.0,) and lab.monitor is lab.children[-1]
    lab.close()


def test_monitor_without_nvml_says_so(ip):
    from gpulab.sources.nvml import NvmlProbe
    m = magic(ip, "monitor --interval 0.5")
    try:
        if not NvmlProbe().available():
            assert m.source == "none" and "nothing to monitor" in m.header.value
        else:
            assert m.running
    finally:
        m.close()
    assert not m.running


@pytest.mark.slow
def test_bench_on_virtual_devices(ip, model):
    r = magic(ip, f"bench {model} --virtual 2 -ts 1,1 -c 256 -p 16 -n 4 -r 1")
    df = r.to_dataframe()
    assert bool(df["placement_as_planned"][0])
    assert df["devices"][0] == "RPC0,RPC1"
    if r.run.pp is not None:                 # measurement installed: throughput too
        assert df["pp_ts"][0] > 0 and df["tg_ts"][0] > 0


def test_unload_removes_the_magic(ip):
    assert ip.find_line_magic("gpulab") is not None
    ip.run_line_magic("unload_ext", "gpulab")
    assert ip.find_line_magic("gpulab") is None
    ip.run_line_magic("load_ext", "gpulab")
    assert ip.find_line_magic("gpulab") is not None


def test_a_pasted_llama_server_command_in_a_notebook(ip, model):
    """%gpulab plan -- llama-server ...: the same parser and process plan as the command line."""
    with capture_output():
        r = magic(ip, f"plan --sim 2x1GiB -- llama-server -m {model} -md {model} -devd SIM1 -ngl 99 -ts 1,1 "
                      "-c 2048 -np 1 --port 8080")
    assert r.command.program == "llama-server" and r.command.ignored == ("--port 8080",)
    assert r.process.row("SIM1").draft_bytes > 0 and r.process.row("SIM0").draft_bytes == 0
    assert list(r.to_dataframe()["device"]) == ["SIM0", "SIM1", "CPU"]
