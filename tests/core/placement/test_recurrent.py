"""Compute buffers of recurrent graphs (gpulab/core/placement/recurrent.py, ggml_replay.py) against llama.cpp's.

The expected figures are the `compute buffer size` lines llama.cpp logged (MiB, two decimals) for the
Mamba-2 and LFM2 models of gpulab.sources.arch_models on CPU RPC devices, as
tests/integration/test_arch_matrix_vs_llama.py loads them; the 24-layer, small-ubatch and two-sequence rows
come from the same models with those settings.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from gpulab import SplitConfig, plan
from gpulab.core.devices import Device
from gpulab.core.placement.ggml_replay import _Alloc
from gpulab.core.placement.recurrent import replayable
from gpulab.core.profile import LayerProfile, ModelProfile, TensorInfo

MiB = 1024**2


def mamba2(n_layer: int = 6) -> ModelProfile:
    d_conv, d_inner, d_state, n_group, n_head = 4, 2048, 128, 1, 32
    layers = tuple(LayerProfile(index=i, tensors=(), n_head=0, n_head_kv=0, n_embd_head_k=0, n_embd_head_v=0,
                                has_kv=False, n_embd_r=(d_conv - 1) * (d_inner + 2 * n_group * d_state),
                                n_embd_s=d_state * d_inner) for i in range(n_layer))
    md = {"mamba2.ssm.conv_kernel": d_conv, "mamba2.ssm.inner_size": d_inner, "mamba2.ssm.state_size": d_state,
          "mamba2.ssm.time_step_rank": n_head, "mamba2.ssm.group_count": n_group}
    return ModelProfile(path="mamba2", arch="mamba2", name="mamba2", file_bytes=0, n_layer=n_layer, n_embd=1024,
                        n_ff=0, n_vocab=8192, n_ctx_train=32768, layers=layers, input_tensors=(),
                        output_tensors=(), tied_output=False, metadata=md)


def lfm2() -> ModelProfile:
    """LFM2: short-convolution layers (l_cache 3) and attention at layers 2 and 5 (16 heads, 4 KV heads of 64),
    a 3072-wide SwiGLU FFN after each, n_embd 1024, n_vocab 8192, the output tied to the embeddings."""
    heads_kv = (0, 0, 4, 0, 0, 4)
    layers = tuple(LayerProfile(index=i, tensors=(), n_head=16, n_head_kv=h, n_embd_head_k=64, n_embd_head_v=64,
                                has_kv=h > 0, n_embd_r=0 if h else 2 * 1024) for i, h in enumerate(heads_kv))
    return ModelProfile(path="lfm2", arch="lfm2", name="lfm2", file_bytes=0, n_layer=6, n_embd=1024, n_ff=3072,
                        n_vocab=8192, n_ctx_train=32768, layers=layers, input_tensors=(), output_tensors=(),
                        tied_output=True, metadata={"lfm2.shortconv.l_cache": 3})


def qwen3next() -> ModelProfile:
    """Qwen3-Next shaped: 8 layers, gated delta nets (d_inner 1024, 4 key heads and 8 value heads of 128, d_conv 4)
    with gated attention every 4th layer (16 heads of 128, 2 KV heads), each with a 16-expert MoE (4 used,
    512 wide) and a 512-wide shared expert; n_embd 1024, n_vocab 8192."""
    layers = tuple(LayerProfile(index=i, tensors=(), n_head=16, n_head_kv=2, n_embd_head_k=128, n_embd_head_v=128,
                                has_kv=(i + 1) % 4 == 0, n_embd_r=0 if (i + 1) % 4 == 0 else 3 * (1024 + 2 * 4 * 128),
                                n_embd_s=0 if (i + 1) % 4 == 0 else 128 * 1024) for i in range(8))
    md = {"qwen3next.ssm.conv_kernel": 4, "qwen3next.ssm.inner_size": 1024, "qwen3next.ssm.state_size": 128,
          "qwen3next.ssm.time_step_rank": 8, "qwen3next.ssm.group_count": 4,
          "qwen3next.expert_feed_forward_length": 512, "qwen3next.expert_shared_feed_forward_length": 512}
    return ModelProfile(path="qwen3next", arch="qwen3next", name="qwen3next", file_bytes=0, n_layer=8, n_embd=1024,
                        n_ff=3072, n_vocab=8192, n_ctx_train=32768, layers=layers, input_tensors=(),
                        output_tensors=(), tied_output=False, n_expert=16, n_expert_used=4, metadata=md)


def rpc(n: int) -> list[Device]:
    return [Device(name=f"RPC{i}", total_bytes=64 << 30, free_bytes=64 << 30, source="rpc", kind="rpc")
            for i in range(n)]


def logged(profile: ModelProfile, config: SplitConfig, n_devices: int) -> dict[str, float]:
    """The plan's compute buffers as llama.cpp prints them."""
    p = plan(profile, rpc(n_devices), config)
    return {d.name: round(d.compute_bytes / MiB, 2) for d in p.devices}


