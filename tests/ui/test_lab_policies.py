"""Policy buttons in several orders: each leaves controls that `gpulab plan --policy X` (the command
line, on the same model and devices) agrees with, and only its own note on screen."""

from __future__ import annotations

import json

import pytest

from gpulab.cli import main
from gpulab.sources.synth import SynthSpec, write_model
from gpulab.ui.lab import SplitLab

SPEC = "24GiB@10GiB,24GiB@20GiB,16GiB@12GiB"
ORDERS = [("ollama", "pack", "balanced", "llama", "fit"),
          ("fit", "llama", "balanced", "pack", "ollama"),
          ("pack", "ollama", "fit", "balanced", "ollama-spread", "llama")]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(write_model(tmp_path_factory.mktemp("seq") / "m.gguf",
                           SynthSpec(n_layer=12, n_embd=256, n_ff=512, n_head=8, n_head_kv=2, n_vocab=512)))


def trim(ts: list[float]) -> list[float]:
    """-ts without trailing zeros (llama.cpp pads with zeros: the same split)."""
    while ts and ts[-1] == 0:
        ts = ts[:-1]
    return ts


def cli_plan(capsys, model, policy, c) -> dict:
    """`gpulab plan --policy` with the lab's settings that no policy owns (fit: llama-server's own
    defaults for -c and -np; ollama: none, it reads Ollama's)."""
    argv = ["plan", model, "--sim", SPEC, "--policy", policy, "--json"]
    if policy != "ollama":
        argv += ["-b", c.n_batch, "-ub", c.n_ubatch, "-fa", c.flash_attn, "-ctk", c.type_k, "-ctv", c.type_v]
    if policy not in ("ollama", "fit"):
        argv += ["-c", c.n_ctx, "-np", c.n_seq_max, "-ngl", c.n_gpu_layers] + (["-kvu"] if c.kv_unified else [])
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


@pytest.mark.parametrize("order", ORDERS, ids=["-".join(o) for o in ORDERS])
def test_each_policy_leaves_what_gpulab_plan_chooses(capsys, model, order):
    lab = SplitLab(model, sim=SPEC, debounce=0, live_fit=False)
    for policy in order:
        lab.apply_policy(policy)
        assert lab.error is None, (policy, lab.error)
        c = lab.config
        want = cli_plan(capsys, model, policy, c)
        got = lab.plan.to_dict()
        assert trim(got["config"]["tensor_split"]) == trim(want["config"]["tensor_split"]), policy
        for key in ("split_mode", "main_gpu", "n_gpu_layers", "n_ctx", "n_batch", "n_ubatch",
                    "tensor_overrides"):
            assert got["config"][key] == want["config"][key], (policy, key)
        assert got["layers"] == want["layers"], policy
        # the devices: Ollama picks GPUs (--device), every other policy uses them all
        assert lab.selected == (["SIM1"] if policy == "ollama" else ["SIM0", "SIM1", "SIM2"]), policy
        # only this policy's note; a note of an earlier one would be stale
        assert lab.note and lab.policy_note.value.count("gpulab-note") == 1, policy
        assert ("ollama passes" in lab.note) == (policy == "ollama") and ("fit:" in lab.note) == (policy == "fit")
    # any control changed: the note no longer describes the settings, so it goes
    lab.n_ctx.value = 512
    assert lab.note == "" and lab.policy_note.value == ""


def test_a_policy_that_cannot_choose_says_why_and_changes_nothing(profile_factory):
    lab = SplitLab(profile_factory(n_layer=8), sim="2x24GiB", debounce=0, live_fit=False)
    lab.set_counts([4, 5])
    before = lab.config
    lab.apply_policy("moe-balance")          # not offered for a dense model, refused if called
    assert lab.config == before and "is not a MoE model" in lab.note
    assert lab.policy_note.value.count("gpulab-note") == 1 and "\n" not in lab.note
    for b in lab.use_boxes:
        b.value = False
    lab.apply_policy("pack")
    assert "pack" in lab.note and lab.error is None


def test_measurements_of_earlier_settings_are_marked_stale(tiny_gguf, fake_worker):
    lab = SplitLab(tiny_gguf, worker=fake_worker, debounce=0, live_fit=False)
    assert lab.measure(wait=True) is not None
    assert "gpulab-stale" not in lab.result_html.value
    lab.set_counts([5, 3])
    assert lab.result_html.value.startswith("<div class='gpulab-stale'")
    lab.set_split([])                         # back to the measured settings: no longer stale
    assert "gpulab-stale" not in lab.result_html.value
    lab.apply_policy("pack")                  # a policy clears the old result
    assert lab.result_html.value == ""
