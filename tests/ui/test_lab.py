"""SplitLab through its Python state: set a control, check the plan and the figures' data."""

from __future__ import annotations

import asyncio

import pytest

from gpulab import SplitConfig, parse_sim_spec, plan
from gpulab.core.errors import LoadError
from gpulab.core.policies.apply import policy_split
from gpulab.ui.lab import SplitLab
from ui.conftest import FakeWorker


@pytest.fixture
def prof(profile_factory):
    return profile_factory(n_layer=24)    # 24 x 60 MiB layers + a 400 MiB output layer


def make_lab(prof, spec="4x24GiB", **kw):
    kw.setdefault("debounce", 0)
    return SplitLab(prof, sim=spec, **kw)


def layer_x(lab, name):
    t = next(t for t in lab.layer_fig.data if t.name == name)
    return sorted(t.x)


def memory_y(lab, term):
    t = next(t for t in lab.memory_fig.data if t.name == term)
    return list(t.y)


def test_slider_changes_plan_and_figures_as_the_planner_says(prof):
    lab = make_lab(prof)
    devs = parse_sim_spec("4x24GiB")
    for values in ([1, 0, 0, 0], [1, 1, 0, 0], [0.25, 0.5, 0.75, 1.0], [0, 0, 0, 1]):
        for s, v in zip(lab.split_sliders, values):
            s.value = v
        ts = tuple(float(v) for v in values)
        while ts and ts[-1] == 0:
            ts = ts[:-1]
        want = plan(prof, devs, SplitConfig(tensor_split=ts), lab.host)
        assert lab.plan.layer_devices == want.layer_devices
        assert lab.config.tensor_split == ts
        for d in want.offload_devices:
            assert layer_x(lab, d.name) == want.layers_on(d.name)
        assert memory_y(lab, "weights")[:4] == pytest.approx([d.weights_bytes / lab.unit[1]
                                                              for d in want.offload_devices])
        assert memory_y(lab, "KV")[:4] == pytest.approx([d.kv_bytes / lab.unit[1] for d in want.offload_devices])
    lab.close()


def test_share_labels_show_the_normalised_split(prof):
    lab = make_lab(prof, "2x24GiB")
    assert "50.0%" in lab.share_labels[0].value and "by free memory" in lab.share_labels[0].value
    lab.split_sliders[0].value = 1.0
    lab.split_sliders[1].value = 3.0 if lab.split_sliders[1].max >= 3 else 0.75
    share = lab.split_sliders[0].value / (lab.split_sliders[0].value + lab.split_sliders[1].value)
    assert f"{share * 100:.1f}%" in lab.share_labels[0].value


def test_ngl_slider_keeps_layers_on_the_cpu_and_offloads_the_output_first(prof):
    lab = make_lab(prof, "2x24GiB")
    lab.ngl_slider.value = 1
    assert lab.plan.layer_devices[-1] != "CPU"
    assert set(lab.plan.layer_devices[:-1]) == {"CPU"}
    assert layer_x(lab, "CPU") == list(range(24))
    lab.ngl_slider.value = 0
    assert set(lab.plan.layer_devices) == {"CPU"}
    lab.ngl_slider.value = lab.ngl_slider.max
    assert lab.config.n_gpu_layers == -1 and "CPU" not in lab.plan.layer_devices


@pytest.mark.parametrize("policy", ["llama", "ollama-spread", "pack", "balanced"])
def test_policy_buttons_set_the_sliders(prof, policy):
    lab = make_lab(prof, "24GiB,16GiB,8GiB@6GiB,24GiB")
    lab.policy_buttons[policy].click()
    want = policy_split(policy, prof, parse_sim_spec("24GiB,16GiB,8GiB@6GiB,24GiB"),
                        lab.config.replace(tensor_split=()),
                        lab.host)
    got = [s.value for s in lab.split_sliders]
    if want:
        assert got == pytest.approx(list(want))
    else:
        assert got == [0, 0, 0, 0]      # llama.cpp's default: by free memory
    expected = plan(prof, parse_sim_spec("24GiB,16GiB,8GiB@6GiB,24GiB"), SplitConfig(tensor_split=want), lab.host)
    assert lab.plan.layer_devices == expected.layer_devices
    assert lab.error is None


