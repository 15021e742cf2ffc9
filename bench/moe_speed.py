"""pp/tg of a MoE model with and without --n-cpu-moe, measured on CPU RPC devices (issue 13).

    .venv/bin/python bench/moe_speed.py [--rounds 3] [--store bench/results/moe_speed.jsonl]

Writes a qwen3moe-shaped model (8 layers, 16 experts of which 2 are used, Q8_0, ~120 MiB),
starts 2 RPC servers (1 thread each) and a worker (1 thread for the host's share), and measures,
interleaved over rounds (each round's fastest repetition, median over rounds, as calibration does):
  - every layer and its experts on the RPC devices (-ts 1,1);
  - -ncmoe 4 (the experts of layers 0-3 on the host), -ncmoe 8 (all of them, as -cmoe);
  - moe-balance at -ncmoe 4's host share (the same expert bytes on the host, spread evenly);
  - everything on the host (-ngl 0).
Every run is appended to the results store given (llama-bench records: n_cpu_moe and
tensor_buft_overrides say what was loaded), and the table printed is what docs/BENCHMARKS.md
records. On CPU RPC servers "device" and "host" memory are the same RAM: what moving experts
costs here is where the work runs (host threads, RPC round trips), not memory bandwidth.
/proc/loadavg is printed before and after: on a shared machine the timings depend on it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchkit import loadavg  # noqa: E402 (after the path set-up)

from gpulab import SplitConfig, read_profile  # noqa: E402
from gpulab.core.placement.planner import plan  # noqa: E402
from gpulab.core.policies.moe_balance import expert_bytes_on, moe_balance  # noqa: E402
from gpulab.runtime.calibrate import measure_best  # noqa: E402
from gpulab.runtime.rpc import start_servers  # noqa: E402
from gpulab.runtime.worker import Worker  # noqa: E402
from gpulab.sources.host import host_device  # noqa: E402
from gpulab.sources.synth import SynthSpec, write_model  # noqa: E402
from gpulab.storage.results import ResultsStore  # noqa: E402

SPEC = SynthSpec(arch="qwen3moe", n_layer=8, n_embd=768, n_ff=384, n_ff_exp=384, n_head=12, n_head_kv=4,
                 n_vocab=4096, n_expert=16, n_expert_used=2, weight_type="Q8_0", name="qwen3moe-16x-synth")
N_PROMPT, N_GEN = 128, 32


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repetitions", type=int, default=3)
    ap.add_argument("--store", default=str(REPO / "bench" / "results" / "moe_speed.jsonl"),
                    help="results store (JSONL) to append every run to")
    a = ap.parse_args()
    print(f"loadavg before: {loadavg()}")
    with tempfile.TemporaryDirectory() as tmp, start_servers(2, threads=1) as cluster, \
            Worker(cluster.endpoints) as worker:
        path = write_model(Path(tmp) / "moe.gguf", SPEC)
        prof = read_profile(path)
        rpc = [d for d in worker.devices() if d.kind == "rpc"]
        base = SplitConfig(tensor_split=(1, 1), n_ctx=N_PROMPT + N_GEN)
        half = plan(prof, rpc, base.replace(n_cpu_moe=4), host_device())
        balanced = moe_balance(prof, rpc, base.replace(tensor_split=()), host_device(),
                               cpu_expert_bytes_at_least=expert_bytes_on(half, "CPU")).config
        items = [("experts on the RPC devices (-ts 1,1)", base),
                 ("-ncmoe 4", base.replace(n_cpu_moe=4)),
                 ("moe-balance at -ncmoe 4's host share", balanced),
                 ("-ncmoe 8 (all experts on the host)", base.replace(n_cpu_moe=8)),
                 ("all on the host (-ngl 0)", base.replace(n_gpu_layers=0))]
        plans = {label: plan(prof, rpc, cfg, host_device()) for label, cfg in items}
        best = measure_best(worker, [(label, path, cfg) for label, cfg in items], rounds=a.rounds,
                            repetitions=a.repetitions, n_prompt=N_PROMPT, n_gen=N_GEN, n_threads=1)
        store = ResultsStore(a.store)
        for b in best.values():
            for run in b.runs:
                store.append_run(run)
    print(f"loadavg after: {loadavg()}")
    mib = 2**20
    print(f"| config | host expert MiB | RPC0 / RPC1 weights MiB | pp{N_PROMPT} t/s | tg{N_GEN} t/s |")
    print("|---|---|---|---|---|")
    for label, _ in items:
        p, b = plans[label], best[label]
        pp, tg = b.seconds("pp"), b.seconds("tg")
        w = " / ".join(f"{p.device(d.name).weights_bytes / mib:.0f}" for d in p.offload_devices)
        print(f"| {label} | {expert_bytes_on(p, 'CPU') / mib:.0f} | {w} | {N_PROMPT / pp:.1f} | {1 / tg:.1f} |")
    print(f"{SPEC.name}: {prof.weights_bytes / mib:.0f} MiB; 2 RPC servers x 1 thread, host 1 thread; "
          f"each round's fastest of {a.repetitions} repetitions, median of {a.rounds} rounds; runs in {a.store}")


if __name__ == "__main__":
    main()
