"""One visual meaning per channel, for every gpulab figure (the lab, the magics, the notebooks):

- colour is the device: a device keeps its colour in every figure, the host is grey;
- within a device's colour, shade and pattern tell the memory terms apart (weights full and
  solid, KV lighter and striped, compute lighter still and dotted, ...);
- marker shape tells predicted from measured (bars or filled circles: gpulab's prediction;
  a cross: llama.cpp's report; an open circle: NVML);
- line style tells prompt processing (pp, solid) from generation (tg, dashed);
- legends sit below the plot, clear of plotly's toolbar (top right).

Colours here are plotly colour strings; nothing here draws.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["DEVICE_COLORS", "HOST_COLOR", "OVERFULL_COLOR", "INK", "device_colors", "color_sequence", "tint",
           "TERMS", "term_marker", "MEASURE_SYMBOLS", "THROUGHPUT_DASH", "legend_below", "BOTTOM_MARGIN"]

# Okabe-Ito first (distinguishable for colour-blind readers), then more of the same saturation
DEVICE_COLORS = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#7F3C8D", "#11A579",
                 "#3969AC", "#F2B701", "#E73F74", "#80BA5A")
HOST_COLOR = "#8c8c8c"
OVERFULL_COLOR = "#d62728"
INK = "#333333"          # what is not a device: reference lines, throughput, text

# memory term -> (share of the device colour kept, plotly bar pattern): weights, KV, compute,
# runtime overhead, and the recurrent state of SSM/hybrid models
TERMS = {"weights": (1.0, ""), "KV": (0.6, "/"), "compute": (0.35, "."), "overhead": (0.2, "x"),
         "state": (0.5, "\\"), "draft & projector": (0.8, "+")}

# what a point is -> its marker symbol (plotly names)
MEASURE_SYMBOLS = {"predicted": "circle", "llama.cpp": "x-thin-open", "NVML": "circle-open"}
THROUGHPUT_DASH = {"pp": "solid", "tg": "dash"}

BOTTOM_MARGIN = 90       # room under the x axis for its title and the legend (at the figure's bottom edge)


def device_colors(names: Sequence[str], host: str = "CPU") -> dict[str, str]:
    """A stable colour per device name, by position among the devices (the host is always grey):
    draw every figure of one set of devices with the same `names` order and a device keeps its colour."""
    out, k = {}, 0
    for n in names:
        if n == host:
            out[n] = HOST_COLOR
        else:
            out[n] = DEVICE_COLORS[k % len(DEVICE_COLORS)]
            k += 1
    return out


def color_sequence(n: int) -> list[str]:
    """n distinct colours for things that are not devices (the models of a fleet)."""
    return [DEVICE_COLORS[i % len(DEVICE_COLORS)] for i in range(n)]


def tint(color: str, keep: float) -> str:
    """'#0072B2' mixed with white, `keep` of the colour (1: itself, 0: white), as '#rrggbb'."""
    if keep >= 1:
        return color
    c = color.lstrip("#")
    rgb = [int(c[i:i + 2], 16) for i in (0, 2, 4)]
    return "#" + "".join(f"{round(255 - keep * (255 - v)):02x}" for v in rgb)


def term_marker(colors: str | Sequence[str], term: str) -> dict:
    """A bar trace's marker for memory term `term` in the given device colour(s): the shade and
    pattern of TERMS, the pattern drawn in the full device colour so that it reads on the shade."""
    keep, shape = TERMS[term]
    fill: str | list[str]
    line: str | list[str]
    if isinstance(colors, str):
        fill, line = tint(colors, keep), colors
    else:
        fill, line = [tint(c, keep) for c in colors], list(colors)
    marker: dict = {"color": fill}
    if shape:
        marker["pattern"] = {"shape": shape, "fgcolor": line, "solidity": 0.3, "fillmode": "overlay"}
    return marker


def legend_below(**extra) -> dict:
    """A horizontal legend under the plot area (and its x axis title), where plotly's toolbar never is."""
    return dict(orientation="h", x=0, xanchor="left", yref="container", y=0, yanchor="bottom", traceorder="normal",
                **extra)
