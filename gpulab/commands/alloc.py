"""`gpulab alloc list|show|save|delete`: saved allocations, which settings to load a model with on
a given set of devices (gpulab.storage.allocations).

    gpulab alloc save model.gguf --rpc 127.0.0.1:50052,127.0.0.1:50053 -ts 3,1 -c 8192
    gpulab alloc show model.gguf --rpc ...        # the allocation that applies here, as TOML
    gpulab alloc list
    gpulab alloc delete model.gguf --rpc ...      # or --all: every allocation of the model
"""

from __future__ import annotations

from pathlib import Path

from ..core.exports.render import TARGETS
from .flags import (
    add_config_flags,
    add_device_flags,
    add_json_flag,
    add_model_arg,
    config_from_args,
    devices_from_args,
    model_path,
)
from .result import Result

__all__ = ["register", "run"]


def register(sub, frontend: str) -> None:
    p = sub.add_parser("alloc",
                       help="saved allocations (per model and device set): list, show, save, delete")
    psub = p.add_subparsers(dest="alloc_command", required=True, metavar="ACTION",
                            parser_class=type(p))

    q = psub.add_parser("list", help="every saved allocation")
    add_json_flag(q, frontend)
    q.set_defaults(run=run, action=_list)

    q = psub.add_parser("show", help="the allocation of MODEL that applies on these devices")
    add_model_arg(q)
    add_device_flags(q)
    q.add_argument("--to", default=None, choices=TARGETS, help="also render it for a target (llama-server, ...)")
    q.set_defaults(run=run, action=_show)

    q = psub.add_parser("save", help="save these llama.cpp settings as MODEL's allocation on these devices")
    add_model_arg(q)
    add_config_flags(q)
    add_device_flags(q)
    q.set_defaults(run=run, action=_save)

    q = psub.add_parser("delete", help="delete MODEL's allocation on these devices (--all: on any)")
    add_model_arg(q)
    add_device_flags(q)
    q.add_argument("--all", action="store_true", help="every allocation of MODEL")
    q.set_defaults(run=run, action=_delete)


def run(a, session) -> Result:
    return a.action(a, session)


def _row(x) -> dict:
    c = x.config
    return {"file": str(x.path), "model": x.model_path, "model_fingerprint": x.model_fingerprint[:16],
            "devices": [d.name for d in x.devices], "tensor_split": list(c.tensor_split),
            "n_gpu_layers": c.n_gpu_layers, "n_ctx": c.n_ctx, "type_k": c.type_k, "type_v": c.type_v,
            "created": x.created, "source": x.source, "measurement": x.measurement}


def _list(a, session) -> Result:
    from ..storage.allocations import allocations_dir, list_allocations
    found = list_allocations()
    rows = [_row(x) for x in found]
    if not found:
        return Result(text=f"no saved allocations in {allocations_dir()}", data=[], rows=[])
    lines = []
    for x, r in zip(found, rows):
        ts = ",".join(f"{v:g}" for v in r["tensor_split"]) or "free memory"
        meas = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in x.measurement.items()
                         if k.endswith("tokens_per_s") or k == "objective")
        lines.append(f"{Path(x.model_path).name}  [{x.model_fingerprint[:12]}]  on {','.join(r['devices']) or 'CPU'}  "
                     f"-ngl {r['n_gpu_layers']} -ts {ts} -c {r['n_ctx']}  {meas}  "
                     f"({x.created}, {x.path.name if x.path else ''})")
    return Result(text="\n".join(lines), data=rows, rows=rows, objects={"allocations": found})


def _show(a, session) -> Result:
    from ..storage.allocations import config_for, find_allocation
    path = model_path(a.model)
    devices = list(devices_from_args(a, session).devices)
    x = find_allocation(path, devices)
    if x is None:
        config_for(path, devices, None)   # raises, naming the missing devices, when stale ones exist
        return Result(notes=[f"no saved allocation for {a.model} on these devices"], exit_code=1)
    assert x.path is not None   # found on disk
    text = f"# {x.path}\n" + x.path.read_text().rstrip("\n")
    notes = []
    if a.to:
        from ..core.exports.render import render
        from ..sources.read import read_profile
        e = render(x.config_for_devices(devices), a.to, model_path=path, n_layer=read_profile(path).n_layer,
                   devices=devices)
        text += f"\n\n# --- {a.to} ---\n{e.text.rstrip()}"
        notes = [f"note: {a.to}: {g}" for g in e.gaps]
    return Result(text=text, data=_row(x), rows=[_row(x)], notes=notes, objects={"allocation": x})


def _save(a, session) -> Result:
    from ..storage.allocations import save_allocation
    devices = list(devices_from_args(a, session).devices)
    x = save_allocation(model_path(a.model), config_from_args(a), devices, source="cli")
    return Result(text=f"saved {x.path}", data=_row(x), rows=[_row(x)], objects={"allocation": x})


def _delete(a, session) -> Result:
    from ..storage.allocations import allocations_for, delete_allocation, find_allocation
    path = model_path(a.model)
    if a.all:
        gone = allocations_for(path)
    else:
        found = find_allocation(path, list(devices_from_args(a, session).devices))
        gone = [found] if found else []
    for x in gone:
        delete_allocation(x)
    if not gone:
        return Result(notes=[f"no saved allocation for {a.model}" + ("" if a.all else " on these devices")],
                      exit_code=1)
    return Result(text="\n".join(f"deleted {x.path}" for x in gone), data=[str(x.path) for x in gone])
