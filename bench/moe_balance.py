"""moe-balance against --n-cpu-moe: how evenly each fills the GPUs, planned (no GPU needed).

For MoE profiles shaped like real models (gpulab.sources.synth.moe_profile) on simulated GPUs
too small for the whole model:
  - -ncmoe N: the fewest N whose plan fits with llama.cpp's default split (-ts by free memory),
    as a user who raises N until the load stops failing ends up with;
  - moe-balance at the same CPU share: the same expert bytes on the CPU (to one tensor), placed
    by the policy's -ts and -ot rules;
  - moe-balance alone: only what does not fit on the CPU.
spread = the fullest device's free memory left minus the emptiest's (on equal cards: the most
used minus the least used). Plans only: what llama.cpp allocates for such rules is checked on
RPC devices by tests/integration/test_overrides_vs_llama.py.
    .venv/bin/python bench/moe_balance.py
"""

from __future__ import annotations

import sys
import time

from gpulab import SplitConfig, parse_sim_spec, plan
from gpulab.core.policies.moe_balance import expert_bytes_on, moe_balance, spread_bytes
from gpulab.sources.synth import moe_profile

GiB = 1024**3

MODELS = {
    # Qwen3-30B-A3B: 48 layers, 128 experts of 768, ~4.5 bits per weight
    "Qwen3-30B-A3B-like (16.0 GiB)": moe_profile(),
    # Qwen3-235B-A22B: 94 layers, n_embd 4096, 128 experts of 1536, 64 heads
    "Qwen3-235B-A22B-like (124 GiB)": moe_profile(n_layer=94, n_embd=4096, n_ff_exp=1536, n_head=64),
}
CASES = [
    ("Qwen3-30B-A3B-like (16.0 GiB)", "2x8GiB"),
    ("Qwen3-30B-A3B-like (16.0 GiB)", "3x5GiB"),
    ("Qwen3-30B-A3B-like (16.0 GiB)", "4x4GiB"),
    ("Qwen3-30B-A3B-like (16.0 GiB)", "12GiB,4GiB"),
    ("Qwen3-235B-A22B-like (124 GiB)", "4x24GiB"),
    ("Qwen3-235B-A22B-like (124 GiB)", "8x12GiB"),
    ("Qwen3-235B-A22B-like (124 GiB)", "2x32GiB,2x16GiB"),
]
CONFIG = SplitConfig(n_ctx=16384)


def g(n: int) -> str:
    return f"{n / GiB:.2f}"


def main() -> None:
    print("| model | GPUs | -ncmoe (fewest that fits) | its spread GiB | CPU experts GiB | moe-balance, same CPU share: "
          "spread GiB | moe-balance alone: CPU experts GiB | spread GiB | rules | policy time |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, sim in CASES:
        prof, devices = MODELS[name], parse_sim_spec(sim)
        n, ncmoe = next(((n, p) for n in range(prof.n_layer + 1)
                         if (p := plan(prof, devices, CONFIG.replace(n_cpu_moe=n))).fits), (None, None))
        t0 = time.perf_counter()
        alone = moe_balance(prof, devices, CONFIG)
        dt = time.perf_counter() - t0
        if ncmoe is None:
            ncmoe_cells = ["none fits", "-", "-", "-"]
        else:
            share = moe_balance(prof, devices, CONFIG, cpu_expert_bytes_at_least=expert_bytes_on(ncmoe, "CPU"))
            ncmoe_cells = [str(n), g(spread_bytes(ncmoe)), g(expert_bytes_on(ncmoe, "CPU")),
                           f"{g(share.spread_bytes)} (CPU {g(share.cpu_expert_bytes)})"]
        fits = "" if alone.plan.fits else " (does not fit)"
        print(f"| {name} | {sim} | " + " | ".join(ncmoe_cells) +
              f" | {g(alone.cpu_expert_bytes)}{fits} | {g(alone.spread_bytes)} | {len(alone.config.tensor_overrides)} "
              f"| {dt * 1e3:.0f} ms |")
    print(f"-c {CONFIG.n_ctx}, f16 KV; python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
