"""`gpulab tune MODEL --objective tg|pp|mixed [--budget N] [--save]`: the fastest placement of a
grid, found with few loads (gpulab.core.measure.tune explains how).

    gpulab tune model.gguf --rpc 127.0.0.1:50052,127.0.0.1:50053 --objective mixed --save
    gpulab tune model.gguf -ngl 0-31+8 -ts 1/1,3/1,1/3 --budget 6 -p 128 -n 32

Without grid flags the grid is gpulab.core.measure.tune.default_grid_args. Every load is measured as
`gpulab sweep` measures (same store: a config measured before costs no load now), --budget
caps the loads (default: a quarter of the grid). --save writes the winner as the model's
saved allocation on these devices, with the measurement that justified it.
"""

from __future__ import annotations

import argparse
import math
import sys

from .flags import add_bench_flags, add_device_flags, add_model_arg, model_path
from .result import Result
from .sweep import add_grid_flags, grid_from_args, measuring_setup

__all__ = ["register", "run"]


def register(sub, frontend: str) -> None:
    p = sub.add_parser("tune", help="find the fastest placement with few loads (speed model + measurements)")
    add_model_arg(p)
    p.add_argument("--objective", choices=("tg", "pp", "mixed"), default="tg",
                   help="tokens/s to maximise: generation, prompt processing, or both (-p then -n tokens)")
    p.add_argument("--budget", type=int, default=None, metavar="N", help="at most N loads (default: grid size / 4)")
    p.add_argument("--save", action="store_true", help="save the winner as this model's allocation on these devices")
    add_grid_flags(p)
    add_bench_flags(p)
    add_device_flags(p, sim=False)
    p.add_argument("--store", default=None, metavar="PATH", help="results store (default: the user's)")
    p.add_argument("--fresh", action="store_true", help="measure again what the store already has")
    p.add_argument("--no-fit", dest="vs_fit", action="store_false",
                   help="do not measure llama-server's -fit choice next to the best (one more load unless stored)")
    p.set_defaults(run=run)


def _ts(c) -> str:
    return "/".join(f"{x:g}" for x in c.tensor_split) or "free memory"


