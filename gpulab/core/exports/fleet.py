"""A fleet plan written for the programs that serve several models: llama-swap, llama-server's
router (--models-preset) and Ollama (one `ollama serve` per device set).

Each model's settings come from the one single-model renderer (gpulab.core.exports.render.render,
target llama-server or ollama), so a fleet export says exactly what `gpulab export` says for
that model with its planned --device set and -ts. What a program cannot express is a gap, said,
never dropped.

- llama-swap (config.yaml): `models.NAME.cmd` is `llama-server --port ${PORT} ...` (llama-swap
  replaces the ${PORT} macro); the resident models form one group with swap: false (loaded
  together) and persistent: true (no other group unloads them), preloaded at start
  (hooks.on_startup.preload); swappable models a group with swap: true, exclusive: false (one at
  a time, evicting only each other: internal/router/group.go groupSwapper.EvictionFor). Checked
  against llama-swap's config-schema.json (tests/core/exports/test_fleet.py). This module
  returns the document as a dict; the YAML text is gpulab.storage.fleet_files.llama_swap_yaml.
- llama-server router (--models-preset FILE.ini). The format is common/preset.cpp's
  (parse_ini_from_file, common_preset_context::load_from_ini): `[section]` per model, the
  section name being the model name; `key = value` lines where a key is any spelling of a
  llama-server option without its leading dashes (get_map_key_opt: every alias, so `ngl`,
  `ts`, `c`, `ctk` are keys) or its LLAMA_ARG_* variable; a flag takes true/false; `version`
  is skipped; `[*]` applies to every model; preset-only keys come from
  common_params_add_preset_options (load-on-startup, stop-timeout, dedup-cache-models). The
  router (tools/server/server-models.cpp) sets host, port and alias itself (update_args) and
  drops models-dir/-max/-preset from a preset (unset_reserved_args).
- Ollama: one `ollama serve` per distinct device set with its environment
  (CUDA_VISIBLE_DEVICES, OLLAMA_HOST, OLLAMA_MAX_LOADED_MODELS, ...) as a shell script, and a
  Modelfile per model (num_gpu, num_ctx, ...), with `ollama create` lines.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..devices import Device
from ..fleet.model import FleetModel
from ..fleet.planner import FleetPlan
from .render import render

__all__ = ["FLEET_TARGETS", "FleetExport", "llama_swap_doc", "router_ini", "ollama_fleet", "render_fleet",
           "OLLAMA_BASE_PORT"]

FLEET_TARGETS = ("llama-swap", "llama-server", "ollama")
OLLAMA_BASE_PORT = 11434      # Ollama's default OLLAMA_HOST port; instance i listens on base + i


@dataclass(frozen=True)
class FleetExport:
    target: str
    text: str                 # config.yaml (as data: see llama_swap_doc), the INI, the shell script + Modelfiles
    data: object
    gaps: tuple[str, ...]


def _server_argv(fplan: FleetPlan, name: str, paths: Mapping[str, str], devices: Sequence[Device]) -> list[str]:
    p = fplan.placement(name).plan
    argv = render(p.config, "llama-server", model_path=paths[name], n_layer=p.profile.n_layer,
                  devices=list(devices)).data
    return argv + process_argv(fplan.fleet.model(name))


def process_argv(m: FleetModel) -> list[str]:
    """The model's projector, draft and speculative mode as llama-server spells them (the paths as
    the fleet file gives them)."""
    out: list[str] = []
    if m.mmproj:
        out += ["--mmproj", m.mmproj] + ([] if m.mmproj_offload else ["--no-mmproj-offload"])
    if m.draft:
        out += ["-md", m.draft]
    out += list(m.draft_flags)
    if m.spec_type:
        out += ["--spec-type", m.spec_type]
    return out


def server_commands(fplan: FleetPlan, paths: Mapping[str, str], devices: Sequence[Device]) -> dict[str, list[str]]:
    """{model: llama-server argv (with --port ${PORT})} for every model of the plan."""
    out = {}
    for pl in fplan.placements:
        argv = _server_argv(fplan, pl.name, paths, devices)
        out[pl.name] = [argv[0], "--port", "${PORT}"] + argv[1:]
    return out


def _shared_rpc_servers(fplan: FleetPlan, devices: Sequence[Device]) -> list[str]:
    """Gaps for RPC servers that several models use: an RPC server serves one client at a time
    (ggml_backend_rpc_start_server accepts the next connection when the last one closes), so
    two llama-server processes cannot both use it; gpulab's own worker loads them in one process."""
    by_name = {d.name: d for d in devices}
    users: dict[str, list[str]] = {}
    for pl in fplan.placements:
        for name in pl.devices:
            d = by_name.get(name)
            if d is not None and d.kind == "rpc" and d.endpoint:
                users.setdefault(d.endpoint, [])
                if pl.name not in users[d.endpoint]:
                    users[d.endpoint].append(pl.name)
    return [f"the RPC server {ep} is used by {', '.join(names)}: it serves one process at a time, so their "
            "llama-server processes cannot run together on it (one rpc-server per model, or one process)"
            for ep, names in users.items() if len(names) > 1]


