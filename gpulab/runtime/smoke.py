"""The set-up's smoke test: does the installed llama.cpp run on this host?

    python -m gpulab.runtime.smoke [MODEL]       # exit 0 and one line, or 1 and a paragraph

In a child process it loads the model (default: the demo model) on the CPU, decodes a 64-token
prompt in one batch (ggml's fast CPU paths, AMX among them, start at 32-token batches) and then
8 single tokens. A crash of the child is reported with the signal, the likely cause and how to
rebuild, instead of leaving an environment that looks ready and dies on first use.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

__all__ = ["main", "run_smoke"]

N_PROMPT, N_GEN = 64, 8


def run_smoke(model: str) -> str:
    """In this process: load on the CPU, decode N_PROMPT then N_GEN tokens; a summary line."""
    from ..core.config import SplitConfig
    from .bench import measure
    t0 = time.perf_counter()
    run = measure(model, SplitConfig(devices=("none",), n_ctx=256, n_batch=N_PROMPT, n_ubatch=N_PROMPT),
                  n_prompt=N_PROMPT, n_gen=N_GEN, repetitions=1, warmup=False, nvml=False)
    assert run.pp is not None and run.tg is not None   # both tests were asked for
    return (f"smoke test passed: {N_PROMPT}-token prompt at {run.pp.avg_ts:.0f} t/s and {N_GEN} tokens at "
            f"{run.tg.avg_ts:.0f} t/s on {run.cpu_info or 'the CPU'} ({time.perf_counter() - t0:.1f} s)")


def _paragraph(returncode: int, stderr: str) -> str:
    from .crash import PORTABLE_HINT, REBUILD_HINT, describe_death
    tail = [ln for ln in stderr.strip().splitlines() if ln.strip()][-3:]
    text = (f"The smoke test of llama.cpp failed: {describe_death(returncode, 'a 64-token decode')}. "
            "This environment cannot run models as it is, so the set-up stops here. "
            f"To rebuild llama-cpp-python for this host: {REBUILD_HINT}. To rebuild without any "
            f"CPU-specific code (slower, runs anywhere): {PORTABLE_HINT}. "
            "`python3 gpulab/sources/cpu_features.py --json` shows what the set-up read of this CPU.")
    out = textwrap.fill(text, width=100)
    if tail:
        out += "\nLast lines from the failed process:\n" + "\n".join("  " + ln for ln in tail)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        print(run_smoke(argv[1]), flush=True)
        return 0
    if argv:
        model = argv[0]
    else:
        from ..sources.demo import demo_model_path
        model = str(demo_model_path())
    # the child must die alone: no crash guard (this process reports), no faulthandler noise
    env = {**os.environ, "GPULAB_NO_CRASH_GUARD": "1"}
    proc = subprocess.run([sys.executable, "-m", "gpulab.runtime.smoke", "--child", model],
                          capture_output=True, text=True, env=env)
    if proc.returncode == 0:
        print(proc.stdout.strip())
        return 0
    print(_paragraph(proc.returncode, proc.stderr), file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
