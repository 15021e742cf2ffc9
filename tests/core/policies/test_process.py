"""A pasted command planned as llama-server runs it (gpulab.core.policies.process): the draft added
per device and in fit's dry runs on the main devices only, the projector placed by clip's rules
and its bytes in fit's margin by ggml's registry index, the CUDA base cost as a labelled default."""

from __future__ import annotations

import shlex

import pytest

from builders import make_profile
from gpulab.core.command_line import parse_command
from gpulab.core.devices import Device, parse_sim_spec
from gpulab.core.placement.planner import plan
from gpulab.core.placement.process import (
    DEFAULT_CUDA_OVERHEAD_BYTES,
    ProjectorProfile,
    projector_device,
)
from gpulab.core.policies.process import plan_command, registry_index
from gpulab.sources.projector import read_projector
from projectors import write_projector

MiB = 1024 * 1024
GiB = 1024 * MiB


def _cuda(n: int, free: int = 24 * GiB) -> list[Device]:
    return [Device(f"CUDA{i}", free, free, "sim") for i in range(n)]


def _rpc(n: int, free: int = 24 * GiB) -> list[Device]:
    return [Device(f"RPC{i}", free, free, "rpc", kind="rpc", endpoint=f"127.0.0.1:{50052 + i}") for i in range(n)]


def test_the_draft_is_planned_on_its_own_devices_and_added_there():
    main, draft = make_profile(n_layer=8), make_profile(n_layer=4, layer_bytes=10 * MiB)
    devs = parse_sim_spec("24GiB,24GiB")
    cmd = parse_command(shlex.split("llama-server -m A -md D -ngl 99 -ts 1,1 -c 8192 -np 1 -devd SIM1 -fit off"))
    cp = plan_command(cmd, main, devs, draft=draft)
    # the draft's context has n_parallel outputs (common_base_params_to_speculative)
    alone = plan(draft, devs, cmd.draft.config.replace(n_ctx=8192, tensor_split=(1.0,)), n_outputs=1)
    d1 = alone.device("SIM1")
    assert cp.process.row("SIM1").draft_bytes == d1.weights_bytes + d1.kv_bytes + d1.compute_bytes
    assert cp.process.row("SIM0").draft_bytes == 0
    main_alone = plan(main, devs, cmd.config, n_outputs=1)     # llama-server: 1 slot x (1 + 0 drafted)
    s0 = main_alone.device("SIM0")
    assert cp.process.row("SIM0").main_bytes == s0.weights_bytes + s0.kv_bytes + s0.compute_bytes
    assert cp.fit is None or cp.fit.status == "off"


def test_fit_counts_the_draft_only_where_the_main_model_is():
    main, draft = make_profile(n_layer=8), make_profile(n_layer=8, layer_bytes=200 * MiB)
    devs = _rpc(3, free=4 * GiB)
    on_main = plan_command(parse_command(shlex.split("llama-server -m A -md D -c 4096 -np 1 -devd RPC0")), main,
                           devs, draft=draft)
    elsewhere = plan_command(parse_command(shlex.split("llama-server -m A -md D -c 4096 -np 1 -devd RPC2 "
                                                       "-dev RPC0,RPC1")), main, devs, draft=draft)
    # on RPC0 the draft's 1.6 GiB of weights push main layers off RPC0; on RPC2 fit never sees it
    assert on_main.process.main.layers_on("RPC0") != elsewhere.process.main.layers_on("RPC0")
    assert any("fit counts the draft only on the main model's devices" in n for n in elsewhere.notes)
    assert not any("fit counts the draft" in n for n in on_main.notes)


def test_projector_goes_where_clip_puts_it():
    cuda_and_rpc = _rpc(1) + _cuda(2)
    # ggml_backend_init_by_type(GPU): CUDA's devices are registered before the RPC servers' ones
    assert projector_device(cuda_and_rpc, offload=True, device="", main_devices=())[0] == "CUDA0"
    assert projector_device(_rpc(2), offload=True, device="", main_devices=())[0] == "RPC0"
    assert projector_device(cuda_and_rpc, offload=True, device="", main_devices=("CUDA1",))[0] == "CUDA1"
    assert projector_device(cuda_and_rpc, offload=False, device="", main_devices=())[0] == "CPU"
    assert projector_device(cuda_and_rpc, offload=True, device="RPC0", main_devices=())[0] == "RPC0"
    assert [registry_index(cuda_and_rpc, n) for n in ("CUDA0", "CUDA1", "CPU", "RPC0")] == [0, 1, 2, 3]


