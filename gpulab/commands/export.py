"""`gpulab export MODEL [llama flags] [--to TARGET|all]`: the settings for other runtimes.

    gpulab export model.gguf -ts 3,1 -c 8192 --to llama-server
    gpulab export model.gguf --from-alloc --to ollama        # the saved allocation

One renderer (gpulab.core.exports.render) writes every target, so they cannot drift apart. What a
target cannot express is said on stderr ("gpulab: note: ...") and never silently dropped;
--strict turns those notes into an error (exit 2).
"""

from __future__ import annotations

from ..core.errors import GpulabError
from ..core.exports.render import TARGETS, render
from .flags import add_config_flags, add_device_flags, add_json_flag, add_model_arg, add_policy_flag
from .result import Result

__all__ = ["register", "run"]

def register(sub, frontend: str) -> None:
    p = sub.add_parser("export", help="the same placement as llama-server / llama-bench / llama-cpp-python / "
                                      "Ollama / KoboldCpp settings")
    add_model_arg(p, optional=frontend == "magic")
    add_config_flags(p)
    add_device_flags(p)
    p.add_argument("--to", default="all", choices=(*TARGETS, "all"), help="target (default: all)")
    p.add_argument("--from-alloc", action="store_true",
                   help="use the saved allocation of this model on these devices")
    add_policy_flag(p)
    p.add_argument("--strict", action="store_true", help="fail when a target cannot express a setting")
    add_json_flag(p, frontend, help="{target: {text, data, gaps}}")
    p.set_defaults(run=run)


def run(a, session) -> Result:
    from ..ui.html import exports_html
    from .plan import planned
    path, prof, choice, config, _ = planned(a, session)
    devices = list(choice.devices)
    if a.from_alloc:
        from ..storage.allocations import config_for
        if path.startswith(("http://", "https://")):
            raise GpulabError("allocations are kept for local files; give the model's path")
        config = config_for(path, devices, None)
    targets = TARGETS if a.to == "all" else (a.to,)
    out = {t: render(config, t, model_path=path, n_layer=prof.n_layer, devices=devices, strict=a.strict)
           for t in targets}
    text = "\n".join((("\n" if i else "") + f"# --- {t} ---\n" if len(out) > 1 else "") + e.text.rstrip("\n")
                     for i, (t, e) in enumerate(out.items()))
    html = exports_html(out)
    return Result(text=text, data={t: {"text": e.text, "data": e.data, "gaps": list(e.gaps)} for t, e in out.items()},
                  html=html, rows=[{"target": t, "text": e.text, "gaps": "; ".join(e.gaps)} for t, e in out.items()],
                  notes=[f"note: {t}: {g}" for t, e in out.items() for g in e.gaps],
                  objects={"exports": out, "texts": {t: e.text for t, e in out.items()}, "config": config})
