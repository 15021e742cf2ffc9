"""`gpulab export MODEL [llama flags] [--to TARGET|all]`: the settings for other runtimes.

    gpulab export model.gguf -ts 3,1 -c 8192 --to llama-server
    gpulab export model.gguf --from-profile --to ollama      # the saved allocation profile

One renderer (gpulab.core.exports) writes every target, so they cannot drift apart. What a
target cannot express is said on stderr ("gpulab: note: ...") and never silently dropped;
--strict turns those notes into an error (exit 2).
"""

from __future__ import annotations

import argparse
import json
import sys

from ..cli import add_config_flags, add_device_flags, config_from_args, devices_from_args
from ..core.exports import TARGETS, render
from ..core.policies import POLICIES
from ..errors import GpulabError

__all__ = ["register"]


def register(sub) -> None:
    p = sub.add_parser("export", help="the same placement as llama-server / llama-bench / llama-cpp-python / "
                                      "Ollama / KoboldCpp settings")
    p.add_argument("model", help="path (or http(s) URL) of a .gguf")
    add_config_flags(p)
    add_device_flags(p)
    p.add_argument("--to", default="all", choices=(*TARGETS, "all"), help="target (default: all)")
    p.add_argument("--from-profile", action="store_true",
                   help="use the saved allocation profile of this model on these devices")
    p.add_argument("--policy", choices=POLICIES, help="choose -ts by a policy")
    p.add_argument("--strict", action="store_true", help="fail when a target cannot express a setting")
    p.add_argument("--json", action="store_true", help="{target: {text, data, gaps}}")
    p.set_defaults(func=_cmd_export)


def _cmd_export(a: argparse.Namespace) -> int:
    from .. import read_profile
    prof = read_profile(a.model)
    found = devices_from_args(a)
    devices = list(found.devices)
    config = config_from_args(a)
    if a.from_profile:
        from ..profiles import config_for
        if a.model.startswith(("http://", "https://")):
            raise GpulabError("profiles are kept for local files; give the model's path")
        config = config_for(a.model, devices, None)
    if a.policy:
        from ..core.policies import apply_policy
        config = apply_policy(a.policy, prof, devices, config, found.host)
    targets = TARGETS if a.to == "all" else (a.to,)
    out = {t: render(config, t, model_path=a.model, n_layer=prof.n_layer, devices=devices, strict=a.strict)
           for t in targets}
    if a.json:
        print(json.dumps({t: {"text": e.text, "data": e.data, "gaps": list(e.gaps)} for t, e in out.items()},
                         indent=2))
        return 0
    for i, (t, e) in enumerate(out.items()):
        if len(out) > 1:
            print(("\n" if i else "") + f"# --- {t} ---")
        print(e.text.rstrip("\n"))
        for g in e.gaps:
            print(f"gpulab: note: {t}: {g}", file=sys.stderr)
    return 0
