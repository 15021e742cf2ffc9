"""Byte quantities: parsed from and formatted for people. Everything inside gpulab is int bytes."""

from __future__ import annotations

import re

__all__ = ["parse_bytes", "format_bytes", "MiB", "GiB"]

KiB = 1024
MiB = 1024**2
GiB = 1024**3
TiB = 1024**4

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": KiB,
    "m": 1000**2, "mb": 1000**2, "mib": MiB,
    "g": 1000**3, "gb": 1000**3, "gib": GiB,
    "t": 1000**4, "tb": 1000**4, "tib": TiB,
}
_QUANTITY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(text: str) -> int:
    """'24GiB' -> 25769803776, '1.5 GB' -> 1500000000. Raises ValueError with the bad text."""
    m = _QUANTITY.match(text)
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise ValueError(f"not a byte quantity: {text!r} (try e.g. '24GiB', '512MiB', '80GB')")
    return int(round(float(m.group(1)) * _UNITS[unit]))


def format_bytes(n: int | float) -> str:
    """Binary units with two decimals, the way llama.cpp's logs read: '4.21 GiB'."""
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit, size in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= size:
            return f"{sign}{n / size:.2f} {unit}"
    return f"{sign}{int(n)} B"
