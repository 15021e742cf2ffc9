"""The lab's layer strip: an anywidget (strip.js, strip.css: package data, no build step).

Python sets what the strip shows (`cells`: the device of each layer, the output layer last, as the
planner places them; `segments`: the devices llama.cpp splits across, in its order; `ngl`; the live
fit line in `fit_cells`/`fit_label`). The browser only asks, through `request`: {"counts": [...]}
after a boundary moved (layers per segment), {"ngl": n} after the -ngl handle moved. The lab turns a
request into settings (gpulab.core.placement.planner.split_for_counts) and answers with the new plan.
"""

from __future__ import annotations

from pathlib import Path

import anywidget
import traitlets as T

__all__ = ["LayerStrip"]

_HERE = Path(__file__).parent


class LayerStrip(anywidget.AnyWidget):
    _esm = _HERE / "strip.js"
    _css = _HERE / "strip.css"

    cells = T.List(T.Unicode()).tag(sync=True)
    segments = T.List(T.Dict()).tag(sync=True)          # [{"name": ...}] in llama.cpp's device order
    colors = T.Dict().tag(sync=True)                    # device name -> CSS colour (the host grey)
    ngl = T.Int(0).tag(sync=True)
    draggable = T.Bool(True).tag(sync=True)             # -sm layer: boundaries can move
    fit_cells = T.List(T.Unicode()).tag(sync=True)
    fit_label = T.Unicode("").tag(sync=True)
    request = T.Dict().tag(sync=True)                   # from the browser: {"counts"|"ngl", "seq"}
    applied = T.Int(-1).tag(sync=True)                  # the seq of the last request drawn