def llama_swap_doc(fplan: FleetPlan, paths: Mapping[str, str], devices: Sequence[Device]) -> tuple[dict, list[str]]:
    """(config.yaml as a dict, gaps)."""
    cmds = server_commands(fplan, paths, devices)
    models = {}
    for name, argv in cmds.items():
        # '${PORT}' left unquoted: llama-swap substitutes the macro in the text, then splits it as a
        # POSIX shell would (internal/config/commands.go SanitizeCommand: shlex.Posix.Split)
        models[name] = {"cmd": " ".join(t if t == "${PORT}" else shlex.quote(t) for t in argv)}
    resident = [p.name for p in fplan.placements if p.resident]
    swappable = [p.name for p in fplan.placements if not p.resident]
    groups = {}
    if resident:
        groups["fleet"] = {"swap": False, "exclusive": False, "persistent": True, "members": resident}
    if swappable:
        groups["swappable"] = {"swap": True, "exclusive": False, "members": swappable}
    doc = {"models": models, "groups": groups}
    if resident:   # loaded when llama-swap starts, as the router's load-on-startup
        doc["hooks"] = {"on_startup": {"preload": resident}}
    gaps = _shared_rpc_servers(fplan, devices)
    if not fplan.fits:
        gaps.append("the fleet does not fit (see `gpulab fleet plan`): llama-swap would start these models "
                    "together and one of them would fail to load")
    return doc, gaps


def _ini_value(v: str) -> str:
    if any(c in v for c in "\n\r;#") or v != v.strip():
        raise ValueError(f"{v!r} cannot be written as a value of llama.cpp's preset INI (no ';', '#', newlines "
                         "or surrounding blanks: parse_ini_from_file ends a value there)")
    return v


def router_sections(fplan: FleetPlan, paths: Mapping[str, str], devices: Sequence[Device]) -> dict[str, dict[str, str]]:
    """{model: {key: value}}: each model's llama-server arguments as preset keys (the option
    spelled as on the command line, without its dashes), and load-on-startup for resident models."""
    out = {}
    for pl in fplan.placements:
        argv = _server_argv(fplan, pl.name, paths, devices)[1:]
        keys: dict[str, str] = {}
        i = 0
        while i < len(argv):
            key = argv[i].lstrip("-")
            if i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                keys[key] = argv[i + 1]
                i += 2
            else:          # a flag (-nkvo, --swa-full, --no-op-offload, -nr): true
                keys[key] = "true"
                i += 1
        if pl.resident:
            keys["load-on-startup"] = "true"
        out[pl.name] = keys
    return out


def _router_name(section: str) -> str:
    """common/preset.cpp load_from_ini: the tag after the last ':' becomes its canonical_tag
    (the last [-.]WORD of it, else all of it, upper-cased)."""
    base, colon, tag = section.rpartition(":")
    if not colon:
        return section
    m = re.search(r"[-.]([A-Z0-9_]+)$", tag, re.I)
    return base + ":" + (m.group(1) if m else tag).upper()


def router_ini(fplan: FleetPlan, paths: Mapping[str, str], devices: Sequence[Device]) -> tuple[str, list[str]]:
    """(the --models-preset INI, gaps)."""
    sections = router_sections(fplan, paths, devices)
    n_resident = sum(p.resident for p in fplan.placements)
    models_max = n_resident + (1 if n_resident < len(fplan.placements) else 0)
    lines = ["; gpulab fleet: llama-server router presets (common/preset.cpp's INI)",
             f"; run: llama-server --models-preset fleet.ini --models-max {models_max}", "version = 1", ""]
    for name, keys in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {_ini_value(v)}" for k, v in keys.items()]
        lines.append("")
    gaps = _shared_rpc_servers(fplan, devices)
    for name in sections:
        canon = _router_name(name)
        if canon != name:
            gaps.append(f"[{name}]: the router names this model {canon!r} (load_from_ini upper-cases the tag "
                        "after ':', canonical_tag in common/preset.cpp); requests must use that name")
    if models_max > n_resident:
        gaps.append("the router cannot keep the resident models loaded while a swappable one loads: past "
                    "--models-max it unloads the least recently used model (this llama.cpp has no 'pin' preset "
                    "option: it is commented out in common_params_add_preset_options)")
    if not fplan.fits:
        gaps.append("the fleet does not fit (see `gpulab fleet plan`)")
    return "\n".join(lines), gaps


