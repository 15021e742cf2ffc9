"""The tour as a Voilà dashboard: Voilà executes it, headless Chromium shows it, and the lab in
it still answers a slider. Screenshot: test-artifacts/voila_tour.png."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from browser.kit import (
    ARTIFACTS,
    MEMORY_PLOT,
    REPO,
    bar_paths,
    drag_first_split_slider,
    free_port,
    wait_changed,
    wait_http,
)
from processes import stop

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def voila_server(tmp_path_factory):
    pytest.importorskip("voila", reason="voila is not installed (pip install -e '.[jupyter]')")
    home = tmp_path_factory.mktemp("voila-home")
    port = free_port()
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(home / "config"), JUPYTER_RUNTIME_DIR=str(home / "runtime"),
               IPYTHONDIR=str(home / "ipython"))
    cmd = [sys.executable, "-m", "voila", str(REPO / "notebooks" / "01-tour.ipynb"), "--no-browser",
           f"--port={port}", "--Voila.ip=127.0.0.1", "--show_tracebacks=True"]
    log = home / "voila.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=home)
        url = f"http://127.0.0.1:{port}/"
        wait_http(url + "voila/static/", proc, log)    # any answer will do: not "/", which runs the tour
        yield url
        stop(proc)


def test_tour_renders_as_a_voila_dashboard(browser_page, voila_server):
    page = browser_page
    try:
        page.goto(voila_server, timeout=240_000)
        page.wait_for_selector(MEMORY_PLOT, timeout=240_000)
        page.wait_for_selector("text=llama-server -m", timeout=240_000)    # the last cell ran
        assert page.locator(".jp-OutputArea-output.jp-RenderedText[data-mime-type='application/vnd.jupyter.stderr']"
                            ":has-text('Traceback')").count() == 0
        lab = page.locator(".gpulab-splitlab").first
        lab.scroll_into_view_if_needed()
        before = bar_paths(page)
        drag_first_split_slider(page, lab, dx=-80)
        after = wait_changed(page, before)
        if after == before:
            # Seen once, under load 4-5 (four other test runs): the shares label followed the first drag
            # but the plot did not, as if the figure's view was not yet listening. A person's second drag
            # redraws; one retry, recorded, so a lab that never redraws still fails here.
            (ARTIFACTS / "voila_retry.txt").write_text("the first drag did not redraw; dragged again\n")
            drag_first_split_slider(page, lab, dx=40)
            after = wait_changed(page, before)
        page.screenshot(path=str(ARTIFACTS / "voila_tour.png"), full_page=True)
        assert after != before, "the dashboard's lab did not redraw"
    except Exception:
        page.screenshot(path=str(ARTIFACTS / "voila_failure.png"))
        raise
