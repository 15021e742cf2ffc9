"""gpulab's fit against llama-fit-params on an MLA model (deepseek2, with an MTP layer), a MoE model with an MTP
layer (glm4moe) and a hybrid (qwen3next), over a sweep of budgets on 2 CPU RPC devices (issue 27).

    PYTHONPATH=$PWD .venv/bin/python bench/fit_arch_sweep.py

Budgets are fractions of what each device uses in the plain split at -c 16384; the fit target of a
device is its total less the budget (a CPU RPC device reports free = total). Prints both flag lines
and whether they agree. llama-fit-params comes from scripts/llama-tools.sh (tests/llama_tools.py)."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from benchkit import loadavg

from gpulab import SplitConfig, plan, read_profile
from gpulab.core.policies.server_fit import server_fit
from gpulab.runtime.rpc import start_servers
from gpulab.runtime.worker import Worker
from gpulab.sources.arch_models import write_arch_model

MiB = 1 << 20
SCALES = (1.3, 1.0, 0.8, 0.6, 0.4, 0.25)


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from llama_tools import NOT_BUILT, tools_bin
    if tools_bin() is None:
        sys.exit(NOT_BUILT)
    print(f"load average {loadavg()}")
    agree = total = 0
    with tempfile.TemporaryDirectory() as tmp, start_servers(2) as cluster:
        with Worker(cluster.endpoints) as w:
            devices = [d for d in w.devices() if d.kind == "rpc"]
        for arch in ("deepseek2", "glm4moe", "qwen3next"):
            path = write_arch_model(Path(tmp) / f"{arch}.gguf", arch)
            prof = read_profile(path)
            base = plan(prof, devices, SplitConfig(n_ctx=16384, tensor_split=(1, 1)))
            for scale in SCALES:
                budgets = [max(8, int(scale * d.used_bytes / MiB)) for d in base.offload_devices]
                targets = tuple(d.total_bytes // MiB - b for d, b in zip(devices, budgets))
                ours = server_fit(prof, devices, SplitConfig(n_ctx=0, fit_target=targets))
                argv = [str(tools_bin() / "llama-fit-params"), "-m", str(path), "--rpc", ",".join(cluster.endpoints),
                        "-fitt", ",".join(map(str, targets))]
                got = subprocess.run(argv, capture_output=True, text=True, timeout=300)
                printed = [line for line in got.stdout.splitlines() if line.startswith("-c ")]
                theirs = printed[-1] if printed else f"(exit {got.returncode})"
                mine = ours.flags(devices) if ours.ok else f"({ours.status})"
                total += 1
                agree += mine == theirs
                print(f"{arch} budgets {budgets} MiB\n  gpulab:           {mine}\n  llama-fit-params: {theirs}\n"
                      f"  {'same' if mine == theirs else 'DIFFERENT'}", flush=True)
    print(f"{agree} of {total} agree; load average {loadavg()}")


if __name__ == "__main__":
    main()
