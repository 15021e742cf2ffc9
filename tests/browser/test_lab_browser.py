"""The tour in a real browser: JupyterLab started here, headless Debian Chromium driven by
Playwright; the notebook is run, a boundary of the layer strip dragged, and the memory bars must change.
Screenshots go to test-artifacts/ (lab_browser_before.png, lab_browser_after.png)."""

from __future__ import annotations

import pytest

from browser.kit import (
    ARTIFACTS,
    MEMORY_PLOT,
    REPO,
    bar_paths,
    drag_first_split_slider,
    run_all,
    start_lab,
    wait_changed,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lab_server(tmp_path_factory):
    """JupyterLab (as `make lab` starts it) rooted in a temp dir holding the tour."""
    yield from start_lab(tmp_path_factory, REPO / "notebooks" / "01-tour.ipynb", "tour.ipynb")


def test_tour_lab_slider_moves_the_memory_bars(browser_page, lab_server):
    page = browser_page
    try:
        run_all(page, lab_server, "tour.ipynb")

        # the lab widget renders with its figures; then the last cell (the export) finishes
        page.wait_for_selector(MEMORY_PLOT, timeout=240_000)
        page.wait_for_selector(".jp-OutputArea-output:has-text('llama-server -m')", timeout=240_000)
        page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").wait_for(timeout=240_000)
        lab = page.locator(".gpulab-splitlab").first
        lab.scroll_into_view_if_needed()
        before = bar_paths(page)
        assert before, "no memory bars rendered"
        lab.screenshot(path=str(ARTIFACTS / "lab_browser_before.png"))

        # the tour set -ts 1,3: drag the first boundary to the right
        drag_first_split_slider(page, lab, dx=80)
        after = wait_changed(page, before)
        lab.screenshot(path=str(ARTIFACTS / "lab_browser_after.png"))
        assert after != before, "the memory bars did not change after dragging the boundary"
    except Exception:
        page.screenshot(path=str(ARTIFACTS / "lab_browser_failure.png"))
        raise
