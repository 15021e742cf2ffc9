"""The `gpulab` command line: a renderer over gpulab.commands. Flag names are llama.cpp's.

Every command returns a Result; this prints its text (or its data as JSON with --json), its
notes on stderr, and exits with its status. Every GpulabError ends the command with one line on
stderr and exit status 2, no traceback. `gpulab plan` exits 1 when the plan does not fit.
"""

from __future__ import annotations

import argparse
import json
import sys

from .commands import COMMAND_MODULES
from .commands import build_parser as _build
from .core.errors import GpulabError

__all__ = ["main", "build_parser"]


_COMMANDS = frozenset(name.replace("_", "-") for name, frontends in COMMAND_MODULES if "cli" in frontends)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    return _build("gpulab", "cli", only=only)


def main(argv: list[str] | None = None) -> int:
    from .runtime.session import Session
    args = sys.argv[1:] if argv is None else argv
    # `gpulab plan ...` imports the plan command only; anything else (-h, a typo) gets every command
    a = build_parser(only=args[0] if args and args[0] in _COMMANDS else None).parse_args(args)
    try:
        with Session() as session:
            res = a.run(a, session)
        if getattr(a, "json", False):
            print(json.dumps(res.data, indent=2, default=str))
        elif res.text:
            print(res.text)
        sys.stdout.flush()
        for n in res.notes:
            print(f"gpulab: {n}", file=sys.stderr)
        if res.stderr:
            sys.stderr.write(res.stderr)
        return res.exit_code
    except GpulabError as e:
        print(f"gpulab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:   # `gpulab plan ... | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
