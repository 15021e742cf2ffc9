"""gpulab.core.float32 against numpy's float32: the planner's split points must stay bit-identical."""

from __future__ import annotations

import math
import random

import numpy as np

from gpulab.core.float32 import cumsum_f32, f32


def test_rounding_written_out():
    assert f32(0.1) == 0.10000000149011612
    assert f32(2**24 + 1) == 2**24            # ties to even
    assert f32(1e39) == math.inf and f32(-1e39) == -math.inf
    assert cumsum_f32([0.1, 0.2, 0.3]) == [0.10000000149011612, 0.30000001192092896, 0.6000000238418579]


def test_agrees_with_numpy_on_split_arithmetic():
    rng = random.Random(7)
    for _ in range(3000):
        n = rng.randint(1, 8)
        vals = ([rng.randint(0, 2**45) for _ in range(n)] if rng.random() < 0.5
                else [round(rng.uniform(0, 100), rng.randint(0, 3)) for _ in range(n)])
        theirs = np.cumsum(np.array(vals, dtype=np.float32), dtype=np.float32)
        ours = cumsum_f32(vals)
        assert ours == [float(x) for x in theirs]
        if ours[-1]:
            assert [f32(x / ours[-1]) for x in ours] == [float(x) for x in (theirs / theirs[-1]).astype(np.float32)]
            ne = rng.randint(1, 2**20)
            assert [int(f32(f32(f32(ne) * s) / ours[-1])) for s in ours] == \
                [int(np.float32(ne) * s / theirs[-1]) for s in theirs]
    for act in range(1, 600):
        theirs = np.arange(act, dtype=np.float32) / np.float32(act)
        assert [f32(k / act) for k in range(act)] == [float(x) for x in theirs]
