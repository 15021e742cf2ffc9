"""Saved allocations: saved, found again, applied; refused for devices that are gone; files of
gpulab 0.1 ("allocation profiles") still found."""

from __future__ import annotations

import json

import pytest

from gpulab.cli import main
from gpulab.core.config import SplitConfig
from gpulab.core.devices import Device, parse_sim_spec
from gpulab.core.errors import AllocationMismatchError
from gpulab.sources.fingerprint import model_fingerprint
from gpulab.sources.synth import SynthSpec, write_model
from gpulab.storage.allocations import (
    allocations_for,
    config_for,
    delete_allocation,
    find_allocation,
    list_allocations,
    save_allocation,
)
from gpulab.storage.files import read_toml, to_toml

GiB = 1024**3


@pytest.fixture(autouse=True)
def config_home(tmp_path, monkeypatch):
    monkeypatch.setenv("GPULAB_CONFIG_DIR", str(tmp_path / "cfg"))
    return tmp_path / "cfg"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("prof") / "m.gguf",
                       SynthSpec(n_layer=6, n_embd=256, n_ff=512, n_head=8, n_head_kv=2, n_vocab=512))


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("prof2") / "m.gguf",
                       SynthSpec(n_layer=7, n_embd=256, n_ff=512, n_head=8, n_head_kv=2, n_vocab=512))


def gpu(i: int, total: int = 24 * GiB) -> Device:
    return Device(f"CUDA{i}", total, total - GiB, "nvml", "gpu", uuid=f"GPU-{i}{i}{i}-uuid", description="RTX")


def test_saved_allocation_is_found_and_applied(model, config_home):
    devs = [gpu(0), gpu(1)]
    cfg = SplitConfig(tensor_split=(3, 1), n_ctx=8192, type_k="q8_0", type_v="q8_0", flash_attn="on")
    prof = save_allocation(model, cfg, devs, measurement={"objective": "tg", "tg_tokens_per_s": 41.25, "n_gen": 128})
    assert prof.path.parent == config_home / "allocations" and prof.path.suffix == ".toml"
    doc = read_toml(prof.path)
    assert doc["version"] == 2 and doc["model_fingerprint"] == model_fingerprint(model)
    assert doc["config"]["tensor_split"] == [3.0, 1.0] and doc["config"]["devices"] == ["CUDA0", "CUDA1"]
    assert [d["uuid"] for d in doc["devices"]] == ["GPU-000-uuid", "GPU-111-uuid"]
    assert doc["measurement"] == {"objective": "tg", "tg_tokens_per_s": 41.25, "n_gen": 128}

    found = find_allocation(model, devs)
    assert found is not None and found.measurement["tg_tokens_per_s"] == 41.25
    applied = config_for(model, devs, SplitConfig())
    assert applied == cfg.replace(devices=("CUDA0", "CUDA1"))
    # an extra GPU does not shift the split: the allocation names its devices
    assert config_for(model, [gpu(0), gpu(1), gpu(2)]).devices == ("CUDA0", "CUDA1")


def test_renumbered_gpus_are_followed_by_uuid(model):
    save_allocation(model, SplitConfig(tensor_split=(3, 1)), [gpu(0), gpu(1)])
    # CUDA_VISIBLE_DEVICES=1,0 later: same GPUs, swapped names
    swapped = [Device("CUDA0", 24 * GiB, 23 * GiB, "nvml", "gpu", uuid="GPU-111-uuid"),
               Device("CUDA1", 24 * GiB, 23 * GiB, "nvml", "gpu", uuid="GPU-000-uuid")]
    assert config_for(model, swapped).devices == ("CUDA1", "CUDA0")