def run(a: argparse.Namespace, session) -> Result:
    from ..runtime.llama_lib import require
    require()   # llama-cpp-python: the `run` extra
    from ..core.config import SplitConfig
    from ..core.exports.render import render
    from ..core.measure.sweep_grid import parse_grid
    from ..core.measure.tune import Tuner, default_grid_args, run_tuner
    from ..runtime.sweep import run_sweep
    from ..sources.read import read_profile
    from ..storage.results import ResultsStore

    path = model_path(a.model)
    prof = read_profile(path)
    measure, devices = measuring_setup(a, session)
    grid = grid_from_args(a)
    if not grid.axes:
        grid = parse_grid(default_grid_args(prof, devices))
    base = SplitConfig(n_ctx=max(1, a.n_prompt + a.n_gen))
    configs = grid.configs(base)
    tuner = Tuner(prof, devices, configs, objective=a.objective, n_prompt=a.n_prompt or 512, n_gen=a.n_gen or 128)
    budget = a.budget if a.budget is not None else max(1, math.ceil(len(configs) / 4))
    store = ResultsStore(a.store) if a.store else None
    # progress goes to stderr as it happens: a tune takes minutes
    print(f"gpulab: {len(configs)} configurations, {len(tuner.candidates)} distinct placements that fit "
          f"({len(tuner.pruned)} pruned by the planner); at most {budget} loads", file=sys.stderr)

    def one(config):
        res = run_sweep(path, [config], n_prompt=a.n_prompt, n_gen=a.n_gen, repetitions=a.repetitions,
                        n_threads=a.threads, store=store, measure=measure, progress=False, resume=not a.fresh)
        p = res.points[0]
        pp = next((r["avg_ts"] for r in p.records if r["n_prompt"] and not r["n_gen"]), None)
        tg = next((r["avg_ts"] for r in p.records if r["n_gen"] and not r["n_prompt"]), None)
        if p.status == "failed":
            print(f"gpulab: -ngl {config.n_gpu_layers} -ts {_ts(config)}: {p.error}", file=sys.stderr)
        return pp, tg, p.status in ("measured", "failed")

    def step(c, pp, tg, loaded):
        what = f"pp {pp:.2f} t/s, tg {tg:.2f} t/s" if pp and tg else "failed"
        print(f"[{tuner.loads}/{budget}] -ngl {c.n_gpu_layers} -ts {_ts(c)} {_others(c, grid)}: {what}"
              + ("" if loaded else " (stored)"), file=sys.stderr)

    best = run_tuner(tuner, one, budget, on_step=step)
    if best is None:
        return Result(notes=["nothing could be measured"], exit_code=1)
    config, value = best
    cand = next(c for c in tuner.candidates if c.config == config)
    lines = [f"best ({a.objective}, {value:.2f} t/s) after {tuner.loads} loads: "
             f"pp {cand.pp_ts or 0:.2f} t/s, tg {cand.tg_ts or 0:.2f} t/s",
             render(config, "llama-server", model_path=path, n_layer=prof.n_layer, devices=devices).text]
    notes = []
    fit_data = None
    if getattr(a, "vs_fit", True):
        fit_line, fit_data = _fit_candidate(prof, devices, base, one, a, value)
        lines.insert(1, fit_line)
    saved_to = None
    if a.save:
        from ..storage.allocations import save_allocation
        saved = config
        if not a.grid_c:
            # measured at llama-bench's context (n_prompt + n_gen), which is no context to serve
            # with; the placement does not depend on it, so the allocation keeps the default one
            saved = config.replace(n_ctx=SplitConfig().n_ctx)
            notes.append(f"note: measured with -c {config.n_ctx}; the allocation keeps -c {saved.n_ctx} "
                         "(pass -c to tune and save another)")
        saved_to = save_allocation(path, saved, devices, source="tune", measurement={
            "n_ctx_measured": config.n_ctx,
            "objective": a.objective, "objective_tokens_per_s": value, "pp_tokens_per_s": cand.pp_ts or 0.0,
            "tg_tokens_per_s": cand.tg_ts or 0.0, "n_prompt": a.n_prompt, "n_gen": a.n_gen,
            "repetitions": a.repetitions, "loads": tuner.loads, "configurations": len(configs)})
        lines.append(f"saved {saved_to.path}")
    return Result(text="\n".join(lines), notes=notes,
                  data={"best": {"objective": a.objective, "tokens_per_s": value, "pp_tokens_per_s": cand.pp_ts,
                                 "tg_tokens_per_s": cand.tg_ts}, "loads": tuner.loads, "configurations": len(configs),
                        "fit": fit_data},
                  objects={"config": config, "tuner": tuner, "allocation": saved_to})


def _fit_candidate(prof, devices, base, one, a, best_value):
    """llama-server's own choice (-fit on from its defaults: -c 0, -ngl auto, gpulab.core.policies.server_fit), its
    placement measured at the tune's context like every candidate: fit maximises what it offloads,
    and this says how far that is from the fastest placement found."""
    from ..core.config import SplitConfig
    from ..core.measure.tune import objective_value
    from ..core.policies.server_fit import server_fit
    r = server_fit(prof, devices, SplitConfig(n_ctx=0))
    if not r.ok:
        return f"llama-server's -fit gives up here ({r.reasons[-1]})", {"status": r.status}
    cfg = r.config.replace(n_ctx=base.n_ctx)
    pp, tg, _ = one(cfg)
    v = objective_value(a.objective, pp, tg, a.n_prompt or 512, a.n_gen or 128)
    ratio = v / best_value if best_value else 0.0
    line = (f"llama-server's -fit choice ({r.flags(devices)}): pp {pp or 0:.2f} t/s, tg {tg or 0:.2f} t/s, "
            f"{ratio:.2f} of the best {a.objective}")
    return line, {"flags": r.flags(devices), "pp_tokens_per_s": pp, "tg_tokens_per_s": tg,
                  "ratio_to_best": ratio}


def _others(c, grid) -> str:
    names = {"flash_attn": "-fa", "n_ubatch": "-ub", "n_batch": "-b", "type_k": "-ctk", "type_v": "-ctv",
             "n_ctx": "-c", "offload_kqv": "-kvo", "split_mode": "-sm", "main_gpu": "-mg", "devices": "-dev"}
    return " ".join(f"{names[k]} {getattr(c, k)}" for k in grid.varying() if k in names)