@pytest.mark.parametrize("config,n_devices,expected", [
    # pipelined over two devices: 4 copies of what crosses (embd, cont(z) back, the z view over)
    (SplitConfig(tensor_split=(1, 1), n_ctx=1024, devices=("RPC0", "RPC1")), 2,
     {"RPC0": 52.62, "RPC1": 70.84, "CPU": 10.02}),
    (SplitConfig(tensor_split=(3, 1), n_ctx=2048, devices=("RPC0", "RPC1"), type_k="q8_0", type_v="q8_0",
                 flash_attn="on"), 2, {"RPC0": 36.62, "RPC1": 26.00, "CPU": 10.02}),
    (SplitConfig(tensor_split=(1, 1, 1), n_ctx=4096), 3, {"RPC0": 52.62, "RPC1": 86.83, "RPC2": 66.84, "CPU": 10.02}),
    # one device: the peak is the second layer's scan, above the holes the first layer left
    (SplitConfig(split_mode="none", main_gpu=1, n_ctx=1024), 2, {"RPC1": 30.62, "CPU": 4.00}),
    # layers on the host: not pipelined, each device's first norm runs where the layer before it ran
    (SplitConfig(n_gpu_layers=4, tensor_split=(1, 1, 1), n_ctx=1024), 3,
     {"RPC0": 26.62, "RPC1": 26.64, "RPC2": 18.00, "CPU": 29.12}),
    (SplitConfig(n_gpu_layers=0, n_ctx=1024), 1, {"RPC0": 0.0, "CPU": 29.12}),
    (SplitConfig(tensor_split=(1, 1), n_ctx=2048, n_seq_max=2, devices=("RPC0", "RPC1")), 2,
     {"RPC0": 53.67, "RPC1": 71.89, "CPU": 10.02}),
    (SplitConfig(tensor_split=(2, 1), n_ctx=4096, n_ubatch=128, devices=("RPC0", "RPC1")), 2,
     {"RPC0": 13.94, "RPC1": 17.47, "CPU": 2.50}),
    (SplitConfig(n_gpu_layers=3, tensor_split=(1, 1), n_ctx=1024, n_ubatch=16, devices=("RPC0", "RPC1")), 2,
     {"RPC0": 1.89, "RPC1": 0.56, "CPU": 1.93}),
])
def test_mamba2_compute_buffers_are_llama_cpps(config, n_devices, expected):
    assert logged(mamba2(), config, n_devices) == expected