def test_allocation_for_a_missing_device_is_refused(model):
    save_allocation(model, SplitConfig(tensor_split=(1, 1)), [gpu(0), gpu(1)])
    with pytest.raises(AllocationMismatchError, match=r"CUDA1 \(24.00 GiB, GPU-111-uuid\).*not present now"):
        config_for(model, [gpu(0)], SplitConfig())
    # another GPU in its place (same name, another UUID) is not the same device
    with pytest.raises(AllocationMismatchError, match="GPU-111-uuid"):
        config_for(model, [gpu(0), Device("CUDA1", 24 * GiB, GiB, "nvml", "gpu", uuid="GPU-999")])
    assert config_for(model, [gpu(0)], SplitConfig(n_ctx=77), on_mismatch="default").n_ctx == 77
    assert find_allocation(model, [gpu(0)]) is None


def test_no_allocation_gives_the_default(model, other_model):
    assert config_for(model, [gpu(0)], SplitConfig(n_ctx=123)).n_ctx == 123
    save_allocation(model, SplitConfig(n_ctx=999), [gpu(0)])
    assert config_for(other_model, [gpu(0)], SplitConfig(n_ctx=123)).n_ctx == 123   # keyed by model
    assert config_for(model, [gpu(0)]).n_ctx == 999


def test_one_allocation_per_model_and_device_set(model):
    save_allocation(model, SplitConfig(n_ctx=1000), [gpu(0)])
    save_allocation(model, SplitConfig(n_ctx=2000), [gpu(0)])     # replaces it
    save_allocation(model, SplitConfig(n_ctx=3000), [gpu(1)])
    assert len(allocations_for(model)) == 2 and len(list_allocations()) == 2
    assert config_for(model, [gpu(0)]).n_ctx == 2000
    delete_allocation(find_allocation(model, [gpu(0)]))
    assert [p.config.n_ctx for p in allocations_for(model)] == [3000]


def test_split_none_and_sim_and_rpc_devices(model):
    rpc = [Device("RPC0", 8 * GiB, 8 * GiB, "rpc", "rpc", endpoint="127.0.0.1:50052"),
           Device("RPC1", 8 * GiB, 8 * GiB, "rpc", "rpc", endpoint="127.0.0.1:50053")]
    save_allocation(model, SplitConfig(split_mode="none", main_gpu=1), rpc)
    cfg = config_for(model, rpc)
    assert cfg.devices == ("RPC0", "RPC1") and cfg.main_gpu == 1 and cfg.split_mode == "none"
    # RPC servers registered in the other order: followed by endpoint
    swapped = [Device("RPC0", 8 * GiB, 8 * GiB, "rpc", "rpc", endpoint="127.0.0.1:50053"),
               Device("RPC1", 8 * GiB, 8 * GiB, "rpc", "rpc", endpoint="127.0.0.1:50052")]
    assert config_for(model, swapped).devices == ("RPC1", "RPC0")
    sim = parse_sim_spec("24GiB,12GiB")
    save_allocation(model, SplitConfig(tensor_split=(2, 1)), sim)
    assert config_for(model, sim).devices == ("SIM0", "SIM1")
    with pytest.raises(AllocationMismatchError, match="SIM1"):
        config_for(model, parse_sim_spec("24GiB,24GiB"))   # another size is another device


def test_the_fingerprint_of_a_file_never_changes(tmp_path):
    # results and saved allocations on disk are keyed by it: a new formula would orphan them all
    big = tmp_path / "big.gguf"          # size, first MiB and last MiB
    big.write_bytes(b"GGUF" + bytes(i % 251 for i in range(3 << 20)))
    small = tmp_path / "small.gguf"      # under a MiB: the whole file, once
    small.write_bytes(b"GGUF" + bytes(i % 251 for i in range(1000)))
    assert (model_fingerprint(big), model_fingerprint(small)) == ("b00c87397b201046", "78b61d5ced113177")


def test_a_fingerprint_follows_the_content_not_the_name(model, other_model, tmp_path):
    h = model_fingerprint(model)
    assert model_fingerprint(other_model) != h
    copy = tmp_path / "renamed.gguf"
    copy.write_bytes(model.read_bytes())
    assert model_fingerprint(copy) == h    # a moved or renamed file keeps its allocations
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF                       # the last weights differ: another model
    changed = tmp_path / "changed.gguf"
    changed.write_bytes(bytes(data))
    assert model_fingerprint(changed) != h


