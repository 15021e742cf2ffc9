"""Lab update: what one drag on the layer strip costs the kernel, 128 layers on 8 devices.

A drag sends the strip's layer counts (gpulab.ui.strip); the lab writes the -ts that gives them,
re-plans and redraws. Two times per drag, from the same drags:
- drag -> figures redrawn: plan, layer map and memory bars (FigureWidgets, plotly_restyle), their
  saved state, the strip, the share labels, status and export panel (`lab.last_update_s`);
- drag -> live fit line: llama-server's -fit for the current -c/-fitt and the plan of its result,
  for the thin strip (`lab.last_fit_s`). Fit chooses -ngl and -ts itself, so a drag leaves its
  input unchanged and the lab keeps its last answer; a -c step (the next row) runs fit again.
Every widget message is built and JSON-encoded as ipykernel would (nothing is sent). Each drag
moves one boundary by one layer (what a mouse move or an arrow key does). Profiles: a dense
128-layer model (127 blocks + output) on 8x80GiB, and bench/fit_speed.py's 128-layer MoE on
8x10GiB (fit's long path: overflow layers, -ot rules), and a 128-layer Qwen3-Next (bench/replay_speed.py's
scaled model: its compute buffers replayed op by op, gpulab.core.placement.ggml_replay) on 8x2GiB. Medians,
with the ratio to one plain `plan()` measured in the same run and the load average.

    .venv/bin/python bench/lab_update.py [NAME]     # NAME: only the cases whose name contains it
    GPULAB_BENCH_SRC=/tmp/before .venv/bin/python bench/lab_update.py    # another checkout's gpulab
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import timeit
from pathlib import Path

# this checkout's gpulab, or another's (GPULAB_BENCH_SRC=DIR: a before/after pair in one shell run)
sys.path.insert(0, os.environ.get("GPULAB_BENCH_SRC") or str(Path(__file__).resolve().parents[1]))
from gpulab.testing import MiB, make_hand_moe_profile, make_profile

N_DRAGS = 120


def _serialising_comms() -> list[int]:
    """Make every widget's comm JSON-encode what it would publish; returns a counter."""
    import comm

    sent = [0, 0]   # messages, bytes

    class SerialisingComm(comm.DummyComm):
        def publish_msg(self, msg_type, data=None, metadata=None, buffers=None, **keys):
            sent[0] += 1
            sent[1] += len(json.dumps(data, default=str)) + sum(len(memoryview(b).cast("B")) for b in buffers or ())

    comm.create_comm = lambda *a, **k: SerialisingComm(*a, **k)
    return sent


def drags(lab, n: int, first: list[float] | None = None) -> tuple[list[float], list[float]]:
    """n one-layer boundary moves, back and forth across the 7 boundaries; (figure times, fit times).
    `first` gets the figure times of the drags to counts not seen before in the sequence (the planner's
    answers are remembered per placement, so only these re-plan from scratch)."""
    counts = [16] * 8
    counts[-1] = lab.profile.n_layer + 1 - 16 * 7
    seen = {tuple(counts)}
    draw, fit = [], []
    for k in range(n):
        b = k % 7
        step = 1 if (k // 7) % 2 == 0 else -1
        counts[b] += step
        counts[b + 1] -= step
        lab.strip.request = {"counts": list(counts), "seq": k}
        assert lab.error is None, lab.error
        draw.append(lab.last_update_s)
        fit.append(lab.last_fit_s)
        if first is not None and tuple(counts) not in seen:
            first.append(lab.last_update_s)
        seen.add(tuple(counts))
    return draw, fit


def ctx_steps(lab, n: int) -> list[float]:
    """n changes of -c (up and down the slider's options): the live fit runs each time."""
    opts = [c for c in lab.n_ctx.options if 1024 <= c <= 32768]
    out = []
    for k in range(n):
        lab.n_ctx.value = opts[k % len(opts)] if (k // len(opts)) % 2 == 0 else opts[-1 - k % len(opts)]
        assert lab.error is None, lab.error
        out.append(lab.last_fit_s)
    return out


def main() -> None:
    sent = _serialising_comms()
    import tempfile

    from gpulab import SplitConfig, parse_sim_spec, plan, read_profile
    from gpulab.ui.lab import SplitLab
    sys.path.insert(1, str(Path(__file__).resolve().parent))
    from replay_speed import scaled_model

    hybrid = read_profile(scaled_model("qwen3next", 127, Path(tempfile.mkdtemp()) / "qwen3next-127.gguf"))
    cases = [("dense, 8x80GiB", make_profile(n_layer=127), "8x80GiB"),
             ("MoE, 8x10GiB", make_hand_moe_profile(n_layer=127, expert_bytes=600 * MiB, dense_bytes=50 * MiB,
                                                    n_embd=4096), "8x10GiB"),
             ("Qwen3-Next (replayed), 8x2GiB", hybrid, "8x2GiB")]
    cases = [c for c in cases if len(sys.argv) < 2 or sys.argv[1] in c[0]]
    ms = 1e3
    print("| 128 layers x 8 devices, one-layer drags | drag -> figures redrawn | drag -> live fit line "
          "| ratio to plan() (figures / fit) |")
    print("|---|---|---|---|")
    for name, prof, spec in cases:
        lab = SplitLab(prof, sim=spec, debounce=0)       # debounce 0: every drag redraws at once
        k0 = sent[0]
        new: list[float] = []
        draw, fit = drags(lab, N_DRAGS, new)
        msgs = (sent[0] - k0) / N_DRAGS
        devices = parse_sim_spec(spec)
        cfg = SplitConfig(tensor_split=tuple(float(x) for x in [16] * 7 + [prof.n_layer + 1 - 112]))
        t_plan = min(timeit.repeat(lambda p=prof, d=devices, c=cfg, h=lab.host: plan(p, d, c, h), number=50,
                                   repeat=5)) / 50
        d, f = statistics.median(draw), statistics.median(fit)
        c = statistics.median(ctx_steps(lab, 24))
        print(f"| {name}: drags, median of {N_DRAGS} ({msgs:.0f} widget messages a drag) | {d * ms:.1f} ms "
              f"| {f * ms:.2f} ms | {d / t_plan:.0f}x / {f / t_plan:.1f}x (plan {t_plan * ms:.2f} ms) |")
        print(f"| {name}: the {len(new)} drags to a new placement, median | {statistics.median(new) * ms:.1f} ms "
              f"| | {statistics.median(new) / t_plan:.0f}x / - |")
        print(f"| {name}: -c steps, median of 24 | | {c * ms:.1f} ms | - / {c / t_plan:.0f}x |")
        lab.close()
    load = os.getloadavg()
    print(f"python {sys.version.split()[0]}; {os.cpu_count()} CPUs; load average {load[0]:.1f} {load[1]:.1f} "
          f"{load[2]:.1f}")


if __name__ == "__main__":
    main()