@pytest.mark.parametrize("config,n_devices,expected", [
    (SplitConfig(tensor_split=(3, 1), n_ctx=2048, devices=("RPC0", "RPC1"), type_k="q8_0", type_v="q8_0",
                 flash_attn="on"), 2, {"RPC0": 40.18, "RPC1": 26.00, "CPU": 18.18}),
    (SplitConfig(tensor_split=(1, 1), n_ctx=1024, devices=("RPC0", "RPC1")), 2,
     {"RPC0": 34.05, "RPC1": 36.05, "CPU": 14.05}),
    # layer 2's attention (on the host) runs on RPC0 from KQ to its output: the scheduler gives its weightless
    # ops the backend of layer 3's state reads; flash attention ('auto') is then turned off
    (SplitConfig(n_gpu_layers=4, tensor_split=(1, 1, 1), n_ctx=1024), 3,
     {"RPC0": 37.50, "RPC1": 42.01, "RPC2": 18.00, "CPU": 26.02}),
    (SplitConfig(split_mode="none", main_gpu=1, n_ctx=1024, flash_attn="off"), 2, {"RPC1": 43.01, "CPU": 7.01}),
    (SplitConfig(tensor_split=(1, 2, 1), n_ctx=4096, type_k="q8_0", flash_attn="off"), 3,
     {"RPC0": 30.01, "RPC1": 178.09, "RPC2": 26.00, "CPU": 46.10}),
    # a quantized V cache: the Hadamard rotation of layer 2's attention output runs on RPC1, which sends it back
    (SplitConfig(tensor_split=(1, 1, 1), n_ctx=4096, type_k="q4_0", type_v="q4_0", flash_attn="on"), 3,
     {"RPC0": 54.17, "RPC1": 38.07, "RPC2": 46.17, "CPU": 26.18}),
    (SplitConfig(tensor_split=(1, 1), n_ctx=2048, n_seq_max=2, devices=("RPC0", "RPC1"), flash_attn="off"), 2,
     {"RPC0": 60.04, "RPC1": 60.03, "CPU": 22.04}),
    (SplitConfig(n_gpu_layers=0, n_ctx=1024), 1, {"RPC0": 0.0, "CPU": 27.01}),
])
def test_lfm2_compute_buffers_are_llama_cpps(config, n_devices, expected):
    assert logged(lfm2(), config, n_devices) == expected


@pytest.mark.parametrize("config,n_devices,expected", [
    (SplitConfig(tensor_split=(3, 1), n_ctx=2048, devices=("RPC0", "RPC1"), type_k="q8_0", type_v="q8_0",
                 flash_attn="on"), 2, {"RPC0": 38.41, "RPC1": 46.42, "CPU": 18.37}),
    # pipelined, the device of the output layer: the normed hidden state is a graph output (t_h_nextn), kept
    # under the logits
    (SplitConfig(tensor_split=(1, 1), n_ctx=1024, devices=("RPC0", "RPC1")), 2,
     {"RPC0": 34.10, "RPC1": 42.11, "CPU": 14.05}),
    # RPC0 and RPC2 hold gated delta nets only (the issue's "-ngl 4": 45.0 MiB planned before, 18.00 logged)
    (SplitConfig(n_gpu_layers=4, tensor_split=(1, 1, 1), n_ctx=1024), 3,
     {"RPC0": 18.00, "RPC1": 21.01, "RPC2": 20.00, "CPU": 25.08}),
    (SplitConfig(split_mode="none", main_gpu=1, n_ctx=1024, flash_attn="off"), 2, {"RPC1": 53.07, "CPU": 7.01}),
    (SplitConfig(tensor_split=(1, 2, 1), n_ctx=4096, type_k="q8_0", flash_attn="off"), 3,
     {"RPC0": 26.06, "RPC1": 190.27, "RPC2": 190.28, "CPU": 46.29}),
    (SplitConfig(tensor_split=(1, 1, 1), n_ctx=4096, type_k="q4_0", type_v="q4_0", flash_attn="on"), 3,
     {"RPC0": 26.06, "RPC1": 42.41, "RPC2": 54.42, "CPU": 26.37}),
    (SplitConfig(tensor_split=(1, 1), n_ctx=2048, n_seq_max=2, devices=("RPC0", "RPC1"), flash_attn="off"), 2,
     {"RPC0": 70.09, "RPC1": 68.09, "CPU": 22.04}),
    (SplitConfig(n_gpu_layers=0, n_ctx=1024), 1, {"RPC0": 0.0, "CPU": 33.01}),
])
def test_qwen3next_compute_buffers_are_llama_cpps(config, n_devices, expected):
    assert logged(qwen3next(), config, n_devices) == expected


def test_more_layers_do_not_raise_the_peak():
    # 24 layers on one device: the same 30.62 MiB llama.cpp logs for 6 (the holes repeat every few layers)
    assert logged(mamba2(24), SplitConfig(split_mode="none", main_gpu=1, n_ctx=1024), 2) == {"RPC1": 30.62, "CPU": 4.00}
    assert logged(mamba2(24), SplitConfig(tensor_split=(1, 2, 1), n_ctx=4096, type_k="q8_0", flash_attn="off"), 3) \
        == {"RPC0": 52.62, "RPC1": 86.83, "RPC2": 70.84, "CPU": 10.02}


