"""Exports: every target from one table, each checked against the parser of its target.

llama-server/llama-cli flags are checked against llama.cpp's own definitions (common/arg.cpp)
and llama-bench's against its parser (tools/llama-bench/llama-bench.cpp), read from the llama.cpp
source vendored by the pinned llama-cpp-python (tests/llama_tools.py finds it), else from the
extract checked in below; the llama-server / llama-bench binaries built from that source parse
the flags themselves. The
llama-cpp-python kwargs load the demo model.
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import fields
from pathlib import Path

import pytest

from gpulab.core.config import SplitConfig
from gpulab.core.devices import Device
from gpulab.core.errors import ConfigError
from gpulab.core.exports.render import SPELLINGS, TARGETS, cuda_visible_devices, render, render_all
from llama_args import kv_cache_types_from_source, server_options_from_source
from llama_tools import NOT_BUILT, tools_bin, vendored_src

GiB = 1024**3
SRC = vendored_src()
BIN = tools_bin()


def cuda(i: int, free: int = 20 * GiB, **kw) -> Device:
    return Device(f"CUDA{i}", 24 * GiB, free, "nvml", "gpu", uuid=f"GPU-{i:08x}-aaaa", **kw)


CONFIGS = [
    SplitConfig(),
    SplitConfig(tensor_split=(3, 1), n_ctx=8192, type_k="q8_0", type_v="q8_0", flash_attn="on"),
    SplitConfig(n_gpu_layers=12, split_mode="row", main_gpu=1, tensor_split=(0.4375, 1), n_batch=256,
                n_ubatch=128, type_k="q4_0", type_v="q4_0", flash_attn="auto", offload_kqv=False,
                n_seq_max=4, swa_full=True, devices=("CUDA1", "CUDA0"), op_offload=False),
    SplitConfig(split_mode="none", main_gpu=1, flash_attn="off", n_ctx=300),
    SplitConfig(n_gpu_layers=0, devices=("none",)),
    SplitConfig(split_mode="tensor", tensor_split=(3, 1), flash_attn="on"),
]


# -- llama.cpp's own flag definitions: tests/llama_args.py reads them from common/arg.cpp ----------
# The extract of the vendored llama.cpp (llama-cpp-python 0.3.36) for the flags gpulab writes, used
# where the source is not unpacked; test_extract_matches_the_source keeps it honest.
SERVER_EXTRACT = {
    "-ngl": "N", "-sm": "{none,layer,row,tensor}", "-mg": "INDEX", "-ts": "N0,N1,N2,...",
    "--device": "<dev1,dev2,..>", "-c": "N", "-b": "N", "-ub": "N", "-ctk": "TYPE", "-ctv": "TYPE",
    "-fa": "[on|off|auto]", "-nkvo": None, "-np": "N", "--swa-full": None, "-fit": "[on|off]", "-m": "FNAME",
    "--no-op-offload": None,
}
KV_TYPES_EXTRACT = ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1"]


@pytest.fixture(scope="module")
def server_options():
    if SRC is None:
        return {k: {"hint": v, "handler": '"auto" "all"' if k == "-ngl" else ""} for k, v in SERVER_EXTRACT.items()}
    return server_options_from_source(SRC)


@pytest.fixture(scope="module")
def kv_types():
    return kv_cache_types_from_source(SRC) if SRC is not None else KV_TYPES_EXTRACT


@pytest.mark.skipif(SRC is None, reason="the vendored llama.cpp source is not unpacked here")
@pytest.mark.parametrize("example", ["LLAMA_EXAMPLE_SERVER", "LLAMA_EXAMPLE_CLI"])
def test_extract_matches_the_source(example):
    opts = server_options_from_source(SRC, example)
    for flag, hint in SERVER_EXTRACT.items():
        assert flag in opts, f"{flag} is no longer a {example} option"
        assert opts[flag]["hint"] == hint, flag
    assert kv_cache_types_from_source(SRC) == KV_TYPES_EXTRACT


def _check_value(flag: str, hint: str, value: str, handler: str, kv_types: list[str]) -> None:
    if hint in ("N", "INDEX"):
        ok = re.fullmatch(r"-?\d+", value) or (flag == "-ngl" and value in ("auto", "all") and f'"{value}"' in handler)
    elif hint == "N0,N1,N2,...":
        ok = re.fullmatch(r"\d+(\.\d+)?(e-?\d+)?([,/]\d+(\.\d+)?(e-?\d+)?)*", value)
    elif hint == "TYPE":
        ok = value in kv_types
    elif hint.startswith(("{", "[")):
        ok = value in re.split(r"[,|]", hint.strip("{}[]"))
    elif hint == "<dev1,dev2,..>":
        ok = re.fullmatch(r"[A-Za-z0-9_.:-]+(,[A-Za-z0-9_.:-]+)*", value)
    elif hint == "FNAME":
        ok = bool(value)
    else:
        pytest.fail(f"no check for the value hint {hint!r} of {flag}")
    assert ok, f"{flag} {value!r} does not fit llama.cpp's {hint}"


def check_against_arg_cpp(argv: list[str], options: dict, kv_types: list[str]) -> None:
    i = 1
    while i < len(argv):
        flag = argv[i]
        assert flag in options, f"llama.cpp has no option {flag}"
        hint = options[flag]["hint"]
        if hint is None:
            i += 1
            continue
        assert i + 1 < len(argv), f"{flag} needs a value"
        _check_value(flag, hint, argv[i + 1], options[flag]["handler"], kv_types)
        i += 2


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("target", ["llama-server", "llama-cli"])
def test_server_flags_are_llama_cpps(config, target, server_options, kv_types):
    devs = [cuda(0), cuda(1)]
    exp = render(config, target, model_path="/models/m.gguf", n_layer=30, devices=devs)
    check_against_arg_cpp(exp.data, server_options, kv_types)
    assert exp.gaps == ()   # llama-server can say everything a SplitConfig says
    if target == "llama-cli" and SRC is not None:
        check_against_arg_cpp(exp.data, server_options_from_source(SRC, "LLAMA_EXAMPLE_CLI"), kv_types)


def test_server_spellings():
    argv = render(CONFIGS[2], "llama-server", model_path="m.gguf").data
    text = " ".join(argv)
    assert "-ngl 12 -sm row -mg 1 -ts 0.4375,1 --device CUDA1,CUDA0" in text
    assert "-ctk q4_0 -ctv q4_0 -fa auto -nkvo -np 4 --swa-full --no-op-offload -fit off" in text
    assert render(SplitConfig(), "llama-server").data[3:5] == ["-ngl", "all"]   # -1 is 'auto' there


# -- llama-bench ---------------------------------------------------------------------------------
def bench_options_from_source(src: Path) -> dict[str, str]:
    """{flag: body of its branch in parse_cmd_params} (llama-bench.cpp)."""
    text = (src / "tools" / "llama-bench" / "llama-bench.cpp").read_text()
    body = text[text.index("static cmd_params parse_cmd_params"):]
    out = {}
    branches = re.split(r"\} else if \((?=arg ==|llama_supports_rpc)", body)
    for br in branches:
        names = re.findall(r'arg == "([^"]+)"', br.split(")", 1)[0] + ")")
        for n in names:
            out[n] = br
    return out


BENCH_EXTRACT = {   # flag -> value form, from llama-bench.cpp parse_cmd_params
    "-m": "str", "-ngl": "int_range_neg", "-sm": "choice:none,layer,row,tensor", "-mg": "int_range",
    "-ts": "ts", "-dev": "dev", "-b": "int_range", "-ub": "int_range", "-ctk": "type", "-ctv": "type",
    "-fa": "fa", "-nkvo": "bool", "-nopo": "bool",
}


def _bench_form(flag: str, branch: str) -> str:
    if "parse_int_range(argv[i], /*allow_negative=*/true)" in branch:
        return "int_range_neg"
    if "parse_int_range" in branch:
        return "int_range"
    if "string_split<bool>" in branch:
        return "bool"
    if "is_truthy" in branch:
        return "fa"
    if "ggml_type_from_name" in branch:
        return "type"
    if "parse_devices_arg" in branch:
        return "dev"
    if "[;/]+" in branch:
        return "ts"
    choices = re.findall(r'm == "([^"]+)"', branch)
    if choices:
        return "choice:" + ",".join(choices)
    return "str"


@pytest.mark.skipif(SRC is None, reason="the vendored llama.cpp source is not unpacked here")
def test_bench_extract_matches_the_source():
    opts = bench_options_from_source(SRC)
    for flag, form in BENCH_EXTRACT.items():
        assert flag in opts, flag
        assert _bench_form(flag, opts[flag]) == form, flag


_INT_RANGE = r"\d+(-\d+([+*]\d+)?)?"


def _bench_value_ok(form: str, value: str, kv_types: list[str]) -> bool:
    if form == "int_range_neg":   # parse_int_range: first[-last[(+|*)step]], comma lists
        return bool(re.fullmatch(rf"-?{_INT_RANGE}(,-?{_INT_RANGE})*", value))
    if form == "int_range":
        return bool(re.fullmatch(rf"{_INT_RANGE}(,{_INT_RANGE})*", value))
    if form == "bool":
        return all(v in ("0", "1") for v in value.split(","))
    if form == "fa":   # common_arg_utils::is_truthy / is_falsey / is_autoy
        return all(v in ("on", "enabled", "true", "1", "off", "disabled", "false", "0", "auto", "-1")
                   for v in value.split(","))
    if form == "type":
        return all(v in kv_types for v in value.split(","))
    if form == "dev":
        return all(re.fullmatch(r"[A-Za-z0-9_.:-]+(/[A-Za-z0-9_.:-]+)*", v) for v in value.split(","))
    if form == "ts":
        return all(re.fullmatch(r"[\d.e-]+([;/][\d.e-]+)*", v) for v in value.split(","))
    if form.startswith("choice:"):
        return all(v in form[7:].split(",") for v in value.split(","))
    return bool(value)


@pytest.mark.parametrize("config", CONFIGS)
def test_bench_args_are_llama_benchs(config, kv_types):
    forms = ({f: _bench_form(f, b) for f, b in bench_options_from_source(SRC).items()}
             if SRC is not None else BENCH_EXTRACT)
    argv = render(config, "llama-bench", model_path="m.gguf").data
    assert argv[0] == "llama-bench"
    for flag, value in zip(argv[1::2], argv[2::2]):
        assert flag in forms, f"llama-bench has no option {flag}"
        assert _bench_value_ok(forms[flag], value, kv_types), f"{flag} {value!r} is not llama-bench's {forms[flag]}"


def test_bench_spellings_and_gaps():
    exp = render(CONFIGS[2], "llama-bench", model_path="m.gguf")
    text = exp.text
    assert "-ts 0.4375/1 -dev CUDA1/CUDA0" in text and "-nkvo 1" in text and "-fa auto" in text
    assert "-c" not in exp.data   # llama-bench has no -c: the gap says so
    assert any("-c 4096" in g for g in exp.gaps) and any("-np 4" in g for g in exp.gaps)
    assert any("--swa-full" in g for g in exp.gaps)
    with pytest.raises(ConfigError, match="llama-bench cannot express"):
        render(CONFIGS[2], "llama-bench", strict=True)


@pytest.mark.skipif(BIN is None, reason=NOT_BUILT)
@pytest.mark.parametrize("config", [c for c in CONFIGS if not c.devices or c.devices == ("none",)])
def test_real_binaries_parse_the_flags(config, tmp_path):
    """The binaries parse every flag with their own handlers; --version, last, exits 0 once
    everything before it was accepted."""
    for target, binary in (("llama-server", "llama-server"), ("llama-bench", "llama-bench")):
        argv = render(config, target, model_path=str(tmp_path / "m.gguf")).data
        r = subprocess.run([str(BIN / binary), *argv[1:], "--version"], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0, f"{binary} rejected {argv}: {r.stderr[-500:]}"
        assert "error" not in r.stderr.lower(), r.stderr[-500:]
        # and the check has teeth: a value the binary does not take fails before --version
        bad = subprocess.run([str(BIN / binary), "-m", "m.gguf", "-fa", "maybe", "--version"], capture_output=True,
                             text=True, timeout=60)
        assert bad.returncode != 0


# -- llama-cpp-python ----------------------------------------------------------------------------
def test_python_kwargs_fill_llamas_structs_as_the_runtime_does(tmp_path):
    """For every config, llama_cpp.Llama(**the exported kwargs) sets each struct field that the
    export does not list as a gap exactly as gpulab's own in-process load does (llama_params).
    Llama.__init__ fills its params before it checks the path, so nothing is loaded."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from gpulab.core.settings import SETTINGS
    from gpulab.runtime.params import llama_params
    for c in CONFIGS:
        exp = render(c, "python")
        llm = llama_cpp.Llama.__new__(llama_cpp.Llama)
        with pytest.raises(ValueError, match="does not exist"):
            llm.__init__(model_path=str(tmp_path / "absent.gguf"), verbose=False, **exp.data)
        mp, cp = llama_params(c.replace(devices=()))       # --device is a gap for Llama(): not compared
        gapped = " ".join(exp.gaps)
        for f in SETTINGS:
            if f.c_field is None or f.flags[0] in gapped or f.flags[-1] in gapped:
                continue
            ours = getattr(mp if f.struct == "model" else cp, f.c_field)
            theirs = getattr(llm.model_params if f.struct == "model" else llm.context_params, f.c_field)
            if f.attr == "n_gpu_layers" and ours < 0:   # Llama() writes "all" as INT32_MAX, llama.cpp's -1 too
                ours = 0x7FFFFFFF
            if f.attr in ("n_batch", "n_ubatch"):   # Llama() caps them at n_ctx itself, as llama.cpp's
                ours = min(ours, cp.n_ctx)             # llama_context ctor does anyway (effective_n_ubatch)
            assert ours == theirs, (c, f.attr)


