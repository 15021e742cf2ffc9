"""Plain-text tables for the CLI: rows in, aligned columns out. Human units live here only."""

from __future__ import annotations

from ..core.devices import Device
from ..core.measure.speed import SpeedPrediction
from ..core.placement.plan import Plan
from ..core.profile import ModelProfile
from ..core.units import format_bytes

__all__ = [
    "calibration_text",
    "devices_text",
    "fleet_search_lines",
    "fleet_text",
    "layer_ranges",
    "layers_text",
    "plan_rows",
    "plan_text",
    "profile_text",
    "render_table",
    "rules_text",
    "speed_cache_text",
    "speed_text",
    "tensor_list",
]


def render_table(rows: list[dict], right: tuple[str, ...] = ()) -> str:
    if not rows:
        return "(none)"
    cols = list(rows[0])
    cells = [[str(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]

    def line(values):
        return "  ".join(v.rjust(w) if c in right else v.ljust(w)
                         for v, w, c in zip(values, widths, cols)).rstrip()
    return "\n".join([line(cols), line(["-" * w for w in widths])] + [line(r) for r in cells])


def layers_text(n_blocks: int, has_output: bool) -> str:
    """'22 layers + output', '1 layer', 'the output layer': what a device holds, the repeating layers
    (blocks) counted apart from the output layer, as the layer tables number them."""
    if n_blocks == 0:
        return "the output layer" if has_output else "no layers"
    return f"{n_blocks} layer{'s' if n_blocks != 1 else ''}" + (" + output" if has_output else "")


def layer_ranges(layer_devices: tuple[str, ...] | list[str], n_layer: int) -> dict[str, str]:
    """{'RPC0': '0-7', 'RPC1': '8-29,out'}: contiguous runs of layers per device."""
    runs: dict[str, list[str]] = {}
    start = 0
    for i in range(1, len(layer_devices) + 1):
        if i == len(layer_devices) or layer_devices[i] != layer_devices[start]:
            end = i - 1
            label = []
            last_block = min(end, n_layer - 1)
            if start <= last_block:
                label.append(str(start) if start == last_block else f"{start}-{last_block}")
            if end == n_layer:
                label.append("out")
            runs.setdefault(layer_devices[start], []).append(",".join(label))
            start = i
    return {k: ",".join(v) for k, v in runs.items()}


def plan_rows(p: Plan) -> list[dict]:
    ranges = layer_ranges(p.layer_devices, p.profile.n_layer)
    if p.tensor_parallel is not None and p.tensor_parallel.meta_name in ranges:
        # -sm tensor: every member holds a slice of each layer on the meta device
        cut = ranges.pop(p.tensor_parallel.meta_name)
        for name in p.tensor_parallel.devices:
            ranges[name] = f"{cut} (a slice of each)"
    rows = []
    state = any(d.state_bytes for d in p.devices)   # a column only for models with recurrent layers
    base = any(d.overhead_bytes for d in p.devices)   # the base cost column only where a device has one
    for d in p.devices:
        rows.append({
            "device": d.name, "layers": ranges.get(d.name, "-") if not d.is_host or d.name in ranges else "input",
            "weights": format_bytes(d.weights_bytes), "KV": format_bytes(d.kv_bytes),
            **({"state": format_bytes(d.state_bytes)} if state else {}),
            "compute": format_bytes(d.compute_bytes),
            **({"base": format_bytes(d.overhead_bytes) + (" (default)" if d.overhead_is_default else "")}
               if base else {}),
            "used": format_bytes(d.used_bytes),
            "free": format_bytes(d.free_bytes) if d.free_bytes else "?",
            "fits": "yes" if d.fits else f"NO (-{format_bytes(d.deficit_bytes)})",
        })
    return rows


def speed_text(s: SpeedPrediction, *, n_prompt: int = 512, n_gen: int = 128) -> str:
    """Predicted pp/tg (gpulab.core.measure.speed) and where each device's figures come from."""
    hops = f"; {s.n_hops} hop{'s' if s.n_hops != 1 else ''} between devices" if s.n_hops else ""
    if s.n_allreduce:
        hops += f"; {s.n_allreduce} all-reduces per token between devices (-sm tensor)"
    line = (f"speed (predicted, pp{n_prompt}/tg{n_gen}): tg {s.tg_tokens_per_s:.1f} t/s, "
            f"pp {s.pp_tokens_per_s:.1f} t/s; "
            f"{100 * s.roofline_fraction:.0f}% of the memory roofline ({s.roofline_tg_tokens_per_s:.1f} t/s){hops}")
    by_source: dict[str, list[str]] = {}
    for name, source in s.sources.items():
        by_source.setdefault(source, []).append(name)
    src = "; ".join(f"{source}: {', '.join(names)}" for source, names in by_source.items())
    hint = " (rough guesses: run `gpulab calibrate`)" if "default" in by_source else ""
    return f"{line}\nspeed figures: {src}{hint}"


def tensor_list(names) -> str:
    """'ffn_down_exps.weight, ffn_up_exps.weight of blk 0,1,25; attn_q.weight of blk 3': tensor names
    grouped by what follows 'blk.<i>.', their layers listed once."""
    by_kind: dict[str, list[str]] = {}
    for n in names:
        parts = n.split(".", 2)
        if parts[0] == "blk" and len(parts) == 3:
            by_kind.setdefault(parts[2], []).append(parts[1])
        else:
            by_kind.setdefault(n, [])
    by_layers: dict[tuple[str, ...], list[str]] = {}
    for kind, layers in by_kind.items():
        by_layers.setdefault(tuple(layers), []).append(kind)
    return "; ".join(", ".join(kinds) + (f" of blk {','.join(layers)}" if layers else "")
                     for layers, kinds in by_layers.items())


def rules_text(matches) -> str:
    """Tensor override rules (RuleMatch, a plan's or `inspect -ot`'s) in the order llama.cpp tries
    them: where each sends what it matched (first match wins), and how many bytes that is."""
    rows = [{"#": i, "rule": m.rule.text, "from": m.rule.source, "to": m.device, "tensors": len(m.tensors),
             "bytes": format_bytes(m.n_bytes), "matched": tensor_list(m.tensors) or "(nothing)"}
            for i, m in enumerate(matches)]
    return "tensor overrides (first match wins):\n" + render_table(rows, right=("tensors", "bytes"))


def plan_text(p: Plan, speed: SpeedPrediction | None = None, *, n_prompt: int = 512, n_gen: int = 128,
              speed_error: str = "", flags: str = "") -> str:
    """The plan as text: settings, the memory table, the tensor override rules (when any), the
    predicted speed (when given), the flags that give this plan (when given), whether it fits.
    speed_error: why there is no prediction, said in its place."""
    c = p.config
    ts = ",".join(f"{x:g}" for x in c.tensor_split) if c.tensor_split else "default (free memory)"
    head = (f"{p.profile.title}: {p.profile.n_layer} layers + output, "
            f"{format_bytes(p.profile.file_bytes)} | -ngl {c.n_gpu_layers} -sm {c.split_mode} "
            f"-mg {c.main_gpu} -ts {ts} -c {c.n_ctx} -ctk {c.type_k} -ctv {c.type_v} "
            f"({p.kv_cells} KV cells)")
    body = render_table(plan_rows(p), right=("weights", "KV", "state", "compute", "base", "used", "free"))
    verdict = "fits" if p.fits else "DOES NOT FIT: " + "; ".join(p.deficits())
    parts = [head, body, *(f"not exact: {d}" for d in p.doubts)]
    if p.rule_matches:
        parts.append(rules_text(p.rule_matches))
    if speed is not None:
        parts.append(speed_text(speed, n_prompt=n_prompt, n_gen=n_gen))
    elif speed_error:
        parts.append(f"speed: not predicted ({speed_error})")
    if flags:
        parts.append(f"flags: {flags}")
    return "\n".join(parts + [verdict])


def profile_text(prof: ModelProfile, max_rows: int | None = None) -> str:
    """The model's header, then one row per layer: all of them, or the first `max_rows` and a
    line that says how many of how many are shown."""
    head = [
        f"{prof.title} — arch {prof.arch}, {prof.file_type or '?'}, {format_bytes(prof.file_bytes)}",
        f"n_layer {prof.n_layer}, n_embd {prof.n_embd}, n_ff {prof.n_ff}, vocab {prof.n_vocab}, "
        f"ctx_train {prof.n_ctx_train}" + (f", experts {prof.n_expert_used}/{prof.n_expert}" if prof.n_expert else "")
        + (f", sliding window {prof.n_swa}" if prof.n_swa else ""),
        f"input (CPU): {format_bytes(prof.input_weights_bytes)}; output layer: "
        f"{format_bytes(prof.output_weights_bytes)}" + (" (tied to token_embd)" if prof.tied_output else ""),
    ]
    rows = [{
        "layer": layer.index, "tensors": len(layer.tensors), "weights": format_bytes(layer.weights_bytes),
        "experts": format_bytes(layer.expert_bytes) if layer.expert_bytes else "", "heads": layer.n_head,
        "kv_heads": layer.n_head_kv, "head_k/v": f"{layer.n_embd_head_k}/{layer.n_embd_head_v}",
        "swa": "yes" if layer.is_swa else "", "kv": "" if layer.has_kv else "none",
    } for layer in prof.layers[:max_rows]]
    more = (f"\n(the first {max_rows} of {prof.n_layer} layers; the output layer is layer {prof.n_layer})"
            if max_rows is not None and max_rows < prof.n_layer else "")
    return "\n".join(head) + "\n" + render_table(rows, right=("weights", "experts")) + more


def devices_text(devices: list[Device], host: Device | None = None) -> str:
    rows = [{"device": d.name, "kind": d.kind, "source": d.source, "description": d.description,
             "total": format_bytes(d.total_bytes), "free": format_bytes(d.free_bytes)}
            for d in list(devices) + ([host] if host else [])]
    return render_table(rows, right=("total", "free"))


def calibration_text(cal) -> str:
    """A gpulab.runtime.calibrate.Calibration: each device's fitted figures, the hops, the fit."""
    rows = [{"device": n, "key": cal.keys.get(n, ""), "bandwidth": f"{sp.bandwidth_bytes_per_s / 1e9:.1f} GB/s",
             "FLOP rate": f"{sp.flops_per_s / 1e9:.0f} GFLOP/s", "per step": f"{sp.overhead_s * 1e6:.0f} us",
             "per layer": f"{sp.layer_overhead_s * 1e6:.1f} us",
             "per layer-token (pp)": f"{sp.layer_token_s * 1e6:.2f} us",
             "peak": f"{sp.peak_bandwidth_bytes_per_s / 1e9:.0f} GB/s" if sp.peak_bandwidth_bytes_per_s else ""}
            for n, sp in cal.speeds.items()]
    lines = [render_table(rows, right=("bandwidth", "FLOP rate", "per step", "per layer", "per layer-token (pp)",
                                       "peak"))]
    for cls, ln in cal.links.items():
        lines.append(f"hop ({cls}): {ln.latency_s * 1e6:.0f} us + {ln.bytes_per_s / 1e9:.2f} GB/s")
        if ln.allreduce_latency_s is not None:
            lines.append(f"all-reduce stage ({cls}, -sm tensor): {ln.allreduce_latency_s * 1e6:.0f} us")
    for ep, r in cal.rtt_s.items():
        lines.append(f"RPC round trip {ep}: {r * 1e6:.0f} us")
    if cal.residuals:
        errs = sorted(abs(r) for _, r in cal.residuals)
        lines.append(f"fit: median |error| {100 * errs[len(errs) // 2]:.1f}%, max {100 * errs[-1]:.1f}% over "
                     f"{len(errs)} calibration points")
    lines.append(f"{cal.seconds:.0f} s; host threads {cal.n_threads}; cached in {cal.cache_path}")
    return "\n".join(lines)


def speed_cache_text(path, devices: dict, links: dict, n_observations: int) -> str:
    """What the speed cache (gpulab.storage.speed_cache) knows, per device key."""
    rows = []
    for key, e in devices.items():
        fit = e.get("fit") or {}
        rows.append({"key": key, "name": e.get("name", ""),
                     "bandwidth": f"{fit['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s" if fit else "-",
                     "FLOP rate": f"{fit['flops_per_s'] / 1e9:.0f} GFLOP/s" if fit else "-",
                     "overhead": f"{fit['overhead_s'] * 1e6:.0f} us" if fit else "-",
                     "measurements": e.get("n_observations", 0), "updated": e.get("updated", "")})
    lines = [f"{path}: {n_observations} measurements"]
    lines.append(render_table(rows, right=("bandwidth", "FLOP rate", "overhead", "measurements")) if rows
                 else "(no device calibrated yet: run `gpulab calibrate`)")
    for cls, ln in links.items():
        if "latency_s" in ln:
            lines.append(f"hop ({cls}): {ln['latency_s'] * 1e6:.0f} us + {ln['bytes_per_s'] / 1e9:.2f} GB/s")
    return "\n".join(lines)


_FIT_FLAG = {"n_ctx": "-c", "n_gpu_layers": "-ngl", "tensor_split": "-ts", "tensor_overrides": "-ot"}


def _setting_text(attr: str, value) -> str:
    if attr == "n_ctx":
        return "0 (the training context)" if value == 0 else str(value)
    if attr == "n_gpu_layers":
        return {-1: "auto", -2: "all"}.get(value, str(value))
    if attr == "tensor_split":
        return ",".join(f"{x:g}" for x in value) if any(value) else "unset (free memory)"
    return f"{len(value)} rule(s)" if value else "none"


FIT_HEAD = "llama-server / llama-cli (-fit on, their default) would load:"
PLAIN_HEAD = "plain layer split, no fit (llama-bench, llama-cpp-python, llama-server -fit off):"


def fit_text(r, fitted_plan: Plan, devices, largest_ctx: int | None = None) -> str:
    """What llama-server/llama-cli load after common_fit_params (gpulab.core.policies.server_fit): the flags
    llama-fit-params would print, what changed, fit's log, and the fitted plan."""
    return "\n".join([FIT_HEAD, *fit_lines(r, devices, largest_ctx), plan_text(fitted_plan)])


def fit_lines(r, devices, largest_ctx: int | None = None) -> list[str]:
    """fit_text less its heading and the fitted plan: the flags, what changed, fit's log, warnings."""
    lines = []
    if r.ok:
        lines.append(f"  {r.flags(devices)}" + ("   (nothing needed changing)" if r.status == "unchanged" else ""))
    elif r.status == "off":
        lines.append("  the settings as given (-fit off)")
    else:
        lines.append(f"  fit gave up ({r.status}); llama-fit-params prints nothing, llama-server loads the settings "
                     "as given" + (" with the context fit chose" if "n_ctx" in r.changed else ""))
    for attr in r.changed:
        lines.append(f"  changed {_FIT_FLAG[attr]}: {_setting_text(attr, getattr(r.given, attr))} -> "
                     f"{_setting_text(attr, getattr(r.config, attr))}")
    lines.append("  fit's log:")
    lines += [f"    {x}" for x in r.reasons]
    for name, over in r.over_target:
        lines.append(f"  warning: with these settings {name} is projected {format_bytes(over)} over its -fitt "
                     "target: fit checked it when it filled it, and filling the devices ahead of it changed what it "
                     "uses (offloading every layer turns on pipeline parallelism: 4 copies of the compute inputs)")
    near = r.near_boundary
    for x in near[:4]:
        lines.append(f"  warning: {x}")
    if len(near) > 4:
        lines.append(f"  warning: and {len(near) - 4} more decisions within the uncertainty (--json lists them)")
    if largest_ctx is not None:
        lines.append(f"  the largest context that leaves -fitt free with fit's -ngl/-ts/-ot: {largest_ctx} "
                     f"(fit chose {r.config.n_ctx}: it interpolates, in steps of {256 * r.config.n_streams})")
    return lines


def ctx_table_text(rows, config) -> str:
    """gpulab.core.policies.context.ctx_table as text."""
    from ..core.policies.server_fit import fit_margins
    margin = ",".join(str(m // 1024**2) for m in fit_margins(config, 1)) if len(config.fit_target) <= 1 else \
        ",".join(str(x) for x in config.fit_target)
    kv = f"-np {config.n_seq_max}" + (" -kvu" if config.kv_unified else "")
    head = (f"largest context leaving {margin} MiB free per device (-fitt), -ngl/-ts/-ot as planned, "
            f"steps of {256 * config.n_streams} ({kv}; llama-server's defaults are -np 4 -kvu):")
    return head + "\n" + render_table([{"-ctk/-ctv": r.type_k, "largest -c": str(r.n_ctx)} for r in rows],
                                       right=("largest -c",))
def fleet_search_lines(fp) -> list[str]:
    """What the fleet search did: its limit, and for the heuristic the value against the bound."""
    if fp.search == "exhaustive":
        return ["exhaustive: every device set of every model tried (optimal for this objective)"]
    out = [fp.search_limit] if fp.search_limit else []
    if fp.value is not None and fp.bound is not None:
        if fp.objective == "fewest":
            what = f"{fp.value:.0f} device slots; no plan needs fewer than {fp.bound:.0f}"
        elif fp.objective == "balanced":
            what = (f"{format_bytes(int(fp.value))} left on the tightest device; no plan leaves more than "
                    f"{format_bytes(int(fp.bound))} (the average)")
        else:
            what = (f"{fp.value:.1f} tokens/s for {fp.objective[3:]}; {fp.bound:.1f} alone on the empty devices")
        gap = "" if fp.gap is None else f", gap {100 * fp.gap:.1f}%"
        out.append(what + gap)
    return out


def fleet_text(fp) -> str:
    """`gpulab fleet plan`: the models (devices, split, context, bytes per device), then the
    devices (the sum over models against free memory less keep_free), then what would fit."""
    models = []
    for p in fp.placements:
        c = p.plan.config
        models.append({
            "model": p.name, "loaded": "resident" if p.resident else "swappable",
            "devices": ",".join(p.devices) or "CPU", "-ts": ",".join(f"{x:g}" for x in c.tensor_split) or "-",
            "-c": c.n_ctx, "KV": f"{c.type_k}/{c.type_v}",
            "per device": "  ".join(f"{d.name} {format_bytes(d.used_bytes)}" for d in p.plan.offload_devices) or "-",
        })
    devices = [{"device": d.name, "free": format_bytes(d.free_bytes), "keep free": format_bytes(d.keep_free_bytes),
                "used": format_bytes(d.used_bytes), "left": format_bytes(d.budget_bytes - d.used_bytes),
                "fits": "yes" if d.fits else f"NO, short by {format_bytes(d.deficit_bytes)}"} for d in fp.devices]
    out = [render_table(models, right=("-c",)), "",
           render_table(devices, right=("free", "keep free", "used", "left")), ""]
    out += [f"search: {line}" for line in fleet_search_lines(fp)]
    out.append(f"fleet {'fits' if fp.fits else 'DOES NOT FIT'} (objective {fp.objective}, {fp.search} search, "
               f"{fp.evaluated} model plans)")
    out += [f"  - {a.text}" for a in fp.advice]
    return "\n".join(out)


def process_text(cp) -> str:
    """A pasted command's whole process (gpulab.core.policies.process.CommandPlan): per device the
    main model, the draft, the MTP context, the projector and the base cost, against free memory."""
    pp, cmd = cp.process, cp.command
    lines = [f"{cmd.program}: {cmd.model}" + (f" + draft {cmd.draft.path}" if cmd.draft else "")
             + (f" + projector {cmd.projector.path}" if cmd.projector else "")]
    if cp.fit is not None:
        lines.append(f"fit: {cp.fit.status}" + (f" ({', '.join(cp.fit.changed)})" if cp.fit.changed else ""))
    c = pp.main.config
    lines.append(f"main: -ngl {c.n_gpu_layers} -c {c.n_ctx} -np {c.n_seq_max}{' -kvu' if c.kv_unified else ''} "
                 f"-ctk {c.type_k} -ctv {c.type_v}" + (f" -ts {','.join(f'{x:g}' for x in c.tensor_split)}"
                                                      if c.tensor_split else ""))
    if pp.projector is not None:
        pr = pp.projector
        lines.append(f"projector on {pr.device} ({pr.why}): weights {format_bytes(pr.weights_bytes)}, "
                     f"compute {format_bytes(pr.compute_bytes)} (estimate)")
    if pp.mtp is not None:
        lines.append(f"MTP heads: the nextn layer(s) on {', '.join(dict.fromkeys(pp.mtp.layer_devices[:-1]))} "
                     "(weights in main); the MTP context's KV and compute in the 'mtp' column")
    mtp = pp.mtp is not None
    head = (f"{'device':<10}{'main':>12}{'draft':>12}" + (f"{'mtp':>12}" if mtp else "")
            + f"{'projector':>12}{'base cost':>14}{'total':>12}{'free':>12}  fits")
    lines += ["", head]
    for r in pp.rows:
        base = format_bytes(r.overhead_bytes) + ("*" if r.overhead_is_default else "")
        free = "-" if r.is_host else format_bytes(r.free_bytes)
        lines.append(f"{r.name:<10}{format_bytes(r.main_bytes):>12}{format_bytes(r.draft_bytes):>12}"
                     + (f"{format_bytes(r.mtp_bytes):>12}" if mtp else "")
                     + f"{format_bytes(r.projector_bytes):>12}{base:>14}{format_bytes(r.used_bytes):>12}{free:>12}  "
                     f"{'yes' if r.fits else 'NO'}")
    if any(r.overhead_is_default for r in pp.rows):
        lines.append("* default base cost for a CUDA device (nothing learned on it yet)")
    lines += [""] + list(cp.notes) if cp.notes else []
    lines.append("fits" if pp.fits else "does NOT fit")
    return "\n".join(lines)
