"""`gpulab devices [--sim SPEC | --rpc HOST:PORT,... | --llama-devices]`: the devices gpulab plans for."""

from __future__ import annotations

from dataclasses import asdict

from .flags import add_device_flags, add_json_flag, devices_from_args
from .result import Result

__all__ = ["register", "run"]


def register(sub, frontend: str) -> None:
    p = sub.add_parser("devices", help="list the devices gpulab would plan for")
    add_device_flags(p)
    add_json_flag(p, frontend)
    p.set_defaults(run=run)


def run(a, session) -> Result:
    from ..ui.html import device_rows, devices_html
    from ..ui.text import devices_text
    choice = devices_from_args(a, session)
    devices = list(choice.devices)
    text = (choice.note + "\n" if choice.note else "") + devices_text(devices, choice.host)
    data = {"devices": [asdict(d) for d in devices], "host": asdict(choice.host) if choice.host else None,
            "note": choice.note, "warnings": list(choice.warnings)}
    return Result(text=text, data=data, html=devices_html(devices, choice.host, choice.note),
                  rows=device_rows(devices, choice.host), notes=[f"warning: {w}" for w in choice.warnings],
                  objects={"devices": devices, "host": choice.host, "note": choice.note})
