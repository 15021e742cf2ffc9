"""The README's picture (docs/lab.png): the lab at 1280 px on the real demo model, SmolLM2-135M-Instruct
Q4_1 (30 blocks + output), on 3 simulated 8 GiB devices with -ts 1,2,1 and -ngl 26, in JupyterLab
started as `make lab` starts it.

What the picture must show is checked on the page: the strip places the layers as llama.cpp does
(worked out by hand below), one colour per device and grey for the host, the memory bars under the
scale rule (a 135M model on 8 GiB devices: the axis in MiB fitted to the model, the free memory
written above) and no label cut. The screenshot goes to test-artifacts/lab_docs.png, and with
GPULAB_DOCS_SCREENSHOT=1 to docs/lab.png.
"""

from __future__ import annotations

import os

import nbformat
import pytest

from browser.kit import ARTIFACTS, LABELS_CUT, MEMORY_PLOT, REPO, run_to_strip, start_lab, strip_cells

pytestmark = pytest.mark.slow
NAME = "lab.ipynb"


@pytest.fixture(scope="module")
def lab_server(tmp_path_factory):
    from gpulab.sources.demo import demo_model_path
    try:
        demo_model_path()
    except Exception as e:  # noqa: BLE001 - the demo model's package is an optional extra
        pytest.skip(f"the demo model is missing: {e}")
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(
        "from gpulab.core.config import SplitConfig\n"
        "from gpulab.sources.demo import demo_model_path\n"
        "from gpulab.ui.lab import SplitLab\n"
        "lab = SplitLab(demo_model_path(), sim='3x8GiB',\n"
        "               config=SplitConfig(n_gpu_layers=26, tensor_split=(1.0, 2.0, 1.0)))\n"
        "lab")]
    path = tmp_path_factory.mktemp("nb") / NAME
    nbformat.write(nb, path)
    yield from start_lab(tmp_path_factory, path, NAME)


def test_the_readme_picture_shows_the_demo_model_on_three_devices(playwright_api, lab_server):
    from browser.kit import CHROMIUM, CHROMIUM_ARGS
    ARTIFACTS.mkdir(exist_ok=True)
    browser = playwright_api.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
    page = browser.new_page(viewport={"width": 1280, "height": 1500})
    try:
        lab = run_to_strip(page, lab_server, NAME)
        # -ngl 26 of 31 layers: the first 5 stay on the host; -ts 1,2,1 puts the split points at
        # 0.25, 0.75, 1 of 26: layer k < 6.5 -> SIM0 (7), k < 19.5 -> SIM1 (13), the rest SIM2 (5 + output)
        want = ["CPU"] * 5 + ["SIM0"] * 7 + ["SIM1"] * 13 + ["SIM2"] * 6
        assert strip_cells(lab) == want
        colors = lab.locator(".gls-main .gls-cell").evaluate_all("els => els.map(e => e.style.background)")
        by_device = {}
        for name, color in zip(want, colors):
            by_device.setdefault(name, set()).add(color)
        assert all(len(c) == 1 for c in by_device.values())                   # one colour per device
        assert len({c.pop() for c in by_device.values()}) == 4                # and no two alike
        text = lab.inner_text()
        assert "SmolLM2-135M-Instruct Q4_1" in text
        # the scale rule: the fullest device holds under 200 MiB of 8 GiB free
        assert page.locator(f"{MEMORY_PLOT} .ytitle").first.text_content() == "MiB"
        assert "the axis fitted to the model" in page.locator(f"{MEMORY_PLOT} .gtitle").first.text_content()
        assert page.locator(f"{MEMORY_PLOT} text", has_text="free 8.00 GiB").count() == 3
        assert lab.evaluate(LABELS_CUT) == []
        # the picture: the file browser closed and the context group folded, so that the strip, the
        # fit strip, the layer map and the memory bars show in one 1280 px wide page
        page.locator(".jp-SideBar .lm-TabBar-tab[data-id='filebrowser']").first.click()
        lab.locator(".jupyter-widget-Collapse-header", has_text="context & cache").first.click()
        page.set_viewport_size({"width": 1280, "height": 1720})
        page.evaluate("() => window.dispatchEvent(new Event('resize'))")
        page.wait_for_timeout(1500)
        lab.locator(".widget-html").first.scroll_into_view_if_needed()
        page.wait_for_timeout(1500)
        shot = REPO / "docs" / "lab.png" if os.environ.get("GPULAB_DOCS_SCREENSHOT") else ARTIFACTS / "lab_docs.png"
        page.screenshot(path=str(shot))
    finally:
        browser.close()
