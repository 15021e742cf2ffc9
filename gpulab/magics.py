"""IPython magics: `%load_ext gpulab`, then `%gpulab COMMAND ...` with the CLI's flags.

    %gpulab devices [--sim SPEC | --rpc HOST:PORT,... | --llama-devices]
    %gpulab inspect MODEL
    %gpulab plan MODEL [-ngl N -ts A,B -c N ... --sim 2x24GiB --policy pack]
    %gpulab lab MODEL [flags] [--virtual N]
    %gpulab bench MODEL [flags] [-p 128 -n 32 -r 2] [--virtual N]
    %gpulab monitor [--interval S]
    %gpulab export MODEL [flags]

MODEL is a path, an http(s) URL, or `demo` (the bundled SmolLM2-135M). The flags are built from
the CLI's own flag groups (gpulab.cli.add_config_flags / add_device_flags), so they cannot drift.
Tables show as HTML and every result is also the cell's value (`_`), with `.to_dataframe()`.

The kernel never registers an RPC endpoint: --rpc and --virtual devices are reached through a
gpulab worker process (gpulab.runtime.worker), kept for the session and closed on
`%unload_ext gpulab`.
"""

from __future__ import annotations

import argparse
import atexit

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments
from IPython.utils.process import arg_split

from .cli import add_config_flags, add_device_flags, config_from_args
from .core.policies import POLICIES, apply_policy
from .errors import GpulabError

__all__ = ["GpulabMagics", "load_ipython_extension", "unload_ipython_extension", "build_parser", "COMMANDS"]

COMMANDS = ("devices", "inspect", "plan", "lab", "bench", "monitor", "export")


