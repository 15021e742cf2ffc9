"""A pasted llama-server / llama-cli / llama-bench command (gpulab.core.command_line): every flag of
the vendored common/arg.cpp is modelled, ignored by design, or named as not modelled."""

from __future__ import annotations

import re
import shlex

import pytest

from gpulab.core import command_line as cl
from gpulab.core.errors import ConfigError
from gpulab.core.settings import SETTINGS
from llama_tools import vendored_src


def _arg_cpp_flags() -> set[str]:
    src = vendored_src()
    if src is None:
        pytest.skip("the vendored llama.cpp source is not at hand (make test builds llama.cpp's tools)")
    text = (src / "common" / "arg.cpp").read_text()
    flags: set[str] = set()
    # common_arg({"-a", "--b"}, [{"--no-b"},] ...): the one or two brace groups of spellings
    for m in re.finditer(r'common_arg\(\s*(?://[^\n]*\n\s*)*((?:\{\s*"[^}]*\}\s*,\s*)+)', text):
        for group in re.findall(r"\{([^}]*)\}", m.group(1)):
            flags.update(re.findall(r'"(-[^"]+)"', group))
    assert len(flags) > 400      # the parse found the table, not a handful
    return flags


def test_every_flag_of_arg_cpp_is_classified_once():
    table = {f for s in SETTINGS for f in s.flags} | set(cl.SETTING_ALIASES)
    classes = {"settings": table, "process": set(cl.PROCESS_FLAGS), "unmodelled": set(cl.UNMODELLED),
               "ignored": set(cl.IGNORED)}
    flags = _arg_cpp_flags()
    missing = sorted(f for f in flags if not any(f in c for c in classes.values()))
    assert missing == [], f"flags of common/arg.cpp gpulab does not classify: {missing}"
    names = list(classes)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not classes[a] & classes[b], f"{a} and {b} both list {sorted(classes[a] & classes[b])}"
    stale = sorted(f for c in classes.values() for f in c if f not in flags)
    assert stale == [], f"classified flags that common/arg.cpp no longer has: {stale}"


def test_the_issue_command_plans_the_whole_process():
    c = cl.parse_command(shlex.split(
        "llama-server -m A.gguf --mmproj P.gguf -md D.gguf -ngl 99 -ts 3,1 -c 32768 -np 4 --port 8080 "
        "--temp 0.7 --jinja --lora x.gguf"))
    assert c.program == "llama-server" and c.model == "A.gguf"
    assert (c.config.n_gpu_layers, c.config.tensor_split, c.config.n_ctx, c.config.n_seq_max) == (99, (3.0, 1.0),
                                                                                                   32768, 4)
    assert c.config.kv_unified is False                 # -np given: no auto slots
    assert c.projector == cl.Projector("P.gguf", offload=True, device="")
    assert c.draft is not None and c.draft.path == "D.gguf"
    # common_base_params_to_speculative: -ngld -1 (every layer), f16 cache, no overrides, the rest inherited
    d = c.draft.config
    assert (d.n_gpu_layers, d.type_k, d.type_v, d.tensor_split, d.n_ctx, d.n_seq_max) == (-1, "f16", "f16",
                                                                                          (3.0, 1.0), 32768, 4)
    assert c.ignored == ("--port 8080", "--temp 0.7", "--jinja")
    assert c.unmodelled == ("--lora x.gguf: LoRA adapters' weights are not planned",)


def test_llama_server_defaults_where_the_command_is_silent():
    c = cl.parse_command(["/opt/llama/llama-server", "-m", "A.gguf"])
    assert (c.config.n_ctx, c.config.n_seq_max, c.config.kv_unified, c.config.fit) == (0, 4, True, "on")
    cli = cl.parse_command(["llama-cli", "-m", "A.gguf"])
    assert (cli.config.n_ctx, cli.config.n_seq_max, cli.config.kv_unified) == (0, 1, False)


def test_draft_flags_and_their_aliases():
    c = cl.parse_command(shlex.split(
        "llama-server -m A.gguf -ot blk=CPU --spec-draft-model D.gguf --device-draft RPC1 -ngld 7 -ctkd q8_0 "
        "--cache-type-v-draft q8_0 -otd 'ffn=CPU' -ncmoed 2 -sm none -fa on"))
    d = c.draft.config
    assert d.devices == ("RPC1",) and d.n_gpu_layers == 7 and (d.type_k, d.type_v) == ("q8_0", "q8_0")
    assert d.tensor_overrides == ("ffn=CPU",) and d.n_cpu_moe == 2      # not the main model's -ot
    assert d.split_mode == "layer"          # one -devd device: no inherited split mode
    assert c.config.tensor_overrides == ("blk=CPU",) and c.config.split_mode == "none"


