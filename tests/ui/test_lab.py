"""SplitLab through its Python state: set a control (or send what the strip sends), check the
plan, the strip and the figures' data against placements worked out by hand.

The test model (tests/builders.make_profile, n_layer=24): 24 blocks of 60 MiB, each with 16 MiB of
KV at -c 4096 (8 KV heads x 128 x K and V x f16 x 4096 cells), and an output layer of 400 MiB
(+16 KiB of norm). llama.cpp's rule: of the 25 layers, layer k of the offloaded ones goes to the
first device whose split point is above k / 25 (upper_bound)."""

from __future__ import annotations

import asyncio

import pytest

from gpulab.core.errors import LoadError
from gpulab.ui.lab import GROUPS, SplitLab
from ui.conftest import FakeWorker

MiB = 1 << 20


@pytest.fixture
def prof(profile_factory):
    return profile_factory(n_layer=24)


def make_lab(prof, spec="4x24GiB", **kw):
    kw.setdefault("debounce", 0)
    kw.setdefault("live_fit", False)
    return SplitLab(prof, sim=spec, **kw)


def layer_x(lab, name):
    t = next(t for t in lab.layer_fig.data if t.name == name)
    return sorted(t.x)


def memory_mib(lab, term):
    t = next(t for t in lab.memory_fig.data if t.name == term)
    return [round(y * lab.unit[1] / MiB, 2) for y in t.y]


def blocks(lab):
    return {d.name: (d.n_layers, d.has_output) for d in lab.plan.offload_devices}


def test_the_strip_shows_each_layer_on_its_device(prof):
    # 4 equal devices, no -ts: split points 1/4, 2/4, 3/4, 1 -> layers 0-6, 7-12, 13-18, 19-24
    lab = make_lab(prof)
    assert lab.strip.cells == ["SIM0"] * 7 + ["SIM1"] * 6 + ["SIM2"] * 6 + ["SIM3"] * 6
    assert [s["name"] for s in lab.strip.segments] == ["SIM0", "SIM1", "SIM2", "SIM3"]
    assert lab.strip.ngl == 25 and lab.strip.draggable
    assert lab.strip.colors["CPU"] == "#8c8c8c"                       # the host is grey
    assert len({lab.strip.colors[n] for n in ("SIM0", "SIM1", "SIM2", "SIM3")}) == 4
    assert "by free memory" in lab.share_labels[0].value and "7 layers" in lab.share_labels[0].value
    assert "5 layers + output" in lab.share_labels[3].value          # the output is said apart
    assert memory_mib(lab, "weights")[:4] == [420.0, 360.0, 360.0, 700.02]
    assert memory_mib(lab, "KV")[:4] == [112.0, 96.0, 96.0, 80.0]
    lab.close()


def test_a_dragged_boundary_writes_the_ts_that_places_exactly_the_dragged_counts(prof):
    lab = make_lab(prof)
    # what strip.js sends after the SIM0|SIM1 boundary moved from 7 to 10 layers and the others
    # were dragged to 5 each: the counts per device, the output layer counted in the last
    lab.strip.request = {"counts": [10, 5, 5, 5], "seq": 1}
    assert lab.ts_text.value == "10,5,5,5" and lab.config.tensor_split == (10.0, 5.0, 5.0, 5.0)
    assert blocks(lab) == {"SIM0": (10, False), "SIM1": (5, False), "SIM2": (5, False), "SIM3": (4, True)}
    assert lab.strip.cells == ["SIM0"] * 10 + ["SIM1"] * 5 + ["SIM2"] * 5 + ["SIM3"] * 5
    assert layer_x(lab, "SIM1") == [10, 11, 12, 13, 14]
    assert memory_mib(lab, "weights")[:4] == [600.0, 300.0, 300.0, 640.02]
    # a device dragged down to nothing: it drops off the strip's placement, -ts keeps its 0
    lab.strip.request = {"counts": [10, 0, 10, 5], "seq": 2}
    assert lab.ts_text.value == "10,0,10,5"
    assert blocks(lab) == {"SIM0": (10, False), "SIM1": (0, False), "SIM2": (10, False), "SIM3": (4, True)}
    # the last device given nothing: -ts ends before it (llama.cpp pads with zeros)
    lab.strip.request = {"counts": [20, 5, 0, 0], "seq": 3}
    assert lab.ts_text.value == "20,5" and blocks(lab)["SIM1"] == (4, True)


