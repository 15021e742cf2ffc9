"""Re-split latency: from "new split" to "ready to measure", against a fresh load in a new process.

    .venv/bin/python bench/resplit.py                 # demo model; CPU-only and 2 RPC devices
    .venv/bin/python bench/resplit.py --rounds 5 --model path.gguf

llama.cpp cannot move the layers of a loaded model, so gpulab.runtime.bench.resplit closes the
model and loads it again with the new split; the weights come back from the page cache through
mmap (and go to RPC servers over their socket again). The reference, measured in the same run
and alternating with it, is what a user would do otherwise: start a new process that loads
the model with the new split (interpreter start, imports, llama.cpp init, RPC registration and
the load), timed from spawning it to its "ready" line. The ratio resplit / fresh is the figure.

The RPC devices are two local servers (one thread each); this script registers them in its own
process, which is fine for a benchmark (a notebook would use the worker).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

_CHILD = r"""
import sys, json
sys.path.insert(0, {repo!r})
from gpulab.core.config import config_from_dict
from gpulab.runtime.model import open_model
cfg = config_from_dict(json.loads({cfg!r}))
eps = {eps!r}
if eps:
    from gpulab.runtime import rpc
    rpc.register(eps)
with open_model({path!r}, cfg) as m:
    print("ready", flush=True)
"""


def fresh_process_seconds(path: str, cfg, endpoints: list[str]) -> float:
    import json

    from gpulab.core.config import config_to_dict
    code = _CHILD.format(repo=str(REPO), cfg=json.dumps(config_to_dict(cfg)), eps=list(endpoints), path=path)
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = p.stdout.readline()
    t = time.perf_counter() - t0
    p.wait(60)
    if line.strip() != "ready":
        raise SystemExit(f"the fresh process failed (exit {p.returncode})")
    return t


def main(argv=None) -> int:
    from gpulab.core.config import SplitConfig
    from gpulab.runtime.bench import resplit
    from gpulab.runtime.model import open_model
    from gpulab.sources.demo import demo_model_path

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="GGUF path (default: the demo model)")
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args(argv)
    path = a.model or str(demo_model_path())

    cases = [("CPU only, -c 512 -> -c 1024", [], SplitConfig(n_gpu_layers=0, n_ctx=512),
              SplitConfig(n_gpu_layers=0, n_ctx=1024))]
    cluster = None
    try:
        from gpulab.runtime import llama_lib
        if llama_lib.rpc_supported():
            from gpulab.runtime import rpc
            cluster = rpc.start_servers(2)
            rpc.register(cluster.endpoints)
            cases.append(("2 RPC devices, -ts 1,1 -> 1,3", cluster.endpoints,
                          SplitConfig(tensor_split=(1, 1), n_ctx=512), SplitConfig(tensor_split=(1, 3), n_ctx=512)))
        print(f"model: {Path(path).name} ({Path(path).stat().st_size / 2**20:.0f} MiB); rounds: {a.rounds}; "
              f"python {sys.version.split()[0]}; loadavg {open('/proc/loadavg').read().split()[:3]}")
        print()
        print("| case | resplit (s), median | close alone (s), median | fresh process (s), median | resplit / fresh |")
        print("|---|---:|---:|---:|---:|")
        for label, eps, before, after in cases:
            rs, closes, fresh = [], [], []
            for k in range(a.rounds):
                def in_process(before=before, after=after, rs=rs, closes=closes):
                    m = open_model(path, before)
                    t0 = time.perf_counter()
                    m.close()
                    closes.append(time.perf_counter() - t0)
                    m = open_model(path, before)
                    m2 = resplit(m, after)
                    rs.append(m2.ready_seconds)
                    m2.close()
                if k % 2 == 0:
                    in_process()
                    fresh.append(fresh_process_seconds(path, after, eps))
                else:
                    fresh.append(fresh_process_seconds(path, after, eps))
                    in_process()
            r, f = statistics.median(rs), statistics.median(fresh)
            print(f"| {label} | {r:.3f} | {statistics.median(closes):.3f} | {f:.3f} | {r / f:.2f} |", flush=True)
    finally:
        if cluster is not None:
            # the servers stay registered in this process until it exits: stop them last
            import warnings
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
