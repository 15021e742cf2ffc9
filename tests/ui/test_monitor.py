"""Monitor with an injected probe: timelines, per-process memory, phases, and stopping."""

from __future__ import annotations

import time

from gpulab.core.devices import Device
from gpulab.sources.nvml import GpuInfo, GpuProcess
from gpulab.ui.monitor import Monitor

GiB = 1024**3


class FakeProbe:
    """available() and devices() -> [GpuInfo], memory growing by 1 GiB per call."""

    def __init__(self, n: int = 2, available: bool = True):
        self.n, self._available, self.calls, self.shut = n, available, 0, False
        self.unavailable_reason = None if available else "NVMLError_LibraryNotFound"

    def available(self):
        return self._available

    def devices(self):
        self.calls += 1
        used = self.calls * GiB
        return [GpuInfo(index=i, name="NVIDIA Fake 24GB", uuid=f"GPU-{i}", pci_bus_id=f"0000:0{i}:00.0",
                        total_bytes=24 * GiB, free_bytes=24 * GiB - used, used_bytes=used,
                        utilization_gpu_percent=10 * self.calls % 100, utilization_memory_percent=5,
                        processes=(GpuProcess(4242, used, "python"),))
                for i in range(self.n)]

    def cuda_devices(self, env=None):
        # as CUDA numbers them: in PCI order, i.e. the NVML index order here
        return [Device(f"CUDA{i}", 24 * GiB, 20 * GiB, "nvml", uuid=f"GPU-{i}") for i in range(self.n)], []

    def shutdown(self):
        self.shut = True


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_poll_draws_memory_and_utilisation_per_gpu():
    clock = FakeClock()
    m = Monitor(FakeProbe(), autostart=False, clock=clock)
    assert m.source == "nvml"
    for _ in range(3):
        clock.t += 1.0
        assert m.poll()
    assert [t.name for t in m.mem_fig.data] == ["CUDA0 NVIDIA Fake 24GB", "CUDA1 NVIDIA Fake 24GB"]
    assert list(m.mem_fig.data[0].x) == [1.0, 2.0, 3.0]
    assert list(m.mem_fig.data[0].y) == [1024.0, 2048.0, 3072.0]     # MiB
    assert list(m.util_fig.data[1].y) == [10, 20, 30]
    assert "4242" in m.processes.value and "python" in m.processes.value and "3.00 GiB" in m.processes.value


def test_gpus_are_named_as_llama_cpp_names_them():
    """CUDA_VISIBLE_DEVICES=1: NVML's GPU 1 is llama.cpp's CUDA0, and GPU 0 is no CUDA device."""
    class OnlySecond(FakeProbe):
        def cuda_devices(self, env=None):
            return [Device("CUDA0", 24 * GiB, 20 * GiB, "nvml", uuid="GPU-1")], []

    m = Monitor(OnlySecond(), autostart=False)
    assert m.poll()
    assert [t.name for t in m.mem_fig.data] == ["NVML0 (not visible to CUDA) NVIDIA Fake 24GB",
                                                "CUDA0 NVIDIA Fake 24GB"]


def test_history_is_bounded():
    m = Monitor(FakeProbe(1), autostart=False, history=5)
    for _ in range(12):
        m.poll()
    assert len(m.mem_fig.data[0].x) == 5


def test_phases_are_marked_on_the_timelines():
    clock = FakeClock()
    m = Monitor(FakeProbe(1), autostart=False, clock=clock)
    m.poll()
    clock.t += 1
    m.mark_phase("pp")
    clock.t += 2
    m.mark_phase("tg")
    clock.t += 1
    m.mark_phase(None)
    assert [p[0] for p in m.phases] == ["pp", "tg"]
    assert m.phases[0][1:] == [1.0, 3.0] and m.phases[1][1:] == [3.0, 4.0]
    shapes = m.mem_fig.layout.shapes
    assert len(shapes) == 2 and (shapes[0].x0, shapes[0].x1) == (1.0, 3.0)
    assert [a.text for a in m.util_fig.layout.annotations] == ["pp", "tg"]


def test_polling_stops_when_the_widget_is_closed():
    probe = FakeProbe(1)
    m = Monitor(probe, interval=0.01)
    deadline = time.monotonic() + 5
    while probe.calls < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert m.running and probe.calls >= 3
    m.close()
    assert not m.running
    n = probe.calls
    time.sleep(0.1)
    assert probe.calls == n


def test_a_failing_read_is_shown_and_polling_goes_on():
    class Flaky(FakeProbe):
        def devices(self):
            if self.calls == 0:
                self.calls += 1
                raise RuntimeError("NVML_ERROR_GPU_IS_LOST")
            return super().devices()

    m = Monitor(Flaky(1), autostart=False)
    assert not m.poll() and "GPU_IS_LOST" in m.status.value
    assert m.poll() and m.status.value == ""


def test_no_nvml_and_no_worker_says_so_plainly():
    m = Monitor(FakeProbe(available=False))
    assert m.source == "none" and not m.running
    assert "nothing to monitor" in m.header.value and "NVMLError_LibraryNotFound" in m.header.value
    assert m.children == (m.header,)
    m.close()


def test_without_nvml_llama_cpp_device_memory_from_the_worker(fake_worker):
    m = Monitor(FakeProbe(available=False), worker=fake_worker, autostart=False)
    assert m.source == "llama" and "llama.cpp" in m.note
    assert m.poll()
    assert [t.name.split()[0] for t in m.mem_fig.data] == ["RPC0", "RPC1", "CPU"]
    assert list(m.mem_fig.data[2].y) == [4096.0]          # CPU: 16 GiB total, 12 free
    fake_worker.busy = True                                # a load holds the worker: skip, don't block
    assert not m.poll()
    fake_worker.busy = False
    assert m.poll()
