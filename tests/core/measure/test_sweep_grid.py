"""Sweep grids in llama-bench's list and range syntax."""

from __future__ import annotations

import pytest

from gpulab.core.config import SplitConfig
from gpulab.core.errors import ConfigError
from gpulab.core.exports.render import render
from gpulab.core.measure.sweep_grid import parse_grid, parse_int_range


@pytest.mark.parametrize("text, allow_neg, want", [
    ("10-40+10", False, [10, 20, 30, 40]),
    ("10-45+10", False, [10, 20, 30, 40]),
    ("64-512*2", False, [64, 128, 256, 512]),
    ("1,2,5-7", False, [1, 2, 5, 6, 7]),
    ("7", False, [7]),
    ("-1,0-2", True, [-1, 0, 1, 2]),
    ("3-3", False, [3]),
])
def test_int_ranges_as_llama_bench(text, allow_neg, want):
    assert parse_int_range(text, allow_neg) == want


@pytest.mark.parametrize("text, allow_neg, match", [
    ("-1", False, "invalid range format"),
    ("1-4|2", False, "'|'"),           # parse_int_range's regex admits '|', then throws
    ("1-4*1", False, "does not advance"),
    ("0-4*2", False, "does not advance"),
    ("5-2", False, "empty"),
    ("1,,2", False, "invalid range format"),
    ("a", False, "invalid range format"),
    ("", False, "no values"),
])
def test_bad_ranges_are_refused(text, allow_neg, match):
    with pytest.raises(ConfigError, match=match):
        parse_int_range(text, allow_neg)


def test_grid_product_in_llama_bench_order():
    g = parse_grid(["-fa", "on,off", "-ngl", "10-20+10", "-ts", "1/1,3/1"])
    assert len(g) == 8 and g.varying() == ["n_gpu_layers", "tensor_split", "flash_attn"]
    cs = g.configs(SplitConfig(n_ctx=1024))
    assert [(c.n_gpu_layers, c.tensor_split, c.flash_attn) for c in cs[:3]] == [
        (10, (1.0, 1.0), "on"), (10, (1.0, 1.0), "off"), (10, (3.0, 1.0), "on")]
    assert all(c.n_ctx == 1024 for c in cs)


def test_every_grid_flag():
    g = parse_grid({"-ngl": "-1", "-sm": "layer,none", "-mg": "0,1", "-dev": "RPC0/RPC1,none", "-ts": "2;1",
                    "-c": "512-2048*2", "-b": "256", "-ub": ["64", "128"], "-ctk": "f16,q8_0", "-ctv": "q8_0",
                    "-nkvo": "0,1", "-fa": "1,auto"})
    axes = dict(g.axes)
    assert axes["devices"] == (("RPC0", "RPC1"), ("none",)) and axes["tensor_split"] == ((2.0, 1.0),)
    assert axes["n_ctx"] == (512, 1024, 2048) and axes["n_ubatch"] == (64, 128)
    assert axes["offload_kqv"] == (True, False) and axes["flash_attn"] == ("on", "auto")
    assert len(g) == 2 * 2 * 2 * 3 * 2 * 2 * 2 * 2
    assert len(g.configs()) == len(g)


def test_expert_offload_and_override_sets_as_llama_bench_takes_them():
    # llama-bench: -ncmoe takes ranges; -ot ',' separates variants, ';' rules, '' is "no overrides"
    g = parse_grid(["-ngl", "99", "-ncmoe", "0-4+2", "--override-tensor", r"blk\.[0-3]\.ffn_.*_exps=CPU;attn_q=CPU,"])
    assert g.varying() == ["n_cpu_moe", "tensor_overrides"] and len(g) == 6
    cs = g.configs()
    assert [(c.n_cpu_moe, c.tensor_overrides) for c in cs[:2]] == [
        (0, (r"blk\.[0-3]\.ffn_.*_exps=CPU", "attn_q=CPU")), (0, ())]
    assert cs[-1].n_cpu_moe == 4 and cs[-1].has_tensor_overrides


@pytest.mark.parametrize("argv, match", [
    (["-ot", "attn_q"], "has no '='"),
    (["-ot", "attn_(q=CPU"], "does not compile"),
    (["-ncmoe", "-1"], "invalid range"),
])
def test_bad_override_grids(argv, match):
    with pytest.raises(ConfigError, match=match):
        parse_grid(argv)


def test_repeated_flags_and_long_names_add_values():
    g = parse_grid(["-ngl", "10", "--n-gpu-layers", "20", "-ngl", "10"])
    assert dict(g.axes)["n_gpu_layers"] == (10, 20)


def test_invalid_points_are_reported_not_run():
    g = parse_grid(["-ctv", "q8_0", "-fa", "on,off"])
    pts = list(g.points())
    assert pts[0][0] is not None and pts[1][0] is None and "flash attention" in pts[1][2]
    assert len(g.configs()) == 1


@pytest.mark.parametrize("argv, match", [
    (["-p", "512"], "not a sweep flag"),
    (["-fa", "maybe"], "on, off or auto"),
    (["-nkvo", "yes"], "0 or 1"),
    (["-ngl"], "needs a value"),
    (["-ts", "1/1,"], "empty value"),
])
def test_bad_grids(argv, match):
    with pytest.raises(ConfigError, match=match):
        parse_grid(argv)


@pytest.mark.parametrize("config", [
    SplitConfig(),
    SplitConfig(n_gpu_layers=12, split_mode="none", main_gpu=1, tensor_split=(0.4375, 1), n_batch=256,
                n_ubatch=128, type_k="q4_0", type_v="q4_0", flash_attn="on", offload_kqv=False,
                devices=("RPC1", "RPC0")),
    SplitConfig(tensor_overrides=(r"blk\.[0-2]\.ffn_.*_exps=CPU", "attn_q=RPC1"), n_cpu_moe=3),
])
def test_llama_bench_export_parses_back_to_the_config(config):
    """The llama-bench export and the sweep grammar are each other's inverse (n_ctx aside:
    llama-bench has no -c)."""
    argv = render(config, "llama-bench").data[3:]     # without 'llama-bench -m model.gguf'
    cs = parse_grid(argv).configs(SplitConfig(n_ctx=config.n_ctx))
    assert cs == [config]