def test_moe_balance_button_writes_the_split_and_the_rules(prof):
    from builders import make_moe_profile
    from gpulab.core.policies.apply import apply_policy
    moe = make_moe_profile()
    assert "moe-balance" not in make_lab(prof).policy_buttons       # a dense model has no experts
    lab = make_lab(moe, "2x8GiB", config=SplitConfig(n_ctx=8192, n_cpu_moe=30))
    assert lab.plan.config.n_cpu_moe == 30
    lab.policy_buttons["moe-balance"].click()
    assert lab.error is None
    want = apply_policy("moe-balance", moe, parse_sim_spec("2x8GiB"), SplitConfig(n_ctx=8192), lab.host)
    assert lab.setting_controls["n_cpu_moe"].value == 0
    assert lab.setting_controls["tensor_overrides"].value == ",".join(want.tensor_overrides)
    assert lab.config.tensor_overrides == want.tensor_overrides
    assert [s.value for s in lab.split_sliders] == pytest.approx(list(want.tensor_split))
    assert lab.plan.layer_devices == plan(moe, parse_sim_spec("2x8GiB"), want, lab.host).layer_devices
    assert lab.plan.fits and set(lab.plan.moved_tensors.values()) == {"CPU"}
    # the layer map shows the experts that went to the CPU
    cpu = next(t for t in lab.layer_fig.data if t.name == "CPU experts")
    assert len(cpu.x) > 0
def test_the_fit_button_sets_what_llama_server_would_load(prof):
    from gpulab.core.policies.server_fit import fit
    spec = "2500MiB,2000MiB@1900MiB"
    lab = make_lab(prof, spec)
    lab.policy_buttons["fit"].click()
    want = fit(prof, parse_sim_spec(spec), SplitConfig(n_ctx=0), lab.host)
    assert want.ok and 0 < want.config.n_gpu_layers < prof.n_layer + 1     # too small for the whole model
    assert lab.last_fit.flags() == want.flags()
    c = lab.current_config()
    assert (c.n_ctx, c.n_gpu_layers, c.tensor_split) == (want.config.n_ctx, want.config.n_gpu_layers,
                                                        want.config.tensor_split)
    assert lab.plan.layer_devices == plan(prof, parse_sim_spec(spec), want.config, lab.host).layer_devices


def test_the_ollama_button_ticks_ollamas_gpus_and_sets_its_flags(prof):
    # gpulab.core.policies.ollama: a model that fits one GPU goes to the one with most free memory, alone
    from gpulab.core.policies.ollama import ollama
    spec = "24GiB@10GiB,24GiB@20GiB,24GiB@16GiB"
    lab = make_lab(prof, spec)
    lab.policy_buttons["ollama"].click()
    assert lab.error is None
    want = ollama(prof, parse_sim_spec(spec), host=lab.host)
    assert lab.selected == ["SIM1"] == list(want.gpus)
    c = lab.current_config()
    assert (c.split_mode, c.main_gpu, c.n_ctx, c.n_batch, c.n_ubatch) == (
        "none", 0, want.config.n_ctx, want.config.n_batch, want.config.n_ubatch)
    assert lab.plan.layer_devices == plan(prof, parse_sim_spec(spec), want.config, lab.host).layer_devices
    assert "--split-mode none --main-gpu 0" in lab.result_html.value


def test_pack_uses_fewer_devices_than_ollama_spread(prof):
    lab = make_lab(prof, "8x24GiB")
    lab.apply_policy("ollama-spread")
    assert len({d for d in lab.plan.layer_devices if d != "CPU"}) == 8
    lab.apply_policy("pack")
    assert len({d for d in lab.plan.layer_devices if d != "CPU"}) == 1