def test_python_kwargs_load_the_demo_model():
    llama_cpp = pytest.importorskip("llama_cpp")
    from gpulab.sources.demo import demo_model_path
    try:
        path = demo_model_path()
    except Exception as e:  # noqa: BLE001
        pytest.skip(str(e))
    c = SplitConfig(n_gpu_layers=0, n_ctx=512, n_batch=256, n_ubatch=128, type_k="q8_0", type_v="q8_0",
                    flash_attn="on")
    exp = render(c, "python", model_path=str(path), strict=True)
    llm = llama_cpp.Llama(model_path=str(path), verbose=False, **exp.data)
    try:
        assert llm.n_ctx() == 512 and llm.context_params.type_k == 8 and llm.context_params.n_ubatch == 128
        assert llm.tokenize(b"hello")
    finally:
        llm.close()
    assert exp.text.startswith(f"llama_cpp.Llama(model_path={str(path)!r}, n_gpu_layers=0,")


# -- Ollama --------------------------------------------------------------------------------------
def test_ollama_visible_devices_and_modelfile():
    devs = [cuda(0), cuda(1), cuda(2)]
    c = SplitConfig(tensor_split=(1, 0, 1), n_ctx=8192, n_seq_max=2, n_batch=1024, n_ubatch=512,
                    type_k="q8_0", type_v="q8_0", flash_attn="on")
    exp = render(c, "ollama", model_path="/m.gguf", n_layer=30, devices=devs)
    env, params = exp.data["env"], exp.data["parameters"]
    assert env["CUDA_VISIBLE_DEVICES"] == "GPU-00000000-aaaa,GPU-00000002-aaaa"   # CUDA1 has no share
    assert env["OLLAMA_KV_CACHE_TYPE"] == "q8_0" and env["OLLAMA_FLASH_ATTENTION"] == "1"
    assert env["OLLAMA_NUM_PARALLEL"] == "2"
    assert params == {"num_gpu": 31, "main_gpu": 0, "num_ctx": 4096, "num_batch": 512}
    assert "PARAMETER num_ctx 4096" in exp.text and "FROM /m.gguf" in exp.text
    assert len(exp.gaps) == 1 and "tensor_split" in exp.gaps[0]   # 1:1 over two GPUs is not Ollama's


