"""Preflight of bench/gpu_truth.sh: can this Python load a model with this llama.cpp build at all?

Each probe runs in a child process (a crash there is a result, not the end of the run):
  raw     llama-cpp-python's bindings alone: llama_model_load_from_file with default params
  gpulab  gpulab.runtime.model.open_model with its defaults (the measuring path)
  cpu     the raw probe with CUDA hidden (CUDA_VISIBLE_DEVICES=''): the bindings without the GPU
Where one crashes, the same probe runs again under cuda-gdb (or gdb) for the C backtrace, and then
under each remedy in REMEDIES; the first remedy under which the gpulab probe loads is printed as
`export ...` lines on stdout for the caller to eval. Diagnostics go to stderr and OUT/preflight.log.

    python3 bench/gpu_preflight.py MODEL OUT
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

PROBES = {
    "raw": "import llama_cpp\nllama_cpp.llama_backend_init()\np = llama_cpp.llama_model_default_params()\n"
           "m = llama_cpp.llama_model_load_from_file({path!r}.encode(), p)\nprint('loaded' if m else 'refused')\n",
    "gpulab": "from gpulab.runtime.model import open_model\nwith open_model({path!r}) as m:\n"
              "    print('loaded', m.report.layer_devices[-1])\n",
}


def _compiler_libstdcxx() -> str | None:
    gcc = shutil.which("gcc")
    if not gcc:
        return None
    out = subprocess.run([gcc, "-print-file-name=libstdc++.so.6"], capture_output=True, text=True).stdout.strip()
    return out if out and os.path.isabs(out) and os.path.exists(out) else None


def remedies() -> list[tuple[str, dict]]:
    out = []
    lib = _compiler_libstdcxx()
    if lib:   # the C++ runtime the build was compiled against, before any other the interpreter loads
        out.append((f"LD_PRELOAD={lib}", {"LD_PRELOAD": lib}))
    out.append(("GPULAB_NO_CRASH_GUARD=1", {"GPULAB_NO_CRASH_GUARD": "1"}))
    return out


def run(probe: str, path: str, env: dict, log, timeout: int = 120) -> tuple[int, str]:
    p = subprocess.run([sys.executable, "-c", PROBES[probe].format(path=path)], capture_output=True, text=True,
                       env={**os.environ, **env}, timeout=timeout)
    text = (p.stdout + p.stderr)[-3000:]
    log.write(f"\n=== {probe} {env or ''}: rc {p.returncode}\n{text}\n")
    return p.returncode, text


def backtrace(probe: str, path: str, log) -> None:
    dbg = shutil.which("cuda-gdb") or shutil.which("gdb")
    if not dbg:
        log.write("\n(no cuda-gdb or gdb for a backtrace)\n")
        return
    code = PROBES[probe].format(path=path)
    try:
        p = subprocess.run([dbg, "-batch", "-ex", "run", "-ex", "bt 30", "-ex", "info sharedlibrary",
                            "--args", sys.executable, "-c", code], capture_output=True, text=True, timeout=150)
        log.write(f"\n=== backtrace ({dbg}) of {probe}\n{(p.stdout + p.stderr)[-12000:]}\n")
    except subprocess.TimeoutExpired:
        log.write(f"\n=== backtrace of {probe}: {dbg} timed out\n")


def main() -> int:
    path, out = sys.argv[1], Path(sys.argv[2])
    with open(out / "preflight.log", "w") as log:
        log.write(f"python {sys.executable}\n")
        for k in ("LD_LIBRARY_PATH", "LD_PRELOAD", "LLAMA_CPP_LIB_PATH", "PYTHONPATH", "CUDA_VISIBLE_DEVICES"):
            log.write(f"{k}={os.environ.get(k, '')}\n")
        results = {name: run(name, path, {}, log)[0] for name in PROBES}
        results["cpu"] = run("raw", path, {"CUDA_VISIBLE_DEVICES": ""}, log)[0]
        print(f"[preflight] raw {results['raw']}, gpulab {results['gpulab']}, raw without CUDA {results['cpu']}",
              file=sys.stderr)
        if results["gpulab"] == 0:
            return 0
        backtrace("raw" if results["raw"] != 0 else "gpulab", path, log)
        for label, env in remedies():
            rc, _ = run("gpulab", path, env, log)
            print(f"[preflight] gpulab with {label}: rc {rc}", file=sys.stderr)
            if rc == 0:
                for k, v in env.items():
                    print(f"export {k}={v}")
                return 0
    print("[preflight] no remedy made the gpulab probe load; see preflight.log", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
