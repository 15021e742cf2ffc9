"""`import gpulab` time, this tree against another revision, each in fresh interpreters.

    .venv/bin/python bench/import_time.py [--ref a4cb138] [--runs 20]

Each sample is a new `python -c "import gpulab"` (wall time, so the interpreter's own start is
in it); `python -c pass` is the reference measured in the same run, and the table gives what
importing gpulab adds to it, as milliseconds and as a ratio, with the load average before and after. The other revision is checked out
in a temporary git worktree and imported from there with the same virtual environment. Also
printed: which heavy modules each import pulls in (llama_cpp, numpy, ipywidgets, plotly, pynvml).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchkit import loadavg

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("llama_cpp", "numpy", "gguf", "ipywidgets", "plotly", "pynvml", "IPython", "pandas")


def _times(code: str, path: Path, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], cwd=path, check=True, env={"PYTHONPATH": str(path)})
        out.append(time.perf_counter() - t0)
    return out


def _loaded(path: Path) -> list[str]:
    code = f"import sys, gpulab; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], cwd=path, capture_output=True, text=True,
                       env={"PYTHONPATH": str(path)}, check=True)
    return [m for m in r.stdout.strip().split(",") if m]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ref", default="a4cb138", help="the revision to compare with")
    ap.add_argument("--runs", type=int, default=20)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="gpulab-ref-") as tmp:
        ref = Path(tmp) / "ref"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(ref), a.ref], check=True,
                       capture_output=True)
        try:
            print(f"load average before: {loadavg()}")
            rows = []
            for _ in range(2):     # interleaved: both trees see the same machine
                base = _times("pass", REPO, a.runs)
                here = _times("import gpulab", REPO, a.runs)
                there = _times("import gpulab", ref, a.runs)
                rows.append((base, here, there))
            base = [x for r in rows for x in r[0]]
            here = [x for r in rows for x in r[1]]
            there = [x for r in rows for x in r[2]]
            b = statistics.median(base)
            print("| tree | median `import gpulab` | added to `python -c pass` | ratio to `pass` | heavy modules loaded |")
            print("|---|---:|---:|---:|---|")
            for label, ts, path in ((f"{a.ref} (before)", there, ref), ("this tree", here, REPO)):
                m = statistics.median(ts)
                print(f"| {label} | {m * 1e3:.0f} ms | {(m - b) * 1e3:.0f} ms | {m / b:.2f} | "
                      f"{', '.join(_loaded(path)) or 'none'} |")
            print(f"\n`python -c pass`: {b * 1e3:.0f} ms median; {len(base)} samples per row; python "
                  f"{sys.version.split()[0]}; load average after: {loadavg()}")
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(ref)], capture_output=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
