"""Figure builders: pure functions of a Plan whose data says what the planner says."""

from __future__ import annotations

import plotly.graph_objects as go
import pytest

from gpulab import SplitConfig, parse_sim_spec, plan
from gpulab.core.report import BufferReport, LoadReport
from gpulab.core.run import Run, Throughput
from gpulab.ui import figures as F

CONFIGS = [
    SplitConfig(tensor_split=(1, 3)),
    SplitConfig(tensor_split=(1, 1), n_gpu_layers=5, n_ctx=8192),
    SplitConfig(tensor_split=(2, 1), flash_attn="off"),
    SplitConfig(tensor_split=(1, 1), offload_kqv=False),
    SplitConfig(tensor_split=(1, 1), type_k="q8_0", type_v="q4_0", n_gpu_layers=1),
    SplitConfig(split_mode="none", main_gpu=1),
]


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("config", CONFIGS, ids=range(len(CONFIGS)))
def test_layer_bytes_add_up_to_the_plan(profile_factory, config, tied):
    prof = profile_factory(n_layer=12, swa_layers=(1, 3, 5), n_swa=512, tied=tied)
    p = plan(prof, parse_sim_spec("2x24GiB"), config)
    weights, kv = F.layer_bytes(p)
    for d in p.devices:
        on = [i for i, x in enumerate(p.layer_devices) if x == d.name]
        w = int(sum(weights[i] for i in on)) + (prof.input_weights_bytes if d.is_host else 0)
        assert w == d.weights_bytes, d.name
        if config.offload_kqv:
            assert int(sum(kv[i] for i in on)) == d.kv_bytes, d.name
    assert int(kv.sum()) == sum(d.kv_bytes for d in p.devices)


def test_layer_map_one_bar_per_layer_coloured_by_device(profile_factory):
    prof = profile_factory(n_layer=10)
    p = plan(prof, parse_sim_spec("3x24GiB"), SplitConfig(tensor_split=(1, 2, 1), n_gpu_layers=8))
    fig = F.layer_map(p)
    assert [t.name for t in fig.data] == ["SIM0", "SIM1", "SIM2", "CPU"]
    xs = sorted(x for t in fig.data for x in t.x)
    assert xs == list(range(11))                       # 10 blocks + the output layer
    for t in fig.data:
        assert [p.layer_devices[x] for x in t.x] == [t.name] * len(t.x)
        assert len(t.hovertext) == len(t.x)
    colors = {t.name: t.marker.color for t in fig.data}
    assert len(set(colors.values())) == 4 and colors["CPU"] == F.HOST_COLOR
    out = next(t for t in fig.data if 10 in t.x)
    assert "output layer" in out.hovertext[list(out.x).index(10)]
    assert "KV" in out.hovertext[0] and "weights" in out.hovertext[0]


def test_layer_map_marks_expert_bytes_where_they_sit():
    from builders import make_moe_profile
    prof = make_moe_profile(n_layer=8, n_expert=16)
    MiB = 1024**2
    p = plan(prof, parse_sim_spec("2x24GiB"), SplitConfig(tensor_split=(1, 1), n_cpu_moe=2,
                                                           tensor_overrides=(r"blk\.7\.ffn_down_exps=SIM0",)))
    fig = F.layer_map(p)
    by = {t.name: t for t in fig.data}
    assert list(by) == ["SIM0", "SIM1", "CPU", "SIM0 experts", "SIM1 experts", "CPU experts"]
    assert by["CPU experts"].marker.pattern.shape == "/" and by["SIM0"].marker.pattern.shape in (None, "")
    assert by["CPU experts"].marker.color == by["CPU"].marker.color
    exp = prof.layers[0].expert_bytes
    down = next(t.n_bytes for t in prof.layers[7].tensors if t.name.endswith("ffn_down_exps.weight"))
    # -ncmoe 2: layers 0 and 1's experts on the CPU, drawn on their own layers' bars
    assert list(by["CPU experts"].x) == [0, 1] and list(by["CPU experts"].y) == pytest.approx([exp / MiB] * 2)
    on_sim0 = [i for i in range(2, 7) if p.layer_devices[i] == "SIM0"]
    assert on_sim0 and p.layer_devices[7] == "SIM1"
    assert list(by["SIM0 experts"].x) == on_sim0 + [7]
    assert list(by["SIM0 experts"].y)[-1] == pytest.approx(down / MiB)
    assert list(by["SIM1 experts"].y)[-1] == pytest.approx((exp - down) / MiB)
    # segments stack: each bar is as tall as before (weights + KV of the layer), dense at the bottom
    weights, kv = F.layer_bytes(p)
    tops: dict[int, float] = {}
    for t in fig.data:
        for x, y, b in zip(t.x, t.y, t.base if t.base is not None else [0] * len(t.x)):
            tops[x] = max(tops.get(x, 0.0), y + b)
    assert [tops[i] for i in range(9)] == pytest.approx(list((weights + kv) / MiB))
    # apply() moves the segments too
    q = plan(prof, parse_sim_spec("2x24GiB"), SplitConfig(tensor_split=(1, 1), n_cpu_moe=5))
    w = go.FigureWidget(fig)
    F.apply(w, q, "layers")
    fresh = F.layer_map(q)
    for got, want in zip(w.data, fresh.data):
        assert list(got.x) == list(want.x) and list(got.y) == pytest.approx(list(want.y))
        assert (got.base is None) == (want.base is None)
        if want.base is not None:
            assert list(got.base) == pytest.approx(list(want.base))