def test_the_ngl_handle_keeps_the_first_layers_on_the_cpu(prof):
    lab = make_lab(prof, "2x24GiB")
    lab.strip.request = {"ngl": 1, "seq": 1}          # only the output layer offloaded
    assert lab.config.n_gpu_layers == 1 and lab.ngl_slider.value == 1
    assert lab.strip.cells == ["CPU"] * 24 + ["SIM0"]
    assert layer_x(lab, "CPU") == list(range(24))
    lab.strip.request = {"ngl": 20, "seq": 2}          # 20 of 25: split points 1/2, 1 -> 10 and 10
    assert lab.strip.cells == ["CPU"] * 5 + ["SIM0"] * 10 + ["SIM1"] * 10
    lab.strip.request = {"ngl": 0, "seq": 3}
    assert set(lab.plan.layer_devices) == {"CPU"} and lab.strip.segments == [{"name": "SIM0"}, {"name": "SIM1"}]
    lab.strip.request = {"ngl": 25, "seq": 4}
    assert lab.config.n_gpu_layers == -1 and "CPU" not in lab.plan.layer_devices


def test_ts_typed_as_text_shows_the_proportions_as_they_are(prof):
    lab = make_lab(prof, "2x24GiB")
    lab.ts_text.value = "3,1"                  # points 0.75, 1: layers 0-18 (k/25 < 0.75) on SIM0
    assert lab.config.tensor_split == (3.0, 1.0)
    assert lab.strip.cells == ["SIM0"] * 19 + ["SIM1"] * 6
    assert "75.0%" in lab.share_labels[0].value and "19 layers" in lab.share_labels[0].value
    assert lab.ts_text.value == "3,1"          # not rewritten as layer counts
    lab.ts_text.value = "3,x"
    assert lab.error and "-ts '3,x'" in lab.error and "gpulab-error" in lab.status.value
    assert lab.plan.config.tensor_split == (3.0, 1.0)       # the last valid settings stay
    lab.ts_text.value = "1,2,3"
    assert "3 values for 2 ticked devices" in lab.error
    lab.ts_text.value = ""
    assert lab.error is None and lab.config.tensor_split == ()


def test_ticking_a_device_out_removes_its_segment_and_back_in_gives_it_layers(prof):
    lab = make_lab(prof)
    lab.set_counts([10, 5, 5, 5])
    lab.use_boxes[1].value = False
    assert lab.config.devices == ("SIM0", "SIM2", "SIM3")
    assert [s["name"] for s in lab.strip.segments] == ["SIM0", "SIM2", "SIM3"]
    assert "SIM1" not in lab.strip.cells and lab.ts_text.value == "10,5,5"
    assert [o[0] for o in lab.main_gpu.options] == ["0: SIM0", "1: SIM2", "2: SIM3"]
    assert "not used" in lab.share_labels[1].value
    lab.use_boxes[1].value = True            # back in: its -ts value returns
    assert lab.ts_text.value == "10,5,5,5" and blocks(lab)["SIM1"] == (5, False)
    lab.set_counts([10, 0, 10, 5])           # dragged to nothing, out and in: the others' mean, not 0
    lab.use_boxes[1].value = False
    lab.use_boxes[1].value = True
    assert lab.ts_text.value == "10,8.33333,10,5" and "not used" not in lab.share_labels[1].value
    for b in lab.use_boxes:
        b.value = False
    assert lab.config.devices == ("none",) and set(lab.plan.layer_devices) == {"CPU"}
    assert lab.strip.segments == [] and not lab.strip.draggable
    assert "--device none" in lab.export_html.value


def test_split_mode_none_uses_the_main_gpu(prof):
    lab = make_lab(prof, "3x24GiB")
    lab.split_mode.value = "none"
    lab.main_gpu.value = 2
    assert set(lab.plan.layer_devices) == {"SIM2"} and lab.strip.cells == ["SIM2"] * 25
    assert not lab.strip.draggable
    assert "-sm none" in lab.export_html.value and "-mg 2" in lab.export_html.value


