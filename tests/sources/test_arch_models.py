"""The architecture models (gpulab.sources.arch_models) as gpulab reads them: MLA's K-only cache,
the MTP layers llama.cpp skips, the recurrent state, and the doubts a plan states. Expected values
are written out from llama.cpp's formulas (and its log of the same files on CPU RPC devices:
tests/integration/test_arch_matrix_vs_llama.py)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from gpulab import ConfigError, SplitConfig, parse_sim_spec, plan, read_profile
from gpulab.core.devices import Device
from gpulab.core.placement import coverage
from gpulab.sources.arch_models import ARCH_MODELS, write_arch_model

MiB = 1024**2


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("arch")
    return {a: read_profile(write_arch_model(root / f"{a}.gguf", a)) for a in ARCH_MODELS}


def test_mla_caches_k_only_at_kv_lora_rank_plus_rope(models):
    ds = models["deepseek2"]
    main = [layer for layer in ds.layers if not layer.is_nextn]
    assert all(not layer.has_v and layer.n_embd_k_gqa == 256 + 64 for layer in main)
    # 6 trunk layers x 4096 cells x 320 f16 values; no V cache (llama.cpp logs K (f16): 15.00 MiB)
    p = plan(ds, parse_sim_spec("24GiB"), SplitConfig(n_ctx=4096))
    assert p.device("SIM0").kv_bytes == 6 * 4096 * 320 * 2 == 15 * MiB
    q = plan(ds, parse_sim_spec("24GiB"), SplitConfig(n_ctx=4096, type_k="q8_0", type_v="q8_0"))
    assert q.device("SIM0").kv_bytes == 6 * 4096 * 320 // 32 * 34


def test_mla_refuses_different_k_and_v_types_as_llama_cpp_does(models):
    with pytest.raises(ConfigError, match="different K \\(q8_0\\) and V \\(f16\\)"):
        plan(models["deepseek2"], parse_sim_spec("24GiB"), SplitConfig(type_k="q8_0"))


def test_deepseek4_refuses_different_k_and_v_types_as_llama_cpp_does(models):
    # llama_init_from_model: "model does not support different K (q8_0) and V (f16) cache types"
    with pytest.raises(ConfigError, match="different K \\(q8_0\\) and V \\(f16\\)"):
        plan(models["deepseek4"], parse_sim_spec("24GiB"), SplitConfig(type_k="q8_0", flash_attn="off"))


@pytest.mark.parametrize("flash_attn", ["on", "auto"])
def test_plm_refuses_flash_attention_where_llama_cpp_aborts(models, flash_attn):
    # llama.cpp aborts making the context (GGML_ASSERT(a->ne[0] == b->ne[0]) in ggml_set_rows from build_attn)
    with pytest.raises(ConfigError, match="use -fa off"):
        plan(models["plm"], parse_sim_spec("24GiB"), SplitConfig(flash_attn=flash_attn))
    # with it off: K 192 and V 128 per head, 16 KV heads, 6 layers, 1024 cells (llama.cpp logs 60.00 MiB)
    p = plan(models["plm"], parse_sim_spec("24GiB"), SplitConfig(n_ctx=1024, flash_attn="off"))
    assert p.device("SIM0").kv_bytes == 6 * 1024 * 16 * (192 + 128) * 2 == 60 * MiB


def test_expert_id_tables_are_written_as_i32():
    # deepseek4's hash routing reads ffn_gate_tid2eid with ggml_get_rows as expert ids: ggml asserts I32
    from gpulab.sources.arch_models import tensor_type
    assert tensor_type("blk.0.ffn_gate_tid2eid.weight", (2, 8192)) == "I32"
    assert tensor_type("blk.0.ffn_gate_inp.weight", (1024, 8)) == "F32"


@pytest.mark.parametrize("arch,expected", [
    # MLA: 6 trunk layers x 1024 cells x (K 320 + indexer K 64) f16 (llama.cpp logs 4.50 MiB, -sm none)
    ("deepseek32", 6 * 1024 * (320 + 64) * 2),
    ("glm-dsa", 6 * 1024 * (320 + 64) * 2),
    # K and V 256 on 6 layers, and the indexer's K 64 and V 64 on the 5 after the leading dense one (7.25 MiB)
    ("minimax-m3", 1024 * (6 * (256 + 256) + 5 * (64 + 64)) * 2),
    # llama_memory_hybrid_idx: K and V 256 on the one attention layer of 6 (full_attention_interval 4), the
    # indexer's K 64 there and no V (llama.cpp logs 1.12 MiB on the device that holds it)
    ("qwen4exp", 1024 * (256 + 256 + 64) * 2),
])
def test_indexer_key_cache_is_counted_beside_the_kv_cache(models, arch, expected):
    p = plan(models[arch], parse_sim_spec("24GiB"), SplitConfig(n_ctx=1024, flash_attn="on"))
    assert p.device("SIM0").kv_bytes == expected
    assert not [d for d in p.doubts if d.term == "kv"]


def test_dots3note_indexer_cache_holds_every_cell_of_its_window_layers(models):
    """llama_kv_cache_dsa_iswa (src/llama-kv-cache-dsa-iswa.cpp): the window layers' MLA K (320) in the SWA cache,
    pad(512 + 512, 256) = 1024 cells; the indexer cache (llama_kv_cache_dsa, no window) holds every cell of every
    layer whose indexer is full, its row n_embd_head_k_swa (320: only n_embd_head_k_full is set to the indexer's
    64, src/llama-kv-cache-dsa.cpp). llama.cpp -ts 1,1 -c 1024 on 2 RPC devices logs 5.00 and 2.50 MiB (the
    window's half alone: 2.50 and 1.25); -c 2048 -ctk q8_0 -ts 3,1: 5.97 MiB on RPC0."""
    prof = models["dots3note"]
    assert all(la.is_swa and la.n_embd_k_idx == 320 for la in prof.layers)
    p = plan(prof, parse_sim_spec("24GiB,24GiB"), SplitConfig(n_ctx=1024, tensor_split=(1, 1)))
    assert p.device("SIM0").kv_bytes == 4 * (1024 + 1024) * 320 * 2 == 5 * MiB
    assert p.device("SIM1").kv_bytes == 2 * (1024 + 1024) * 320 * 2 == 2.5 * MiB
    q8 = SplitConfig(n_ctx=2048, tensor_split=(3, 1), type_k="q8_0", type_v="q8_0", flash_attn="on")
    assert plan(prof, parse_sim_spec("24GiB,24GiB"), q8).device("SIM0").kv_bytes == 6 * (1024 + 2048) * 340
    assert not [d for d in p.doubts if d.term == "kv"]


def test_granite_switch_router_layer_is_placed_with_its_own_cache(models):
    prof = models["graniteswitch"]
    # block_count 6, and the router's attention layer at index 6: no weights, one head, one KV head
    assert prof.n_layer == 7 and prof.layers[6].tensors == () and prof.layers[6].n_embd_k_gqa == 64
    p = plan(prof, parse_sim_spec("24GiB,24GiB"), SplitConfig(n_ctx=1024, flash_attn="on", tensor_split=(1, 1)))
    # llama.cpp -ts 1,1 on 2 RPC devices: layers 0-3 and 4-6 + output; KV 4.00 and 2.25 MiB
    assert p.layers_on("SIM1") == [4, 5, 6, 7]
    assert p.device("SIM0").kv_bytes == 4 * 1024 * 512 * 2 == 4 * MiB
    assert p.device("SIM1").kv_bytes == (2 * 512 + 128) * 1024 * 2 == 2.25 * MiB


@pytest.mark.parametrize("arch", ["deepseek2", "glm4moe"])
def test_mtp_layer_is_placed_but_not_loaded(models, arch):
    prof = models[arch]
    assert prof.n_nextn == 1 and prof.n_layer == 7 and prof.n_layer_main == 6
    mtp = prof.layers[6]
    assert mtp.is_nextn and mtp.tensors == () and mtp.weights_bytes == 0 and not mtp.has_kv
    assert {t.name for t in mtp.mtp_tensors} >= {"blk.6.nextn.eh_proj.weight", "blk.6.ffn_gate_exps.weight"}
    assert prof.mtp_weights_bytes > 30 * MiB
    # -ts 5,2: the MTP layer (and the output) alone on SIM1: weights are only the output layer's
    p = plan(prof, parse_sim_spec("24GiB,24GiB"), SplitConfig(tensor_split=(5, 2)))
    assert p.layers_on("SIM1") == [6, 7]
    assert p.device("SIM1").weights_bytes == prof.output_weights_bytes
    assert p.device("SIM1").kv_bytes == 0


def test_recurrent_state_per_layer_and_sequence(models):
    qn = models["qwen3next"]
    # n_embd_r = (d_conv - 1) * (d_inner + 2 * n_group * d_state) = 3 * (1024 + 2 * 4 * 128);
    # n_embd_s = d_state * d_inner = 128 * 1024; f32; attention every 4th layer
    assert [layer.n_embd_r for layer in qn.layers] == [6144, 6144, 6144, 0] * 2
    assert [layer.n_embd_s for layer in qn.layers] == [131072, 131072, 131072, 0] * 2
    per_layer = 4 * (6144 + 131072)
    p = plan(qn, parse_sim_spec("24GiB,24GiB"), SplitConfig(tensor_split=(1, 1), n_ctx=1024))
    assert p.layers_on("SIM0") == [0, 1, 2, 3, 4] and p.device("SIM0").state_bytes == 4 * per_layer
    assert p.device("SIM1").state_bytes == 2 * per_layer
    assert p.device("SIM0").used_bytes == (p.device("SIM0").weights_bytes + p.device("SIM0").kv_bytes
                                           + 4 * per_layer + p.device("SIM0").compute_bytes)
    four = plan(qn, parse_sim_spec("24GiB,24GiB"), SplitConfig(tensor_split=(1, 1), n_ctx=1024, n_seq_max=4))
    assert four.device("SIM0").state_bytes == 4 * 4 * per_layer      # one cell per sequence
    assert plan(qn, parse_sim_spec("24GiB"), SplitConfig(n_ctx=1024)).to_dict()["devices"][0]["state_bytes"] \
        == 6 * per_layer


def test_pure_recurrent_model_has_state_and_no_kv(models):
    mb = models["mamba2"]
    # (d_conv - 1) * (d_inner + 2 * n_group * d_state) and d_state * d_inner, f32: llama.cpp logs 6.16 MiB
    rows = {(layer.n_embd_r, layer.n_embd_s, layer.has_kv) for layer in mb.layers}
    assert rows == {(3 * (2048 + 2 * 128), 128 * 2048, False)}
    p = plan(mb, parse_sim_spec("24GiB"), SplitConfig(n_ctx=4096))
    assert p.device("SIM0").state_bytes == 6 * 4 * (6912 + 262144) and p.device("SIM0").kv_bytes == 0
    assert p.doubts == ()      # its compute: replayed (gpulab.core.placement.recurrent), exact


def test_doubts_are_silent_where_exact_and_one_line_per_term_elsewhere(models, monkeypatch):
    sim = parse_sim_spec("24GiB,24GiB")
    assert plan(models["llama"], sim, SplitConfig(split_mode="none")).doubts == ()
    assert plan(models["gemma3"], sim, SplitConfig(n_gpu_layers=5, tensor_split=(1, 1))).doubts == ()
    # pipelined, the output layer's device also holds layers: stated for a checked graph the matrix did not find
    # exact (none is left: a checked architecture stands in); exact for llama's and gemma3's graphs
    # (coverage.COMPUTE_EXACT), quantized cache or not
    checked = replace(models["gemma3"], arch="checked-only")
    monkeypatch.setattr(coverage, "COMPUTE_CHECKED", coverage.COMPUTE_CHECKED | {"checked-only"})
    assert [d.bound_bytes for d in plan(checked, sim, SplitConfig()).doubts] == [int(2.1 * MiB)]
    assert plan(models["gemma3"], sim, SplitConfig()).doubts == ()
    assert plan(models["llama4"], sim, SplitConfig(type_k="q4_0", type_v="q4_0", flash_attn="on")).doubts == ()
    assert plan(models["llama"], sim, SplitConfig()).doubts == ()
    assert plan(models["llama"], sim, SplitConfig(type_k="q8_0", type_v="q8_0", flash_attn="on")).doubts == ()
    # hybrid recurrent graphs: replayed (placement.recurrent), so silent; one that gpulab does not replay says so
    assert plan(models["qwen3next"], sim, SplitConfig()).doubts == ()
    jd = plan(replace(models["qwen3next"], arch="jamba"), sim, SplitConfig()).doubts
    assert len(jd) == 1 and jd[0].text.startswith("compute: jamba's recurrent layers are not modelled") \
        and jd[0].term == "compute"
    # absorbed MLA (attn_k_b/attn_v_b) is modelled; the older graph (one attn_kv_b) is not
    assert plan(models["deepseek2"], sim, SplitConfig()).doubts == ()
    ds = models["deepseek2"]
    kv_b = replace(ds, layers=tuple(replace(layer, tensors=tuple(t for t in layer.tensors if "attn_k_b" not in t.name))
                                    for layer in ds.layers))
    old = plan(kv_b, sim, SplitConfig())
    assert len(old.doubts) == 1 and "MLA" in str(old.doubts[0])
    assert old.to_dict()["doubts"] == [old.doubts[0].text]
    assert plan(models["llama"], sim, SplitConfig(offload_kqv=False)).doubts[0].text.startswith("compute: with the KV")
    # expert outputs 4x as wide as an expert's up projection (DeepSeek-V3: 3.5x): the closed forms' MoE rules were
    # derived at 2x; variants of the generated models at 4x were up to two row sets off (4.0 MiB at n_embd 1024, 512
    # tokens). qwen2moe is sized by them; deepseek2's graph is replayed op by op (placement.dense), at any width
    def narrow(prof):
        return replace(prof, layers=tuple(replace(layer, tensors=tuple(
            replace(t, shape=(t.shape[0], 256, *t.shape[2:])) if "up_exps" in t.name else t
            for t in layer.tensors)) for layer in prof.layers))
    wide = plan(narrow(models["qwen2moe"]), sim, SplitConfig()).doubts
    assert [(d.term, d.bound_bytes) for d in wide] == [("compute", 2 * 4 * 1024 * 512 + 64 * 1024)]
    assert wide[0].text.startswith("compute: qwen2moe's expert outputs are 4.0x as wide")
    assert plan(narrow(ds), sim, SplitConfig()).doubts == ()
    # settings: a quantized cache; a MoE split between host and devices
    quantized = plan(checked, sim, SplitConfig(type_k="q8_0", split_mode="none"))
    assert [d.bound_bytes for d in quantized.doubts] == [int(2.2 * MiB)]
    moe = plan(models["qwen3moe"], sim, SplitConfig(n_gpu_layers=4, tensor_split=(1, 1))).doubts
    assert [d.text.split(",")[0] for d in moe] == ["compute: MoE layers split between the host and devices"]


@pytest.mark.parametrize("arch,kv,expected", [
    # Mamba-130m: (d_conv - 1) * d_inner conv rows, d_state * d_inner SSM state
    ("mamba", {"mamba.ssm.conv_kernel": 4, "mamba.ssm.inner_size": 1536, "mamba.ssm.state_size": 16}, (4608, 24576)),
    # RWKV-6 1.6B: token_shift_count (default 2) x n_embd, n_embd x head size
    ("rwkv6", {"rwkv6.wkv.head_size": 64}, (2 * 2048, 2048 * 64)),
    # LFM2: n_embd x (l_cache - 1) short-convolution rows, no SSM state
    ("lfm2", {"lfm2.shortconv.l_cache": 3}, (2 * 2048, 0)),
])
def test_state_rows_follow_llama_hparams(arch, kv, expected):
    from gpulab.sources.gguf_arch import _state_row
    assert _state_row(arch, kv, 2048, 32, 64, ValueError) == expected


def test_exaone4_never_loads_its_mtp_layer(models):
    ex = models["exaone4"]
    assert ex.n_nextn == 1 and ex.mtp_never_loaded and ex.layers[6].tensors == () and ex.layers[6].mtp_tensors
    assert not models["glm4moe"].mtp_never_loaded      # glm4moe loads them with MTP on


def test_discovered_models_hold_the_tensors_llama_cpp_asked_for(models):
    """scripts/discover_arch_models.py wrote what the vendored llama.cpp's loader asked for: falcon
    (src/models/falcon.cpp) has a fused QKV of n_embd + 2 x 4 KV heads x 64 columns and no FFN gate."""
    from gpulab.sources.arch_models import DISCOVERED
    assert len(DISCOVERED) >= 85 and "falcon" in DISCOVERED and "llama" not in DISCOVERED
    falcon = models["falcon"]
    assert [(t.name, t.shape) for t in falcon.layers[0].tensors] == [
        ("blk.0.attn_norm.weight", (1024,)), ("blk.0.attn_norm.bias", (1024,)),
        ("blk.0.attn_qkv.weight", (1024, 1536)), ("blk.0.attn_output.weight", (1024, 1024)),
        ("blk.0.ffn_down.weight", (3072, 1024)), ("blk.0.ffn_up.weight", (1024, 3072))]
    assert falcon.layers[0].weights_bytes == 2 * 4096 + (1536 + 1024 + 2 * 3072) * 1024 * 2 == 17833984
    # gemma4 creates its per-layer-input projection with layer 0 (create_tensor(..., "weight", 0))
    assert "per_layer_model_proj.weight" in {t.name for t in models["gemma4"].layers[0].tensors}


def test_token_norm_and_conv1d_are_layer_zeros(models):
    """token_embd_norm and wavtokenizer-dec's conv1d are LLM_TENSOR_LAYER_REPEATING tensors created with bid 0
    (llama-arch.cpp; src/models/bert.cpp, wavtokenizer-dec.cpp): llama.cpp puts them on layer 0's device. The
    conv1d kernel (7 x 1024 x 1024 f32, 28 MiB) was left unplaced before: 28.02 MiB low on that device."""
    layer0 = {t.name: t.n_bytes for t in models["wavtokenizer-dec"].layers[0].tensors}
    assert layer0["conv1d.weight"] == 7 * 1024 * 1024 * 4 and layer0["token_embd_norm.weight"] == 4096
    assert {"token_embd_norm.weight", "token_embd_norm.bias"} <= {t.name for t in models["bert"].layers[0].tensors}
    assert not models["wavtokenizer-dec"].other_tensors and not models["bert"].other_tensors
    # lfm2's token_embd_norm is its output norm (LLM_TENSOR_OUTPUT_NORM_LFM2)
    assert "token_embd_norm.weight" in {t.name for t in models["lfm2"].output_tensors}


def test_a_discovered_architecture_states_its_measured_compute_doubt(models, monkeypatch):
    # a graph sized as llama's states the worst error the matrix measured (scripts/arch_coverage.py --bounds
    # writes the table) as the doubt's bound, in units a person reads. Every matrix architecture is now replayed,
    # exact or states another doubt, so llama's graph under a name gpulab does not know stands in.
    sim = parse_sim_spec("24GiB,24GiB")
    other = replace(models["llama"], arch="discovered")
    monkeypatch.setitem(coverage.COMPUTE_MEASURED_MIB, "discovered", 5.5)
    (d,) = plan(other, sim, SplitConfig()).doubts
    assert d.term == "compute" and d.text == "compute: discovered's graph is sized as a llama-like graph " \
        "(measured up to 5.50 MiB off per device)" and d.bound_bytes == int(5.5 * MiB)
    monkeypatch.delitem(coverage.COMPUTE_MEASURED_MIB, "discovered")
    (d,) = plan(other, sim, SplitConfig()).doubts
    assert d.text == "compute: discovered's graph is sized as a llama-like graph; not checked against llama.cpp" \
        and d.bound_bytes == 0


@pytest.mark.parametrize("arch,config,expected", [
    # -cmoe: the experts' products run on the host, with the router's choice (the argsort's top-k view, all
    # of its rows) and the normed hidden state copied there
    ("qwen3next", SplitConfig(tensor_split=(1, 1), n_ctx=1024, devices=("RPC0", "RPC1"), cpu_moe=True),
     {"RPC0": 23.02, "RPC1": 30.62, "CPU": 17.04}),
    ("qwen3next", SplitConfig(tensor_split=(1, 1), n_ctx=1024, devices=("RPC0", "RPC1"), n_cpu_moe=3),
     {"RPC0": 23.02, "RPC1": 31.01, "CPU": 17.04}),
    ("lfm2", SplitConfig(tensor_split=(1, 1), n_ctx=1024, devices=("RPC0", "RPC1"), n_cpu_ffn=2),
     {"RPC0": 22.01, "RPC1": 25.02, "CPU": 23.01}),
])
def test_replayed_recurrent_graphs_follow_tensor_overrides(models, arch, config, expected):
    """Compute buffers (MiB, as llama.cpp logs them for these files on two CPU RPC devices) with FFN weights
    moved by overrides: gpulab.core.placement.recurrent runs each product where its weight is."""
    p = plan(models[arch], [Device(name=f"RPC{i}", total_bytes=64 << 30, free_bytes=64 << 30, source="rpc",
                                   kind="rpc") for i in range(2)], config)
    assert {d.name: round(d.compute_bytes / MiB, 2) for d in p.devices} == expected


def test_a_discovered_architecture_found_exact_is_silent(models):
    """glm4's loader builds llama's graph: the matrix found it within 1 MiB in every setting."""
    assert plan(models["glm4"], parse_sim_spec("24GiB,24GiB"), SplitConfig(split_mode="none")).doubts == ()