def test_memory_bars_stack_the_plan_and_flag_an_overfull_device(profile_factory):
    prof = profile_factory(n_layer=20)              # ~1.6 GiB of layers
    p = plan(prof, parse_sim_spec("2GiB,1GiB"), SplitConfig(tensor_split=(1, 3)))
    assert not p.device("SIM1").fits and p.device("SIM0").fits
    fig = F.memory_bars(p)
    by = {t.name: t for t in fig.data}
    unit = F.memory_unit(max(max(d.total_bytes, d.used_bytes) for d in p.devices))[1]
    for term, attr in (("weights", "weights_bytes"), ("KV", "kv_bytes"), ("compute", "compute_bytes")):
        assert list(by[term].y) == pytest.approx([getattr(d, attr) / unit for d in p.devices])
    assert list(by["free"].y)[:2] == pytest.approx([2 * 1024**3 / unit, 1024**3 / unit])
    # the over-full device: red outline, red label, the deficit in words
    assert by["weights"].marker.line.color[1] == F.OVERFULL_COLOR
    assert by["weights"].marker.line.color[0] != F.OVERFULL_COLOR
    assert "needs" in by["deficit"].text[1] and by["deficit"].text[0] == ""
    assert "OVER" in fig.layout.xaxis.ticktext[1]
    assert "DOES NOT FIT" in fig.layout.title.text


def test_apply_updates_in_place_like_a_fresh_figure(profile_factory):
    prof = profile_factory(n_layer=16)
    devs = parse_sim_spec("4x8GiB")
    a = plan(prof, devs, SplitConfig(tensor_split=(1, 1, 1, 1)))
    b = plan(prof, devs, SplitConfig(tensor_split=(3, 0, 1, 0), n_gpu_layers=9))
    for kind, build in (("layers", F.layer_map), ("memory", F.memory_bars)):
        fig = go.FigureWidget(build(a))
        with fig.batch_update():
            F.apply(fig, b, kind)
        fresh = build(b)
        for got, want in zip(fig.data, fresh.data):
            assert list(got.x) == list(want.x)
            assert list(got.y) == pytest.approx(list(want.y)) if want.y is not None else got.y is None
        assert fig.layout.title.text == fresh.layout.title.text


def _run(ts, pp, tg):
    rep = LoadReport(layer_devices=(), buffers=(BufferReport("RPC0", "RPC0", "model", 1 << 20),), devices=("RPC0",))
    t = lambda n_p, n_g, v: Throughput(n_p, n_g, (1,), (v,), v, 0.5)  # noqa: E731
    return Run("m.gguf", 1, SplitConfig(tensor_split=ts), rep, pp=t(128, 0, pp), tg=t(0, 32, tg))


def test_throughput_chart_one_group_per_run():
    runs = [_run((1, 1), 100.0, 20.0), _run((1, 3), 90.0, 25.0)]
    fig = F.throughput_chart(runs)
    pp, tg = fig.data
    assert list(pp.y) == [100.0, 90.0] and list(tg.y) == [20.0, 25.0]
    assert pp.x[1].startswith("#2 -ts 1,3")
    assert list(F.throughput_chart([]).layout.annotations)[0].text == "no throughput measured yet"


def test_memory_compare_predicted_vs_reported(profile_factory):
    prof = profile_factory(n_layer=4)
    p = plan(prof, parse_sim_spec("2x8GiB"), SplitConfig(tensor_split=(1, 1)))
    rep = LoadReport(layer_devices=p.layer_devices, devices=("SIM0", "SIM1"),
                     buffers=(BufferReport("SIM0", "SIM0", "model", 2 << 20),
                              BufferReport("SIM0", "SIM0", "kv", 1 << 20)))
    fig = F.memory_compare(p, rep, {"SIM0": 5 << 20})
    assert [t.name for t in fig.data] == ["gpulab predicts", "llama.cpp reports", "NVML measured"]
    assert fig.data[1].y[0] == pytest.approx(3.0)       # MiB: model + KV on SIM0


