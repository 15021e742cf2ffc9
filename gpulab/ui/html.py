"""HTML tables for notebooks and magics: the same rows as the CLI's text tables, as HTML.

Each `*_html` function returns a string; each `*_rows` function plain values (bytes as int) for a
DataFrame. The commands' Results (gpulab.commands.result) carry both.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

from ..core.devices import Device
from ..core.placement.plan import Plan
from ..core.profile import ModelProfile
from ..core.run import Run
from ..core.units import format_bytes
from .text import plan_rows

__all__ = ["table_html", "plan_html", "devices_html", "profile_html", "pre_html", "device_rows", "profile_rows",
           "plan_frame_rows", "run_rows", "exports_html", "EXPORT_LABELS"]

_STYLE = ("<style>.gpulab-t{border-collapse:collapse;font-size:12px;font-family:var(--jp-code-font-family,monospace)}"
          ".gpulab-t th,.gpulab-t td{padding:2px 8px;border-bottom:1px solid #ddd;text-align:left}"
          ".gpulab-t td.r{text-align:right}.gpulab-t tr.bad td{color:#d62728;font-weight:bold}"
          ".gpulab-t caption{caption-side:top;text-align:left;font-weight:bold;padding:4px 0}</style>")


def table_html(rows: Sequence[dict], *, right: Sequence[str] = (), caption: str | None = None,
               bad: Sequence[bool] | None = None) -> str:
    """An HTML table of `rows` (dicts sharing keys); `bad[i]` marks row i red."""
    if not rows:
        return "<i>(none)</i>"
    cols = list(rows[0])
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = []
    for i, r in enumerate(rows):
        cls = " class='bad'" if bad is not None and bad[i] else ""
        cells = "".join(f"<td{' class=r' if c in right else ''}>{html.escape(str(r.get(c, '')))}</td>" for c in cols)
        body.append(f"<tr{cls}>{cells}</tr>")
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    # a table wider than its cell scrolls sideways instead of being cut off on the right
    return (f"{_STYLE}<div class='gpulab-tw' style='overflow-x:auto;max-width:100%'><table class='gpulab-t'>{cap}"
            f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>")


def pre_html(text: str, title: str | None = None) -> str:
    t = f"<div style='font-weight:bold;margin-top:6px'>{html.escape(title)}</div>" if title else ""
    return (f"{t}<pre style='user-select:all;white-space:pre-wrap;background:#f6f6f6;padding:6px;"
            f"margin:2px 0;font-size:12px'>{html.escape(text)}</pre>")


def plan_html(p: Plan) -> str:
    c = p.config
    ts = ",".join(f"{x:g}" for x in c.tensor_split) if c.tensor_split else "default (free memory)"
    head = (f"{p.profile.title}: {p.profile.n_layer} layers + output, "
            f"{format_bytes(p.profile.file_bytes)} | -ngl {c.n_gpu_layers} -sm {c.split_mode} -mg {c.main_gpu} "
            f"-ts {ts} -c {c.n_ctx} -ctk {c.type_k} -ctv {c.type_v} ({p.kv_cells} KV cells)")
    verdict = ("<div style='color:#2a7d2a;font-weight:bold'>fits</div>" if p.fits else
               "<div style='color:#d62728;font-weight:bold'>DOES NOT FIT: "
               + html.escape("; ".join(p.deficits())) + "</div>")
    doubts = "".join(f"<div style='color:#b35c00;font-size:12px'>not exact: {html.escape(str(d))}</div>"
                     for d in p.doubts)
    return (table_html(plan_rows(p), right=("weights", "KV", "state", "compute", "base", "used", "free"), caption=head,
                       bad=[not d.fits for d in p.devices]) + doubts + verdict)


EXPORT_LABELS = {"llama-server": "llama-server", "llama-cli": "llama-cli", "llama-bench": "llama-bench",
                 "python": "llama-cpp-python", "ollama": "Ollama", "koboldcpp": "KoboldCpp (.kcpps)"}


def exports_html(exports: dict) -> str:
    """{target: gpulab.core.exports.render.Export} as copy-ready blocks, each with what it cannot express."""
    return "".join(pre_html(e.text.rstrip("\n") + "".join(f"\n# cannot express: {g}" for g in e.gaps),
                            EXPORT_LABELS.get(t, t)) for t, e in exports.items())


def plan_frame_rows(p: Plan) -> list[dict]:
    """Plain numbers per device (bytes as int) for a DataFrame."""
    from .text import layer_ranges
    ranges = layer_ranges(p.layer_devices, p.profile.n_layer)
    return [{"device": d.name, "layers": ranges.get(d.name, ""), "n_layers": d.n_layers, "has_output": d.has_output,
             "weights_bytes": d.weights_bytes, "kv_bytes": d.kv_bytes, "state_bytes": d.state_bytes,
             "compute_bytes": d.compute_bytes,
             "overhead_bytes": d.overhead_bytes, "used_bytes": d.used_bytes, "free_bytes": d.free_bytes,
             "total_bytes": d.total_bytes, "fits": d.fits, "deficit_bytes": d.deficit_bytes}
            for d in p.devices]


def device_rows(devices: Sequence[Device], host: Device | None = None) -> list[dict]:
    return [{"device": d.name, "kind": d.kind, "source": d.source, "description": d.description,
             "endpoint": d.endpoint, "total_bytes": d.total_bytes, "free_bytes": d.free_bytes}
            for d in list(devices) + ([host] if host else [])]


def devices_html(devices: Sequence[Device], host: Device | None = None, note: str = "") -> str:
    rows = [{"device": d.name, "kind": d.kind, "source": d.source, "description": d.description,
             "total": format_bytes(d.total_bytes), "free": format_bytes(d.free_bytes)}
            for d in list(devices) + ([host] if host else [])]
    return table_html(rows, right=("total", "free"), caption=note or None)


def profile_rows(prof: ModelProfile) -> list[dict]:
    return [{"layer": layer.index, "tensors": len(layer.tensors), "weights_bytes": layer.weights_bytes,
             "expert_bytes": layer.expert_bytes, "n_head": layer.n_head, "n_head_kv": layer.n_head_kv,
             "n_embd_head_k": layer.n_embd_head_k, "n_embd_head_v": layer.n_embd_head_v, "is_swa": layer.is_swa,
             "has_kv": layer.has_kv} for layer in prof.layers]


def profile_html(prof: ModelProfile, max_rows: int = 200) -> str:
    head = (f"{prof.title} — arch {prof.arch}, {prof.file_type or '?'}, {format_bytes(prof.file_bytes)}; "
            f"n_layer {prof.n_layer}, n_embd {prof.n_embd}, n_ff {prof.n_ff}, vocab {prof.n_vocab}, "
            f"ctx_train {prof.n_ctx_train}; input (CPU) {format_bytes(prof.input_weights_bytes)}, output layer "
            f"{format_bytes(prof.output_weights_bytes)}" + (" (tied)" if prof.tied_output else ""))
    rows = [{"layer": layer.index, "tensors": len(layer.tensors), "weights": format_bytes(layer.weights_bytes),
             "heads": layer.n_head, "kv_heads": layer.n_head_kv,
             "head_k/v": f"{layer.n_embd_head_k}/{layer.n_embd_head_v}",
             "swa": "yes" if layer.is_swa else "", "kv": "" if layer.has_kv else "none"}
            for layer in prof.layers[:max_rows]]
    more = f"<div>the first {max_rows} of {prof.n_layer} layers</div>" if len(prof.layers) > max_rows else ""
    return table_html(rows, right=("weights",), caption=head) + more


def run_rows(runs: list[Run], plans: list[dict | None] | None = None) -> list[dict]:
    """One flat row per run (numbers, not text), for the results table and DataFrames."""
    rows = []
    for i, r in enumerate(runs, 1):
        c = r.config
        p = r.plan
        match = None
        if p is not None and p.layer_devices and r.report.layer_devices:
            match = p.layer_devices == tuple(r.report.layer_devices)
        row = {"run": i, "tensor_split": ",".join(f"{x:g}" for x in c.tensor_split) or "auto",
               "n_gpu_layers": c.n_gpu_layers, "split_mode": c.split_mode, "main_gpu": c.main_gpu,
               "n_ctx": c.n_ctx, "type_k": c.type_k, "type_v": c.type_v, "flash_attn": c.flash_attn,
               "devices": ",".join(r.devices or r.report.devices), "predicted_fits": p.fits if p is not None else None,
               "placement_as_planned": match, "load_s": round(r.load_seconds, 3),
               "pp_ts": round(r.pp.avg_ts, 2) if r.pp else None, "tg_ts": round(r.tg.avg_ts, 2) if r.tg else None}
        for d in (p.devices if p is not None else ()):
            row[f"{d.name}_pred_MiB"] = round(d.used_bytes / 2**20, 2)
            row[f"{d.name}_llama_MiB"] = round(r.report.bytes_on(d.name) / 2**20, 2)
        rows.append(row)
    return rows
