"""The `gpulab` command line: a renderer over gpulab.commands. Flag names are llama.cpp's.

Every command returns a Result; this prints its text (or its data as JSON with --json), its
notes on stderr, and exits with its status. Every GpulabError ends the command with one line on
stderr and exit status 2, no traceback. `gpulab plan` exits 1 when the plan does not fit.
"""

from __future__ import annotations

import argparse
import json
import sys

from .commands import build_parser as _build
from .core.errors import GpulabError

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    return _build("gpulab", "cli")


def main(argv: list[str] | None = None) -> int:
    from .runtime.session import Session
    a = build_parser().parse_args(argv)
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