def test_mimebundle_needs_no_browser(profile_factory):
    p = plan(profile_factory(n_layer=3), parse_sim_spec("24GiB"))
    b = F.mimebundle(F.memory_bars(p))
    assert set(b) == {"application/vnd.plotly.v1+json", "text/plain"}
    assert b["application/vnd.plotly.v1+json"]["data"][0]["type"] == "bar"


def test_layer_map_stacks_every_devices_slice_of_each_layer_under_tensor_split():
    from builders import make_llama_profile
    from gpulab import SplitConfig, parse_sim_spec, plan
    from gpulab.ui.figures import layer_map
    from gpulab.ui.text import plan_rows
    p = plan(make_llama_profile(n_layer=4), parse_sim_spec("2x24GiB"),
             SplitConfig(split_mode="tensor", tensor_split=(3, 1), n_gpu_layers=3))
    fig = layer_map(p)
    assert fig.layout.barmode == "stack"
    by = {t.name: t for t in fig.data}
    for d in p.offload_devices:   # layers 2, 3 and the output layer, each on both devices
        assert list(by[d.name].x) == [2, 3, 4]
        assert sum(by[d.name].y) * 2**20 == pytest.approx(d.weights_bytes + d.kv_bytes)
    assert list(by["CPU"].x) == [0, 1]
    rows = {r["device"]: r["layers"] for r in plan_rows(p)}
    assert rows["SIM0"] == rows["SIM1"] == "2-3,out (a slice of each)" and rows["CPU"] == "0-1"


# -- one scale rule, one palette --------------------------------------------------------------

def test_a_small_model_gets_an_axis_that_fits_it_and_its_free_memory_written(profile_factory):
    MiB = 1024**2
    prof = profile_factory(n_layer=4, layer_bytes=10 * MiB)
    p = plan(prof, parse_sim_spec("2x24GiB"), SplitConfig(tensor_split=(1, 1), n_ctx=512))
    assert all(d.used_bytes < 0.25 * d.free_bytes for d in p.offload_devices)
    unit, y_range = F.memory_scale(p)
    assert unit == ("MiB", MiB)
    top = max(d.used_bytes for d in p.devices) / MiB
    assert y_range == pytest.approx([0.0, 1.3 * top])
    fig = F.memory_bars(p)
    assert fig.layout.yaxis.title.text == "MiB" and list(fig.layout.yaxis.range) == pytest.approx(y_range)
    written = {x: t for x, t in zip(fig.data[-1].x, fig.data[-1].text)}
    assert written == {"SIM0": "free 24.00 GiB ↑", "SIM1": "free 24.00 GiB ↑", "CPU": ""}
    # hover in the axis's unit
    assert next(t for t in fig.data if t.name == "weights").hovertext[0].endswith(" MiB")


def test_a_model_that_fills_its_devices_is_drawn_to_scale(profile_factory):
    prof = profile_factory(n_layer=20)              # ~1.6 GiB of layers on 2 GiB + 1 GiB
    p = plan(prof, parse_sim_spec("2GiB,2GiB"), SplitConfig(tensor_split=(1, 1)))
    assert F.memory_scale(p) == (("GiB", 1024**3), None)
    fig = F.memory_bars(p)
    assert fig.layout.yaxis.range is None and set(fig.data[-1].text) == {""}


def test_apply_follows_the_scale_rule(profile_factory):
    prof = profile_factory(n_layer=4)
    devs = parse_sim_spec("2x24GiB")
    small = plan(prof, devs, SplitConfig(tensor_split=(1, 1), n_ctx=512))
    fig = go.FigureWidget(F.memory_bars(small))
    F.apply(fig, plan(prof, devs, SplitConfig(tensor_split=(1, 3), n_ctx=512)), "memory")
    assert fig.layout.yaxis.range is not None and "free 24.00 GiB" in fig.data[-1].text[0]
    F.apply(fig, small, "memory", y_range=None)      # the caller's choice: autorange
    assert fig.layout.yaxis.autorange is True and set(fig.data[-1].text) == {""}


