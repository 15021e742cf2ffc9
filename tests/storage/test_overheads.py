"""The runtime overhead learned per GPU from NVML, and the planner counting it: a GPU that ran
once knows what CUDA takes beyond llama.cpp's buffers, and the next plan leaves room for it."""

from __future__ import annotations

import json

from builders import UUID, MiB, gpu_run
from gpulab.core.config import SplitConfig
from gpulab.core.devices import Device
from gpulab.runtime.session import Session
from gpulab.sources.nvml import NvmlProbe
from gpulab.storage.overheads import learn_overhead, learned_overhead, overhead_path
from gpulab.testing import FakeGpu, FakeNvml


def one_gpu_nvml() -> FakeNvml:
    """NVML with one 80 GiB GPU, 1 GiB used, whose UUID is the one gpu_run carries."""
    return FakeNvml([FakeGpu(name="NVIDIA H200", uuid=UUID, total=80 << 30, used=1 << 30)])


def test_learned_overhead_is_kept_per_gpu(monkeypatch, tmp_path):
    monkeypatch.setenv("GPULAB_DATA_DIR", str(tmp_path))
    gpu = Device("CUDA0", 80 << 30, 79 << 30, "nvml", uuid=UUID)
    assert learned_overhead(gpu) == 0 and learned_overhead(UUID) == 0
    assert learn_overhead(gpu_run(900 * MiB)) == {"CUDA0": 236 * MiB}
    assert overhead_path(UUID).is_file() and overhead_path(UUID).parent == tmp_path / "overhead"
    learn_overhead(gpu_run(1000 * MiB))
    learn_overhead(gpu_run(910 * MiB))
    assert learned_overhead(gpu) == 246 * MiB        # median of 236, 336, 246
    data = json.loads(overhead_path(UUID).read_text())
    assert data["samples"] == [236 * MiB, 336 * MiB, 246 * MiB] and data["name"] == "CUDA0"
    # CPU, RPC and devices without a UUID learn nothing and read 0
    assert learned_overhead(Device("RPC0", 1, 1, "rpc", kind="rpc")) == 0
    assert learn_overhead(gpu_run(nvml_used=None)) == {}


def test_the_next_plan_counts_it(monkeypatch, tmp_path, profile_factory):
    """Through the front ends' path: the session's NVML device carries the learned overhead, and
    the plan's device row counts it in used bytes and in whether the model fits."""
    from gpulab.core.placement.planner import plan
    monkeypatch.setenv("GPULAB_DATA_DIR", str(tmp_path))
    prof = profile_factory(n_layer=4)
    with Session(probe=NvmlProbe(one_gpu_nvml()), env={}) as s:
        before = s.devices()
    # nothing learned: gpulab's default for a CUDA device (the H200 run's 523 MiB), labelled as one
    assert before.devices[0].name == "CUDA0" and before.devices[0].overhead_bytes == 523 * MiB
    assert before.devices[0].overhead_is_default
    p0 = plan(prof, list(before.devices), SplitConfig(n_ctx=512))
    assert p0.device("CUDA0").overhead_bytes == 523 * MiB and p0.device("CUDA0").overhead_is_default
    assert any(n.startswith("CUDA0: counts a base cost of 523.00 MiB, gpulab's default") for n in p0.notes)
    assert p0.to_dict()["devices"][0]["overhead_is_default"] is True
    from gpulab.ui.text import plan_text
    assert "523.00 MiB (default)" in plan_text(p0)          # the table's base column says it is a default

    learn_overhead(gpu_run(900 * MiB))
    with Session(probe=NvmlProbe(one_gpu_nvml()), env={}) as s:
        after = s.devices()
    assert after.devices[0].overhead_bytes == 236 * MiB and not after.devices[0].overhead_is_default
    p1 = plan(prof, list(after.devices), SplitConfig(n_ctx=512))
    d0, d1 = p0.device("CUDA0"), p1.device("CUDA0")
    # the learned value replaces the default
    assert d1.overhead_bytes == 236 * MiB and d1.used_bytes == d0.used_bytes - 523 * MiB + 236 * MiB
    assert not d1.overhead_is_default and not any("default" in n for n in p1.notes)
    d0 = plan(prof, [Device("CUDA0", 80 << 30, 79 << 30, "nvml", uuid=UUID)], SplitConfig(n_ctx=512)).device("CUDA0")
    # a GPU with less free memory than buffers + overhead no longer "fits"
    tight = [Device("CUDA0", 80 << 30, d0.used_bytes + MiB, "nvml", uuid=UUID, overhead_bytes=236 * MiB)]
    assert plan(prof, [Device("CUDA0", 80 << 30, d0.used_bytes + MiB, "nvml", uuid=UUID)],
                SplitConfig(n_ctx=512)).fits
    assert not plan(prof, tight, SplitConfig(n_ctx=512)).fits
