"""`gpulab plan` and `gpulab inspect` wall time on real models, this tree against another revision.

    .venv/bin/python bench/cli_latency.py [--ref main] [--rounds 15]

Every sample is a fresh process, timed from spawn to exit (what a shell loop waits for). Each
round runs, in a shuffled order, `python -c pass` (the reference), `python -c "import gpulab"`,
and for the demo model (SmolLM2-135M) and Gemma 3 270M `gpulab plan MODEL --sim 2x24GiB -c 4096
-fit off` and `gpulab inspect MODEL`, each under this tree and under --ref (checked out in a
temporary git worktree, same virtual environment). The table gives medians, the ratio to
`python -c pass`'s median and the median of the per-round ratios (paired: both taken in the same
round). Byte code is written and warm before timing, as in an installed package. The load average
is printed before and after: the machine is shared. Beside the wall time, each process's CPU time
(user + system, from getrusage): on a loaded machine a process waits for a core, and its CPU time
is what its wall time would be on an idle one (these commands neither sleep nor wait for I/O once
the files are in the page cache).

Then `gpulab inspect URL` for Gemma 3 from a local HTTP server that answers Range requests and
counts the bytes it sends: bytes fetched and requests, under both trees.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # this checkout's gpulab
from benchkit import loadavg

from gpulab.sources.demo import demo_model_path, gemma3_path

REPO = Path(__file__).resolve().parents[1]

PLAN = ("--sim", "2x24GiB", "-c", "4096", "-fit", "off")


def _env(tree: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "PYTHONPATH")}
    env["PYTHONPATH"] = str(tree)
    return env


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _run(argv: list[str], tree: Path) -> tuple[float, float]:
    """(wall, CPU) seconds of one process."""
    c0, t0 = _cpu(), time.perf_counter()
    r = subprocess.run(argv, cwd=tree, env=_env(tree), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       check=False)
    dt, dc = time.perf_counter() - t0, _cpu() - c0
    if r.returncode not in (0, 1):   # plan: 1 when it does not fit
        raise SystemExit(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.decode()[-500:]}")
    return dt, dc


class _Range(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        srv = self.server
        size = srv.path.stat().st_size
        start, _, end = self.headers["Range"].removeprefix("bytes=").partition("-")
        start, end = int(start), min(int(end), size - 1)
        srv.requests.append(f"{start}-{end}")
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        with open(srv.path, "rb") as f:
            f.seek(start)
            left = end - start + 1
            while left:
                chunk = f.read(min(left, 1 << 16))
                srv.served += len(chunk)
                left -= len(chunk)
                try:
                    self.wfile.write(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    return


def _fetched(path: Path, tree: Path) -> tuple[int, list[str]]:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Range)
    srv.path, srv.served, srv.requests = path, 0, []
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}/{path.name}"
        r = subprocess.run([sys.executable, "-m", "gpulab", "inspect", url], cwd=tree, env=_env(tree),
                           capture_output=True, text=True, timeout=120, check=False)
        if r.returncode:
            raise SystemExit(f"inspect {url} failed: {r.stderr[-500:]}")
        return srv.served, srv.requests
    finally:
        srv.shutdown()
        srv.server_close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ref", default="main", help="the revision to compare with")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    models = {"demo (SmolLM2-135M Q4_1)": Path(demo_model_path()), "Gemma 3 270M Q4_K_M": Path(gemma3_path())}
    rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", a.ref], capture_output=True,
                         text=True, check=True).stdout.strip()
    here = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    py = sys.executable
    with tempfile.TemporaryDirectory(prefix="gpulab-ref-") as tmp:
        ref = Path(tmp) / "ref"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(ref), a.ref], check=True,
                       capture_output=True)
        try:
            trees = {f"{rev} ({a.ref}, before)": ref, f"{here} (this tree)": REPO}
            cases: list[tuple[str, str, list[str], Path]] = [("`python -c pass`", "", [py, "-c", "pass"], REPO)]
            for tname, tree in trees.items():
                cases.append(("`import gpulab`", tname, [py, "-c", "import gpulab"], tree))
                for mname, path in models.items():
                    cases.append((f"`plan` {mname}", tname, [py, "-m", "gpulab", "plan", str(path), *PLAN], tree))
                    cases.append((f"`inspect` {mname}", tname, [py, "-m", "gpulab", "inspect", str(path)], tree))
            for _, _, argv, tree in cases:   # warm: byte code written, files in the page cache
                _run(argv, tree)
                _run(argv, tree)
            load_before = loadavg()
            rng = random.Random(a.seed)
            times: list[list[float]] = [[] for _ in cases]
            cpus: list[list[float]] = [[] for _ in cases]
            for _ in range(a.rounds):
                order = list(range(len(cases)))
                rng.shuffle(order)
                for i in order:
                    wall, cpu = _run(cases[i][2], cases[i][3])
                    times[i].append(wall)
                    cpus[i].append(cpu)
            load_after = loadavg()
            base, base_cpu = times[0], cpus[0]
            b, bc = statistics.median(base), statistics.median(base_cpu)
            print(f"{a.rounds} rounds; load average {load_before} before, {load_after} after; "
                  f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs\n")
            print("| command | tree | wall, median | / `pass` | paired / `pass`, median | CPU, median | CPU / `pass` CPU |")
            print("|---|---|---:|---:|---:|---:|---:|")
            for (label, tname, _, _), ts, cs in zip(cases, times, cpus):
                m, mc = statistics.median(ts), statistics.median(cs)
                paired = statistics.median(t / p for t, p in zip(ts, base))
                print(f"| {label} | {tname or '-'} | {m * 1e3:.0f} ms | {m / b:.2f} | {paired:.2f} | "
                      f"{mc * 1e3:.0f} ms | {mc / bc:.2f} |")
            print("\n`gpulab inspect URL`, Gemma 3 270M from a local Range server:\n")
            print("| tree | bytes fetched | requests |")
            print("|---|---:|---|")
            for tname, tree in trees.items():
                served, reqs = _fetched(models["Gemma 3 270M Q4_K_M"], tree)
                print(f"| {tname} | {served:,} ({served / 2**20:.2f} MiB) | {len(reqs)}: {', '.join(reqs)} |")
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(ref)], capture_output=True,
                           check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