def test_projector_read_from_its_gguf(tmp_path):
    p = read_projector(write_projector(tmp_path / "mmproj.gguf", image_size=224, patch_size=14, n_embd=128))
    assert (p.projector_type, p.has_vision, p.warmup_tokens, p.n_embd, p.n_head) == ("gemma3", True, 256, 128, 4)
    # every tensor: patch 128*3*14*14 f16 + bias, pos 256*128 f16, 2 blocks, post_ln, the projection
    per_block = 4 * (128 * 128 * 2 + 128 * 4) + 4 * 128 * 4 + (512 * 128 * 2 + 512 * 4) + (128 * 512 * 2 + 128 * 4)
    expected = (128 * 3 * 14 * 14 * 2 + 128 * 4 + 256 * 128 * 2 + 2 * per_block + 2 * 128 * 4 + 128 * 4
                + 576 * 128 * 2)
    assert p.weights_bytes == expected
    assert p.compute_bytes(flash_attn=False) > p.compute_bytes(flash_attn=True) > 0


def test_a_projector_that_fit_leaves_no_room_for_is_named_with_bytes():
    main = make_profile(n_layer=30, layer_bytes=100 * MiB)     # 3.7 GiB: fit must fill the devices
    proj = ProjectorProfile("P", "gemma3", weights_bytes=1536 * MiB, has_vision=True, has_audio=False,
                            image_size=896, patch_size=14, n_embd=1152, n_ff=4304, n_head=16, n_layer=27,
                            warmup_tokens=4096)
    devs = _rpc(2, free=3 * GiB)
    # RPC devices: fit adds the projector to the margin of registry index 1 (RPC1), clip loads it on RPC0
    cp = plan_command(parse_command(shlex.split("llama-server -m A --mmproj P -c 4096 -np 1")), main, devs,
                      projector=proj)
    assert any(n.startswith("fit adds the projector's") and "of RPC1 (ggml registry index 1), not of RPC0" in n
               for n in cp.notes)
    assert any(n.startswith("fit leaves") and "free on RPC0; the projector takes" in n and "will fail there" in n
               for n in cp.notes)
    assert not cp.process.row("RPC0").fits
    # on CUDA the indexes agree: fit keeps the projector's room on CUDA0 and the load fits
    cuda = plan_command(parse_command(shlex.split("llama-server -m A --mmproj P -c 4096 -np 1")), main,
                        _cuda(2, free=3 * GiB), projector=proj)
    assert cuda.process.row("CUDA0").fits and not any("will fail" in n for n in cuda.notes)


def test_a_projector_inside_fits_margin_is_named_with_the_margin():
    """Where the device has the projector's room only inside the -fitt margin (the default 1024 MiB
    on a GPU), the load succeeds but spends the margin the user kept: said with the bytes."""
    main = make_profile(n_layer=30, layer_bytes=100 * MiB)
    proj = ProjectorProfile("P", "mlp", weights_bytes=300 * MiB, has_vision=True, has_audio=False)
    cp = plan_command(parse_command(shlex.split("llama-server -m A --mmproj P -c 4096 -np 1")), main,
                      _rpc(2, free=3 * GiB), projector=proj)
    left = cp.process.row("RPC0").free_bytes - cp.process.row("RPC0").main_bytes - 1024 * MiB
    assert 0 <= left < 300 * MiB
    assert any(n.startswith("fit leaves ") and "free on RPC0 above its -fitt margin of 1.00 GiB; the projector "
               "takes 300.00 MiB: the load ends " in n for n in cp.notes), cp.notes
    assert cp.process.row("RPC0").fits


