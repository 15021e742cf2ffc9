"""The lab's layer strip in real Chromium at 1280x800, in JupyterLab started as `make lab` starts it.

A person drags the SIM0|SIM1 boundary with the mouse and moves -ngl with the keyboard; the test then
reads -ts, the strip, the share labels and the memory bars from the page and compares them with
placements worked out by hand (not by the planner). It also checks that every control's label is
fully visible, that no legend sits under a plotly toolbar and that the strip is at least 600 px wide.
Screenshots: test-artifacts/lab_strip_*.png (docs/lab.png: test_lab_docs_screenshot.py).

The model (gpulab.testing.make_profile, n_layer=24): 24 blocks of 60 MiB with 16 MiB of KV each at
-c 4096, and a 400 MiB output layer, on 4 simulated 24 GiB devices. llama.cpp's rule: layer k of the
offloaded ones goes to the first device whose split point is above k / (layers offloaded).
"""

from __future__ import annotations

import nbformat
import pytest

from browser.kit import (
    ARTIFACTS,
    LABELS_CUT,
    MEMORY_PLOT,
    drag_boundary,
    plot_trace,
    run_to_strip,
    show_memory_plot,
    start_lab,
    strip_cells,
)

pytestmark = pytest.mark.slow
NAME = "strip.ipynb"


@pytest.fixture(scope="module")
def lab_server(tmp_path_factory):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(
        "from gpulab.testing import make_profile   # the tests' hand-built profile\n"
        "from gpulab.ui.lab import SplitLab\n"
        "lab = SplitLab(make_profile(n_layer=24), sim='4x24GiB')\n"
        "lab")]
    path = tmp_path_factory.mktemp("nb") / NAME
    nbformat.write(nb, path)
    yield from start_lab(tmp_path_factory, path, NAME)


def wait_cells(page, lab, want: list[str], timeout_ms: int = 60_000) -> list[str]:
    got = strip_cells(lab)
    waited = 0
    while got != want and waited < timeout_ms:
        page.wait_for_timeout(250)
        waited += 250
        got = strip_cells(lab)
    return got


LEGEND_UNDER_TOOLBAR = """root => {
  const hit = (a, b) => a.left < b.right && b.left < a.right && a.top < b.bottom && b.top < a.bottom;
  const out = [];
  for (const plot of root.querySelectorAll('.js-plotly-plot')) {
    const bar = plot.querySelector('.modebar');
    if (!bar) continue;
    const m = bar.getBoundingClientRect();
    for (const leg of plot.querySelectorAll('.legend')) {
      const l = leg.getBoundingClientRect();
      if (l.width && m.width && hit(l, m)) out.push(plot.querySelector('.gtitle')?.textContent || 'a plot');
    }
  }
  return out;
}"""


def test_drag_and_keys_move_layers_as_llama_cpp_places_them(playwright_api, lab_server):
    from browser.kit import CHROMIUM, CHROMIUM_ARGS
    ARTIFACTS.mkdir(exist_ok=True)
    browser = playwright_api.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    try:
        lab = run_to_strip(page, lab_server, NAME)
        # no -ts: by free memory, points 1/4, 2/4, 3/4 -> layers 0-6, 7-12, 13-18, 19-24 (the output)
        assert wait_cells(page, lab, ["SIM0"] * 7 + ["SIM1"] * 6 + ["SIM2"] * 6 + ["SIM3"] * 6) == \
            ["SIM0"] * 7 + ["SIM1"] * 6 + ["SIM2"] * 6 + ["SIM3"] * 6
        strip = lab.locator(".gls-main").first
        strip.scroll_into_view_if_needed()
        assert strip.bounding_box()["width"] >= 600
        page.screenshot(path=str(ARTIFACTS / "lab_strip_before.png"))

        # the mouse: SIM0|SIM1 from 7 to 10 layers; SIM1 keeps the rest up to its other boundary (3)
        drag_boundary(page, lab, 0, 10)
        want = ["SIM0"] * 10 + ["SIM1"] * 3 + ["SIM2"] * 6 + ["SIM3"] * 6
        assert wait_cells(page, lab, want) == want
        ts = lab.locator(".widget-text:has-text('-ts') input").first
        assert ts.input_value() == "10,3,6,6"

        # the keyboard: the -ngl handle, five layers to the right = -ngl 20. With -ts 10,3,6,6 the
        # points are 0.4, 0.52, 0.76, 1 of 20 layers: 8 (k < 8), 3 (k < 10.4), 5 (k < 15.2), 4
        lab.locator(".gls-ngl").first.focus()
        for _ in range(5):
            page.keyboard.press("ArrowRight")
            page.wait_for_timeout(150)
        want = ["CPU"] * 5 + ["SIM0"] * 8 + ["SIM1"] * 3 + ["SIM2"] * 5 + ["SIM3"] * 4
        assert wait_cells(page, lab, want) == want
        assert ts.input_value() == "10,3,6,6"           # -ngl keeps the proportions
        text = lab.inner_text()
        for line in ("→ 8 layers", "→ 3 layers", "→ 5 layers", "→ 3 layers + output"):
            assert line in text, line

        # the memory bars as the page draws them: 60 MiB a block, 400.02 MiB the output, 16 MiB KV a block
        page.wait_for_timeout(1000)
        show_memory_plot(page, lab)
        # the scale rule: the fullest device (SIM3: 580.02 + 48 + 306.55 of compute = 934.57 MiB) is
        # under 1 GiB and a small part of its 24 GiB free, so the axis is in MiB, fitted to the model
        assert page.locator(f"{MEMORY_PLOT} .ytitle").first.text_content() == "MiB"
        weights = plot_trace(page, MEMORY_PLOT, "weights")
        kv = plot_trace(page, MEMORY_PLOT, "KV")
        assert [round(y, 2) for y in weights["y"][:4]] == [480.0, 180.0, 300.0, 580.02]
        assert [round(y, 2) for y in kv["y"][:4]] == [128.0, 48.0, 80.0, 48.0]
        page.screenshot(path=str(ARTIFACTS / "lab_strip_memory.png"))
        lab.locator(".gls-main").first.scroll_into_view_if_needed()
        page.screenshot(path=str(ARTIFACTS / "lab_strip_after.png"))
        # every group open: no label cut, no legend under a toolbar
        for group in lab.locator(".gpulab-group").all():
            if group.bounding_box()["height"] < 60:          # closed: only its title shows
                group.locator(".jupyter-widget-Collapse-header").first.click()
        page.wait_for_timeout(500)
        lab.locator(".gpulab-group").nth(2).scroll_into_view_if_needed()
        page.screenshot(path=str(ARTIFACTS / "lab_strip_groups.png"))
        assert lab.evaluate(LABELS_CUT) == []
        assert lab.evaluate(LEGEND_UNDER_TOOLBAR) == []
    except Exception:
        page.screenshot(path=str(ARTIFACTS / "lab_strip_failure.png"))
        raise
    finally:
        browser.close()
