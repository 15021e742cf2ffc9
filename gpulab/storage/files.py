"""Writing files so that a reader never sees half of one, and TOML both ways.

TOML is read by tomllib (tomli before Python 3.11) and written by tomli-w: gpulab writes no
format by hand.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

if sys.version_info >= (3, 11):
    import tomllib
else:                      # the same parser, from PyPI (pyproject.toml)
    import tomli as tomllib

__all__ = ["atomic_write_text", "write_json", "read_json", "to_toml", "read_toml", "read_toml_as", "TOMLDecodeError"]

TOMLDecodeError = tomllib.TOMLDecodeError
T = TypeVar("T")


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` through a temporary file in the same folder and os.replace: the
    file is either its old content or the new, never half of it (also across a crash)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # writers only: readers (every `gpulab plan`) skip tempfile, shutil, random
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def write_json(path: str | os.PathLike, data: Any, *, indent: int | None = 1) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=indent))


def read_json(path: str | os.PathLike, default: Any = None) -> Any:
    """The JSON in `path`, or `default` when the file is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return default


def to_toml(doc: dict) -> str:
    """TOML text for a dict of scalars, lists, tables and lists of tables (tomli-w)."""
    import tomli_w
    return tomli_w.dumps(doc)


def read_toml(path: str | os.PathLike) -> dict:
    """Raises OSError or TOMLDecodeError."""
    return tomllib.loads(Path(path).read_text())


def read_toml_as(path: str | os.PathLike, what: str, from_dict: Callable[[dict], T]) -> T:
    """A TOML file of gpulab's (a fleet, a cluster) as its type; ConfigError naming the file for
    anything wrong with it: unreadable, not TOML, or refused by `from_dict`."""
    from ..core.errors import ConfigError
    try:
        doc = read_toml(path)
    except OSError as e:
        raise ConfigError(f"cannot read the {what} {path}: {e.strerror or e}") from None
    except TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from None
    try:
        return from_dict(doc)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
