"""The monitor names the fleet model each GPU process serves (from its command line)."""

from __future__ import annotations

from gpulab.core.devices import Device
from gpulab.sources.nvml import GpuInfo, GpuProcess
from gpulab.ui.monitor import Monitor

GiB = 1024**3


class Probe:
    def available(self):
        return True

    def devices(self):
        procs = (GpuProcess(11, 6 * GiB, "llama-server", ("llama-server", "--port", "5800", "-m", "/m/chat.gguf")),
                 GpuProcess(12, 2 * GiB, "llama-server", ("llama-server", "--alias", "coder", "-m", "/x.gguf")),
                 GpuProcess(13, GiB, "Xorg", ("/usr/lib/Xorg",)))
        return [GpuInfo(index=0, name="NVIDIA Fake", uuid="GPU-0", pci_bus_id="0000:01:00.0", total_bytes=24 * GiB,
                        free_bytes=15 * GiB, used_bytes=9 * GiB, processes=procs)]

    def cuda_devices(self, env=None):
        return [Device("CUDA0", 24 * GiB, 15 * GiB, "nvml", uuid="GPU-0")], []

    def shutdown(self):
        pass


def test_processes_are_named_by_fleet_model():
    m = Monitor(Probe(), autostart=False, models={"chat": "/m/chat.gguf", "coder": "/m/coder.gguf"})
    try:
        m.poll()
        table = m.processes.value
        assert "<th>model</th>" in table.replace(" ", "") or "model" in table
        rows = table.split("<tr")
        assert any("chat" in r and "6.00 GiB" in r for r in rows)
        assert any("coder" in r and "2.00 GiB" in r for r in rows)
        assert any("Xorg" in r and ">-<" in r.replace(" ", "") for r in rows)
    finally:
        m.close()


def test_without_a_fleet_there_is_no_model_column():
    m = Monitor(Probe(), autostart=False)
    try:
        m.poll()
        assert "chat" not in m.processes.value
    finally:
        m.close()
