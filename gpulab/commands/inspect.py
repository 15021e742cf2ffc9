"""`gpulab inspect MODEL [--json]`: a GGUF's layers and tensors, from a path or an http(s) URL."""

from __future__ import annotations

from .flags import add_json_flag, add_model_arg, model_path
from .result import Result

__all__ = ["register", "run"]


def register(sub, frontend: str) -> None:
    p = sub.add_parser("inspect", help="a GGUF's layers and tensors, from a path or an http(s) URL")
    add_model_arg(p)
    add_json_flag(p, frontend)
    p.add_argument("--max-rows", type=int, default=200, help="layers shown in a notebook's table")
    p.set_defaults(run=run)


def run(a, session) -> Result:
    from ..core.schema import profile_to_dict
    from ..sources.read import read_profile
    from ..ui.html import profile_html, profile_rows
    from ..ui.text import profile_text
    prof = read_profile(model_path(a.model))
    return Result(text=profile_text(prof), data=profile_to_dict(prof), html=profile_html(prof, a.max_rows),
                  rows=profile_rows(prof), objects={"profile": prof})