def test_ollama_split_none_and_what_it_cannot_say():
    devs = [cuda(0), cuda(1)]
    exp = render(SplitConfig(split_mode="none", main_gpu=1), "ollama", devices=devs)
    assert exp.data["env"]["CUDA_VISIBLE_DEVICES"] == "GPU-00000001-aaaa"
    assert exp.data["parameters"]["main_gpu"] == 0 and exp.data["parameters"]["num_gpu"] == 999
    rpc = [Device("RPC0", GiB, GiB, "rpc", "rpc", endpoint="h:1"), cuda(0)]
    gaps = render(SplitConfig(type_k="q8_0", type_v="f16", offload_kqv=False, split_mode="row"), "ollama",
                  devices=rpc).gaps
    assert any("RPC0: not CUDA devices" in g for g in gaps)
    assert any("one type" in g for g in gaps) and any("-nkvo" in g for g in gaps)
    assert any("row" in g for g in gaps)


def test_cuda_visible_devices_prefers_uuids():
    assert cuda_visible_devices([cuda(1), Device("CUDA3", 1, 1, "llama", "gpu")]) == ("GPU-00000001-aaaa,3", [])
    assert cuda_visible_devices([Device("SIM0", 1, 1, "sim", "gpu")]) == ("", ["SIM0"])