def test_toml_writer_round_trips_through_tomllib():
    doc = {"s": 'a "quoted"\\ \n\ttab \x01 ü', "i": -3, "f": 0.1, "big": 1e300, "inf": float("inf"), "b": True,
           "l": [1.5, 2.0], "e": [], "ls": ["x", "y"],
           "t": {"k": "v", "with space": 1}, "arr": [{"a": 1}, {"a": 2, "b": "c"}]}
    from gpulab.storage.files import tomllib
    back = tomllib.loads(to_toml(doc))
    assert back == doc


def test_cli_save_show_list_delete(model, capsys, word="alloc"):
    assert main([word, "save", str(model), "--sim", "24GiB,12GiB", "-ts", "2,1", "-c", "2048"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("saved ")
    assert main([word, "show", str(model), "--sim", "24GiB,12GiB", "--to", "llama-server"]) == 0
    out = capsys.readouterr().out
    toml_part = out.split("\n# --- llama-server ---")[0].split("\n", 1)[1]
    from gpulab.storage.files import tomllib
    assert tomllib.loads(toml_part)["config"]["tensor_split"] == [2.0, 1.0]
    assert "-ts 2,1 --device SIM0,SIM1 -c 2048" in out
    assert main([word, "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 1 and rows[0]["devices"] == ["SIM0", "SIM1"]
    assert main([word, "list"]) == 0
    assert "m.gguf" in capsys.readouterr().out
    # another device set: the saved allocation is refused by name, exit 2 and one line
    assert main([word, "show", str(model), "--sim", "24GiB"]) == 2
    err = capsys.readouterr().err
    assert "SIM1 (12.00 GiB" in err and "not present now" in err and err.count("\n") == 1
    assert main(["export", str(model), "--sim", "24GiB,12GiB", "--from-alloc", "--to", "llama-bench"]) == 0
    assert "-ts 2/1 -dev SIM0/SIM1" in capsys.readouterr().out
    assert main([word, "delete", str(model), "--all"]) == 0
    capsys.readouterr()
    assert main([word, "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert main([word, "delete", str(model), "--all"]) == 1


def test_cli_export_all_targets(model, capsys):
    assert main(["export", str(model), "--sim", "24GiB,24GiB", "-ts", "3,1", "-c", "4096"]) == 0
    out, err = capsys.readouterr()
    for t in ("llama-server", "llama-bench", "python", "ollama", "koboldcpp"):
        assert f"# --- {t} ---" in out
    assert "gpulab: note: ollama:" in err and "SIM0, SIM1: not CUDA devices" in err
    assert main(["export", str(model), "--sim", "24GiB", "--to", "python", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["python"]["data"]["n_gpu_layers"] == -1
    assert main(["export", str(model), "--sim", "24GiB", "--to", "python", "--strict"]) == 2
    assert "flash_attn='auto'" in capsys.readouterr().err


def test_gpulab_load_applies_the_saved_allocation(tmp_path, monkeypatch):
    """gpulab.load(model) opens the model with the allocation saved for the devices present."""
    import gpulab
    from gpulab.runtime.llama_lib import llama_devices
    from gpulab.sources.demo import demo_model_path

    monkeypatch.setenv("GPULAB_CONFIG_DIR", str(tmp_path))
    model = demo_model_path()
    offload = [d for d in llama_devices() if d.is_offload]   # none on a CPU-only machine
    save_allocation(model, SplitConfig(n_gpu_layers=0, n_ctx=768, type_k="q8_0"), offload)
    with gpulab.load(model) as loaded:
        assert loaded.config.n_ctx == 768 and loaded.config.type_k == "q8_0"
        assert loaded.report.bytes_on("CPU", "kv") > 0
