"""IPython magics: `%load_ext gpulab`, then `%gpulab COMMAND ...`, a renderer over gpulab.commands.

    %gpulab devices [--sim SPEC | --rpc HOST:PORT,... | --llama-devices]
    %gpulab inspect MODEL
    %gpulab plan MODEL [-ngl N -ts A,B -c N ... --sim 2x24GiB --policy pack]
    %gpulab lab [MODEL] [flags] [--virtual N]
    %gpulab bench [MODEL] [flags] [-p 128 -n 32 -r 2] [--virtual N]
    %gpulab monitor [--interval S]
    %gpulab export [MODEL] [flags]
    %gpulab plan?                  # one command's flags (as %gpulab plan -h)

MODEL is a path, an http(s) URL, or `demo` (the bundled SmolLM2-135M). The parser tree is the
CLI's (gpulab.commands.build_parser), built with IPython's MagicArgumentParser, so errors are
UsageErrors and a flag added once shows in `gpulab X --help`, here and in the lab. Each result
shows as HTML (its figures first) and is the cell's value (`_`), with `.to_dataframe()`.

The kernel never registers an RPC endpoint: --rpc and --virtual devices are reached through a
gpulab worker process held by this kernel's Session (gpulab.runtime.session), closed on
`%unload_ext gpulab`.
"""

from __future__ import annotations

import argparse
import atexit
import re

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_magic, magics_class
from IPython.core.magic_arguments import MagicArgumentParser
from IPython.utils.process import arg_split

from .commands import build_parser as _build
from .commands import command_parsers
from .core.errors import GpulabError

__all__ = ["GpulabMagics", "load_ipython_extension", "unload_ipython_extension", "build_parser"]


class _Exit(Exception):
    pass


class _Parser(MagicArgumentParser):
    """IPython's magic parser (errors are UsageErrors), with -h, which prints instead of exiting."""

    def __init__(self, *, add_help: bool = True, formatter_class=argparse.HelpFormatter, **kwargs):
        # keywords only, as argparse builds parsers (add_subparsers' parser_class)
        super().__init__(add_help=add_help, formatter_class=formatter_class, **kwargs)

    def exit(self, status=0, message=None):
        if message:
            print(message)
        raise _Exit(status)


def build_parser() -> argparse.ArgumentParser:
    return _build("%gpulab", "magic", parser_class=_Parser)


def full_help() -> str:
    """The help of every subcommand, for `%gpulab?`."""
    top = build_parser()
    parts = [top.format_help()]
    for name, p in command_parsers(top).items():
        parts.append(f"\n--- %gpulab {name} ---\n" + p.format_help())
    return "\n".join(parts)


class _Kernel:
    """This kernel's Session (workers, virtual devices) and the widgets to close with it."""

    def __init__(self):
        self.session = None
        self.widgets: list = []

    def get(self):
        from .runtime.session import Session
        if self.session is None:
            self.session = Session()
        return self.session

    def close(self) -> None:
        for w in self.widgets:
            try:
                w.close()
            except Exception:  # noqa: BLE001 - best effort at unload
                pass
        self.widgets.clear()
        if self.session is not None:
            self.session.close()
            self.session = None


_KERNEL = _Kernel()
atexit.register(_KERNEL.close)


@magics_class
class GpulabMagics(Magics):
    """`%gpulab COMMAND [args]`; `%gpulab COMMAND -h` (or `%gpulab COMMAND?`) for one command's flags."""

    @line_magic
    def gpulab(self, line: str = ""):
        try:
            a = build_parser().parse_args(arg_split(line, posix=True))
        except _Exit:
            return None
        try:
            res = a.run(a, _KERNEL.get())
        except GpulabError as e:
            raise UsageError(f"gpulab: {e}") from None
        if res.widget is not None:
            _KERNEL.widgets.append(res.widget)
            return res.widget
        if res.figures:
            from .ui.figures import show
            for fig in res.figures:
                show(fig)
        return res


GpulabMagics.gpulab.__doc__ = (GpulabMagics.gpulab.__doc__ or "") + "\n\n" + full_help()

# `%gpulab plan?` would otherwise ask IPython to inspect a Python object named `plan`
_HELP_LINE = re.compile(r"^(\s*)%gpulab\s+([\w-]+)\s*\?\s*$")


def _command_help(lines: list[str]) -> list[str]:
    return [_HELP_LINE.sub(r"\1%gpulab \2 --help", ln.rstrip("\n")) + ("\n" if ln.endswith("\n") else "")
            for ln in lines]


def load_ipython_extension(ipython) -> None:
    ipython.register_magics(GpulabMagics)
    if _command_help not in ipython.input_transformers_cleanup:
        ipython.input_transformers_cleanup.append(_command_help)


def unload_ipython_extension(ipython) -> None:
    _KERNEL.close()
    mm = ipython.magics_manager
    mm.magics["line"].pop("gpulab", None)
    mm.registry.pop("GpulabMagics", None)
    if _command_help in ipython.input_transformers_cleanup:
        ipython.input_transformers_cleanup.remove(_command_help)