# -- KoboldCpp -----------------------------------------------------------------------------------
def test_kcpps_keys_are_koboldcpp_argparse_destinations():
    # koboldcpp.py (1.102) argparse destinations: a .kcpps is json.dumps(vars(args)) and
    # load_config_cli setattr()s every key back
    known = {"model_param", "usecuda", "gpulayers", "tensor_split", "maingpu", "contextsize", "batchsize",
             "flashattention", "quantkv", "lowvram", "useswa"}
    for c in CONFIGS:
        doc = json.loads(render(c, "koboldcpp", model_path="/m.gguf", n_layer=30, devices=[cuda(0), cuda(1)]).text)
        assert set(doc) <= known, set(doc) - known
        assert isinstance(doc["gpulayers"], int) and doc["gpulayers"] != -1   # -1 is "autodetect" there
        assert doc["usecuda"][0] == "normal"
        assert set(doc["usecuda"][1:]) <= {"0", "1", "2", "3", "rowsplit"}
        assert doc.get("batchsize", 512) in (-1, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
        assert doc.get("quantkv", 0) in (0, 1, 2)
        assert 256 <= doc.get("contextsize", 8192) <= 262144


def test_kcpps_split_and_single_gpu():
    devs = [cuda(0, free=10 * GiB), cuda(1, free=20 * GiB), cuda(2)]
    doc = render(SplitConfig(devices=("CUDA2", "CUDA1")), "koboldcpp", n_layer=30, devices=devs).data
    # llama.cpp's default split is by free memory: written down, zero for the unused CUDA0
    assert doc["tensor_split"] == [0.0, 1.0, 1.0] and doc["gpulayers"] == 31
    doc = render(SplitConfig(split_mode="none", main_gpu=1), "koboldcpp", devices=devs).data
    assert doc["usecuda"] == ["normal", "1"] and doc["maingpu"] == 0 and doc["tensor_split"] is None
    doc = render(SplitConfig(tensor_split=(3, 1), split_mode="row", type_k="q4_0", type_v="q4_0",
                             flash_attn="on", offload_kqv=False), "koboldcpp", devices=devs[:2]).data
    assert doc["tensor_split"] == [3.0, 1.0] and "rowsplit" in doc["usecuda"]
    assert doc["quantkv"] == 2 and doc["flashattention"] is True and doc["lowvram"] is True


def test_kcpps_orders_gpus_by_pci_bus_as_koboldcpp_does():
    # CUDA's FASTEST_FIRST order put the GPU on bus 2 first; KoboldCpp forces PCI_BUS_ID order
    devs = [cuda(0, pci_bus_id="00000000:02:00.0"), cuda(1, pci_bus_id="00000000:01:00.0")]
    doc = render(SplitConfig(tensor_split=(3, 1)), "koboldcpp", devices=devs).data
    assert doc["tensor_split"] == [1.0, 3.0]


def test_kcpps_gaps():
    rpc = [Device("RPC0", GiB, GiB, "rpc", "rpc", endpoint="h:1"), cuda(0)]
    gaps = render(SplitConfig(n_seq_max=2, n_ubatch=256, n_batch=300), "koboldcpp", devices=rpc).gaps
    assert any("RPC0" in g for g in gaps) and any("-np 2" in g for g in gaps)
    assert any("-ub 256" in g for g in gaps) and any("-b 300" in g for g in gaps)
    assert any("-fa auto" in g for g in gaps)


# -- the table -----------------------------------------------------------------------------------
def test_every_setting_is_spelled_for_every_target():
    assert {f.name for f in fields(SplitConfig)} == {s.attr for s in SPELLINGS}
    for c in CONFIGS:
        out = render_all(c, model_path="m.gguf", n_layer=30, devices=[cuda(0), cuda(1)])
        assert set(out) == set(TARGETS)
        for exp in out.values():
            assert exp.text and str(exp) == exp.text


def test_unknown_target():
    with pytest.raises(ConfigError, match="unknown export target"):
        render(SplitConfig(), "vllm")


def test_tensor_split_is_written_for_llama_cpp_and_a_gap_elsewhere():
    c = SplitConfig(split_mode="tensor", tensor_split=(3, 1), flash_attn="on")
    devs = [cuda(0), cuda(1)]
    server = " ".join(render(c, "llama-server", model_path="m.gguf", devices=devs).data)
    # -fit off: llama-server's fit only warns "llama_params_fit is not implemented for SPLIT_MODE_TENSOR"
    assert "-sm tensor" in server and "-ts 3,1" in server and "-fa on" in server and server.endswith("-fit off")
    bench = " ".join(render(c, "llama-bench", model_path="m.gguf", devices=devs).data)
    assert "-sm tensor" in bench and "-ts 3/1" in bench
    assert render(c, "python").data["split_mode"] == 3          # LLAMA_SPLIT_MODE_TENSOR
    for target, who in (("ollama", "Ollama"), ("koboldcpp", "KoboldCpp")):
        gaps = render(c, target, model_path="/m.gguf", n_layer=30, devices=devs).gaps
        assert any(g.startswith("-sm tensor") and who in g for g in gaps), gaps