def test_cuda_base_cost_is_a_labelled_default_until_learned():
    main = make_profile(n_layer=4)
    cmd = parse_command(shlex.split("llama-server -m A -c 4096 -np 1 -ngl 99 -fit off"))
    cp = plan_command(cmd, main, _cuda(1))
    row = cp.process.row("CUDA0")
    assert row.overhead_bytes == DEFAULT_CUDA_OVERHEAD_BYTES == 523 * MiB and row.overhead_is_default
    assert any("gpulab's default for a CUDA device" in n for n in cp.notes)
    learned = [Device("CUDA0", 24 * GiB, 24 * GiB, "nvml", overhead_bytes=400 * MiB)]
    row = plan_command(cmd, main, learned).process.row("CUDA0")
    assert row.overhead_bytes == 400 * MiB and not row.overhead_is_default
    assert plan_command(cmd, main, _rpc(1)).process.row("RPC0").overhead_bytes == 0


@pytest.mark.parametrize("free_gib,fits", [(1, False), (24, True)])
def test_the_default_base_cost_counts_in_fits(free_gib, fits):
    main = make_profile(n_layer=2, layer_bytes=100 * MiB, embd_bytes=10 * MiB, out_bytes=10 * MiB)
    cmd = parse_command(shlex.split("llama-server -m A -c 4096 -np 1 -ngl 99 -fit off"))
    cp = plan_command(cmd, main, _cuda(1, free=free_gib * GiB - 400 * MiB))
    assert cp.process.fits is fits


def test_the_gap_between_the_draft_fit_counted_and_the_draft_loaded():
    """Fit measures the draft with the -ts given (none: by free memory) but llama-server loads it with
    the -ts fit wrote into params.tensor_split; the plan says where the two differ, with bytes."""
    main, draft = make_profile(n_layer=16, layer_bytes=100 * MiB), make_profile(n_layer=8, layer_bytes=40 * MiB)
    devs = parse_sim_spec("3GiB,1500MiB")
    cp = plan_command(parse_command(shlex.split("llama-server -m A -md D -c 4096 -np 1")), main, devs, draft=draft)
    assert cp.fit is not None and "tensor_split" in cp.fit.changed
    # the draft as loaded: fit's -ts over the same devices
    loaded = plan(draft, devs, cp.command.draft.config.replace(n_ctx=cp.process.main.config.n_ctx,
                                                                 tensor_split=cp.process.main.config.tensor_split),
                  n_outputs=1)
    assert cp.process.row("SIM1").draft_bytes == sum(
        getattr(loaded.device("SIM1"), k) for k in ("weights_bytes", "kv_bytes", "compute_bytes"))
    gaps = [n for n in cp.notes if n.startswith("fit counted")]
    assert gaps and all("(the draft loads with the -ts fit wrote)" in n for n in gaps)


def test_llama_server_reserves_logits_for_its_slots_not_for_the_ubatch():
    """server_output_limits: n_outputs_max = min(n_batch, slots x (1 + drafted tokens)); llama-bench
    leaves it at n_batch, so every token of the reserved ubatch has logits [n_vocab] f32."""
    main = make_profile(n_layer=4, n_vocab=128256)
    devs = _rpc(1)
    server = parse_command(shlex.split("llama-server -m A -c 4096 -np 2 -ngl 99 -fit off"))
    bench = parse_command(shlex.split("llama-bench -m A -p 4096 -n 0 -ngl 99"))
    assert server.n_outputs() == (2, None) and bench.n_outputs() == (None, None)
    spec = parse_command(shlex.split("llama-server -m A -md D -c 4096 -np 2 --spec-type draft-simple "
                                     "--spec-draft-n-max 5"))
    assert spec.n_outputs() == (2 * (1 + 5), 2)
    s = plan_command(server, main, devs).process.main.device("RPC0").compute_bytes
    b = plan_command(bench, main, devs).process.main.device("RPC0").compute_bytes
    logits = 4 * 128256 * 512                       # llama-bench: [n_vocab, 512] f32 logits are its peak
    assert logits <= b <= logits + 16 * MiB
    assert s < b - 100 * MiB                        # llama-server: 2 rows of logits; another phase peaks


