"""Lab redraw: the Python-side time of one SplitLab update, 128 layers on 8 devices.

One update is what a slider move costs the kernel: re-plan, copy the new data into the layer
map and the memory bars (FigureWidgets), the share labels, the status line and the export
panel, including building and JSON-encoding every widget message (the widgets get a comm that
serialises what it would send, as ipykernel's session does; nothing goes over a socket).
Reported as a ratio to the bare plan() call measured in the same run, as docs/BENCHMARKS.md
asks; the target is under 30 ms per update.

    .venv/bin/python bench/lab_update.py
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # this checkout's gpulab
from gpulab.testing import make_profile

TARGET_MS = 30.0


def _serialising_comms() -> list[int]:
    """Make every widget's comm JSON-encode what it would publish; returns a byte counter."""
    import comm

    sent = [0, 0]   # messages, bytes

    class SerialisingComm(comm.DummyComm):
        def publish_msg(self, msg_type, data=None, metadata=None, buffers=None, **keys):
            sent[0] += 1
            sent[1] += len(json.dumps(data, default=str)) + sum(len(memoryview(b).cast("B")) for b in buffers or ())

    comm.create_comm = lambda *a, **k: SerialisingComm(*a, **k)
    return sent


def main() -> None:
    sent = _serialising_comms()
    from gpulab import SplitConfig, parse_sim_spec, plan
    from gpulab.ui.lab import SplitLab

    prof = make_profile(n_layer=127)            # 127 blocks + output = 128 placed layers
    devices = parse_sim_spec("8x80GiB")
    lab = SplitLab(prof, sim="8x80GiB", debounce=0)    # debounce 0: every change redraws at once
    host = lab.host

    # reference: the bare planner call for the same kind of change
    configs = [SplitConfig(tensor_split=tuple(float(1 + (i + k) % 3) for i in range(8))) for k in range(16)]
    it = iter(range(1 << 30))
    t_plan = min(timeit.repeat(lambda: plan(prof, devices, configs[next(it) % 16], host), number=200, repeat=5)) / 200

    # one slider move = one update; values cycle so every move changes the placement
    times, k0 = [], sent[0]
    n_moves = 300
    for k in range(n_moves):
        slider = lab.split_sliders[k % 8]
        t0 = time.perf_counter()
        slider.value = round(0.05 + ((k * 7) % 19) / 19, 2)
        times.append(time.perf_counter() - t0)
    msgs = (sent[0] - k0) / n_moves
    assert lab.error is None and lab.plan is not None

    # parts, for the table: figures only, the export panel only
    from gpulab.ui import figures as F
    from gpulab.ui.html import exports_html
    p = lab.plan
    t_fig = min(timeit.repeat(lambda: (F.apply(lab.layer_fig, p, "layers", order=lab.order),
                                       F.apply(lab.memory_fig, p, "memory", order=lab.order, unit=lab.unit)),
                              number=50, repeat=5)) / 50
    t_exp = min(timeit.repeat(lambda: exports_html(lab.exports(p)), number=50, repeat=5)) / 50
    t_sync = min(timeit.repeat(lambda: (F.sync_widget_state(lab.layer_fig), F.sync_widget_state(lab.memory_fig)),
                               number=50, repeat=5)) / 50

    med = statistics.median(times)
    p90 = sorted(times)[int(0.9 * len(times))]
    ms = 1e3
    print("| case (128 layers x 8 devices) | time | ratio to plan() |")
    print("|---|---|---|")
    print(f"| one lab update (slider move), median of {n_moves} | {med * ms:.1f} ms | {med / t_plan:.0f}x |")
    print(f"| one lab update, 90th percentile | {p90 * ms:.1f} ms | {p90 / t_plan:.0f}x |")
    print(f"| of which: both figures (`figures.apply`) | {t_fig * ms:.1f} ms | {t_fig / t_plan:.0f}x |")
    print(f"| of which: saved state for later views (`sync_widget_state`) | {t_sync * ms:.1f} ms | "
          f"{t_sync / t_plan:.0f}x |")
    print(f"| of which: export panel (`exports_html(lab.exports())`) | {t_exp * ms:.1f} ms | {t_exp / t_plan:.0f}x |")
    print(f"| reference: `plan()` alone | {t_plan * ms:.2f} ms | 1x |")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{msgs:.1f} widget messages per update (JSON-encoded, not sent); python {sys.version.split()[0]}; "
          f"{os.cpu_count()} CPUs, load average {load:.1f}; "
          f"target < {TARGET_MS:.0f} ms per update: {'met' if p90 * ms < TARGET_MS else 'MISSED'} (90th percentile)")
    lab.close()


if __name__ == "__main__":
    main()
