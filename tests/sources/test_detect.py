"""detect_devices: simulated, NVML (through an injected probe), RPC first, the host, no GPU."""

from __future__ import annotations

import pytest

from gpulab.core.devices import Device
from gpulab.core.errors import DeviceSpecError, GpulabError
from gpulab.sources.detect import DeviceSet, detect_devices
from gpulab.sources.host import host_device
from gpulab.sources.nvml import NvmlProbe
from gpulab.testing import FakeGpu, FakeNvml, FakeNVMLError

GiB = 1024**3
NO_GPU = "no GPU found (NVML unavailable); plan with --sim 24GiB,24GiB or --rpc HOST:PORT"


def nvml(names=("NVIDIA GeForce RTX 3090", "NVIDIA GeForce RTX 4090"), **kw) -> FakeNvml:
    """GPUs of 24 GiB, the first 20 GiB free, the next 21 GiB, ... (two models by default)."""
    return FakeNvml([FakeGpu(name=n, uuid=f"GPU-{i}{i}{i}{i}-cafe", bus_id=f"00000000:{i + 1:02X}:00.0",
                             total=24 * GiB, used=(4 - i) * GiB) for i, n in enumerate(names)], **kw)


UNAVAILABLE = FakeNVMLError("NVML Shared Library Not Found")


def test_sim_replaces_detection():
    ds = detect_devices(sim="24GiB,12GiB@10GiB", probe=NvmlProbe(nvml()))
    assert isinstance(ds, DeviceSet)
    assert [(d.name, d.source, d.free_bytes) for d in ds.devices] == [
        ("SIM0", "sim", 24 * GiB), ("SIM1", "sim", 10 * GiB)]
    assert ds.source_note.startswith("simulated: 2 devices") and ds.warnings == ()
    assert ds.host is not None and ds.host.name == "CPU"
    with pytest.raises(DeviceSpecError):
        detect_devices(sim="24 apples")


def test_nvml_gpus_through_an_injected_probe():
    ds = detect_devices(probe=NvmlProbe(nvml()), env={})
    assert [(d.name, d.source, d.free_bytes) for d in ds.devices] == [
        ("CUDA0", "nvml", 20 * GiB), ("CUDA1", "nvml", 21 * GiB)]
    assert ds.source_note == "NVML: 2 GPUs (NVIDIA GeForce RTX 3090, NVIDIA GeForce RTX 4090)"
    assert len(ds.warnings) == 1 and "CUDA_DEVICE_ORDER=PCI_BUS_ID" in ds.warnings[0]
    ds = detect_devices(probe=NvmlProbe(nvml(("H100",) * 2)),
                        env={"CUDA_VISIBLE_DEVICES": "1"})
    assert [(d.name, d.uuid) for d in ds.devices] == [("CUDA0", "GPU-1111-cafe")]
    assert ds.source_note == "NVML: 1 GPU (H100)" and ds.warnings == ()


def test_no_gpu_gives_the_plain_note_and_still_a_host():
    ds = detect_devices(probe=NvmlProbe(FakeNvml(init_error=UNAVAILABLE)))
    assert ds.devices == () and ds.source_note == NO_GPU
    assert ds.host.kind == "cpu" and ds.host.source == "host" and ds.host.total_bytes > 0


def test_real_nvml_on_this_machine_never_raises():
    probe = NvmlProbe()
    if probe.available():
        probe.shutdown()
        pytest.skip("this machine has an NVIDIA driver")
    ds = detect_devices()
    assert ds.devices == () and ds.source_note == NO_GPU
    assert ds.host is not None and ds.host.name == "CPU" and 0 < ds.host.free_bytes <= ds.host.total_bytes


def test_nvml_that_fails_after_init_is_a_warning_not_an_error():
    ds = detect_devices(probe=NvmlProbe(nvml(count_error=FakeNVMLError("Unknown Error"))))
    assert ds.devices == () and "could not count" in ds.warnings[0]
    assert ds.source_note.startswith("no GPU found (NVML failed); plan with --sim")


def test_nothing_asked_for():
    ds = detect_devices(use_nvml=False)
    assert ds.devices == () and ds.source_note.startswith("no GPU found (NVML not used)")


# -- RPC and llama.cpp's own list: passed in as functions (gpulab.runtime.session passes a worker's) --

def rpc_device(i: int, endpoint: str) -> Device:
    return Device(name=f"RPC{i}", total_bytes=8 * GiB, free_bytes=8 * GiB, source="rpc", kind="rpc",
                  description=f"RPC {endpoint}", endpoint=endpoint)


CUDA0 = Device(name="CUDA0", total_bytes=24 * GiB, free_bytes=23 * GiB, source="llama",
               description="NVIDIA GeForce RTX 4090")
CPU = Device(name="CPU", total_bytes=64 * GiB, free_bytes=60 * GiB, source="llama", kind="cpu")
BLAS = Device(name="BLAS", total_bytes=0, free_bytes=0, source="llama", kind="accel")