def ollama_fleet(fplan: FleetPlan, paths: Mapping[str, str], devices: Sequence[Device]) -> tuple[str, dict, list[str]]:
    """(shell script with Modelfiles, {'instances': [...], 'modelfiles': {...}}, gaps)."""
    gaps: list[str] = []
    by_set: dict[tuple[str, ...], list] = {}
    for pl in fplan.placements:
        by_set.setdefault(pl.devices, []).append(pl)
    instances: list[dict[str, Any]] = []
    modelfiles: dict[str, str] = {}
    for i, (dev_set, members) in enumerate(by_set.items()):
        port = OLLAMA_BASE_PORT + i
        env: dict[str, str] = {}
        for pl in members:
            p = pl.plan
            exp = render(p.config, "ollama", model_path=paths[pl.name], n_layer=p.profile.n_layer,
                         devices=list(devices))
            gaps += [f"{pl.name}: {g}" for g in exp.gaps]
            for k, v in exp.data["env"].items():
                if k in env and env[k] != v:
                    gaps.append(f"{pl.name}: {k}={v} differs from {env[k]} of another model on the same "
                                f"`ollama serve` ({','.join(dev_set) or 'CPU'}): one value per instance")
                    continue
                env[k] = v
            params = exp.data["parameters"]
            modelfiles[pl.name] = "\n".join([f"FROM {paths[pl.name]}"] +
                                            [f"PARAMETER {k} {v}" for k, v in params.items()]) + "\n"
        if not dev_set:
            env["CUDA_VISIBLE_DEVICES"] = "-1"   # no GPU: CPU only
        env["OLLAMA_HOST"] = f"127.0.0.1:{port}"
        # resident models stay; a swappable one is loaded when asked (so one slot more). Ollama's
        # scheduler (server/sched.go processPending) counts every loaded runner of the instance
        # against OLLAMA_MAX_LOADED_MODELS
        resident = sum(pl.resident for pl in members)
        env["OLLAMA_MAX_LOADED_MODELS"] = str(resident + (1 if resident < len(members) else 0))
        if resident == len(members):
            env["OLLAMA_KEEP_ALIVE"] = "-1"   # every model here is resident: never unloaded
        keep = {fplan.fleet.keep_free_bytes(d) for d in dev_set}
        if len(keep) == 1 and keep != {0}:
            env["OLLAMA_GPU_OVERHEAD"] = str(keep.pop())   # envconfig: bytes reserved on each GPU
        elif len(keep) > 1:
            gaps.append(f"keep_free differs between {', '.join(dev_set)}: Ollama's OLLAMA_GPU_OVERHEAD is one "
                        "value for every GPU of an instance")
        instances.append({"devices": list(dev_set), "port": port, "env": env, "models": [pl.name for pl in members]})
    shared: dict[str, list[int]] = {}
    for inst in instances:
        for d in inst["devices"]:
            shared.setdefault(d, []).append(inst["port"])
    for d, ports in shared.items():
        if len(ports) > 1:
            gaps.append(f"{d} is used by the instances on ports {', '.join(map(str, ports))}: each Ollama schedules "
                        "by the free memory it sees at load time and does not know the others' plans")
    gaps += [f"{pl.name}: its projector and draft (--mmproj, -md) are not written: an Ollama model carries its "
             "projector in its own blob and Ollama has no draft model" for pl in fplan.placements
             if fplan.fleet.model(pl.name).has_process]
    gaps.append("Ollama has no tensor_split: within an instance its scheduler splits layers by free memory, "
                "not by the planned -ts")
    gaps.append("Ollama has no per-model pinning: a model reaches its devices only through the instance it is "
                "created on (the maintainers' answer to #7399, #9394, #10531)")
    lines = ["#!/bin/sh", "# gpulab fleet: one `ollama serve` per device set", "set -e"]
    for name, text in modelfiles.items():
        lines += ["", f"cat > {shlex.quote(name + '.Modelfile')} <<'MODELFILE'", text.rstrip("\n"), "MODELFILE"]
    for inst in instances:
        envs = " ".join(f"{k}={shlex.quote(v)}" for k, v in inst["env"].items())
        lines += ["", f"# devices {','.join(inst['devices']) or 'none (CPU)'}: {', '.join(inst['models'])}",
                  f"env {envs} ollama serve &"]
    lines += ["sleep 2", ""]
    for inst in instances:
        for name in inst["models"]:
            lines.append(f"OLLAMA_HOST=127.0.0.1:{inst['port']} ollama create {shlex.quote(name)} "
                         f"-f {shlex.quote(name + '.Modelfile')}")
    lines += ["wait"]
    return "\n".join(lines) + "\n", {"instances": instances, "modelfiles": modelfiles}, gaps


def render_fleet(fplan: FleetPlan, target: str, paths: Mapping[str, str], devices: Sequence[Device],
                 yaml_dump=None) -> FleetExport:
    """One FLEET_TARGETS export. yaml_dump(dict) -> str writes llama-swap's YAML (storage)."""
    if target == "llama-swap":
        doc, gaps = llama_swap_doc(fplan, paths, devices)
        return FleetExport(target, yaml_dump(doc) if yaml_dump else "", doc, tuple(gaps))
    if target == "llama-server":
        text, gaps = router_ini(fplan, paths, devices)
        return FleetExport(target, text, router_sections(fplan, paths, devices), tuple(gaps))
    if target == "ollama":
        text, data, gaps = ollama_fleet(fplan, paths, devices)
        return FleetExport(target, text, data, tuple(gaps))
    from ..errors import ConfigError
    raise ConfigError(f"unknown fleet export target {target!r}; choose one of {', '.join(FLEET_TARGETS)}")