class _Exit(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors as IPython UsageError (one line, no SystemExit)."""

    def error(self, message):
        raise UsageError(f"{self.prog}: {message}")

    def exit(self, status=0, message=None):
        if message:
            print(message)
        raise _Exit(status)


def _model_arg(p: argparse.ArgumentParser, optional: bool = False) -> None:
    p.add_argument("model", nargs="?" if optional else None, default="demo" if optional else None,
                   help="path or http(s) URL of a .gguf, or 'demo' (SmolLM2-135M)")


def build_parser() -> argparse.ArgumentParser:
    top = _Parser(prog="%gpulab", description="See where llama.cpp puts each layer of a GGUF model.",
                  add_help=True)
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("devices", help="the devices gpulab would plan for")
    add_device_flags(p)

    p = sub.add_parser("inspect", help="a GGUF's layers and tensors")
    _model_arg(p)
    p.add_argument("--max-rows", type=int, default=200)

    p = sub.add_parser("plan", help="predict llama.cpp's placement and per-device memory")
    _model_arg(p)
    add_config_flags(p)
    add_device_flags(p)
    p.add_argument("--policy", choices=POLICIES, help="choose -ts by a policy")
    p.add_argument("--no-figures", action="store_true", help="the table only")

    p = sub.add_parser("lab", help="the SplitLab widget: sliders, figures, load & measure")
    _model_arg(p, optional=True)
    add_config_flags(p)
    add_device_flags(p)
    p.add_argument("--policy", choices=POLICIES)
    p.add_argument("--virtual", type=int, default=None, metavar="N",
                   help="N virtual devices (llama.cpp RPC servers on this machine's CPU)")
    p.add_argument("--monitor", action="store_true", help="add the live GPU monitor under the lab")

    p = sub.add_parser("bench", help="load (and measure pp/tg where the runtime can) in a worker")
    _model_arg(p, optional=True)
    add_config_flags(p)
    add_device_flags(p)
    p.add_argument("--policy", choices=POLICIES)
    p.add_argument("--virtual", type=int, default=None, metavar="N")
    p.add_argument("-p", "--n-prompt", type=int, default=128)
    p.add_argument("-n", "--n-gen", type=int, default=32)
    p.add_argument("-r", "--repetitions", type=int, default=2)

    p = sub.add_parser("monitor", help="live GPU memory and utilisation (NVML)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between samples")
    p.add_argument("--history", type=int, default=600, help="samples kept per GPU")

    p = sub.add_parser("export", help="llama-server flags, llama-cpp-python kwargs, Ollama settings")
    _model_arg(p, optional=True)
    add_config_flags(p)
    add_device_flags(p)
    p.add_argument("--policy", choices=POLICIES)
    return top


def full_help() -> str:
    """The help of every subcommand, for `%gpulab?`."""
    top = build_parser()
    parts = [top.format_help()]
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        parts.append(f"\n--- %gpulab {name} ---\n" + p.format_help())
    return "\n".join(parts)


# -- session resources (workers, virtual devices) -----------------------------------------------

class _Session:
    def __init__(self):
        self.workers: dict[tuple, object] = {}
        self.clusters: list = []
        self.labs: list = []

    def worker(self, endpoints: tuple[str, ...] = ()):
        from .runtime.worker import Worker
        w = self.workers.get(endpoints)
        if w is None:
            w = self.workers[endpoints] = Worker(list(endpoints))
        return w

    def virtual(self, n: int) -> tuple[str, ...]:
        from .runtime.rpc import start_servers
        cluster = start_servers(n)
        self.clusters.append(cluster)
        return tuple(cluster.endpoints)

    def close(self) -> None:
        for lab in self.labs:
            try:
                lab.close()
            except Exception:  # noqa: BLE001
                pass
        for w in self.workers.values():
            try:
                w.close()
            except Exception:  # noqa: BLE001
                pass
        for c in self.clusters:
            try:
                c.stop()
            except Exception:  # noqa: BLE001
                pass
        self.workers.clear()
        self.clusters.clear()
        self.labs.clear()


_SESSION = _Session()
atexit.register(_SESSION.close)


def _endpoints(a) -> tuple[str, ...]:
    return tuple(x.strip() for x in (a.rpc or "").split(",") if x.strip())


def _devices(a, *, for_load: bool = False):
    """(devices, host, note, worker) from the device flags, never registering RPC in the kernel."""
    from .sources.detect import detect_devices, host_device
    host = host_device()
    virtual = getattr(a, "virtual", None)
    endpoints = _endpoints(a)
    if a.sim:
        if endpoints or a.llama_devices or virtual:
            raise UsageError("--sim replaces device detection: drop --rpc / --llama-devices / --virtual")
        found = detect_devices(sim=a.sim)
        return list(found.devices), found.host, found.source_note, None
    if virtual:
        endpoints = _SESSION.virtual(virtual) + endpoints
    if endpoints or a.llama_devices:
        w = _SESSION.worker(endpoints)
        devs = [d for d in w.devices() if d.kind != "cpu"]
        note = (f"llama.cpp's devices in a worker process ({len(devs)}"
                + (f"; RPC {', '.join(endpoints)}" if endpoints else "") + ")")
        return devs, host, note, w
    found = detect_devices()
    return list(found.devices), found.host, found.source_note, (_SESSION.worker(()) if for_load else None)


def _model(name: str) -> str:
    if name == "demo":
        from .sources.demo import demo_model_path
        return str(demo_model_path())
    return name


def _planned(a):
    from . import read_profile
    from .core.planner import plan
    config = config_from_args(a)
    path = _model(a.model)
    prof = read_profile(path)
    devices, host, note, worker = _devices(a)
    if a.policy:
        config = apply_policy(a.policy, prof, devices, config, host)
    return path, prof, devices, host, note, worker, config, plan(prof, devices, config, host)


# -- the magic ------------------------------------------------------------------------------------

@magics_class
class GpulabMagics(Magics):
    """`%gpulab COMMAND [args]`; `%gpulab COMMAND -h` for one command's flags."""

    @magic_arguments()
    @argument("command", choices=COMMANDS, help="what to do (each takes -h)")
    @argument("args", nargs=argparse.REMAINDER, help="the command's arguments: the gpulab CLI's flags")
    @line_magic
    def gpulab(self, line: str = ""):
        try:
            a = build_parser().parse_args(arg_split(line, posix=True))
        except _Exit:
            return None
        try:
            return getattr(self, f"_cmd_{a.command}")(a)
        except GpulabError as e:
            raise UsageError(f"gpulab: {e}") from None

    # -- commands ------------------------------------------------------------------------
    def _cmd_devices(self, a):
        from .ui.html import HtmlTable, device_rows, devices_html
        from .ui.text import devices_text
        devices, host, note, _ = _devices(a)
        return HtmlTable(devices_html(devices, host, note), device_rows(devices, host),
                         text=(note + "\n" if note else "") + devices_text(devices, host),
                         devices=devices, host=host, note=note)

    def _cmd_inspect(self, a):
        from . import read_profile
        from .ui.html import HtmlTable, profile_html, profile_rows
        from .ui.text import profile_text
        prof = read_profile(_model(a.model))
        return HtmlTable(profile_html(prof, a.max_rows), profile_rows(prof), text=profile_text(prof), profile=prof)

    def _cmd_plan(self, a):
        from .ui import figures as F
        from .ui.html import HtmlTable, plan_frame_rows, plan_html
        from .ui.text import plan_text
        _, prof, devices, host, note, _, config, p = _planned(a)
        if not a.no_figures:
            F.show(F.layer_map(p))
            F.show(F.memory_bars(p))
        return HtmlTable(plan_html(p), plan_frame_rows(p), text=plan_text(p, list(devices) + ([host] if host else [])),
                         plan=p, profile=prof, note=note)

    def _cmd_lab(self, a):
        from .ui.lab import SplitLab
        config = config_from_args(a)
        path = _model(a.model)
        kw = dict(config=config)
        if a.sim:
            kw["sim"] = a.sim
        elif a.rpc or a.llama_devices:
            _, _, _, w = _devices(a)
            kw["worker"] = w
        elif a.virtual:
            kw["virtual"] = a.virtual
        lab = SplitLab(path, **kw)
        _SESSION.labs.append(lab)
        if a.policy:
            lab.apply_policy(a.policy)
        if a.monitor:
            from .ui.monitor import Monitor
            lab.attach_monitor(Monitor(worker=lab.worker))
        return lab

    def _cmd_bench(self, a):
        from .ui.html import HtmlTable, table_html
        from .ui.lab import comparison_rows, measure_with, run_rows
        if a.sim:
            raise UsageError("gpulab: simulated devices cannot load a model; use --virtual N, --rpc or GPUs")
        if not a.virtual and not a.rpc and not a.llama_devices:
            from .sources.detect import detect_devices
            if not detect_devices().devices:
                a.virtual = 2    # no GPU: two virtual devices, as the lab does
        path, prof, devices, host, note, worker, config, p = _planned(a)
        if worker is None:
            worker = _SESSION.worker(())
        from .ui.monitor import worker_lock
        with worker_lock(worker):
            run = measure_with(worker, path, config, p, n_prompt=a.n_prompt, n_gen=a.n_gen,
                               repetitions=a.repetitions)
        rows = run_rows([run])
        body = table_html(rows, caption=note or None) + table_html(comparison_rows(p, run),
                                                                     caption="predicted vs llama.cpp")
        if run.pp is None and run.tg is None:
            body += ("<div style='color:#666'>memory only: this install has no throughput measurement "
                     "(gpulab.runtime.bench) yet</div>")
        return HtmlTable(body, rows, text=str(rows[0]), run=run, plan=p)

    def _cmd_monitor(self, a):
        from .ui.monitor import Monitor
        return Monitor(interval=a.interval, history=a.history)

    def _cmd_export(self, a):
        from .ui.html import HtmlTable, pre_html
        from .ui.lab import export_texts
        path, prof, devices, host, note, _, config, p = _planned(a)
        texts = export_texts(p, path, devices)
        return HtmlTable("".join(pre_html(t, k) for k, t in texts.items()),
                         [{"target": k, "text": t} for k, t in texts.items()],
                         text="\n\n".join(f"# {k}\n{t}" for k, t in texts.items()), texts=texts, plan=p)


GpulabMagics.gpulab.__doc__ = (GpulabMagics.gpulab.__doc__ or "") + "\n\n" + full_help()


def load_ipython_extension(ipython) -> None:
    ipython.register_magics(GpulabMagics)


def unload_ipython_extension(ipython) -> None:
    _SESSION.close()
    mm = ipython.magics_manager
    mm.magics["line"].pop("gpulab", None)
    mm.registry.pop("GpulabMagics", None)
