"""Plain-text tables for the CLI: rows in, aligned columns out. Human units live here only."""

from __future__ import annotations

from ..core.plan import Plan
from ..core.profile import ModelProfile
from ..core.devices import Device
from ..core.units import format_bytes

__all__ = ["render_table", "plan_rows", "plan_text", "profile_text", "devices_text", "layer_ranges"]


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
    rows = []
    for d in p.devices:
        rows.append({
            "device": d.name, "layers": ranges.get(d.name, "-") if not d.is_host or d.name in ranges else "input",
            "weights": format_bytes(d.weights_bytes), "KV": format_bytes(d.kv_bytes),
            "compute": format_bytes(d.compute_bytes), "used": format_bytes(d.used_bytes),
            "free": format_bytes(d.free_bytes) if d.free_bytes else "?",
            "fits": "yes" if d.fits else f"NO (-{format_bytes(d.deficit_bytes)})",
        })
    return rows


def plan_text(p: Plan, devices: list[Device] | None = None, *, speed_model=None, n_threads: int | None = None,
              n_prompt: int = 512, n_gen: int = 128) -> str:
    """The plan as text: settings, the memory table, predicted speed, whether it fits.

    devices: the Devices planned for (host included or not), so that each one's speed comes from
    its calibration, spec (--sim ...:BW/s) or NVML; without them the names alone are looked up.
    speed_model: a SpeedModel to use instead (gpulab.runtime.calibrate.speed_model_for)."""
    def _speed_text(p: Plan, devices, speed_model, n_threads, n_prompt: int, n_gen: int) -> str:
        """Predicted pp/tg (gpulab.core.speed) and where each device's figures come from."""
        from ..core.speed import predict_speed
        try:
            if speed_model is None:
                from ..runtime.calibrate import speed_model_for
                if devices is None:   # names only: what the plan knows of its devices
                    devices = [Device(name=d.name, total_bytes=d.total_bytes, free_bytes=d.free_bytes,
                                      source="host" if d.is_host else "sim" if d.name.startswith("SIM") else "plan",
                                      kind="cpu" if d.is_host else "rpc" if d.name.startswith("RPC") else "gpu")
                               for d in p.devices]
                speed_model = speed_model_for(devices, n_threads=n_threads)
            s = predict_speed(p, speed_model, n_prompt=n_prompt, n_gen=n_gen)
        except Exception as e:  # noqa: BLE001 - the memory plan stands without a speed
            return f"speed: not predicted ({type(e).__name__}: {e})"
        hops = f"; {s.n_hops} hop{'s' if s.n_hops != 1 else ''} between devices" if s.n_hops else ""
        line = (f"speed (predicted, pp{n_prompt}/tg{n_gen}): tg {s.tg_tokens_per_s:.1f} t/s, "
                f"pp {s.pp_tokens_per_s:.1f} t/s; "
                f"{100 * s.roofline_fraction:.0f}% of the memory roofline ({s.roofline_tg_tokens_per_s:.1f} t/s){hops}")
        by_source: dict[str, list[str]] = {}
        for name, source in s.sources.items():
            by_source.setdefault(source, []).append(name)
        src = "; ".join(f"{source}: {', '.join(names)}" for source, names in by_source.items())
        hint = " (rough guesses: run `gpulab calibrate`)" if "default" in by_source else ""
        return f"{line}\nspeed figures: {src}{hint}"

    c = p.config
    ts = ",".join(f"{x:g}" for x in c.tensor_split) if c.tensor_split else "default (free memory)"
    head = (f"{p.profile.name or p.profile.arch}: {p.profile.n_layer} layers + output, "
            f"{format_bytes(p.profile.file_bytes)} | -ngl {c.n_gpu_layers} -sm {c.split_mode} "
            f"-mg {c.main_gpu} -ts {ts} -c {c.n_ctx} -ctk {c.type_k} -ctv {c.type_v} "
            f"({p.kv_cells} KV cells)")
    body = render_table(plan_rows(p), right=("weights", "KV", "compute", "used", "free"))
    verdict = "fits" if p.fits else "DOES NOT FIT: " + "; ".join(p.deficits())
    return f"{head}\n{body}\n{_speed_text(p, devices, speed_model, n_threads, n_prompt, n_gen)}\n{verdict}"


def profile_text(prof: ModelProfile) -> str:
    head = [
        f"{prof.name or '(unnamed)'} — arch {prof.arch}, {prof.file_type or '?'}, {format_bytes(prof.file_bytes)}",
        f"n_layer {prof.n_layer}, n_embd {prof.n_embd}, n_ff {prof.n_ff}, vocab {prof.n_vocab}, "
        f"ctx_train {prof.n_ctx_train}" + (f", experts {prof.n_expert_used}/{prof.n_expert}" if prof.n_expert else "")
        + (f", sliding window {prof.n_swa}" if prof.n_swa else ""),
        f"input (CPU): {format_bytes(prof.input_weights_bytes)}; output layer: "
        f"{format_bytes(prof.output_weights_bytes)}" + (" (tied to token_embd)" if prof.tied_output else ""),
    ]
    rows = [{
        "layer": l.index, "tensors": len(l.tensors), "weights": format_bytes(l.weights_bytes),
        "experts": format_bytes(l.expert_bytes) if l.expert_bytes else "", "heads": l.n_head,
        "kv_heads": l.n_head_kv, "head_k/v": f"{l.n_embd_head_k}/{l.n_embd_head_v}",
        "swa": "yes" if l.is_swa else "", "kv": "" if l.has_kv else "none",
    } for l in prof.layers]
    return "\n".join(head) + "\n" + render_table(rows, right=("weights", "experts"))


def devices_text(devices: list[Device], host: Device | None = None) -> str:
    rows = [{"device": d.name, "kind": d.kind, "source": d.source, "description": d.description,
             "total": format_bytes(d.total_bytes), "free": format_bytes(d.free_bytes)}
            for d in list(devices) + ([host] if host else [])]
    return render_table(rows, right=("total", "free"))
