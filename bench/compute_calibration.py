"""Compute buffers: gpulab's prediction against real llama.cpp, per device.

Writes a few random-weight GGUFs (gpulab.sources.synth: dense GQA and MHA, gemma2/gemma3
sliding window, qwen3moe and Mixtral-style MoE), starts three llama.cpp RPC servers on this
machine (each serves its CPU as a device), loads every model across a grid of n_ctx, n_ubatch,
flash attention, n_gpu_layers and tensor splits, and compares every `compute buffer size`
llama.cpp reports with `gpulab.plan(...).devices[i].compute_bytes`.

    .venv/bin/python bench/compute_calibration.py            # full grid, 1-2 minutes
    .venv/bin/python bench/compute_calibration.py --quick    # one n_ctx/n_ubatch pair
    .venv/bin/python bench/compute_calibration.py --rows all # print every device row

Needs llama-cpp-python built with GGML_RPC (scripts/setup.sh). The servers bind 127.0.0.1.
The planner places the layers itself (tensor_split, n_gpu_layers), so a row is an end-to-end
check; rows where its placement differs from llama.cpp's `assigned to device` lines are counted.
Profiles are built from the synth specs (what a GGUF reader must find in those files); where
gpulab.read_profile is available its reading of the written files is compared with them.
"""

from __future__ import annotations

import argparse
import ctypes
import itertools
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpulab import Device, SplitConfig, plan
from gpulab.core.ggml_types import ggml_type_id
from gpulab.core.profile import LayerProfile, ModelProfile, TensorInfo
from gpulab.sources.synth import SynthSpec, _n_bytes, _tensors, write_model

MiB = 1024 ** 2

# Shapes with the proportions of real models (FFN/embd, heads, experts), small enough that
# shipping the weights to the RPC servers stays cheap.
MODELS: dict[str, SynthSpec] = {
    "gqa-2048": SynthSpec(n_layer=3, n_embd=2048, n_ff=5632, n_head=32, n_head_kv=4, n_vocab=32000,
                          weight_type="Q4_0", name="gqa-2048"),
    "gqa-1024": SynthSpec(n_layer=4, n_embd=1024, n_ff=2816, n_head=16, n_head_kv=4, n_vocab=32000,
                          weight_type="Q4_0", name="gqa-1024"),
    "mha-768": SynthSpec(n_layer=4, n_embd=768, n_ff=2048, n_head=12, n_head_kv=12, n_vocab=8192,
                         weight_type="Q8_0", name="mha-768"),
    "smol-576": SynthSpec(n_layer=4, n_embd=576, n_ff=1536, n_head=9, n_head_kv=3, n_vocab=49152,
                          weight_type="Q4_0", name="smol-576"),
    "gemma2-swa": SynthSpec(arch="gemma2", n_layer=4, n_embd=512, n_ff=2048, n_head=8, n_head_kv=4,
                            n_vocab=8192, tied_output=True, sliding_window=1024, weight_type="Q8_0",
                            name="gemma2-swa"),
    "gemma3-swa": SynthSpec(arch="gemma3", n_layer=6, n_embd=640, n_ff=2560, n_head=4, n_head_kv=1,
                            head_dim=256, n_vocab=16384, tied_output=True, sliding_window=512,
                            weight_type="Q8_0", name="gemma3-swa"),
    "qwen3moe": SynthSpec(arch="qwen3moe", n_layer=4, n_embd=512, n_ff=1536, n_head=8, n_head_kv=4,
                          n_vocab=8192, n_expert=32, n_expert_used=8, n_ff_exp=192, weight_type="Q4_0",
                          name="qwen3moe"),
    "mixtral-moe": SynthSpec(n_layer=4, n_embd=512, n_ff=1792, n_head=8, n_head_kv=2, n_vocab=8192,
                             n_expert=4, n_expert_used=2, weight_type="Q4_0", name="mixtral-moe"),
}

_SERVER = r"""
import ctypes, importlib.util, os, sys, threading, time
# libggml by soname from llama_cpp/lib, found without importing llama_cpp
d = os.path.join(importlib.util.find_spec("llama_cpp").submodule_search_locations[0], "lib")
ggml = ctypes.CDLL(os.path.join(d, "libggml.so.0"))
rpc = ctypes.CDLL(os.path.join(d, "libggml-rpc.so.0"))
ggml.ggml_backend_load_all()
ggml.ggml_backend_dev_by_type.restype = ctypes.c_void_p
ggml.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
dev = (ctypes.c_void_p * 1)(ggml.ggml_backend_dev_by_type(0))   # the CPU device
rpc.ggml_backend_rpc_start_server.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t,
                                              ctypes.c_size_t, ctypes.c_void_p]
parent = os.getppid()
def watchdog():   # leave with the parent, even if it dies in a GGML_ABORT
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)
threading.Thread(target=watchdog, daemon=True).start()
rpc.ggml_backend_rpc_start_server(sys.argv[1].encode(), None, 1, 1, dev)
"""


