"""Planner speed: one plan for a 128-layer profile on 8 devices, the slider-drag case, and the
speed prediction the lab redraws with it (was a 5 ms assertion in tests/core/measure/test_speed.py).

A ratio against a reference measured in the same run, not a timed test: the reference is
copying the profile's per-layer byte list (the least any planner must touch), so the ratio
says how much work the planner does per layer beyond reading it.
    .venv/bin/python bench/planner_speed.py
"""

from __future__ import annotations

import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # this checkout's gpulab
from gpulab import SplitConfig, parse_sim_spec, plan
from gpulab.core.measure.speed import DeviceSpeed, LinkSpeed, SpeedModel, predict_speed
from gpulab.testing import make_profile


def best_us(fn, number: int, repeat: int = 7) -> float:
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def main() -> None:
    prof = make_profile(n_layer=127)        # 127 blocks + output = 128 placed layers
    devices = parse_sim_spec("8x80GiB")
    configs = [SplitConfig(tensor_split=tuple(float(1 + (i + k) % 3) for i in range(8)), n_ctx=4096 * (1 + k % 4))
               for k in range(16)]
    it = iter(range(1 << 30))
    t_plan = best_us(lambda: plan(prof, devices, configs[next(it) % 16]), number=500)
    t_ref = best_us(lambda: [layer.weights_bytes for layer in prof.layers], number=5000)
    p = plan(prof, devices, configs[0])
    speeds = SpeedModel(devices={d.name: DeviceSpeed(bandwidth_bytes_per_s=1e12, flops_per_s=1e14, overhead_s=0.0)
                                 for d in devices}, link=LinkSpeed(latency_s=50e-6, bytes_per_s=25e9))
    t_speed = best_us(lambda: predict_speed(p, speeds), number=200)
    print(f"load average {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    print("| case | time per call | ratio to reading the layers |")
    print("|---|---|---|")
    print(f"| plan(), 128 layers x 8 devices | {t_plan:.0f} µs | {t_plan / t_ref:.0f}x |")
    print(f"| predict_speed() of that plan | {t_speed:.0f} µs | {t_speed / t_ref:.0f}x |")
    print(f"| reference: read 127 layer sizes | {t_ref:.1f} µs | 1x |")
    print(f"python {sys.version.split()[0]}; budgets: well under 1000 µs per plan "
          f"({'met' if t_plan < 1000 else 'MISSED'}), under 5000 µs per prediction "
          f"({'met' if t_speed < 5000 else 'MISSED'})")


if __name__ == "__main__":
    main()