def test_rpc_servers_come_before_the_gpus():
    asked = []

    def rpc_devices():
        asked.append(True)
        return [rpc_device(0, "127.0.0.1:50052"), rpc_device(1, "10.0.0.2:50052")]
    ds = detect_devices(rpc_devices=rpc_devices, probe=NvmlProbe(nvml(("A",))), env={})
    assert asked == [True]
    assert [d.name for d in ds.devices] == ["RPC0", "RPC1", "CUDA0"]
    assert ds.source_note == "2 RPC devices (127.0.0.1:50052, 10.0.0.2:50052); NVML: 1 GPU (A)"


def test_rpc_alone_on_a_machine_without_gpus():
    ds = detect_devices(rpc_devices=lambda: [rpc_device(0, "127.0.0.1:50052")],
                        probe=NvmlProbe(FakeNvml(init_error=UNAVAILABLE)))
    assert [d.name for d in ds.devices] == ["RPC0"]
    assert ds.source_note == "1 RPC device (127.0.0.1:50052); no GPU found (NVML unavailable)"


def test_a_source_that_answers_garbage_is_a_clear_error():
    with pytest.raises(GpulabError, match="rpc_devices returned str, not gpulab Device"):
        detect_devices(rpc_devices=lambda: ["RPC0"], use_nvml=False)


def test_llama_devices_replace_nvml_and_leave_out_the_cpu_and_helpers():
    # llama.cpp's registry lists the RPC device after CUDA; the load puts it first
    ds = detect_devices(llama_devices=lambda: [CUDA0, rpc_device(0, "127.0.0.1:50052"), CPU, BLAS],
                        rpc_devices=lambda: [rpc_device(0, "127.0.0.1:50052")], probe=NvmlProbe(nvml()))
    assert [d.name for d in ds.devices] == ["RPC0", "CUDA0"]     # RPC once, first; CPU is the host
    assert ds.host.source == "host"
    assert ds.source_note.endswith("llama.cpp: 1 GPU (NVIDIA GeForce RTX 4090)")


def test_the_session_takes_rpc_devices_from_a_worker_only():
    """The front ends' resolver never registers an RPC endpoint in this process: it asks the
    worker (here a stand-in that records what it was asked)."""
    from gpulab.runtime import session as session_mod

    made = []

    class FakeWorkerProcess:
        def __init__(self, endpoints):
            made.append(tuple(endpoints))

        def devices(self):
            return [rpc_device(0, "127.0.0.1:50052"), CPU]

        def close(self):
            pass

    s = session_mod.Session(probe=NvmlProbe(FakeNvml(init_error=UNAVAILABLE)), worker_factory=FakeWorkerProcess)
    choice = s.devices(rpc="127.0.0.1:50052")
    assert made == [("127.0.0.1:50052",)] and [d.name for d in choice.devices] == ["RPC0"]
    assert choice.can_load and choice.worker is s._workers[("127.0.0.1:50052",)]
    with pytest.raises(DeviceSpecError, match="HOST:PORT"):
        s.devices(rpc="localhost")
    with pytest.raises(DeviceSpecError, match="--sim replaces"):
        s.devices(sim="24GiB", rpc="127.0.0.1:50052")
    sim = s.devices(sim="2x24GiB")
    assert not sim.can_load and "plan only" in sim.why_not


# -- the host -------------------------------------------------------------------------------

MEMINFO = "MemTotal:       32000000 kB\nMemFree:         1000000 kB\nMemAvailable:   20000000 kB\n"


def test_host_from_meminfo(tmp_path):
    (tmp_path / "meminfo").write_text(MEMINFO)
    host = host_device(str(tmp_path / "meminfo"), cgroup_dir=str(tmp_path / "none"))
    assert (host.name, host.kind, host.source) == ("CPU", "cpu", "host")
    assert (host.total_bytes, host.free_bytes) == (32000000 * 1024, 20000000 * 1024)


def test_host_capped_by_a_cgroup_limit(tmp_path):
    (tmp_path / "meminfo").write_text(MEMINFO)
    (tmp_path / "memory.max").write_text(f"{8 * GiB}\n")
    (tmp_path / "memory.current").write_text(f"{3 * GiB}\n")
    host = host_device(str(tmp_path / "meminfo"), cgroup_dir=str(tmp_path))
    assert (host.total_bytes, host.free_bytes) == (8 * GiB, 5 * GiB)
    (tmp_path / "memory.max").write_text("max\n")
    assert host_device(str(tmp_path / "meminfo"), cgroup_dir=str(tmp_path)).total_bytes == 32000000 * 1024


def test_host_without_proc_falls_back_to_sysconf(tmp_path):
    host = host_device(str(tmp_path / "missing"), cgroup_dir=str(tmp_path))
    assert host is not None and 0 <= host.free_bytes <= host.total_bytes
    assert "sysconf" in host.description