def test_the_allocator_is_best_fit_below_the_top_and_merges_freed_neighbours():
    a = _Alloc()
    x, y, z = a.alloc(100), a.alloc(64), a.alloc(32)     # sizes pad to 32 bytes
    assert (x, y, z, a.top) == (0, 128, 192, 224)
    a.free(x, 100)
    a.free(z, 32)                  # the top one goes back to the endless last block
    assert a.alloc(96) == 0        # best fit: the 128-byte hole, not the top
    assert a.alloc(64) == 192 and a.top == 256
    a.free(y, 64)
    a.free(0, 96)                  # merges with its freed neighbour above: one 192-byte hole
    assert a.alloc(160) == 0 and a.top == 256



def test_a_graph_that_is_not_replayed_falls_back_and_says_so():
    # no SSM sizes in the file: the closed forms, and the plan states its compute as not modelled
    bare = replace(mamba2(), metadata={})
    assert not replayable(bare) and replayable(mamba2()) and replayable(lfm2()) and replayable(qwen3next())
    doubts = plan(bare, rpc(1), SplitConfig(n_ctx=1024)).doubts
    assert [d.term for d in doubts] == ["compute"] and "not modelled" in doubts[0].text
    assert plan(mamba2(), rpc(1), SplitConfig(n_ctx=1024)).doubts == ()
    # a sliding window (lfm2's iswa graph) is not built
    assert not replayable(replace(lfm2(), n_swa=512))
    # the attention layers alone (an MTP head's profile, placement.mtp) are another graph
    assert not replayable(replace(qwen3next(), n_layer=2, layers=qwen3next().layers[3::4]))
    # a Qwen3-Next file with the mixed ssm_in projection (another graph: conts and concats) instead of the
    # fused QKV and gate ones
    q = qwen3next()

    def with_tensors(*names: str) -> ModelProfile:
        return replace(q, layers=(replace(q.layers[0], tensors=tuple(TensorInfo(f"blk.0.{n}", "F16", (1024, 64), 1)
                                                                     for n in names)), *q.layers[1:]))
    assert replayable(with_tensors("attn_qkv.weight", "attn_gate.weight"))
    assert not replayable(with_tensors("ssm_in.weight"))


# fit's UP overflow on gpulab.sources.arch_models' qwen3next (2 CPU RPC devices, bench/fit_arch_sweep.py's budgets):
# "ffn_(gate|gate_up|down).*" takes the layer's router, shared-expert gate (ffn_gate_inp_shexp) and shared expert's
# gate and down to the next device with the experts' gate and down. Expected: the compute buffer sizes llama.cpp
# logged loading each (branch fitmla); before the router and shared expert were placed by name, RPC1 was 31.76 and
# 30.62 MiB.
@pytest.mark.parametrize("config,expected", [
    (SplitConfig(n_ctx=12032, n_gpu_layers=9, tensor_split=(7, 2),
                 tensor_overrides=(r"blk\.6\.ffn_(gate|gate_up|down).*=RPC1",
                                   r"blk\.8\.ffn_(up|down|gate_up|gate)_(ch|)exps=CPU")),
     {"RPC0": 33.82, "RPC1": 34.76, "CPU": 15.76}),
    (SplitConfig(n_ctx=4096, n_gpu_layers=9, tensor_split=(5, 4),
                 tensor_overrides=(r"blk\.4\.ffn_(gate|gate_up|down).*=RPC1",
                                   *(rf"blk\.{il}\.ffn_(up|down|gate_up|gate)_(ch|)exps=CPU" for il in (6, 7, 8)))),
     {"RPC0": 26.07, "RPC1": 29.52, "CPU": 20.04}),
], ids=["up-overflow", "up-overflow-and-experts-on-host"])
def test_qwen3next_router_and_shared_expert_run_where_fit_moved_them(tmp_path, config, expected):
    from gpulab import read_profile
    from gpulab.sources.arch_models import write_arch_model

    profile = read_profile(write_arch_model(tmp_path / "qwen3next.gguf", "qwen3next"))
    assert logged(profile, config, 2) == expected
