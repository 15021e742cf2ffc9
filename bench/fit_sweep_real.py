"""gpulab's fit against llama-fit-params on Gemma 3 270M over a sweep of budgets, 2 CPU RPC devices.

Budget of each device = scale x what it uses in gpulab's plain plan at -c 32768 with that cache type; the
fit target given to both is (device total - budget) MiB (tests/integration/test_fit_vs_llama.py). Prints
both sides' flags per budget. Usage (from the repository root, llama tools built):
    PYTHONPATH=$PWD python bench/fit_sweep_real.py 0.75,0.8,0.85,0.9,0.95 f16,q8_0,q4_0
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from gpulab import SplitConfig, plan, read_profile
from gpulab.core.policies.server_fit import server_fit
from gpulab.runtime.rpc import start_servers
from gpulab.runtime.worker import Worker
from gpulab.sources.demo import gemma3_path
from llama_tools import tools_bin

MiB = 1024**2


def main(scales: list[float], caches: list[str]) -> None:
    path = gemma3_path()
    prof = read_profile(path)
    with start_servers(2) as cluster:
        with Worker(cluster.endpoints) as w:
            devices = [d for d in w.devices() if d.kind == "rpc"][:2]
        for kv in caches:
            flags: tuple[str, ...] = () if kv == "f16" else ("-ctk", kv, "-ctv", kv)
            base = plan(prof, devices, SplitConfig(n_ctx=32768, type_k=kv, type_v=kv))
            for s in scales:
                budgets = [max(8, int(s * d.used_bytes / MiB)) for d in base.offload_devices]
                targets = tuple(d.total_bytes // MiB - b for d, b in zip(devices, budgets))
                r = server_fit(prof, devices, SplitConfig(n_ctx=0, type_k=kv, type_v=kv, fit_target=targets))
                ours = r.flags(devices) if r.status != "failure" else "failure"
                t = time.time()
                got = subprocess.run([str(tools_bin() / "llama-fit-params"), "-m", str(path), "--rpc",
                                      ",".join(cluster.endpoints[:2]), "-fitt", ",".join(map(str, targets)), *flags],
                                     capture_output=True, text=True, timeout=300)
                printed = [line for line in got.stdout.splitlines() if line.startswith("-c ")]
                theirs = printed[-1] if printed else f"exit {got.returncode}"
                print(f"{kv:5s} scale {s:.2f} budgets {budgets} MiB | gpulab: {ours} | llama-fit-params: {theirs} | "
                      f"{'agree' if ours == theirs else 'MISS'} ({time.time() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    main([float(x) for x in sys.argv[1].split(",")], sys.argv[2].split(","))
