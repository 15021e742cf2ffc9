"""`gpulab inspect MODEL [-ot RULE ...] [--json]`: a GGUF's layers and tensors, from a path or an
http(s) URL; with tensor override rules (-ot, -cmoe, -ncmoe, -ncffn), which tensors each rule
decides (first match wins, as llama.cpp's create_tensor) and their bytes."""

from __future__ import annotations

from .flags import RULE_SETTINGS, add_config_flags, add_json_flag, add_model_arg, config_from_args, model_path
from .result import Result

__all__ = ["register", "run"]


def register(sub, frontend: str) -> None:
    p = sub.add_parser("inspect", help="a GGUF's layers and tensors, from a path or an http(s) URL; "
                                       "with -ot, what each rule matches")
    add_model_arg(p)
    add_config_flags(p, only=RULE_SETTINGS)
    add_json_flag(p, frontend)
    p.add_argument("--max-rows", type=int, default=200, help="layers shown in a notebook's table")
    p.set_defaults(run=run)


def run(a, session) -> Result:
    from html import escape

    from ..core.overrides import effective_rules
    from ..core.placement.tensors import rule_matches
    from ..core.schema import profile_to_dict
    from ..sources.read import read_profile
    from ..ui.html import profile_html, profile_rows
    from ..ui.text import profile_text, rules_text
    prof = read_profile(model_path(a.model))
    rules = effective_rules(config_from_args(a, only=RULE_SETTINGS))
    text, data, html = profile_text(prof), profile_to_dict(prof), profile_html(prof, a.max_rows)
    notes = []
    if rules:
        matches = rule_matches(prof, rules)
        table = rules_text(matches)
        text += "\n" + table
        html += f"<pre>{escape(table)}</pre>"
        data["rules"] = [m.to_dict() for m in matches]
        notes = [f"warning: tensor override {m.rule.text!r} matches no tensor of this model (or earlier rules "
                 "take them all); llama.cpp ignores it" for m in matches if not m.tensors and m.rule.source == "-ot"]
    return Result(text=text, data=data, html=html, rows=profile_rows(prof), notes=notes,
                  objects={"profile": prof, "rules": rules})
