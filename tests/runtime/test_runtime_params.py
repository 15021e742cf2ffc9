"""SplitConfig -> llama.cpp: the structs for in-process loads and the Llama() keywords."""

from __future__ import annotations

import ctypes
from dataclasses import fields

import pytest

from gpulab.core.config import SplitConfig
from gpulab.core.devices import Device
from gpulab.core.errors import ConfigError
from gpulab.core.settings import SETTINGS
from gpulab.runtime.params import llama_kwargs, llama_kwargs_gaps, llama_params

llama_cpp = pytest.importorskip("llama_cpp")


def _ts(mp) -> list[float]:
    return [mp.tensor_split[i] for i in range(llama_cpp.llama_max_devices())]


def test_every_splitconfig_field_is_mapped():
    assert {f.name for f in fields(SplitConfig)} == {f.attr for f in SETTINGS}


def test_defaults():
    mp, cp = llama_params(SplitConfig())
    assert (mp.n_gpu_layers, mp.split_mode, mp.main_gpu) == (-1, 1, 0)
    assert _ts(mp) == [0.0] * llama_cpp.llama_max_devices()
    assert mp.devices is None and mp.no_alloc is False
    assert (cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max) == (4096, 2048, 512, 1)
    assert (cp.type_k, cp.type_v) == (1, 1)            # GGML_TYPE_F16
    assert cp.flash_attn_type == -1                    # LLAMA_FLASH_ATTN_TYPE_AUTO
    assert cp.offload_kqv is True
    assert cp.swa_full is False                        # llama.cpp's struct default is true; -swa-full's is off
    assert cp.op_offload is True


def test_every_setting_reaches_the_structs():
    c = SplitConfig(n_gpu_layers=12, split_mode="row", main_gpu=1, tensor_split=(3, 1), n_ctx=1000,
                    n_batch=256, n_ubatch=128, type_k="q8_0", type_v="q4_0", flash_attn="on",
                    offload_kqv=False, n_seq_max=4, swa_full=True, op_offload=False)
    mp, cp = llama_params(c)
    assert (mp.n_gpu_layers, mp.split_mode, mp.main_gpu) == (12, 2, 1)
    assert _ts(mp)[:3] == [3.0, 1.0, 0.0]
    assert (cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max) == (1000, 256, 128, 4)
    assert (cp.type_k, cp.type_v) == (8, 2)            # GGML_TYPE_Q8_0, GGML_TYPE_Q4_0
    assert cp.flash_attn_type == 1 and cp.offload_kqv is False and cp.swa_full is True and cp.op_offload is False
    assert llama_params(c.replace(flash_attn="off", type_v="f16"))[1].flash_attn_type == 0
    assert llama_params(c.replace(split_mode="none"))[0].split_mode == 0


def test_tensor_split_array_stays_alive():
    mp, _ = llama_params(SplitConfig(tensor_split=(1, 2, 3)))
    import gc
    gc.collect()
    assert _ts(mp)[:4] == [1.0, 2.0, 3.0, 0.0]
    assert any(isinstance(x, ctypes.Array) for x in mp._gpulab_keep)


def test_dry_run_sets_no_alloc_and_no_mmap():
    mp, _ = llama_params(SplitConfig(), dry_run=True)
    assert mp.no_alloc is True
    assert mp.load_mode == 0   # LLAMA_LOAD_MODE_NONE: no_alloc with mmap aborts in load_tensors


def test_device_none_is_an_empty_null_terminated_list():
    mp, _ = llama_params(SplitConfig(devices=("none",)))
    assert mp.devices   # not NULL: NULL would mean "every device"
    assert ctypes.cast(mp.devices, ctypes.POINTER(ctypes.c_void_p))[0] is None


def test_device_errors():
    with pytest.raises(ConfigError, match="no device 'NOPE'"):
        llama_params(SplitConfig(devices=("NOPE",)))
    with pytest.raises(ConfigError, match="CPU is not an offload device"):
        llama_params(SplitConfig(devices=("CPU",)))


