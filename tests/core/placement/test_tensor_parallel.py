"""Split mode `tensor`: llama_meta_device_get_split_state's cuts, each pinned down by hand.

The expected numbers below are worked out from the rules in src/llama-model.cpp (cited in
gpulab/core/placement/tensor_parallel.py); tests/integration/test_tensor_parallel_vs_llama.py checks the same
planner against what real llama.cpp allocates on each RPC device.
"""

from __future__ import annotations

import pytest

from builders import make_llama_profile
from gpulab import ConfigError, SplitConfig, parse_sim_spec, plan
from gpulab.core.placement.tensor_parallel import _context, split_tensor

TWO = "24GiB,24GiB"
MiB = 1024**2


def _split(profile, name, shape, ts=(), n=2):
    return split_tensor(_context(profile, n, SplitConfig(split_mode="tensor", tensor_split=ts)), name, shape)


def test_equal_shares_without_tensor_split_cut_heads_and_ffn_in_half():
    prof = make_llama_profile()     # n_embd 512, 8 heads of 64, 2 KV heads, n_ff 1536, F16
    assert _split(prof, "blk.0.attn_q.weight", (512, 512)) == (1, (256, 256))
    assert _split(prof, "blk.0.attn_k.weight", (512, 128)) == (1, (64, 64))       # one KV head each
    assert _split(prof, "blk.0.attn_output.weight", (512, 512)) == (0, (256, 256))   # along its input
    assert _split(prof, "blk.0.ffn_up.weight", (512, 1536)) == (1, (768, 768))
    assert _split(prof, "blk.0.ffn_down.weight", (1536, 512)) == (0, (768, 768))
    assert _split(prof, "output.weight", (512, 4096)) == (1, (2048, 2048))        # along the vocabulary
    for mirrored in ("blk.0.attn_norm.weight", "blk.0.ffn_norm.weight", "output_norm.weight"):
        assert _split(prof, mirrored, (512,))[0] < 0


def test_tensor_split_rounds_down_to_whole_query_groups_and_rotates_per_layer():
    prof = make_llama_profile()
    # -ts 3,1, layer 0 (rotation 0): Q high = 512*3/4 = 384, rounded down to the 256-row group of
    # 4 query heads sharing a KV head -> 256; K 96 -> 64 (whole heads); the FFN 1152 is a multiple of 128
    assert _split(prof, "blk.0.attn_q.weight", (512, 512), (3, 1)) == (1, (256, 256))
    assert _split(prof, "blk.0.attn_k.weight", (512, 128), (3, 1)) == (1, (64, 64))
    assert _split(prof, "blk.0.ffn_gate.weight", (512, 1536), (3, 1)) == (1, (1152, 384))
    # layer 1 (rotation 1): the scan starts at device 1 (512/4 = 128 -> 0), device 0 takes the rest
    assert _split(prof, "blk.1.attn_q.weight", (512, 512), (3, 1)) == (1, (512, 0))
    assert _split(prof, "blk.1.attn_k.weight", (512, 128), (3, 1)) == (1, (128, 0))
    assert _split(prof, "blk.1.ffn_gate.weight", (512, 1536), (3, 1)) == (1, (1152, 384))
    # the KV cache follows its layer's heads
    assert _split(prof, "cache_k_l1", (128, 512), (3, 1)) == (0, (128, 0))
    # outside the layers the rotation is n_layer % n_devices = 0
    assert _split(prof, "output.weight", (512, 4096), (3, 1)) == (1, (3072, 1024))


def test_quantized_ffn_is_cut_in_steps_of_lcm_block_128():
    prof = make_llama_profile(n_ff=1408, weight_type="Q8_0")
    # 1408 / 2 = 704 -> rounded down to a multiple of lcm(32, 128) = 128 -> 640; the last takes 768
    assert _split(prof, "blk.0.ffn_up.weight", (512, 1408)) == (1, (640, 768))
    # layer 1 rotates which device takes the remainder
    assert _split(prof, "blk.1.ffn_up.weight", (512, 1408)) == (1, (768, 640))


def test_moe_experts_are_cut_like_the_dense_ffn_and_the_router_is_mirrored():
    prof = make_llama_profile(arch="qwen3moe", n_expert=8, n_ff_exp=256)
    assert _split(prof, "blk.0.ffn_up_exps.weight", (512, 256, 8)) == (1, (128, 128))
    assert _split(prof, "blk.0.ffn_down_exps.weight", (256, 512, 8)) == (0, (128, 128))
    assert _split(prof, "blk.0.ffn_gate_inp.weight", (512, 8))[0] < 0


def test_three_devices_get_the_remainder_on_the_last_of_the_rotated_order():
    prof = make_llama_profile(n_head=12, n_head_kv=12, n_embd=768)   # MHA: one head = 64 rows
    # 12 heads over 3: n_embd_q = 64 (one head per KV head); the block step grows 1 -> 32 (32*3 >= 64),
    # so cuts fall on lcm(64, 32) = 64: whole heads, 4 each
    axis, per = _split(prof, "blk.0.attn_q.weight", (768, 768), n=3)
    assert axis == 1 and per == (256, 256, 256)
    assert _split(prof, "blk.0.attn_k.weight", (768, 768), n=3)[1] == per


