"""The host row against llama.cpp: CPU_Mapped, CPU_REPACK and the host's compute buffer, per case.

    .venv/bin/python bench/host_row.py

The tensor-override cases of tests/integration/test_overrides_vs_llama.py (which asserts each
device within 1% or 1 MiB), loaded by llama.cpp on 3 CPU RPC devices in a worker; this prints the
errors themselves, for the host and the worst offload device, so they can be stated. On RPC
devices there is no pinned host buffer (that needs a GPU), so the pinned column is not measured.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # this checkout's gpulab
from gpulab import plan, read_profile
from gpulab.runtime.rpc import start_servers
from gpulab.runtime.worker import Worker
from gpulab.sources.host import host_device
from gpulab.sources.synth import write_model
from gpulab.testing import OVERRIDE_CASES as CASES
from gpulab.testing import OVERRIDE_MODELS as MODELS

MiB = 2**20


def err(pred: int, got: int) -> str:
    if not pred and not got:
        return "0"
    return f"{(pred - got) / MiB:+.3f} MiB ({(pred - got) / got:+.1%})" if got else f"{pred / MiB:+.3f} MiB (vs 0)"


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp, start_servers(3) as cluster, Worker(cluster.endpoints) as w:
        paths = {n: write_model(Path(tmp) / f"{n}.gguf", s) for n, s in MODELS.items()}
        devices = [d for d in w.devices() if d.kind == "rpc"]
        for model, case, config in CASES:
            config = config.replace(devices=tuple(d.name for d in devices[:len(config.tensor_split)]))
            p = plan(read_profile(paths[model]), devices, config, host_device())
            report, _ = w.load(paths[model], config, check_fit=False)
            bufs = {b.buffer_type: b.n_bytes for b in report.buffers if b.device == "CPU" and b.kind == "model"}
            got = report.kinds_by_device()
            host = p.host
            worst = max((abs(d.weights_bytes - got.get(d.name, {}).get("model", 0)) for d in p.offload_devices),
                        default=0)
            hc = got.get("CPU", {}).get("compute", 0)
            rows.append((f"{model} {case}", err(host.mapped_bytes, bufs.get("CPU_Mapped", 0)),
                         err(host.repack_bytes, bufs.get("CPU_REPACK", 0)), err(host.compute_bytes, hc),
                         f"{worst / MiB:.3f} MiB"))
    print("| case | CPU_Mapped: planned - llama.cpp | CPU_REPACK | host compute | worst offload weights |")
    print("|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
