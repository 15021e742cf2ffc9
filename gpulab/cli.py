"""The `gpulab` command line. Flag names are llama.cpp's (-ngl -ts -mg -sm -c -ctk -ctv -b -ub -fa).

Every GpulabError ends the command with one line on stderr and exit status 2, no traceback.
`gpulab plan` exits 1 when the plan does not fit, so scripts can test it.
"""

from __future__ import annotations

import argparse
import json
import sys

from .core.config import FLASH_ATTN_MODES, SPLIT_MODES, SplitConfig, parse_tensor_split
from .core.ggml_types import KV_CACHE_TYPES
from .core.policies import POLICIES, apply_policy
from .errors import GpulabError

__all__ = ["main", "build_parser", "config_from_args", "add_config_flags", "add_device_flags", "devices_from_args"]

# Further commands live in their own modules, each with `register(subparsers)` adding its parser
# and setting `func`; they reuse the flag groups below so every command speaks llama.cpp's flags.
COMMAND_MODULES: tuple[str, ...] = (
    "gpulab.commands.export",
    "gpulab.commands.profile",
    "gpulab.commands.sweep",
    "gpulab.commands.tune",
    "gpulab.commands.bench",
    "gpulab.commands.calibrate",
)


def add_device_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("devices (default: the GPUs NVML sees)")
    g.add_argument("--sim", metavar="SPEC", help="simulated devices instead, e.g. 24GiB,24GiB,12GiB@10GiB or 8x80GiB")
    g.add_argument("--rpc", metavar="HOST:PORT,...", help="llama.cpp RPC servers to add (listed before GPUs)")
    g.add_argument("--llama-devices", action="store_true",
                   help="ask llama.cpp for its devices instead of NVML (loads llama.cpp)")


def add_config_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("llama.cpp settings (same names as llama-server)")
    g.add_argument("-ngl", "--n-gpu-layers", type=int, default=-1, help="layers to offload; -1 all (default)")
    g.add_argument("-sm", "--split-mode", choices=SPLIT_MODES, default="layer")
    g.add_argument("-mg", "--main-gpu", type=int, default=0)
    g.add_argument("-ts", "--tensor-split", default="", metavar="N,N,...", help="proportions, e.g. 3,1 (default: free memory)")
    g.add_argument("-c", "--ctx-size", type=int, default=4096)
    g.add_argument("-b", "--batch-size", type=int, default=2048)
    g.add_argument("-ub", "--ubatch-size", type=int, default=512)
    g.add_argument("-ctk", "--cache-type-k", choices=list(KV_CACHE_TYPES), default="f16")
    g.add_argument("-ctv", "--cache-type-v", choices=list(KV_CACHE_TYPES), default="f16")
    g.add_argument("-fa", "--flash-attn", choices=FLASH_ATTN_MODES, default="auto")
    g.add_argument("-nkvo", "--no-kv-offload", action="store_true", help="keep the KV cache on the CPU")
    g.add_argument("-np", "--parallel", type=int, default=1, help="sequences (KV streams)")
    g.add_argument("--swa-full", action="store_true", help="full-size KV cache for sliding-window layers")
    g.add_argument("--device", default="", metavar="NAME,...", help="use only these devices, e.g. CUDA0,CUDA2")


def config_from_args(a: argparse.Namespace) -> SplitConfig:
    return SplitConfig(
        n_gpu_layers=a.n_gpu_layers, split_mode=a.split_mode, main_gpu=a.main_gpu,
        tensor_split=parse_tensor_split(a.tensor_split) if a.tensor_split else (),
        n_ctx=a.ctx_size, n_batch=a.batch_size, n_ubatch=a.ubatch_size,
        type_k=a.cache_type_k, type_v=a.cache_type_v, flash_attn=a.flash_attn,
        offload_kqv=not a.no_kv_offload, n_seq_max=a.parallel, swa_full=a.swa_full,
        devices=tuple(x.strip() for x in a.device.split(",") if x.strip()),
    )


def devices_from_args(a: argparse.Namespace):
    from .sources.detect import detect_devices
    rpc = [x.strip() for x in a.rpc.split(",") if x.strip()] if a.rpc else None
    found = detect_devices(sim=a.sim, rpc=rpc, use_llama=a.llama_devices)
    for w in found.warnings:
        print(f"gpulab: warning: {w}", file=sys.stderr)
    return found


def _cmd_devices(a: argparse.Namespace) -> int:
    from .ui.text import devices_text
    found = devices_from_args(a)
    if a.json:
        from dataclasses import asdict
        print(json.dumps({"devices": [asdict(d) for d in found.devices],
                          "host": asdict(found.host) if found.host else None,
                          "note": found.source_note, "warnings": list(found.warnings)}, indent=2))
        return 0
    if found.source_note:
        print(found.source_note)
    print(devices_text(list(found.devices), found.host))
    return 0


def _cmd_inspect(a: argparse.Namespace) -> int:
    from . import read_profile
    from .core.schema import profile_to_dict
    from .ui.text import profile_text
    prof = read_profile(a.model)
    print(json.dumps(profile_to_dict(prof), indent=2) if a.json else profile_text(prof))
    return 0


def _cmd_plan(a: argparse.Namespace) -> int:
    from . import read_profile
    from .core.planner import plan
    from .ui.text import plan_text
    config = config_from_args(a)
    prof = read_profile(a.model)
    found = devices_from_args(a)
    devices = list(found.devices)
    if a.policy:
        config = apply_policy(a.policy, prof, devices, config, found.host)
    p = plan(prof, devices, config, found.host)
    if a.json:
        print(json.dumps(p.to_dict(), indent=2))
    else:
        if found.source_note and not devices:
            print(found.source_note, file=sys.stderr)
        print(plan_text(p, devices + ([found.host] if found.host else [])))
    return 0 if p.fits else 1


def _cmd_rpc_server(a: argparse.Namespace) -> int:
    from .runtime.rpc import serve
    serve(a.host, a.port, device=a.device, threads=a.threads, cache_dir=a.cache_dir)
    return 0


def build_parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="gpulab", description="See where llama.cpp puts each layer of a GGUF model.")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("devices", help="list the devices gpulab would plan for")
    add_device_flags(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_devices)

    p = sub.add_parser("inspect", help="a GGUF's layers and tensors, from a path or an http(s) URL")
    p.add_argument("model", help="path or URL of a .gguf")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("plan", help="predict llama.cpp's placement and per-device memory")
    p.add_argument("model", help="path or URL of a .gguf")
    add_config_flags(p)
    add_device_flags(p)
    p.add_argument("--policy", choices=POLICIES, help="choose -ts by a policy")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("rpc-server", help="serve a device over llama.cpp's RPC protocol (no authentication!)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback; anything else is exposed)")
    p.add_argument("--port", type=int, default=50052)
    p.add_argument("--device", default="CPU", help="llama.cpp device to serve: CPU, CUDA0, ...")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--cache-dir", default=None, help="local tensor cache directory")
    p.set_defaults(func=_cmd_rpc_server)

    import importlib
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return top


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        return a.func(a)
    except GpulabError as e:
        print(f"gpulab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:   # `gpulab plan ... | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