def test_projector_placement_flags():
    assert cl.parse_command(shlex.split("llama-server -m A --mmproj P --no-mmproj-offload")).projector.offload is False
    assert cl.parse_command(shlex.split("llama-server -m A -mm P -mmdev RPC1")).projector.device == "RPC1"
    assert cl.parse_command(shlex.split("llama-server -m A -mm P -mmdev none")).projector.offload is False


def test_positive_spellings_and_equals():
    c = cl.parse_command(shlex.split("llama-server -m A --ctx-size=8192 -nkvo --kv-offload --no-repack --gpu-layers 5"))
    assert (c.config.n_ctx, c.config.offload_kqv, c.config.use_extra_bufts, c.config.n_gpu_layers) == (8192, True,
                                                                                                      False, 5)


def test_a_flag_llama_server_does_not_have_is_one_line():
    with pytest.raises(ConfigError, match=r"^--frobnicate: not a flag of the vendored llama-server"):
        cl.parse_command(shlex.split("llama-server -m A --frobnicate 3"))
    with pytest.raises(ConfigError, match="no -m MODEL"):
        cl.parse_command(shlex.split("llama-server -c 4096"))
    with pytest.raises(ConfigError, match="starts with llama-server"):
        cl.parse_command(shlex.split("ollama run x"))


def test_llama_bench_command():
    c = cl.parse_command(shlex.split("llama-bench -m A.gguf -p 1024 -n 64 -ngl 99 -ts 3/1 -fa 1 -nkvo 1 -r 3 -o json"))
    assert c.bench_tests == ("pp1024", "tg64")
    assert c.config.n_ctx == 1024 and c.config.fit == "off"     # n_ctx = n_prompt + n_gen + n_depth, per test
    assert (c.config.tensor_split, c.config.flash_attn, c.config.offload_kqv) == ((3.0, 1.0), "on", False)
    assert c.ignored == ("-r 3", "-o json")
    with pytest.raises(ConfigError, match="several tests"):
        cl.parse_command(shlex.split("llama-bench -m A.gguf -ngl 10,20"))


def test_llama_bench_flags_are_its_own():
    src = vendored_src()
    if src is None:
        pytest.skip("the vendored llama.cpp source is not at hand")
    text = (src / "tools" / "llama-bench" / "llama-bench.cpp").read_text()
    flags = set(re.findall(r'arg == "(-[^"]+)"', text))
    ours = (set(cl._BENCH_SETTINGS) | set(cl.BENCH_TESTS) | cl.BENCH_IGNORED | set(cl.BENCH_UNMODELLED)
            | {"-m", "--model", "-rpc", "--rpc"})
    assert sorted(flags - ours) == [] and sorted(ours - flags) == []


def test_a_device_named_before_rpc_registers_it_is_refused_as_llama_server_refuses_it():
    with pytest.raises(ConfigError, match=r"^-devd RPC2 comes before --rpc: .* put --rpc first"):
        cl.parse_command(shlex.split("llama-server -m A -md D -devd RPC2 --rpc 127.0.0.1:50052"))
    c = cl.parse_command(shlex.split("llama-server --rpc 127.0.0.1:50052 -m A -md D -devd RPC0"))
    assert c.rpc == ("127.0.0.1:50052",) and c.draft.config.devices == ("RPC0",)


def test_mtp_is_planned_with_the_drafts_cache_types():
    c = cl.parse_command(shlex.split("llama-server -m A --spec-type draft-mtp"))
    assert c.spec_types == ("draft-mtp",) and c.draft is None
    assert c.unmodelled == () and c.draft_cache == ("f16", "f16")
    assert c.n_outputs() == (4 * (1 + 3), 4)     # -np auto: 4 slots, 3 drafted tokens each
    c = cl.parse_command(shlex.split("llama-server -m A --spec-type draft-mtp -ctk q4_0 -ctkd q8_0 -ctvd q8_0"))
    assert c.draft_cache == ("q8_0", "q8_0") and c.config.type_k == "q4_0"
