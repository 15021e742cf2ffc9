"""Where ggml-alloc put every tensor of llama.cpp's graph: the layout behind a compute buffer, per device.

Loads an architecture-matrix model (gpulab.sources.arch_models) on three CPU RPC devices with
llama_context_params.cb_eval set, fills the KV cache to n_ctx - n_ubatch first (so that the decode graph
is the one llama.cpp reserved: same n_kv, same layout), decodes one n_ubatch batch with every token an
output, and records each graph node's backend buffer, offset and size as the scheduler hands it over.
Prints, per compute buffer, the tensor that reaches the top and what is live when it is allocated, next
to gpulab's prediction and llama.cpp's logged sizes; --all lists every node. This is how the recurrent
graphs of gpulab/core/placement/recurrent.py were checked node by node.

    .venv/bin/python bench/compute_trace.py mamba2 'SplitConfig(tensor_split=(1, 1), n_ctx=1024)'
    .venv/bin/python bench/compute_trace.py qwen3next 'SplitConfig(n_gpu_layers=4, tensor_split=(1, 1, 1))' --all

Needs llama-cpp-python built with GGML_RPC (scripts/setup.sh). The servers bind 127.0.0.1.
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpulab import SplitConfig, plan, read_profile
from gpulab.runtime import llama_lib, rpc
from gpulab.runtime.model import open_model
from gpulab.sources.arch_models import write_arch_model
from gpulab.sources.host import host_device

MiB = 1 << 20
_USAGE_COMPUTE = 2      # GGML_BACKEND_BUFFER_USAGE_COMPUTE


class _Tensor(ctypes.Structure):   # struct ggml_tensor (ggml/include/ggml.h)
    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
                ("nb", ctypes.c_size_t * 4), ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16),
                ("flags", ctypes.c_int32), ("src", ctypes.c_void_p * 10), ("view_src", ctypes.c_void_p),
                ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64),
                ("extra", ctypes.c_void_p), ("padding", ctypes.c_char * 8)]


def _ggml_base():
    base = llama_lib.ggml_base()
    for name, args, res in (("ggml_backend_buffer_get_base", [ctypes.c_void_p], ctypes.c_void_p),
                            ("ggml_backend_buffer_name", [ctypes.c_void_p], ctypes.c_char_p),
                            ("ggml_backend_buffer_get_usage", [ctypes.c_void_p], ctypes.c_int),
                            ("ggml_nbytes", [ctypes.c_void_p], ctypes.c_size_t),
                            ("ggml_op_desc", [ctypes.c_void_p], ctypes.c_char_p)):
        getattr(base, name).argtypes, getattr(base, name).restype = args, res
    return base


def trace(arch: str, config: SplitConfig) -> tuple[list[dict], dict, dict]:
    """(nodes in execution order, gpulab's compute bytes, llama.cpp's) for `arch` under `config`."""
    base = _ggml_base()
    path = write_arch_model(Path(tempfile.mkdtemp()) / f"{arch}.gguf", arch)
    nodes: list[dict] = []
    seen: set[int] = set()

    def info(ptr: int) -> dict:
        t = _Tensor.from_address(ptr)
        d = {"ptr": ptr, "name": t.name.decode(errors="replace"), "op": base.ggml_op_desc(ptr).decode(),
             "bytes": base.ggml_nbytes(ptr), "view": bool(t.view_src), "view_src": t.view_src}
        if t.buffer and t.data:
            d.update(buf=base.ggml_backend_buffer_name(t.buffer).decode(),
                     usage=base.ggml_backend_buffer_get_usage(t.buffer),
                     off=t.data - base.ggml_backend_buffer_get_base(t.buffer))
        d["src"] = [info_src(s) for s in t.src if s]
        return d

    def info_src(ptr: int) -> dict:
        t = _Tensor.from_address(ptr)
        d = {"ptr": ptr, "name": t.name.decode(errors="replace"), "bytes": base.ggml_nbytes(ptr),
             "view": bool(t.view_src), "view_src": t.view_src}
        if t.buffer and t.data:
            d.update(buf=base.ggml_backend_buffer_name(t.buffer).decode(),
                     usage=base.ggml_backend_buffer_get_usage(t.buffer),
                     off=t.data - base.ggml_backend_buffer_get_base(t.buffer))
        return d

    def on_node(ptr, ask, _user) -> bool:
        if ask and ptr not in seen:
            seen.add(ptr)
            nodes.append(info(ptr))
        return not ask

    lc = llama_lib.llama_cpp()
    callback = lc.ggml_backend_sched_eval_callback(on_node)
    with rpc.start_servers(3) as cluster:
        rpc.register(cluster.endpoints)
        devices = llama_lib.llama_devices()
        predicted = plan(read_profile(path), [d for d in devices if d.kind == "rpc"], config, host_device())
        loaded = open_model(path, config, devices=devices, check_fit=False,
                            context_params={"cb_eval": callback, "cb_eval_user_data": None})
        try:
            n = config.effective_n_ubatch
            n_ctx = -(-config.n_ctx // 256) * 256
            pos = 0
            while True:
                last = pos + 2 * n > n_ctx
                batch = lc.llama_batch_init(n, 0, 1)
                for i in range(n):
                    batch.token[i], batch.pos[i], batch.n_seq_id[i] = 300 + (pos + i) % 100, pos + i, 1
                    batch.seq_id[i][0], batch.logits[i] = 0, int(last)
                batch.n_tokens = n
                if last:
                    nodes.clear()
                    seen.clear()
                rc = lc.llama_decode(loaded.ctx, batch)
                lc.llama_batch_free(batch)
                pos += n
                if rc != 0:
                    raise SystemExit(f"llama_decode returned {rc}")
                if last:
                    break
            llama = {d.name: loaded.report.bytes_on(d.name, "compute") for d in predicted.devices}
        finally:
            loaded.close()
    return nodes, {d.name: d.compute_bytes for d in predicted.devices}, llama


def show(nodes: list[dict], every: bool = False) -> None:
    """Per compute buffer: the tensor reaching the top and what is live when it is allocated."""
    root_of = {n["ptr"]: n["view_src"] for n in nodes}
    for n in nodes:
        for s in n["src"]:
            root_of.setdefault(s["ptr"], s["view_src"])

    def root(p: int) -> int:
        while root_of.get(p):
            p = root_of[p]
        return p

    last: dict[int, int] = {}
    first: dict[int, tuple[int, dict]] = {}
    for i, n in enumerate(nodes):
        for s in n["src"]:
            last[root(s["ptr"])] = i
        for t in [n, *n["src"]]:
            if t.get("usage") == _USAGE_COMPUTE and not t["view"] and t["ptr"] not in first:
                first[t["ptr"]] = (i, t)
    by_buf: dict[str, list[tuple[int, dict]]] = {}
    for i, t in first.values():
        by_buf.setdefault(t["buf"], []).append((i, t))
    for buf, ts in by_buf.items():
        i_top, top = max(ts, key=lambda it: it[1]["off"] + it[1]["bytes"])
        print(f"== {buf}: top {(top['off'] + top['bytes']) / MiB:.3f} MiB by {top['name']} at node {i_top}")
        for i, t in sorted(ts, key=lambda it: it[1]["off"]):
            if every or i <= i_top <= last.get(t["ptr"], 1 << 30):
                print(f"   n{i:<5} {t['off'] / MiB:9.3f} +{t['bytes'] / MiB:8.3f}  {t['name']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("arch")
    ap.add_argument("config", help="a SplitConfig(...) expression")
    ap.add_argument("--all", action="store_true", help="every tensor of every buffer, not only the live ones")
    args = ap.parse_args()
    config = eval(args.config, {"SplitConfig": SplitConfig})
    nodes, predicted, llama = trace(args.arch, config)
    print("gpulab   ", {k: round(v / MiB, 3) for k, v in predicted.items()})
    print("llama.cpp", {k: round(v / MiB, 3) for k, v in llama.items()})
    show(nodes, args.all)


if __name__ == "__main__":
    main()
