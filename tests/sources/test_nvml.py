"""NvmlProbe against a fake NVML module (injected), and the real pynvml where there is no GPU."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from gpulab.core.devices import Device
from gpulab.core.errors import DeviceError
from gpulab.sources.nvml import NVML_FUNCTIONS, GpuInfo, GpuProcess, NvmlProbe, cuda_order
from gpulab.testing import FakeGpu, FakeNvml, FakeNVMLError, fake_gpu

GiB = 1024**3


def infos(*names: str) -> list[GpuInfo]:
    return NvmlProbe(FakeNvml([fake_gpu(i, name=n) for i, n in enumerate(names)])).devices()


# -- the probe ------------------------------------------------------------------------------

def test_init_is_lazy_and_happens_once():
    fake = FakeNvml([fake_gpu(0)])
    probe = NvmlProbe(fake)
    assert fake.calls == []
    assert probe.available()
    probe.devices()
    probe.devices()
    assert fake.calls.count("nvmlInit") == 1
    probe.shutdown()
    probe.shutdown()
    assert fake.calls.count("nvmlShutdown") == 1
    probe.devices()          # a query after shutdown initialises again
    assert fake.calls.count("nvmlInit") == 2


def test_importing_does_not_load_pynvml():
    code = ("import sys, gpulab.sources.nvml, gpulab.sources.detect; "
            "assert 'pynvml' not in sys.modules, 'pynvml imported at import time'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_devices_reports_every_field():
    me = os.getpid()
    fake = FakeNvml([fake_gpu(0, procs=[(me, 512 * 1024**2), (999_999_999, None)])])
    (g,) = NvmlProbe(fake).devices()
    assert g == GpuInfo(
        index=0, name="NVIDIA GeForce RTX 4090", uuid=fake.gpus[0].uuid, pci_bus_id="00000000:01:00.0",
        total_bytes=24 * GiB, free_bytes=23 * GiB, used_bytes=1 * GiB,
        utilization_gpu_percent=7, utilization_memory_percent=3,
        processes=(GpuProcess(me, 512 * 1024**2, g.processes[0].name, g.processes[0].argv),
                   GpuProcess(999_999_999, None, None, ())),
        memory_clock_mhz=10501, memory_bus_width_bits=384)
    assert g.processes[0].name  # our own /proc/PID/comm is readable
    # and our own command line: which fleet model a process serves is read from it
    assert g.processes[0].argv == tuple(open(f"/proc/{me}/cmdline", "rb").read().decode().split("\0")[:-1])
    assert g.peak_bandwidth_bytes_per_s == pytest.approx(1008e9, rel=1e-3)  # RTX 4090 datasheet


def test_unsupported_queries_leave_fields_none():
    fake = FakeNvml([fake_gpu(0, util=None, mem_clock=None, bus_width=None)])
    (g,) = NvmlProbe(fake).devices()
    assert g.utilization_gpu_percent is None and g.utilization_memory_percent is None
    assert g.memory_clock_mhz is None and g.memory_bus_width_bits is None
    assert g.peak_bandwidth_bytes_per_s is None
    assert g.total_bytes == 24 * GiB          # the rest of the probe is unaffected
    (d,) = NvmlProbe(fake).as_devices(env={})
    assert d.bandwidth_bytes_per_s is None


def test_bytes_from_old_pynvml_are_decoded():
    fake = FakeNvml([FakeGpu(name=b"Tesla T4", uuid=b"GPU-abc", bus_id=b"00000000:3B:00.0")])
    (g,) = NvmlProbe(fake).devices()
    assert (g.name, g.uuid, g.pci_bus_id) == ("Tesla T4", "GPU-abc", "00000000:3B:00.0")


def test_a_lost_gpu_is_left_out_with_a_warning():
    probe = NvmlProbe(FakeNvml([fake_gpu(0), fake_gpu(1, lost=True)]))
    assert [g.index for g in probe.devices()] == [0]
    assert "GPU 1 left out" in probe.warnings[0]


def test_without_a_driver_available_is_false_and_devices_says_why():
    probe = NvmlProbe(FakeNvml(init_error=FakeNVMLError("NVML Shared Library Not Found")))
    assert probe.available() is False
    assert "Library Not Found" in probe.unavailable_reason
    with pytest.raises(DeviceError, match="NVML is not available"):
        probe.devices()
    probe.shutdown()   # harmless when never initialised


def test_as_devices_names_them_as_llama_cpp_does():
    fake = FakeNvml([fake_gpu(0), fake_gpu(1, name="NVIDIA GeForce RTX 3090", used=4 * GiB)])
    devs = NvmlProbe(fake).as_devices(env={"CUDA_DEVICE_ORDER": "PCI_BUS_ID"})
    assert [d.name for d in devs] == ["CUDA0", "CUDA1"]
    assert all(isinstance(d, Device) and d.source == "nvml" and d.kind == "gpu" for d in devs)
    assert devs[1].description == "NVIDIA GeForce RTX 3090"
    assert (devs[1].total_bytes, devs[1].free_bytes) == (24 * GiB, 20 * GiB)
    assert devs[1].uuid == fake.gpus[1].uuid and devs[1].pci_bus_id == "00000000:02:00.0"


# -- CUDA's order ---------------------------------------------------------------------------

def names(gpus):
    return [g.index for g in gpus]


def test_mixed_models_warn_unless_pci_bus_id_order():
    gpus = infos("NVIDIA GeForce RTX 3090", "NVIDIA GeForce RTX 4090")
    ordered, warnings = cuda_order(gpus, env={})
    assert names(ordered) == [0, 1]
    assert len(warnings) == 1 and "CUDA_DEVICE_ORDER=PCI_BUS_ID" in warnings[0]
    assert cuda_order(gpus, env={"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}) == (gpus, [])
    same = infos("NVIDIA H100", "NVIDIA H100")
    assert cuda_order(same, env={})[1] == []


def test_pci_bus_id_order_sorts_by_bus():
    a, b = infos("A", "A")
    ordered, _ = cuda_order([b, a], env={"CUDA_DEVICE_ORDER": "PCI_BUS_ID"})
    assert ordered == [a, b]


@pytest.mark.parametrize("cvd, expected", [
    ("2,0", [2, 0]),              # filters and reorders
    (" 1 ", [1]),
    ("0,2,-1,1", [0, 2]),         # an invalid item ends the list
    ("0,7,1", [0]),               # so does an index past the end
    ("", []),                     # hides every GPU
    ("1,1", []),                  # a repeated device: CUDA sees none
    ("GPU-2222", [2]),            # a unique UUID prefix
    ("GPU-2222aaaa-0000-0000-0000-000000000002,GPU-0000", [2, 0]),
    ("gpu-1111", [1]),
    ("GPU-1,GPU-1111aaaa", []),   # the same GPU twice, by two prefixes
    ("GPU-9999", []),             # no such GPU
    ("1,GPU-0000", [1]),          # indices and UUIDs do not mix
])
def test_cuda_visible_devices(cvd, expected):
    gpus = infos("A", "A", "A")
    ordered, _ = cuda_order(gpus, env={"CUDA_VISIBLE_DEVICES": cvd})
    assert names(ordered) == expected


def test_minus_one_hides_the_gpus_quietly():
    assert cuda_order(infos("A"), env={"CUDA_VISIBLE_DEVICES": "-1"}) == ([], [])
    ordered, warnings = cuda_order(infos("A"), env={"CUDA_VISIBLE_DEVICES": "0,x,1"})
    assert names(ordered) == [0] and "'x' is neither an index" in warnings[0]


def test_ambiguous_uuid_prefix_stops_with_a_warning():
    gpus = infos("A", "A")
    ordered, warnings = cuda_order(gpus, env={"CUDA_VISIBLE_DEVICES": "GPU-"})
    assert ordered == [] and "ambiguous" in warnings[0]


def test_visible_devices_by_uuid_fix_the_order_so_no_order_warning():
    gpus = infos("NVIDIA GeForce RTX 3090", "NVIDIA GeForce RTX 4090")
    uuid = gpus[1].uuid
    assert cuda_order(gpus, env={"CUDA_VISIBLE_DEVICES": uuid}) == ([gpus[1]], [])
    ordered, warnings = cuda_order(gpus, env={"CUDA_VISIBLE_DEVICES": "1"})
    assert names(ordered) == [1] and "PCI_BUS_ID" in warnings[0]   # '1' means CUDA's order


def test_probe_reads_cuda_visible_devices_from_the_env_it_is_given():
    fake = FakeNvml([fake_gpu(0), fake_gpu(1, used=2 * GiB), fake_gpu(2)])
    devs, warnings = NvmlProbe(fake).cuda_devices(env={"CUDA_VISIBLE_DEVICES": "GPU-1111"})
    assert [(d.name, d.uuid) for d in devs] == [("CUDA0", fake.gpus[1].uuid)]
    assert devs[0].free_bytes == 22 * GiB and warnings == []


def mig_machine() -> FakeNvml:
    def mig(p, m):
        return FakeGpu(name="NVIDIA A100-SXM4-40GB MIG 3g.20gb", uuid=f"MIG-{p}{m}{p}{m}bbbb-0000",
                       total=20 * GiB, used=0, util=None, mem_clock=None, bus_width=None,
                       gi_ci=(m + 1, 0))
    return FakeNvml([fake_gpu(0, name="NVIDIA A100-SXM4-40GB"),
                     fake_gpu(1, name="NVIDIA A100-SXM4-40GB", mig=[mig(1, 0), mig(1, 1)])])


def test_mig_devices_are_probed_under_their_gpu():
    g0, g1 = NvmlProbe(mig_machine()).devices()
    assert not g0.mig_enabled and g0.mig_devices == ()
    assert g1.mig_enabled and [m.uuid for m in g1.mig_devices] == ["MIG-1010bbbb-0000", "MIG-1111bbbb-0000"]
    m = g1.mig_devices[1]
    assert (m.index, m.parent_index, m.gpu_instance_id, m.compute_instance_id) == (1, 1, 2, 0)
    assert m.total_bytes == 20 * GiB and m.pci_bus_id == g1.pci_bus_id


def test_mig_cuda_uses_a_single_mig_device():
    gpus = NvmlProbe(mig_machine()).devices()
    mig0, mig1 = gpus[1].mig_devices
    ordered, warnings = cuda_order(gpus, env={})      # a MIG-enabled GPU hides the others
    assert ordered == [mig0] and "MIG enabled" in warnings[0]
    assert cuda_order(gpus, env={"CUDA_VISIBLE_DEVICES": "0"}) == ([gpus[0]], [])
    assert cuda_order(gpus, env={"CUDA_VISIBLE_DEVICES": "MIG-1111"}) == ([mig1], [])
    legacy = f"MIG-{gpus[1].uuid}/2/0"                # MIG-GPU-<uuid>/<gi>/<ci>, drivers < 470
    assert cuda_order(gpus, env={"CUDA_VISIBLE_DEVICES": legacy}) == ([mig1], [])
    ordered, warnings = cuda_order(gpus, env={"CUDA_VISIBLE_DEVICES": "MIG-1111,MIG-1010"})
    assert ordered == [mig1] and "single MIG device" in warnings[0]


# -- the real pynvml ------------------------------------------------------------------------

def test_real_pynvml_has_every_function_the_probe_calls():
    pynvml = pytest.importorskip("pynvml")
    assert [f for f in NVML_FUNCTIONS if not hasattr(pynvml, f)] == []


def test_real_nvml_never_raises_from_available():
    probe = NvmlProbe()
    try:
        ok = probe.available()
        assert isinstance(ok, bool)
        if not ok:      # this CPU-only machine: no library or no driver
            assert probe.unavailable_reason
            with pytest.raises(DeviceError):
                probe.devices()
    finally:
        probe.shutdown()


@pytest.mark.gpu
def test_real_nvml_on_a_gpu_machine():
    with NvmlProbe() as probe:
        if not probe.available():
            pytest.skip("no NVIDIA driver here")
        gpus = probe.devices()
        assert gpus and all(g.total_bytes and g.uuid.startswith("GPU-") for g in gpus)
        devs, _ = probe.cuda_devices(env={"CUDA_DEVICE_ORDER": "PCI_BUS_ID"})
        assert devs[0].name == "CUDA0" and devs[0].free_bytes <= devs[0].total_bytes