def test_device_selection_uses_only_the_ticked_devices(prof):
    lab = make_lab(prof, "4x24GiB")
    lab.use_boxes[1].value = False
    lab.use_boxes[3].value = False
    assert lab.config.devices == ("SIM0", "SIM2")
    assert set(lab.plan.layer_devices) == {"SIM0", "SIM2"}
    assert layer_x(lab, "SIM1") == [] and layer_x(lab, "SIM3") == []
    assert lab.split_sliders[1].disabled and not lab.split_sliders[0].disabled
    assert [o[0] for o in lab.main_gpu.options] == ["0: SIM0", "1: SIM2"]
    for b in lab.use_boxes:
        b.value = False
    assert lab.config.devices == ("none",)
    assert set(lab.plan.layer_devices) == {"CPU"}
    assert "--device none" in lab.export_html.value


def test_split_mode_none_uses_the_main_gpu(prof):
    lab = make_lab(prof, "3x24GiB")
    lab.split_mode.value = "none"
    lab.main_gpu.value = 2
    assert set(lab.plan.layer_devices) == {"SIM2"}
    assert "-sm none" in lab.export_html.value and "-mg 2" in lab.export_html.value


def test_split_mode_tensor_cuts_every_layer_across_the_devices(profile_factory):
    from builders import make_llama_profile
    lab = SplitLab(make_llama_profile(n_layer=6), sim="2x24GiB", debounce=0)
    lab.split_mode.value = "tensor"
    p = lab.plan
    assert lab.error is None and set(p.layer_devices) == {"Meta()"}
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
    kv = sum(memory_y(lab, "KV"))
    lab.n_ctx.value = 2 * lab.n_ctx.value
    assert sum(memory_y(lab, "KV")) == pytest.approx(2 * kv)
    lab.type_k.value = "q8_0"
    lab.type_v.value = "q8_0"
    assert sum(memory_y(lab, "KV")) == pytest.approx(2 * kv * 34 / 64)
    assert lab.plan.config.type_k == "q8_0"


def test_an_overfull_setting_shows_the_deficit(prof):
    lab = make_lab(prof, "4GiB,1GiB")
    lab.split_sliders[0].value = 0.1
    lab.split_sliders[1].value = 1.0
    assert not lab.plan.fits
    assert "does not fit" in lab.status.value and "SIM1: needs" in lab.status.value
    deficit = next(t for t in lab.memory_fig.data if t.name == "deficit")
    assert deficit.text[1].startswith("needs") and deficit.text[0] == ""
    assert "DOES NOT FIT" in lab.memory_fig.layout.title.text
    lab.split_sliders[1].value = 0.0          # all on SIM0 again: fits, the red goes away
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
        for v in [i / 20 for i in range(1, 21)]:
            lab.split_sliders[0].value = v
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.15)

    asyncio.run(drag())
    assert 1 <= len(draws) < 20                  # not one redraw per value
    assert draws[-1] == (1.0,)                   # but the last one is the final value
    assert lab.plan.config.tensor_split == (1.0,)


def test_redraw_time_is_recorded(profile_factory):
    lab = SplitLab(profile_factory(n_layer=127), sim="8x80GiB", debounce=0)
    lab.split_sliders[3].value = 0.5
    assert 0 < lab.last_update_s < 1.0


# -- load & measure with a fake worker -------------------------------------------------------

def test_load_appends_a_run_and_compares_memory(tiny_gguf, fake_worker):
    from gpulab.core.protocols import Runtime
    assert isinstance(fake_worker, Runtime)
    lab = SplitLab(tiny_gguf, worker=fake_worker, debounce=0)
    assert [d.name for d in lab.devices] == ["RPC0", "RPC1"]
    lab.split_sliders[0].value = 1.0
    lab.split_sliders[1].value = 1.0
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
    lab.split_sliders[0].value = 0.5
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
    lab.split_sliders[0].value = 1.0
    lab.split_sliders[1].value = 0.0
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