def test_split_mode_tensor_cuts_every_layer_across_the_devices():
    from builders import make_llama_profile
    lab = SplitLab(make_llama_profile(n_layer=6), sim="2x24GiB", debounce=0, live_fit=False)
    lab.split_mode.value = "tensor"
    p = lab.plan
    assert lab.error is None and set(p.layer_devices) == {"Meta()"}
    assert lab.strip.cells == ["Meta()"] * 7 and lab.strip.segments == [] and not lab.strip.draggable
    assert lab.layer_fig.layout.barmode == "stack"
    assert layer_x(lab, "SIM0") == layer_x(lab, "SIM1") == list(range(7))   # every layer on both
    assert "split mode tensor" in lab.status.value and "a slice of each" in lab.share_labels[0].value
    assert "-sm tensor" in lab.export_html.value
    lab.flash_attn.value = "off"      # refused, as llama.cpp refuses it
    assert "requires flash_attn" in lab.error
    lab.flash_attn.value = "auto"
    lab.split_mode.value = "layer"
    assert lab.layer_fig.layout.barmode == "overlay" and lab.plan.tensor_parallel is None


def test_context_and_kv_types_change_the_kv_bars(prof):
    lab = make_lab(prof, "2x24GiB")
    assert sum(memory_mib(lab, "KV")) == 24 * 16
    lab.n_ctx.value = 8192
    assert sum(memory_mib(lab, "KV")) == 24 * 32
    lab.type_k.value = "q8_0"
    lab.type_v.value = "q8_0"
    assert sum(memory_mib(lab, "KV")) == 24 * 17          # q8_0: 34 bytes per 32 values
    assert lab.plan.config.type_k == "q8_0"


def test_the_memory_axis_follows_the_one_scale_rule(prof):
    # 4x24GiB, no -ts, -c 4096: SIM3 (the fullest) holds 5 blocks + output = 700.02 MiB of weights,
    # 80 MiB of KV and 306.55 MiB of compute = 1086.56 MiB, under 25% of its 24 GiB free: the axis
    # fits the model, in GiB (the fullest device is over 1 GiB), to 1.3x that; the free memory is
    # written at the top of each device's bar
    lab = make_lab(prof)
    y = lab.memory_fig.layout.yaxis
    assert lab.y_scale.value == "auto" and y.title.text == "GiB"
    assert y.range == pytest.approx((0.0, 1.3 * 1086.5625 / 1024))
    above = next(t for t in lab.memory_fig.data if t.name == "free (above the axis)")
    assert above.text[:4] == ("free 24.00 GiB ↑",) * 4
    assert "the axis fitted to the model" in lab.memory_fig.layout.title.text
    # -c 512: SIM3 = 700.02 + 10 (KV) + 292.55 (compute) = 1002.56 MiB, below 1 GiB: MiB ticks
    lab.n_ctx.value = 512
    assert y.title.text == "MiB" and y.range == pytest.approx((0.0, 1.3 * 1002.5625))
    assert memory_mib(lab, "weights")[:4] == [420.0, 360.0, 360.0, 700.02]
    # whole device: the axis runs to the devices' 24 GiB (autorange, in GiB), nothing written above
    lab.y_scale.value = "device"
    assert y.title.text == "GiB" and y.autorange is True
    assert memory_mib(lab, "free")[:4] == [24576.0] * 4
    assert set(next(t for t in lab.memory_fig.data if t.name == "free (above the axis)").text) == {""}
    lab.y_scale.value = "auto"
    assert y.title.text == "MiB" and y.range == pytest.approx((0.0, 1.3 * 1002.5625))
    lab.close()


def test_an_overfull_setting_shows_the_deficit(prof):
    lab = make_lab(prof, "4GiB,1GiB")
    lab.set_split([0.1, 1.0])
    assert not lab.plan.fits
    assert "does not fit" in lab.status.value and "SIM1: needs" in lab.status.value
    deficit = next(t for t in lab.memory_fig.data if t.name == "deficit")
    assert deficit.text[1].startswith("needs") and deficit.text[0] == ""
    assert "DOES NOT FIT" in lab.memory_fig.layout.title.text
    lab.set_split([1.0])          # all on SIM0 again: fits, the red goes away
    assert lab.plan.fits and "fits" in lab.status.value
    assert next(t for t in lab.memory_fig.data if t.name == "deficit").text[1] == ""