def _with_nextn(n_layer: int = 8) -> object:
    """make_profile's last layer made an MTP (nextn) head, as gguf_arch reads one: its tensors
    skipped unless MTP is on, no KV in the main context."""
    from dataclasses import replace as _r
    p = make_profile(n_layer=n_layer, layer_bytes=60 * MiB)
    last = p.layers[-1]
    layers = (*p.layers[:-1], _r(last, tensors=(), mtp_tensors=last.tensors, has_kv=False, is_nextn=True))
    return _r(p, layers=layers, n_nextn=1)


def test_mtp_loads_the_nextn_layer_and_adds_a_context_holding_its_kv_only():
    profile = _with_nextn()
    devs = _rpc(2)
    flags = "llama-server -m A -ngl 99 -ts 1,1 -c 8192 -np 1 -fit off"
    off = plan_command(parse_command(shlex.split(flags)), profile, devs)
    on = plan_command(parse_command(shlex.split(flags + " --spec-type draft-mtp")), profile, devs)
    # layers 4..7 and the output on RPC1: the nextn layer's 60 MiB load only with the mode
    assert on.process.main.device("RPC1").weights_bytes - off.process.main.device("RPC1").weights_bytes == 60 * MiB
    assert on.process.main.device("RPC0").weights_bytes == off.process.main.device("RPC0").weights_bytes
    # the main context's KV is the trunk's either way: 7 layers x 8192 cells x 2 x 1024 f16 = 224 MiB
    assert sum(d.kv_bytes for d in on.process.main.devices) == 7 * 32 * MiB
    # the MTP context: the nextn layer's KV alone, 8192 x 2 x 1024 x 2 bytes, on its device
    assert on.process.mtp.kv_bytes == {"RPC0": 0, "RPC1": 32 * MiB, "CPU": 0}
    assert on.process.row("RPC1").mtp_bytes == 32 * MiB + on.process.mtp.compute_bytes["RPC1"]
    assert off.process.mtp is None and off.process.row("RPC1").mtp_bytes == 0
    # the draft's cache types (-ctkd/-ctvd) are the MTP context's: q8_0 is 34/64 of f16's bytes
    q8 = plan_command(parse_command(shlex.split(flags + " --spec-type draft-mtp -ctkd q8_0 -ctvd q8_0")), profile, devs)
    assert q8.process.mtp.kv_bytes["RPC1"] == 17 * MiB


def test_mtp_on_a_model_without_nextn_layers_is_refused_in_one_line():
    from gpulab.core.errors import ConfigError
    cmd = parse_command(shlex.split("llama-server -m A -ngl 99 --spec-type draft-mtp"))
    with pytest.raises(ConfigError, match=r"^--spec-type draft-mtp: hand-built has no MTP \(nextn\) layers"):
        plan_command(cmd, make_profile(n_layer=4), _rpc(2))


def test_fit_counts_the_mtp_context_on_the_placement_given_and_the_gap_is_named():
    """common_fit_extra_model with shares_model: the MTP context's KV and compute (not its weights)
    join fit's sums, measured once per context size with the -ngl/-ts given (mparams_dft is taken
    before fit writes its own), so where fit moves the nextn layer the count is wrong."""
    profile = _with_nextn()
    cmd = parse_command(shlex.split("llama-server -m A -c 8192 -np 1 -fitt 256 --spec-type draft-mtp"))
    roomy = plan_command(cmd, profile, _rpc(2, 2000 * MiB))
    assert roomy.fit.config.n_gpu_layers == -1 and roomy.notes == ()
    assert roomy.process.row("RPC1").main_bytes + roomy.process.row("RPC1").mtp_bytes <= (2000 - 256) * MiB
    tight = plan_command(cmd, profile, _rpc(2, 900 * MiB))
    # fit offloads 2 layers (the output and the nextn layer) to RPC0, having counted the MTP context on RPC1
    assert tight.process.main.layer_devices[-2:] == ("RPC0", "RPC0") and tight.process.row("RPC1").mtp_bytes == 0
    assert any(n.startswith("fit counted 0 B of the MTP context on RPC0; llama-server allocates 224.04 MiB there")
               for n in tight.notes), tight.notes