def test_plan_puts_every_offloaded_layer_on_the_meta_device_and_slices_on_its_members():
    prof = make_llama_profile()
    p = plan(prof, parse_sim_spec(TWO), SplitConfig(split_mode="tensor", n_ctx=512))
    assert p.layer_devices == ("Meta()",) * 5
    assert [d.name for d in p.devices] == ["SIM0", "SIM1", "CPU"]
    ts = p.tensor_parallel
    mirrored = sum(t.n_bytes for layer in prof.layers for t in layer.tensors if "norm" in t.name) + 512 * 4
    split_total = prof.weights_bytes - prof.input_weights_bytes - mirrored
    assert ts.mirrored == (mirrored, mirrored)
    assert sum(d.weights_bytes for d in p.offload_devices) == split_total + 2 * mirrored
    assert p.device("SIM0").weights_bytes == p.device("SIM1").weights_bytes
    # KV: one of the two KV heads of every layer on each device
    assert ts.kv_heads == ((1, 1),) * 4
    assert p.device("SIM0").kv_bytes == p.device("SIM1").kv_bytes == 4 * 512 * 2 * 64 * 2
    assert p.device("SIM0").compute_bytes == p.device("SIM1").compute_bytes > 0
    assert p.device("SIM0").n_layers == 4 and p.device("SIM0").has_output
    assert p.host.weights_bytes == prof.input_weights_bytes      # the input layer stays on the CPU
    d = p.to_dict()
    assert d["config"]["split_mode"] == "tensor" and d["tensor_parallel"]["meta_device"] == "Meta()"


def test_three_devices_hold_whole_kv_heads_and_their_share_of_the_weights():
    prof = make_llama_profile(n_layer=5)
    p = plan(prof, parse_sim_spec("24GiB,24GiB,24GiB"), SplitConfig(split_mode="tensor", tensor_split=(3, 1, 2)))
    ts = p.tensor_parallel
    # 2 KV heads (1 MiB each per layer at this context) over three devices: whole heads, never halves
    assert ts.kv_heads == ((1, 0, 1), (1, 0, 1), (1, 1, 0), (1, 0, 1), (1, 0, 1))
    assert ts.layer_kv[:5] == ((MiB, 0, MiB),) * 2 + ((MiB, MiB, 0),) + ((MiB, 0, MiB),) * 2
    # what the plan table shows per device (the layer bars of the lab are these, layer by layer)
    assert [(d.name, d.weights_bytes, d.kv_bytes) for d in p.offload_devices] == [
        ("SIM0", 17_192_960, 5 * MiB), ("SIM1", 5_309_440, 1 * MiB), ("SIM2", 11_906_048, 4 * MiB)]


def test_partial_offload_keeps_the_first_layers_whole_on_the_cpu():
    prof = make_llama_profile(n_layer=4)
    p = plan(prof, parse_sim_spec(TWO), SplitConfig(split_mode="tensor", n_gpu_layers=2))
    assert p.layer_devices == ("CPU",) * 3 + ("Meta()",) * 2
    assert p.host.kv_bytes > 0 and len(p.tensor_parallel.kv_heads) == 1


def test_tied_output_is_mirrored_on_every_device():
    untied = plan(make_llama_profile(), parse_sim_spec(TWO), SplitConfig(split_mode="tensor"))
    prof = make_llama_profile(tied=True)
    p = plan(prof, parse_sim_spec(TWO), SplitConfig(split_mode="tensor"))
    emb = prof.token_embd.n_bytes
    # untied: output.weight is cut in two; tied: token_embd's copy is whole on each device
    assert p.device("SIM0").weights_bytes - untied.device("SIM0").weights_bytes == emb - emb // 2


def test_refusals_carry_llama_cpp_words():
    devs = parse_sim_spec(TWO)
    with pytest.raises(ConfigError, match="LLAMA_SPLIT_MODE_TENSOR not implemented for architecture 'olmoe'"):
        plan(make_llama_profile(arch="olmoe", n_expert=8, n_ff_exp=256), devs, SplitConfig(split_mode="tensor"))
    with pytest.raises(ConfigError, match="SPLIT_MODE_TENSOR requires flash_attn to be enabled"):
        SplitConfig(split_mode="tensor", flash_attn="off")
    with pytest.raises(ConfigError, match="needs >= 1 devices"):
        plan(make_llama_profile(), [], SplitConfig(split_mode="tensor"))
    with pytest.raises(ConfigError, match="only overrides to CPU"):
        plan(make_llama_profile(), devs, SplitConfig(split_mode="tensor", tensor_overrides=("ffn_up=SIM0",)))


def test_overrides_to_the_cpu_take_tensors_out_of_the_split():
    prof = make_llama_profile(arch="qwen3moe", n_expert=8, n_ff_exp=256)
    base = plan(prof, parse_sim_spec(TWO), SplitConfig(split_mode="tensor"))
    moe = plan(prof, parse_sim_spec(TWO), SplitConfig(split_mode="tensor", cpu_moe=True))
    experts = sum(t.n_bytes for layer in prof.layers for t in layer.tensors if t.is_expert)
    assert sum(d.weights_bytes for d in base.offload_devices) - sum(d.weights_bytes for d in moe.offload_devices) \
        == experts


def test_layer_cuts_name_every_tensor_and_the_kv_cache():
    from gpulab.core.placement.tensor_parallel import layer_cuts
    cuts = {name: (how, per)
            for name, how, per in layer_cuts(make_llama_profile(), SplitConfig(split_mode="tensor"), 2, 0)}
    assert cuts["blk.0.attn_q.weight"] == ("cut along ne[1] (output rows)", (256, 256))
    assert cuts["blk.0.ffn_down.weight"] == ("cut along ne[0] (input)", (768, 768))
    assert cuts["blk.0.attn_norm.weight"][0] == "whole copy on each device"
    assert cuts["cache_k_l0"] == ("cut along ne[0] (input)", (64, 64))