def test_an_impossible_setting_shows_the_message_and_the_lab_recovers(prof):
    lab = make_lab(prof, "2x24GiB")
    lab.type_v.value = "q4_0"
    before = lab.plan
    lab.flash_attn.value = "off"               # llama.cpp: quantized V needs flash attention
    assert lab.error and "flash attention" in lab.error
    assert "flash attention" in lab.status.value and "gpulab-error" in lab.status.value
    assert lab.plan is before                  # the figures keep the last valid plan
    lab.flash_attn.value = "on"
    assert lab.error is None and lab.plan.config.type_v == "q4_0"


def test_controls_sit_in_five_groups_with_full_labels(prof):
    from builders import make_moe_profile
    lab = make_lab(make_moe_profile(), "2x24GiB")
    assert [a.titles[0] for a in lab.groups.values()] == ["split", "context & cache", "experts & overrides", "fit",
                                                           "process"]
    assert [a.selected_index for a in lab.groups.values()] == [0, 0, None, None, None]
    # every llama.cpp setting of the flag table has its control in the group it belongs to
    def inside(w):
        kids = getattr(w, "children", ())
        return {id(w)} | {i for k in kids for i in inside(k)}
    for group, attrs in GROUPS.items():
        ids = inside(lab.groups[group])
        for a in attrs:
            if a in lab.setting_controls:
                assert id(lab.setting_controls[a]) in ids, (group, a)
    assert id(lab.strip) in inside(lab.groups["split"]) and id(lab.n_ctx) in inside(lab.groups["context & cache"])
    # no label is cut to a fixed width (the browser test measures the rendered ones)
    for w in [lab.ngl_slider, lab.split_mode, lab.main_gpu, lab.n_ctx, lab.flash_attn, *lab.use_boxes,
              *lab.setting_controls.values()]:
        assert w.style.description_width == "initial", w.description
    assert lab.split_mode.style.button_width == "auto"


def test_the_live_fit_strip_shows_what_llama_server_would_load(prof):
    # 2500 MiB + 2000 MiB (1900 free): fit leaves 1024 MiB per device, so the 1840 MiB of blocks
    # and KV plus the 400 MiB output cannot all go: it keeps blocks on the CPU
    lab = make_lab(prof, "2500MiB,2000MiB@1900MiB", live_fit=True)
    r = lab.live_fit_result
    assert r.ok and 0 < r.config.n_gpu_layers < 25
    cells = lab.strip.fit_cells
    assert len(cells) == 25 and cells[0] == "CPU" and cells[-1] != "CPU"
    assert cells.count("CPU") == 25 - r.config.n_gpu_layers
    assert lab.strip.fit_label.startswith("llama-server -fit at -c 4096: -c 4096 -ngl ")
    lab.n_ctx.value = 1024                      # less KV: fit offloads more
    assert lab.strip.fit_cells.count("CPU") < cells.count("CPU")
    lab.setting_controls["fit_target"].value = "100000"     # a margin bigger than any device: all on the CPU
    assert lab.strip.fit_cells == ["CPU"] * 25 and " -ngl 0" in lab.strip.fit_label


def test_simulated_devices_cannot_load(prof):
    lab = make_lab(prof)
    assert lab.measure_button.disabled
    assert lab.measure(wait=True) is None
    assert "cannot load" in lab.result_html.value


def test_throttled_drags_end_on_the_latest_value(prof):
    lab = make_lab(prof, "2x24GiB", debounce=0.05)
    draws = []
    orig = lab._draw
    lab._draw = lambda p: (draws.append(p.config.tensor_split), orig(p))

    async def drag():
        for k in range(1, 21):
            lab.strip.request = {"counts": [k, 25 - k], "seq": k}
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.15)

    asyncio.run(drag())
    assert 1 <= len(draws) < 20                  # not one redraw per value
    assert draws[-1] == (20.0, 5.0)              # but the last one is the final value
    assert lab.strip.cells == ["SIM0"] * 20 + ["SIM1"] * 5


def test_redraw_time_is_recorded(profile_factory):
    lab = SplitLab(profile_factory(n_layer=127), sim="8x80GiB", debounce=0)
    lab.set_counts([16] * 8)
    assert 0 < lab.last_update_s < 1.0 and 0 < lab.last_fit_s < 1.0


# -- load & measure with a fake worker -------------------------------------------------------

