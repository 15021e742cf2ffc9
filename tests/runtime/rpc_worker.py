"""A process that does the llama.cpp work needing registered RPC devices, for tests/runtime.

Why a separate process: ggml cannot unregister a backend, so RPC devices registered in the
pytest process would stay there for the rest of the session, and once their servers stop,
anything that lets llama.cpp pick its devices itself (llama_cpp.Llama, a default load) aborts
the whole test run in llama.cpp's RPC client. Here they live and die with this worker.

Protocol: one JSON request per line on stdin {"op": ..., "args": {...}}, one JSON answer per
line on the original stdout: {"ok": result} or {"error": class name, "message": ..., "traceback": ...}.
Anything C code prints goes to stderr. The client is conftest.Worker (fixture `worker_factory`).
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from dataclasses import asdict


def main() -> None:
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)   # llama.cpp/ggml printf must not corrupt the answers

    from gpulab.core.config import SplitConfig
    from gpulab.runtime import llama_lib, rpc
    from gpulab.runtime.model import open_model

    def op_register(endpoints):
        return [asdict(d) for d in rpc.register(endpoints)]

    def op_devices():
        return [asdict(d) for d in llama_lib.llama_devices()]

    def op_dev_count():
        return int(llama_lib.ggml().ggml_backend_dev_count())

    def op_default_device_names():
        return llama_lib.default_device_names()

    def op_load(path, config, dry_run=False, use_devices=True):
        cfg = SplitConfig(**config)
        devs = llama_lib.llama_devices() if use_devices else None
        fractions = []
        with open_model(path, cfg, devices=devs, dry_run=dry_run, progress=fractions.append) as m:
            r = m.report
            return {
                "layer_devices": list(r.layer_devices), "buffers": [asdict(b) for b in r.buffers],
                "devices": list(r.devices), "log": r.log, "kv_layer_devices": list(r.kv_layer_devices),
                "dry_run": r.dry_run, "kv_total_bytes": r.kv_total_bytes,
                "notes": list(m.notes), "effective_devices": list(m.effective_config.devices),
                "load_seconds": m.load_seconds, "context_seconds": m.context_seconds,
                "n_progress": len(fractions), "last_progress": fractions[-1] if fractions else None,
            }

    ops = {name[3:]: fn for name, fn in locals().items() if name.startswith("op_")}
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        try:
            answer = {"ok": ops[req["op"]](**req.get("args", {}))}
        except Exception as e:  # noqa: BLE001
            answer = {"error": type(e).__name__, "message": str(e), "traceback": traceback.format_exc()}
        out.write(json.dumps(answer) + "\n")


if __name__ == "__main__":
    main()
