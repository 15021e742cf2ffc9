"""float32 arithmetic for the few places where llama.cpp computes in `float` (split points).

Python computes in double; rounding a double result of one +, -, * or / of float32 values to
float32 gives exactly the float32 result (double has more than 2 x 24 + 2 bits, so the double
rounding is innocuous). This replaces numpy here: importing numpy costs `gpulab plan` ~100 ms.
"""

from __future__ import annotations

import math
import struct

__all__ = ["cumsum_f32", "f32"]

_F32 = struct.Struct("<f")


def f32(x: float) -> float:
    """x rounded to the nearest float32, as a C cast to float (inf past its range)."""
    try:
        return _F32.unpack(_F32.pack(x))[0]
    except OverflowError:   # struct refuses what rounds to inf; a C cast gives inf
        return math.copysign(math.inf, x)


def cumsum_f32(values) -> list[float]:
    """Running sums in float32, each step rounded (`float sum += x[i]`, as np.cumsum(dtype=float32))."""
    out, s = [], 0.0
    for x in values:
        s = f32(s + f32(x))
        out.append(s)
    return out