def test_load_appends_a_run_and_compares_memory(tiny_gguf, fake_worker):
    from gpulab.core.protocols import Runtime
    assert isinstance(fake_worker, Runtime)
    lab = SplitLab(tiny_gguf, worker=fake_worker, debounce=0)
    assert [d.name for d in lab.devices] == ["RPC0", "RPC1"]
    lab.set_split([1, 1])
    run = lab.measure(wait=True)
    assert run is not None and fake_worker.loads[-1] == lab.config
    assert "placement exactly as planned" in lab.result_html.value
    assert len(lab.runs) == 1 and lab.progress.bar_style == "success"
    df = lab.to_dataframe()
    assert list(df["tensor_split"]) == ["1,1"] and bool(df["placement_as_planned"][0])
    assert "this session&#x27;s runs" in lab.results_html.value or "this session's runs" in lab.results_html.value
    assert "--rpc 127.0.0.1:5000,127.0.0.1:5001" in lab.export_html.value


def test_a_placement_llama_cpp_did_differently_is_flagged(tiny_gguf, fake_worker):
    lab = SplitLab(tiny_gguf, worker=fake_worker, debounce=0)
    lab.set_split([3, 1])                       # the plan puts 6 layers on RPC0 ...
    assert lab.plan.layer_devices.count("RPC0") == 6
    assert lab.measure(wait=True) is not None   # ... the (fake) llama.cpp reports its 4/4 split
    assert "placement DIFFERS from the plan" in lab.result_html.value
    assert not bool(lab.to_dataframe()["placement_as_planned"][0])


def test_a_worker_death_is_a_message_not_a_dead_widget(tiny_gguf, fake_worker):
    lab = SplitLab(tiny_gguf, worker=fake_worker, debounce=0)
    fake_worker.fail_with = LoadError("llama.cpp ended the worker process (exit -6) during load: RPC_STATUS_ASSERT")
    assert lab.measure(wait=True) is None
    assert "LoadError" in lab.result_html.value and "exit -6" in lab.result_html.value
    assert lab.progress.bar_style == "danger" and not lab.measure_button.disabled
    fake_worker.fail_with = RuntimeError("something unexpected")
    assert lab.measure(wait=True) is None and "unexpected RuntimeError" in lab.result_html.value
    fake_worker.fail_with = None                # the next load works: the widget is alive
    lab.set_split([0.5])
    assert lab.measure(wait=True) is not None and len(lab.runs) == 1


def test_a_plan_that_does_not_fit_is_not_loaded_unless_asked(tiny_gguf):
    from gpulab.core.devices import Device

    class Small(FakeWorker):
        def devices(self):
            return [Device(f"RPC{i}", 2 << 20, 2 << 20, "rpc", "rpc", endpoint=f"127.0.0.1:{6000 + i}")
                    for i in range(2)]

    w = Small()
    w.fail_with = LoadError("llama.cpp could not load: out of memory")
    lab = SplitLab(tiny_gguf, worker=w, debounce=0)
    assert not lab.plan.fits
    assert lab.measure(wait=True) is None and w.loads == []
    assert "does not fit" in lab.result_html.value
    lab.force_load.value = True
    assert lab.measure(wait=True) is None and len(w.loads) == 1
    assert "out of memory" in lab.result_html.value


def test_a_measurement_shows_its_phases_and_throughput(tiny_gguf, fake_worker):
    phases = []

    class Monitor:
        def mark_phase(self, name):
            phases.append(name)

    lab = SplitLab(tiny_gguf, worker=fake_worker, debounce=0, monitor=Monitor())
    run = lab.measure(wait=True)
    assert run.pp.avg_ts == FakeWorker.PP_TS and run.plan is not None
    assert "pp128 123.0" in lab.progress_label.value and "tg32 45.0" in lab.progress_label.value
    assert phases == ["load", "load", "warmup", "pp", "tg", None]
    pp, tg = lab.throughput_fig.data
    assert list(pp.y) == [FakeWorker.PP_TS] and list(tg.y) == [FakeWorker.TG_TS]


def test_background_measure_from_the_button(tiny_gguf, fake_worker):
    lab = SplitLab(tiny_gguf, worker=fake_worker, debounce=0)
    lab.measure_button.click()
    lab.wait(30)
    assert len(lab.runs) == 1


def test_close_closes_only_what_the_lab_started(tiny_gguf, fake_worker):
    lab = SplitLab(tiny_gguf, worker=fake_worker, debounce=0)
    lab.close()
    assert not fake_worker.closed              # the caller's worker stays the caller's


