"""Fit speed: gpulab's `fit` policy (common_params_fit mirrored, gpulab.core.policies.server_fit) for a 128-layer
MoE model on 8 devices, the slider case: the budget is 20 ms per call.

The sizes make fit take its longest path: the whole model does not fit, the dense-only layers do
(a surplus), so it fills dense-only layers back to front and then converts them to full layers front
to back with overflow layers (about 45 dry runs, each one gpulab plan with up to a hundred -ot
rules). The reference, measured in the same run, is one plain plan of the same model (no rules):
the ratio says how many plain plans one fit costs. llama.cpp's own fit makes the same dry runs as
no_alloc model loads, about a second for a 30B model (tools/fit-params/README.md).
    .venv/bin/python bench/fit_speed.py
"""

from __future__ import annotations

import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # this checkout's gpulab
from gpulab import SplitConfig, parse_sim_spec, plan
from gpulab.core.policies.server_fit import server_fit
from gpulab.testing import MiB, make_hand_moe_profile


def best_ms(fn, number: int, repeat: int = 7) -> float:
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e3


def main() -> None:
    prof = make_hand_moe_profile(n_layer=127, expert_bytes=600 * MiB, dense_bytes=50 * MiB, n_embd=4096)
    devices = parse_sim_spec("8x10GiB")
    config = SplitConfig(n_ctx=0)
    r = server_fit(prof, devices, config)
    assert r.ok and r.overrides, r.reasons          # the long path: MoE with overflow layers
    t_fit = best_ms(lambda: server_fit(prof, devices, config), number=3)
    t_plan = best_ms(lambda: plan(prof, devices, SplitConfig(n_ctx=4096)), number=50)
    print("| case | time per call | ratio to one plain plan |")
    print("|---|---|---|")
    print(f"| server_fit(), 128-layer MoE x 8 devices ({r.n_dry_runs} dry runs, {len(r.overrides)} -ot rules chosen) "
          f"| {t_fit:.1f} ms | {t_fit / t_plan:.0f}x |")
    print(f"| reference: plan(), same model, no rules | {t_plan:.2f} ms | 1x |")
    print(f"python {sys.version.split()[0]}; budget: 20 ms per fit ({'met' if t_fit <= 20 else 'MISSED'})")


if __name__ == "__main__":
    main()
