"""The commands every front end runs: one module each, `register(subparsers, frontend)` adding its
parser (and setting `run`), and `run(args, session) -> Result`.

gpulab.cli renders a Result as text or JSON, gpulab.magics as HTML and DataFrames; both build
their parser tree with `build_parser`, from the same modules and flag groups (gpulab.commands.flags).
"""

from __future__ import annotations

import argparse
import importlib

__all__ = ["COMMAND_MODULES", "build_parser", "command_parsers"]

# (module, the front ends that offer it)
COMMAND_MODULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("devices", ("cli", "magic")),
    ("inspect", ("cli", "magic")),
    ("plan", ("cli", "magic")),
    ("export", ("cli", "magic")),
    ("fleet", ("cli", "magic")),
    ("bench", ("cli", "magic")),
    ("sweep", ("cli", "magic")),
    ("tune", ("cli", "magic")),
    ("alloc", ("cli", "magic")),
    ("calibrate", ("cli", "magic")),
    ("rpc_server", ("cli",)),
    ("rpc_probe", ("cli",)),
    ("lab", ("magic",)),
    ("monitor", ("magic",)),
)


def build_parser(prog: str, frontend: str, parser_class=argparse.ArgumentParser,
                 only: str | None = None) -> argparse.ArgumentParser:
    """The parser tree of a front end; with `only`, of that one command (a front end that knows
    which command it runs imports that command's module, not all of them)."""
    top = parser_class(prog=prog, description="See where llama.cpp puts each layer of a GGUF model.")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=parser_class)
    for name, frontends in COMMAND_MODULES:
        if frontend in frontends and only in (None, name.replace("_", "-")):
            importlib.import_module(f"{__name__}.{name}").register(sub, frontend)
    return top


def command_parsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """{command name: its parser} of a tree made by build_parser."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)