def test_a_view_made_later_starts_from_the_current_state(prof):
    """Voilà, a reloaded page or a second display build their view from the synced state."""
    lab = make_lab(prof, "2x24GiB")
    lab.set_split([1, 0])
    for fig in (lab.layer_fig, lab.memory_fig):
        synced = fig._widget_data
        assert [list(t.get("x", ())) for t in synced] == [list(t.x) if t.x is not None else [] for t in fig.data]
    assert lab.memory_fig._widget_layout["title"]["text"] == lab.memory_fig.layout.title.text


def test_an_attached_monitor_is_shown_and_closed_with_the_lab(tiny_gguf, fake_worker):
    from gpulab.ui.monitor import Monitor

    class NoNvml:
        unavailable_reason = "no driver"

        def available(self):
            return False

    m = Monitor(NoNvml(), worker=fake_worker, interval=0.05)
    lab = SplitLab(tiny_gguf, worker=fake_worker, debounce=0)
    lab.attach_monitor(m)
    assert lab.children[-1] is m and m.running
    lab.measure(wait=True)
    assert [p[0] for p in m.phases] == ["load", "warmup", "pp", "tg"] and all(p[2] is not None for p in m.phases)
    lab.close()
    assert not m.running


def test_in_a_notebook_the_live_fit_waits_for_the_controls_to_rest(prof):
    lab = make_lab(prof, "2500MiB,2000MiB@1900MiB", debounce=0.05, live_fit=True)
    fits = []
    orig = lab._draw_fit
    lab._draw_fit = lambda cfg: (fits.append(cfg.n_ctx), orig(cfg))

    async def steps():
        for c in (1024, 2048, 512, 1024):
            lab.n_ctx.value = c
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.2)

    asyncio.run(steps())
    assert fits == [1024]                        # once, for the settings the controls rest on
    assert lab.strip.fit_label.startswith("llama-server -fit at -c 1024:")


def test_a_projector_and_a_draft_typed_in_the_process_group_join_the_bars(prof, tmp_path):
    """The 'process' group takes the paths as llama-server's flags do; the bars gain the draft and the
    projector on their devices, as gpulab.core.policies.process plans them (the same pasted command)."""
    import shlex

    from gpulab.core.command_line import parse_command
    from gpulab.core.policies.process import plan_command
    from gpulab.sources.projector import read_projector
    from gpulab.sources.synth import SynthSpec, write_model
    from projectors import write_projector
    mm = write_projector(tmp_path / "mm.gguf", projector_type="mlp", image_size=336, patch_size=14, n_embd=256,
                         n_ff=1024, n_head=4, n_layer=2, proj_dim=4096)
    draft = write_model(tmp_path / "d.gguf", SynthSpec(n_layer=2, n_embd=256, n_ff=512, n_head=4, n_head_kv=4,
                                                      n_vocab=512))
    lab = make_lab(prof, "2x24GiB")
    before = memory_mib(lab, "draft & projector")
    assert before == [0.0, 0.0, 0.0]
    lab.process_controls["mmproj"].value = str(mm)
    lab.process_controls["draft"].value = str(draft)
    lab.process_controls["draft_flags"].value = "-ngld 99"
    lab.redraw()
    assert lab.error is None
    ts = ",".join(f"{x:g}" for x in lab.plan.config.tensor_split) or "1,1"
    from gpulab.sources.read import read_profile
    ref = plan_command(parse_command(shlex.split(
        f"llama-server -m M --mmproj {mm} -md {draft} -ngld 99 -dev SIM0,SIM1 -ts {ts} -c {lab.plan.config.n_ctx} "
        f"-np {lab.plan.config.n_seq_max} -fit off")), prof, lab.devices, draft=read_profile(draft),
        projector=read_projector(mm)).process
    for d in lab.plan.offload_devices:
        r = ref.row(d.name)
        assert d.process_bytes == r.draft_bytes + r.projector_bytes, d.name
    assert lab.plan.device("SIM0").process_bytes > lab.plan.device("SIM1").process_bytes > 0   # the projector on SIM0
    lab.process_controls["draft_flags"].value = "-ngld"
    lab.redraw()
    assert lab.error and "needs a value" in lab.error
