"""Tensor overrides (-ot, --cpu-moe, --n-cpu-moe, --n-cpu-ffn) planned, against real llama.cpp.

Models written here: Mixtral-style MoEs (4 and 8 experts, untied), a qwen3moe (8 experts, tied
output) and a dense llama (Q4_0, whose host weights llama.cpp also repacks), loaded by llama.cpp
on three CPU RPC devices in a worker. Each expert tensor is over 1 MiB, so a misplaced one shows
beyond the tolerance. For every case:
  - every layer's device exactly llama.cpp's (the overrides must not move a layer);
  - every tensor llama.cpp logs as overridden is one the plan moved, to the same device;
  - weights and KV per offload device within 1% or 1 MiB; the host's CPU_Mapped span and
    CPU_REPACK copies each within 1% or 1 MiB of llama.cpp's buffers;
  - compute buffers on the offload devices within 25% (the host's too: it runs the moved FFNs).
The moe-balance policy's rules are checked the same way, on devices told they are small.
"""

from __future__ import annotations

import pytest

from builders import close_to_llama
from gpulab import SplitConfig, plan, read_profile
from gpulab.core.overrides import parse_llama_rpc_buffer_type
from gpulab.sources.host import host_device
from gpulab.testing import OVERRIDE_CASES, OVERRIDE_MODELS
from llama_tools import NOT_BUILT, tools_bin

MiB = 1024**2

MODELS, CASES = OVERRIDE_MODELS, OVERRIDE_CASES   # shared with bench/host_row.py


def _llama_names(config: SplitConfig, devices) -> SplitConfig:
    """The same rules with RPC devices named as llama.cpp names their buffer types."""
    from gpulab.core.overrides import llama_buffer_type_name
    by_name = {d.name: llama_buffer_type_name(d) for d in devices}
    items = []
    for item in config.tensor_overrides:
        pattern, _, target = item.partition("=")
        items.append(f"{pattern}={by_name.get(target, target)}")
    return config.replace(tensor_overrides=tuple(items))


@pytest.mark.parametrize("model_name,case,config", CASES, ids=[f"{m}-{c}" for m, c, _ in CASES])
def test_overrides_match_llama_cpp(model_name, case, config, model_paths, worker):
    devices = [d for d in worker.devices() if d.kind == "rpc"]
    n = len(config.tensor_split)
    config = config.replace(devices=tuple(d.name for d in devices[:n]))
    if "llama-name" in case:
        config = _llama_names(config, devices)
        assert "RPC0[" in config.tensor_overrides[0]
    predicted = plan(read_profile(model_paths[model_name]), devices, config, host_device())
    report, _ = worker.load(model_paths[model_name], config, check_fit=False)
    _assert_placed_as_llama_cpp(predicted, report, devices)


def _assert_placed_as_llama_cpp(predicted, report, devices) -> None:
    assert list(report.layer_devices) == list(predicted.layer_devices), "a layer moved"
    # every tensor llama.cpp says an override placed, on the device the plan has it
    by_endpoint = {(d.endpoint, d.server_index): d.name for d in devices}
    for tensor, buft in report.overridden:
        rpc = parse_llama_rpc_buffer_type(buft)
        where = by_endpoint[(rpc[1], rpc[0])] if rpc else ("CPU" if buft.startswith("CPU") else buft)
        home = predicted.moved_tensors.get(tensor)
        if home is None:      # a rule sent it where its layer is anyway (not moved)
            il = int(tensor.split(".")[1]) if tensor.startswith("blk.") else predicted.profile.n_layer
            home = predicted.layer_devices[il]
        assert where == home, f"{tensor}: llama.cpp {buft}, plan {home}"
    assert set(predicted.moved_tensors) <= {t for t, _ in report.overridden}

    for d in predicted.devices:
        got = report.kinds_by_device().get(d.name, {})
        assert close_to_llama(d.kv_bytes, got.get("kv", 0)), f"{d.name} KV: {d.kv_bytes} vs {got.get('kv', 0)}"
        if d.is_host:
            bufs = {b.buffer_type: b.n_bytes for b in report.buffers if b.device == "CPU" and b.kind == "model"}
            assert close_to_llama(d.mapped_bytes, bufs.get("CPU_Mapped", 0)), f"CPU_Mapped: {d.mapped_bytes} vs {bufs}"
            assert close_to_llama(d.repack_bytes, bufs.get("CPU_REPACK", 0)), f"CPU_REPACK: {d.repack_bytes} vs {bufs}"
        else:
            assert close_to_llama(d.weights_bytes, got.get("model", 0)), f"{d.name} weights: {d.weights_bytes} vs {got}"
        actual = got.get("compute", 0)
        if actual:
            assert abs(d.compute_bytes - actual) <= 0.25 * actual, \
                f"{d.name} compute: predicted {d.compute_bytes / MiB:.2f} MiB, llama.cpp {actual / MiB:.2f} MiB"


