"""`gpulab plan MODEL --cluster cluster.toml [--objective tg|hosts]`: which of the cluster's hosts
the model should span, with each choice's placement and predicted pp and tg over the links
(gpulab.core.measure.hosts). The head's memory for layers left on its CPU is this machine's."""

from __future__ import annotations

from .result import Result

__all__ = ["run", "options_text"]


def options_text(options, chosen, why: str) -> str:
    lines = [f"{'hosts':<28} {'layers on CPU':>13} {'fits':>5} {'tg t/s':>8} {'pp t/s':>8} "
             f"{'links ms/token':>14}  dominant"]
    for o in options:
        mark = "*" if o is chosen else " "
        lines.append(f"{mark}{' + '.join(o.hosts):<27} {o.n_cpu_layers:>13} {'yes' if o.fits else 'no':>5} "
                     f"{o.speed.tg_tokens_per_s:8.1f} {o.speed.pp_tokens_per_s:8.0f} "
                     f"{o.network.tg_seconds * 1e3:14.2f}  {o.network.dominant('tg') if o.network.tg else '-'}")
    lines.append("")
    lines.append(f"chosen: {chosen.describe() if chosen else 'none'}")
    lines.append(f"why: {why}")
    return "\n".join(lines)


def run(a, config) -> Result:
    """a: the plan command's arguments; config: its llama.cpp flags as a SplitConfig."""
    from ..core.measure.hosts import choose, host_options
    from ..sources.host import host_device
    from ..sources.read import read_profile
    from ..storage.cluster_files import read_cluster
    from .flags import model_path
    cluster = read_cluster(a.cluster)
    prof = read_profile(model_path(a.model))
    options = host_options(prof, cluster, config, host_device(), n_prompt=512, n_gen=128)
    chosen, why = choose(options, a.objective)
    rows = [{"hosts": " + ".join(o.hosts), "cpu_layers": o.n_cpu_layers, "fits": o.fits,
             "tg_ts": o.speed.tg_tokens_per_s, "pp_ts": o.speed.pp_tokens_per_s,
             "link_ms_per_token": o.network.tg_seconds * 1e3,
             "dominant": o.network.dominant("tg") if o.network.tg else "", "chosen": o is chosen,
             "rpc": ",".join(o.endpoints), "layer_devices": list(o.plan.layer_devices)} for o in options]
    text = options_text(options, chosen, why)
    data: dict = {"options": rows, "why": why}
    objects: dict = {"options": options, "chosen": chosen}
    if getattr(a, "commands", False) and chosen is not None:
        from pathlib import Path

        from ..core.exports.cluster import cluster_export
        devices, _ = cluster.devices(list(chosen.hosts[1:]))
        exp = cluster_export(chosen.plan, cluster, chosen.hosts, devices, model_path=str(model_path(a.model)),
                             name=Path(a.model).stem)
        text += "\n\n" + exp.text()
        data["commands"] = {"servers": [{"host": s.host, "command": s.text, "exposes": s.exposure}
                                        for s in exp.servers],
                            "head": exp.head.text, "llama_swap": exp.llama_swap}
        objects["export"] = exp
    return Result(text=text, data=data, rows=rows, exit_code=0 if chosen else 1, objects=objects)
