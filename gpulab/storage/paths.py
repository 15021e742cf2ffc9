"""gpulab's two folders: data (results, calibration, learned overheads) and config (allocations).

The only place gpulab reads these environment variables:
  GPULAB_DATA_DIR, else $XDG_DATA_HOME/gpulab, else ~/.local/share/gpulab
  GPULAB_CONFIG_DIR, else $XDG_CONFIG_HOME/gpulab, else ~/.config/gpulab
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["data_dir", "config_dir"]


def _dir(own: str, xdg: str, default: Path) -> Path:
    env = os.environ.get(own)
    if env:
        return Path(env)
    base = os.environ.get(xdg)
    return (Path(base) if base else default) / "gpulab"


def data_dir() -> Path:
    """$GPULAB_DATA_DIR, else $XDG_DATA_HOME/gpulab, else ~/.local/share/gpulab."""
    return _dir("GPULAB_DATA_DIR", "XDG_DATA_HOME", Path.home() / ".local" / "share")


def config_dir() -> Path:
    """$GPULAB_CONFIG_DIR, else $XDG_CONFIG_HOME/gpulab, else ~/.config/gpulab."""
    return _dir("GPULAB_CONFIG_DIR", "XDG_CONFIG_HOME", Path.home() / ".config")
