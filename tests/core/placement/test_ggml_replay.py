"""ggml_replay.template: a graph built once and scheduled for each placement (gpulab/core/placement/ggml_replay.py).

The bytes below are worked out by hand from ggml-alloc's rules (32-byte alignment; best fit among the free
blocks but the last, else the end; freed after the last reader), for a three-tensor graph: a 100-byte host
input `x`, `a` = op(x) of 1000 bytes on layer 0's device, `b` = op(a) of 3000 bytes on layer 1's device.
"""

from __future__ import annotations

from gpulab import SplitConfig
from gpulab.core.placement.ggml_replay import Graph, template

# one device: x copied to GPU0 (128 at 0), a at 128 (1024), the copy freed, b at the end: 1152 + 3008
ONE_DEVICE = {"CPU": 128, "GPU0": 4160}
# two: GPU0 holds x's copy and a (128 + 1024); GPU1 a's copy (1024) and b (3008)
TWO_DEVICES = {"CPU": 128, "GPU0": 1152, "GPU1": 4032}


class _Profile:
    """What a template is remembered by (any object a weak reference can name)."""


def _builder(calls: list, compare: bool = False):
    def build(devs, ffn, cfg, extra):
        calls.append(list(devs))
        g = Graph()
        x = g.inp(100)
        a = g.op(1000 + cfg.n_ctx * 0, x, w=devs[0])          # reads a setting: the template remembers it
        if compare and devs[0] == devs[1]:
            a = g.op(1000, a, w=devs[0])                         # a graph that depends on the placement
        g.expand(g.op(3000 + extra, a, w=devs[1]))
        return g, {}, []
    return build


def test_a_graph_built_once_serves_every_placement():
    calls: list = []
    build, owner, cfg = _builder(calls), _Profile(), SplitConfig(n_ctx=4096)
    one = template(build, owner, ("t",), cfg, ["GPU0", "GPU0"], None, 0)
    assert one.place(["GPU0", "GPU0"], None).peaks(1) == ONE_DEVICE
    two = template(build, owner, ("t",), cfg.replace(tensor_split=(1, 1)), ["GPU0", "GPU1"], None, 0)
    assert two is one and len(calls) == 1          # tensor_split is not read by the builder: the same graph
    assert two.place(["GPU0", "GPU1"], None).peaks(1) == TWO_DEVICES
    assert calls[0][0] != "GPU0"                   # built with stand-in labels, not the first placement's


def test_a_setting_the_builder_reads_or_another_variant_builds_again():
    calls: list = []
    build, owner = _builder(calls), _Profile()
    first = template(build, owner, ("t",), SplitConfig(n_ctx=4096), ["GPU0", "GPU1"], None, 0)
    assert template(build, owner, ("t",), SplitConfig(n_ctx=8192), ["GPU0", "GPU1"], None, 0) is not first
    other = template(build, owner, ("t",), SplitConfig(n_ctx=4096), ["GPU0", "GPU1"], None, 32)
    assert other is not first and len(calls) == 3
    # b 32 bytes larger: 3040 at 1024 on GPU1
    assert other.place(["GPU0", "GPU1"], None).peaks(1) == {"CPU": 128, "GPU0": 1152, "GPU1": 4064}


def test_a_builder_that_compares_devices_is_built_per_placement():
    calls: list = []
    build, owner, cfg = _builder(calls, compare=True), _Profile(), SplitConfig(n_ctx=4096)
    two = template(build, owner, ("c",), cfg, ["GPU0", "GPU1"], None, 0)
    assert calls[-1] == ["GPU0", "GPU1"]           # the stand-in build was seen comparing, then built for real
    assert two.place(["GPU0", "GPU1"], None).peaks(1) == TWO_DEVICES
    one = template(build, owner, ("c",), cfg, ["GPU0", "GPU0"], None, 0)
    assert calls[-1] == ["GPU0", "GPU0"]
    # the extra 1024-byte op on GPU0: x's copy freed, a at 128, a2 at 1152 (a freed: a block of 1024 at 128),
    # b at the end: 2176 + 3008
    assert one.place(["GPU0", "GPU0"], None).peaks(1) == {"CPU": 128, "GPU0": 5184}