def test_moe_balance_plan_is_llama_cpps_placement(model_paths, worker):
    """The moe-balance policy on three RPC devices told they hold 36, 28 and 20 MiB: its -ts and
    -ot rules (experts to the CPU and to another RPC device), loaded by llama.cpp, place every
    layer and tensor as planned, and each device's weights, KV and compute as the policy counted."""
    from dataclasses import replace

    from gpulab.core.policies.moe_balance import moe_balance
    rpc = [d for d in worker.devices() if d.kind == "rpc"]
    small = [replace(d, total_bytes=f * MiB, free_bytes=f * MiB) for d, f in zip(rpc, (36, 28, 20))]
    config = SplitConfig(devices=tuple(d.name for d in small), n_ctx=512, n_batch=64, n_ubatch=64)
    b = moe_balance(read_profile(model_paths["mixtral-8x"]), small, config, host_device())
    targets = {item.rpartition("=")[2] for item in b.config.tensor_overrides}
    assert "CPU" in targets and targets - {"CPU"}, f"the case should move experts both ways: {targets}"
    assert b.plan.fits
    report, _ = worker.load(model_paths["mixtral-8x"], b.config, check_fit=False)
    _assert_placed_as_llama_cpp(b.plan, report, rpc)
    # and what llama.cpp allocated fits the memory the policy was given, as evenly as it planned
    got = report.kinds_by_device()
    used = {d.name: sum(got.get(d.name, {}).get(k, 0) for k in ("model", "kv", "compute")) for d in small}
    left = [d.free_bytes - used[d.name] for d in small]
    assert min(left) >= -1 * MiB, f"llama.cpp's buffers overflow a device: {used}"
    assert max(left) - min(left) <= b.spread_bytes + 2 * MiB


def test_a_rule_to_a_device_the_model_does_not_use_is_refused(model_paths, worker):
    from gpulab import ConfigError
    devices = [d for d in worker.devices() if d.kind == "rpc"]
    config = SplitConfig(devices=("RPC0", "RPC1"), tensor_overrides=("exps=RPC2",), n_ctx=512)
    with pytest.raises(ConfigError, match="RPC2 is not one of the devices the model uses"):
        plan(read_profile(model_paths["mixtral-4x"]), devices, config)
    with pytest.raises(ConfigError, match="no device here .* available: CPU, RPC0 \\(RPC0\\["):
        plan(read_profile(model_paths["mixtral-4x"]), devices, SplitConfig(tensor_overrides=("exps=CUDA7",)))


@pytest.mark.skipif(tools_bin() is None, reason=NOT_BUILT)
@pytest.mark.parametrize("flags,gpulab_says,llama_says", [
    (["-ot", "exps=CUDA7"], "no device here", "unknown buffer type"),
    (["-ot", "exps"], "has no '='", "invalid value"),
    (["-ncmoe", "-1"], "takes a count from 0", "invalid value"),
])
def test_bad_rules_are_refused_as_llama_server_refuses_them(flags, gpulab_says, llama_says, model_paths):
    """The same flags, to gpulab and to llama-server built from the vendored source."""
    import subprocess
    import sys
    g = subprocess.run([sys.executable, "-m", "gpulab", "plan", str(model_paths["mixtral-4x"]), "--sim", "2x24GiB",
                        *flags], capture_output=True, text=True)
    assert g.returncode == 2 and gpulab_says in g.stderr and len(g.stderr.strip().splitlines()) == 1, g.stderr
    r = subprocess.run([str(tools_bin() / "llama-server"), "-m", str(model_paths["mixtral-4x"]), *flags, "--version"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and llama_says in r.stderr + r.stdout
