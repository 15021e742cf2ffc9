"""`gpulab profile list|show|save|delete`: per-model allocation profiles (gpulab.profiles).

    gpulab profile save model.gguf --rpc 127.0.0.1:50052,127.0.0.1:50053 -ts 3,1 -c 8192
    gpulab profile show model.gguf --rpc ...        # the profile that applies here, as TOML
    gpulab profile list
    gpulab profile delete model.gguf --rpc ...      # or --all: every profile of the model
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..cli import add_config_flags, add_device_flags, config_from_args, devices_from_args

__all__ = ["register"]


def register(sub) -> None:
    p = sub.add_parser("profile", help="per-model allocation profiles: list, show, save, delete")
    psub = p.add_subparsers(dest="profile_command", required=True, metavar="ACTION")

    q = psub.add_parser("list", help="every saved profile")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=_cmd_list)

    q = psub.add_parser("show", help="the profile of MODEL that applies on these devices")
    q.add_argument("model")
    add_device_flags(q)
    q.add_argument("--to", default=None, help="also print it as an export (llama-server, ollama, ...)")
    q.set_defaults(func=_cmd_show)

    q = psub.add_parser("save", help="save these llama.cpp settings as MODEL's profile on these devices")
    q.add_argument("model")
    add_config_flags(q)
    add_device_flags(q)
    q.set_defaults(func=_cmd_save)

    q = psub.add_parser("delete", help="delete MODEL's profile on these devices (--all: on any)")
    q.add_argument("model")
    add_device_flags(q)
    q.add_argument("--all", action="store_true", help="every profile of MODEL")
    q.set_defaults(func=_cmd_delete)


def _row(p) -> dict:
    c = p.config
    return {"file": str(p.path), "model": p.model_path, "model_hash": p.model_hash[:16],
            "devices": [d.name for d in p.devices], "tensor_split": list(c.tensor_split),
            "n_gpu_layers": c.n_gpu_layers, "n_ctx": c.n_ctx, "type_k": c.type_k, "type_v": c.type_v,
            "created": p.created, "source": p.source, "measurement": p.measurement}


def _cmd_list(a: argparse.Namespace) -> int:
    from ..profiles import list_profiles, profiles_dir
    profs = list_profiles()
    if a.json:
        print(json.dumps([_row(p) for p in profs], indent=2))
        return 0
    if not profs:
        print(f"no allocation profiles in {profiles_dir()}")
        return 0
    for p in profs:
        r = _row(p)
        ts = ",".join(f"{x:g}" for x in r["tensor_split"]) or "free memory"
        meas = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in p.measurement.items()
                         if k.endswith("tokens_per_s") or k == "objective")
        print(f"{Path(p.model_path).name}  [{p.model_hash[:12]}]  on {','.join(r['devices']) or 'CPU'}  "
              f"-ngl {r['n_gpu_layers']} -ts {ts} -c {r['n_ctx']}  {meas}  ({p.created}, {p.path.name})")
    return 0


def _cmd_show(a: argparse.Namespace) -> int:
    from ..profiles import config_for, find_profile
    devices = list(devices_from_args(a).devices)
    prof = find_profile(a.model, devices)
    if prof is None:
        config_for(a.model, devices, None)   # raises, naming the missing devices, when stale ones exist
        print(f"no allocation profile for {a.model} on these devices", file=sys.stderr)
        return 1
    print(f"# {prof.path}")
    print(prof.path.read_text().rstrip("\n"))
    if a.to:
        from .. import read_profile
        from ..core.exports import render
        e = render(prof.config_for_devices(devices), a.to, model_path=a.model,
                   n_layer=read_profile(a.model).n_layer, devices=devices)
        print(f"\n# --- {a.to} ---\n{e.text.rstrip()}")
        for g in e.gaps:
            print(f"gpulab: note: {a.to}: {g}", file=sys.stderr)
    return 0


def _cmd_save(a: argparse.Namespace) -> int:
    from ..profiles import save_profile
    devices = list(devices_from_args(a).devices)
    prof = save_profile(a.model, config_from_args(a), devices, source="cli")
    print(f"saved {prof.path}")
    return 0


def _cmd_delete(a: argparse.Namespace) -> int:
    from ..profiles import delete_profile, find_profile, profiles_for
    if a.all:
        gone = profiles_for(a.model)
    else:
        found = find_profile(a.model, list(devices_from_args(a).devices))
        gone = [found] if found else []
    for p in gone:
        delete_profile(p)
        print(f"deleted {p.path}")
    if not gone:
        print(f"no allocation profile for {a.model}" + ("" if a.all else " on these devices"), file=sys.stderr)
        return 1
    return 0