def _lib_dir() -> Path:
    import importlib.util
    spec = importlib.util.find_spec("llama_cpp")
    return Path(spec.submodule_search_locations[0]) / "lib"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaCpp:
    """In-process llama.cpp with RPC devices; loads a model and reads its compute buffers."""

    def __init__(self, n_servers: int) -> None:
        code = _SERVER
        self.endpoints = [f"127.0.0.1:{_free_port()}" for _ in range(n_servers)]
        self.procs = [subprocess.Popen([sys.executable, "-c", code, ep], stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL) for ep in self.endpoints]
        for ep in self.endpoints:
            host, port = ep.split(":")
            for _ in range(200):
                try:
                    socket.create_connection((host, int(port)), 0.2).close()
                    break
                except OSError:
                    time.sleep(0.05)
        import llama_cpp
        self.llama = llama_cpp
        d = _lib_dir()
        ggml = ctypes.CDLL(str(d / "libggml.so.0"))
        rpc = ctypes.CDLL(str(d / "libggml-rpc.so.0"))
        rpc.ggml_backend_rpc_add_server.restype = ctypes.c_void_p
        rpc.ggml_backend_rpc_add_server.argtypes = [ctypes.c_char_p]
        ggml.ggml_backend_register.argtypes = [ctypes.c_void_p]
        self.lines: list[str] = []

        @llama_cpp.llama_log_callback
        def on_log(level, text, user):
            self.lines.append(text.decode(errors="replace"))

        self._on_log = on_log   # keep the callback alive
        llama_cpp.llama_log_set(on_log, None)
        llama_cpp.llama_backend_init()
        for ep in self.endpoints:   # registration order = RPC0, RPC1, ...
            ggml.ggml_backend_register(rpc.ggml_backend_rpc_add_server(ep.encode()))

    def close(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()

    def measure(self, path: str, cfg: SplitConfig) -> tuple[dict[str, int], list[str]]:
        """llama.cpp's compute buffer bytes per device, and the device of every layer."""
        L = self.llama
        self.lines.clear()
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = cfg.n_gpu_layers
        ts = list(cfg.tensor_split) + [0.0] * (16 - len(cfg.tensor_split))
        mp.tensor_split = (ctypes.c_float * 16)(*ts)
        model = L.llama_model_load_from_file(path.encode(), mp)
        if not model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = cfg.n_ctx, cfg.n_batch, cfg.n_ubatch
        cp.n_seq_max = cfg.n_seq_max
        cp.type_k, cp.type_v = ggml_type_id(cfg.type_k), ggml_type_id(cfg.type_v)
        cp.flash_attn_type = {"off": 0, "on": 1, "auto": -1}[cfg.flash_attn]
        cp.swa_full = cfg.swa_full        # llama_context_default_params says true; SplitConfig false
        cp.offload_kqv = cfg.offload_kqv
        ctx = L.llama_init_from_model(model, cp)
        if ctx:
            L.llama_free(ctx)   # ~llama_context logs the buffers to 4 decimals (debug level)
        L.llama_model_free(model)
        if not ctx:
            raise RuntimeError(f"llama.cpp could not create a context for {path} with {cfg}")
        sizes: dict[str, int] = {}
        exact = re.compile(r"~llama_context:\s+(\S+) compute buffer size is\s+([\d.]+) MiB")
        rough = re.compile(r"sched_reserve:\s+(\S+) compute buffer size =\s+([\d.]+) MiB")
        for pat in (rough, exact):     # the 4-decimal lines win where both are present
            for line in self.lines:
                m = pat.search(line)
                if m:
                    sizes[self._device(m.group(1))] = round(float(m.group(2)) * MiB)
        layers = [m.group(1) for line in self.lines
                  if (m := re.search(r"layer\s+\d+ assigned to device (\S+),", line))]
        return sizes, layers

    def _device(self, buffer_name: str) -> str:
        # RPC buffers are named 'RPC<i>[host:port]' with i per server; devices RPC0, RPC1, ...
        # are numbered in registration order
        m = re.match(r"RPC\d+\[(.+)\]$", buffer_name)
        return f"RPC{self.endpoints.index(m.group(1))}" if m else buffer_name


def profile_of(spec: SynthSpec) -> ModelProfile:
    """The ModelProfile of a synth model, from its spec (what gpulab.read_profile reads back)."""
    tensors = [(n, shape, t, _n_bytes(shape, t)) for n, shape, t in _tensors(spec)]
    # llama.cpp's load_swa_pattern: gemma2 every 2nd layer is global, gemma3 every 6th
    pattern = {"gemma2": 2, "gemma3": 6 if spec.sliding_window else 0}.get(spec.arch, 0)
    n_swa = spec.sliding_window or (4096 if spec.arch == "gemma2" else 0)
    hd = spec.head_dim_
    layers = tuple(
        LayerProfile(index=i, tensors=tuple(TensorInfo(n, t, s, b) for n, s, t, b in tensors
                                            if n.startswith(f"blk.{i}.")),
                     n_head=spec.n_head, n_head_kv=spec.n_head_kv, n_embd_head_k=hd, n_embd_head_v=hd,
                     is_swa=bool(pattern) and i % pattern < pattern - 1)
        for i in range(spec.n_layer))
    return ModelProfile(
        path="", arch=spec.arch, name=spec.name, file_bytes=0, n_layer=spec.n_layer, n_embd=spec.n_embd,
        n_ff=spec.n_ff, n_vocab=spec.n_vocab, n_ctx_train=spec.n_ctx_train, layers=layers,
        input_tensors=tuple(TensorInfo(n, t, s, b) for n, s, t, b in tensors if n == "token_embd.weight"),
        output_tensors=tuple(TensorInfo(n, t, s, b) for n, s, t, b in tensors if n.startswith("output")),
        tied_output=spec.tied_output, n_expert=spec.n_expert, n_expert_used=spec.n_expert_used,
        n_swa=n_swa if pattern else 0)


def _shape(p: ModelProfile) -> tuple:
    # what the compute model reads of a profile
    return (p.arch, p.n_layer, p.n_embd, p.n_ff, p.n_vocab, p.n_expert, p.n_expert_used, p.n_swa,
            tuple((layer.n_head, layer.n_head_kv, layer.n_embd_head_k, layer.n_embd_head_v, layer.is_swa) for layer in p.layers),
            tuple(t.shape for t in p.layers[0].tensors if t.is_expert))


def check_reader(paths: dict[str, str]) -> str:
    try:
        from gpulab import read_profile
        differ = [n for n, path in paths.items() if _shape(read_profile(path)) != _shape(profile_of(MODELS[n]))]
    except Exception as exc:    # noqa: BLE001 - the reader is optional here
        return f"gpulab.read_profile not checked ({type(exc).__name__}: {exc})"
    return ("gpulab.read_profile reads every model as its spec" if not differ
            else f"gpulab.read_profile DIFFERS from the spec for: {', '.join(differ)}")


def grid(spec: SynthSpec, quick: bool) -> list[SplitConfig]:
    L = spec.n_layer
    ctxs, ubs = ((4096,), (512,)) if quick else ((512, 4096), (128, 512))
    out = []
    for n_ctx, n_ub, fa in itertools.product(ctxs, ubs, ("on", "off")):
        base = SplitConfig(n_ctx=n_ctx, n_ubatch=n_ub, n_batch=2048, flash_attn=fa)
        # two devices (the third a model device without layers), all / part / none offloaded
        for ngl in (-1, L // 2 + 1, 1, 0):
            out.append(base.replace(n_gpu_layers=ngl, tensor_split=(1.0, 1.0, 0.0)))
        # three devices, uneven
        for ngl in (-1, L // 2 + 2):
            out.append(base.replace(n_gpu_layers=ngl, tensor_split=(2.0, 1.0, 1.0)))
    # a few less common settings: several sequences, a quantized KV cache, --swa-full
    base = SplitConfig(n_ctx=4096, n_ubatch=512, n_batch=2048, flash_attn="on", tensor_split=(1.0, 1.0, 0.0))
    extras = [dict(n_seq_max=2), dict(type_k="q8_0", type_v="q8_0")]
    if spec.sliding_window:
        extras.append(dict(swa_full=True))
    for extra, ngl in itertools.product(extras, (-1, L // 2 + 1)):
        out.append(base.replace(n_gpu_layers=ngl, **extra))
    return out


def describe(cfg: SplitConfig) -> str:
    ts = "/".join(f"{x:g}" for x in cfg.tensor_split)
    text = f"ctx {cfg.n_ctx} ub {cfg.n_ubatch} fa {cfg.flash_attn} ngl {cfg.n_gpu_layers} ts {ts}"
    if cfg.n_seq_max > 1:
        text += f" np {cfg.n_seq_max}"
    if cfg.type_k != "f16" or cfg.type_v != "f16":
        text += f" kv {cfg.type_k}/{cfg.type_v}"
    if cfg.swa_full:
        text += " swa-full"
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one n_ctx/n_ubatch pair instead of four")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ",".join(MODELS))
    ap.add_argument("--rows", choices=("worst", "all"), default="worst",
                    help="device rows to print: the 25 worst (default) or all")
    ap.add_argument("--json", metavar="PATH", help="also write every row (and llama.cpp's placement) as JSON")
    args = ap.parse_args()
    names = [m for m in args.models.split(",") if m]

    t0 = time.time()
    rows = []            # (model, config, device, predicted, measured)
    raw = []
    placement_mismatch = 0
    with tempfile.TemporaryDirectory(prefix="gpulab-compute-") as tmp:
        paths = {n: str(write_model(Path(tmp) / f"{n}.gguf", MODELS[n])) for n in names}
        reader = check_reader(paths)
        lc = LlamaCpp(3)
        try:
            devices = [Device(name=f"RPC{i}", total_bytes=64 << 30, free_bytes=64 << 30, source="rpc",
                              kind="rpc", endpoint=ep) for i, ep in enumerate(lc.endpoints)]
            for n in names:
                prof = profile_of(MODELS[n])
                for cfg in grid(MODELS[n], args.quick):
                    measured, layers = lc.measure(paths[n], cfg)
                    p = plan(prof, devices, cfg)
                    if list(p.layer_devices) != layers:
                        placement_mismatch += 1
                    config = {k: getattr(cfg, k) for k in ("n_ctx", "n_ubatch", "flash_attn", "n_gpu_layers",
                                                            "n_seq_max", "type_k", "type_v", "swa_full")}
                    raw.append(dict(model=n, config=dict(config, tensor_split=list(cfg.tensor_split)), layers=layers,
                                    measured=measured, predicted={d.name: d.compute_bytes for d in p.devices}))
                    for d in p.devices:
                        m = measured.get(d.name, 0)
                        if m <= 1 and d.compute_bytes == 0:
                            continue       # nothing runs there, and none is predicted
                        rows.append((n, describe(cfg), d.name, d.compute_bytes, m))
        finally:
            lc.close()

    if args.json:
        import json
        Path(args.json).write_text(json.dumps(raw, indent=1))

    def err(r):
        return (r[3] - r[4]) / r[4] if r[4] > 1 else float("inf")

    print(f"## Compute buffers: gpulab vs llama.cpp ({len(rows)} device rows, {len(names)} models, "
          f"{time.time() - t0:.0f} s)\n")
    print("| model | rows | median abs err | p90 | max | within 10% | within 5% |")
    print("|---|---|---|---|---|---|---|")
    for n in names + ["all"]:
        es = sorted(abs(err(r)) for r in rows if n in ("all", r[0]))
        if not es:
            continue
        print(f"| {n} | {len(es)} | {100 * statistics.median(es):.1f}% | {100 * es[int(0.9 * (len(es) - 1))]:.1f}% | "
              f"{100 * es[-1]:.1f}% | {100 * sum(e <= 0.10 for e in es) / len(es):.1f}% | "
              f"{100 * sum(e <= 0.05 for e in es) / len(es):.1f}% |")
    print(f"\nplanner layer placement differed from llama.cpp's in {placement_mismatch} loads; {reader}")
    shown = sorted(rows, key=lambda r: -abs(err(r)))
    if args.rows == "worst":
        shown = shown[:25]
        print("\n### The 25 rows with the largest error\n")
    else:
        shown = rows
        print("\n### Every device row\n")
    print("| model | config | device | predicted MiB | llama.cpp MiB | error |")
    print("|---|---|---|---|---|---|")
    for r in shown:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3] / MiB:.2f} | {r[4] / MiB:.2f} | {100 * err(r):+.1f}% |")


if __name__ == "__main__":
    main()