def test_memory_terms_are_shades_of_the_device_colour(profile_factory):
    from gpulab.ui.palette import DEVICE_COLORS, tint
    p = plan(profile_factory(n_layer=6), parse_sim_spec("2x24GiB"), SplitConfig(tensor_split=(1, 1)))
    by = {t.name: t for t in F.memory_bars(p).data}
    blue, orange = DEVICE_COLORS[0], DEVICE_COLORS[1]
    assert list(by["weights"].marker.color) == [blue, orange, F.HOST_COLOR]      # SIM0, SIM1, CPU
    assert list(by["KV"].marker.color) == [tint(blue, 0.6), tint(orange, 0.6), tint(F.HOST_COLOR, 0.6)]
    assert tint("#0072B2", 0.6) == "#66aad1" and tint("#0072B2", 1.0) == "#0072B2"
    assert by["weights"].marker.pattern.shape in (None, "") and by["KV"].marker.pattern.shape == "/"
    assert by["compute"].marker.pattern.shape == "."
    # a device keeps its colour from the layer map to the memory bars
    layer_colors = {t.name: t.marker.color for t in F.layer_map(p).data}
    assert layer_colors["SIM1"] == orange


def test_legends_sit_below_every_figure_clear_of_the_toolbar(profile_factory):
    p = plan(profile_factory(n_layer=4), parse_sim_spec("2x24GiB"), SplitConfig(tensor_split=(1, 1)))
    runs = [_run((1, 1), 100.0, 20.0)]
    for fig in (F.layer_map(p), F.memory_bars(p), F.throughput_chart(runs), F.memory_compare(p),
                F.runs_compare(["a"], [p], runs)):
        leg = fig.layout.legend
        assert (leg.orientation, leg.yref, leg.y, leg.yanchor) == ("h", "container", 0, "bottom"), fig.layout.title.text


def test_predicted_and_measured_differ_by_marker_pp_and_tg_by_line(profile_factory):
    p = plan(profile_factory(n_layer=4), parse_sim_spec("2x8GiB"), SplitConfig(tensor_split=(1, 1)))
    rep = LoadReport(layer_devices=p.layer_devices, devices=("SIM0", "SIM1"),
                     buffers=(BufferReport("SIM0", "SIM0", "model", 2 << 20),))
    pred, got = F.memory_compare(p, rep).data
    assert pred.type == "bar" and got.type == "scatter" and got.marker.symbol == "x-thin-open"
    assert list(got.x) == list(pred.x)                  # each cross over its own device's bar
    assert list(got.marker.color) == list(pred.marker.color)
    pp, tg = F.throughput_chart([_run((1, 1), 100.0, 20.0)]).data
    assert (pp.line.dash, tg.line.dash) == ("solid", "dash") and pp.line.color == tg.line.color


def test_runs_compare_puts_each_cross_over_its_devices_bar(profile_factory):
    prof = profile_factory(n_layer=4)
    devs = parse_sim_spec("2x8GiB")
    plans = [plan(prof, devs, SplitConfig(tensor_split=ts)) for ts in ((1,), (1, 1))]
    runs = [_run((1,), 1.0, 1.0), _run((1, 1), 1.0, 1.0)]
    fig = F.runs_compare(["one", "two"], plans, runs)
    assert fig.layout.barmode == "group" and fig.layout.scattermode == "group"
    for bar, cross in zip(fig.data[::2], fig.data[1::2]):
        assert bar.offsetgroup == cross.offsetgroup and bar.marker.color == cross.marker.color


def test_fleet_terms_of_one_model_are_told_apart(profile_factory):
    from gpulab.core.fleet.model import Fleet, FleetModel
    from gpulab.core.fleet.planner import plan_fleet
    fp = plan_fleet(Fleet((FleetModel("a", "a.gguf"),)), {"a": profile_factory(n_layer=4)}, parse_sim_spec("8GiB"))
    w, kv, c = (t for t in F.fleet_bars(fp).data if t.type == "bar")
    assert len({w.marker.color, kv.marker.color, c.marker.color}) == 3
    assert (kv.marker.pattern.shape, c.marker.pattern.shape) == ("/", ".")


def test_layer_counts_say_blocks_and_the_output_apart():
    from gpulab.ui.text import layers_text
    assert layers_text(30, True) == "30 layers + output"
    assert layers_text(22, False) == "22 layers"
    assert layers_text(1, False) == "1 layer"
    assert layers_text(0, True) == "the output layer"


def test_a_hand_built_figure_is_shown_with_its_legend_below():
    raw = go.Figure(go.Bar(x=[1], y=[2], name="a"))
    shown = F.mimebundle(F.styled(raw))["application/vnd.plotly.v1+json"]["layout"]
    assert shown["legend"]["yref"] == "container" and shown["legend"]["yanchor"] == "bottom"
    assert raw.layout.legend.yref is None                            # the caller's figure is untouched
    placed = go.Figure(layout=dict(legend=dict(orientation="v", x=1.1)))
    assert F.styled(placed).layout.legend.x == 1.1                    # a legend placed on purpose stays