def test_checked_against_the_devices_given():
    devs = [Device(f"RPC{i}", 10, 10, "rpc", "rpc", endpoint=f"h:{i}") for i in range(2)]
    llama_params(SplitConfig(tensor_split=(1, 1)), devs)
    with pytest.raises(ConfigError, match="only 2 devices"):
        llama_params(SplitConfig(tensor_split=(1, 1, 1)), devs)
    with pytest.raises(ConfigError, match="main_gpu 2"):
        llama_params(SplitConfig(split_mode="none", main_gpu=2), devs)
    with pytest.raises(ConfigError, match="RPC7"):
        llama_params(SplitConfig(devices=("RPC7",)), devs)
    with pytest.raises(ConfigError, match="at most 16"):
        llama_params(SplitConfig(tensor_split=(1,) * 17))


def test_llama_kwargs_defaults_and_gaps():
    kw = llama_kwargs(SplitConfig())
    assert kw == {"n_gpu_layers": -1, "split_mode": 1, "main_gpu": 0, "n_ctx": 4096, "n_batch": 2048,
                  "n_ubatch": 512, "type_k": 1, "type_v": 1, "offload_kqv": True, "swa_full": False}
    gaps = llama_kwargs_gaps(SplitConfig())
    assert len(gaps) == 1 and "flash_attn='auto'" in gaps[0]
    with pytest.raises(ConfigError, match="flash_attn='auto'"):
        llama_kwargs(SplitConfig(), strict=True)
    c = SplitConfig(flash_attn="on", tensor_split=(1, 3), devices=("RPC0",), n_seq_max=2)
    kw = llama_kwargs(c)
    assert kw["flash_attn"] is True and kw["tensor_split"] == [1.0, 3.0]
    assert "devices" not in kw and "n_seq_max" not in kw
    assert len(llama_kwargs_gaps(c)) == 2
    assert llama_kwargs(SplitConfig(flash_attn="off"), strict=True)["flash_attn"] is False


def test_llama_kwargs_give_llama_the_same_structs(tmp_path):
    """Llama(**llama_kwargs(c)) fills llama.cpp's structs as llama_params(c) does.

    Llama.__init__ fills its params before it checks the path, so a missing path stops it
    right after, before anything is loaded."""
    c = SplitConfig(n_gpu_layers=7, split_mode="row", main_gpu=1, tensor_split=(2, 1), n_ctx=300,
                    n_batch=200, n_ubatch=100, type_k="q8_0", type_v="q8_0", flash_attn="on",
                    offload_kqv=False, swa_full=True, op_offload=False)
    assert llama_kwargs_gaps(c) == []
    llm = llama_cpp.Llama.__new__(llama_cpp.Llama)
    with pytest.raises(ValueError, match="does not exist"):
        llm.__init__(model_path=str(tmp_path / "absent.gguf"), verbose=False, **llama_kwargs(c))
    mp, cp = llama_params(c)
    for f in SETTINGS:
        if f.c_field is None:
            continue
        ours = getattr(mp if f.struct == "model" else cp, f.c_field)
        theirs = getattr(llm.model_params if f.struct == "model" else llm.context_params, f.c_field)
        assert ours == theirs, f.attr
    assert _ts(mp) == [llm.model_params.tensor_split[i] for i in range(llama_cpp.llama_max_devices())]


def test_llama_without_swa_full_loads_the_full_cache_so_gpulab_always_passes_it():
    """llama_cpp.Llama(swa_full=None) leaves the C default, which is true (a full-size cache for
    sliding-window layers); llama-server and llama-bench use false, and so does gpulab's plan. The
    export and gpulab's own loads therefore always pass it."""
    assert llama_cpp.llama_context_default_params().swa_full is True
    import inspect
    assert inspect.signature(llama_cpp.Llama.__init__).parameters["swa_full"].default is None
    assert llama_kwargs(SplitConfig())["swa_full"] is False
    assert llama_params(SplitConfig())[1].swa_full is False
