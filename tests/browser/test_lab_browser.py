"""The tour in a real browser: JupyterLab started here, headless Debian Chromium driven by
Playwright; the notebook is run, a split slider dragged, and the memory bars must change.
Screenshots go to test-artifacts/ (lab_browser_before.png, lab_browser_after.png)."""

from __future__ import annotations

import json
import os
import shutil
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
def lab_server(tmp_path_factory):
    """JupyterLab on a free loopback port, no token, rooted in a temp dir holding the tour."""
    root = tmp_path_factory.mktemp("lab-root")
    shutil.copy(REPO / "notebooks" / "01-tour.ipynb", root / "tour.ipynb")
    home = tmp_path_factory.mktemp("lab-home")
    # no "get notified about Jupyter news?" toast over the page (and no request for the news)
    note = home / "settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    note.parent.mkdir(parents=True)
    note.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    port = free_port()
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(home / "config"), JUPYTER_RUNTIME_DIR=str(home / "runtime"),
               IPYTHONDIR=str(home / "ipython"), GPULAB_PYTHON=sys.executable, GPULAB_LAB_PORT=str(port),
               GPULAB_LAB_TOKEN="", GPULAB_LAB_BROWSER="no")
    # started as `make lab` starts it (scripts/lab.sh: --allow-root as root, loopback, no browser
    # without a display), so that a lab `make lab` cannot serve cannot pass this test
    cmd = [str(REPO / "scripts" / "lab.sh"), "tour.ipynb", "--ServerApp.password=",
           "--ServerApp.disable_check_xsrf=True", f"--ServerApp.root_dir={root}",
           f"--LabApp.workspaces_dir={home / 'workspaces'}", f"--LabApp.user_settings_dir={home / 'settings'}",
           "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
           "--LabApp.extension_manager=readonly"]
    log = home / "jupyter.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root)
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/api/status", proc, log)
        said = log.read_text()
        assert f"open http://127.0.0.1:{port}/lab/tree/tour.ipynb" in said, said
        if os.geteuid() == 0:
            assert "running as root: passing --allow-root" in said, said
        yield url
        stop(proc)


def test_tour_lab_slider_moves_the_memory_bars(browser_page, lab_server):
    page = browser_page
    try:
        page.goto(f"{lab_server}/lab/tree/tour.ipynb")
        # a fresh JupyterLab asks which kernel to start: accept the default (Python 3)
        try:
            page.locator(".jp-Dialog .jp-mod-accept").click(timeout=60_000)
        except Exception:  # noqa: BLE001 - the dialog does not always appear
            pass
        page.wait_for_selector(".jp-Notebook", timeout=60_000)
        page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").wait_for(timeout=120_000)
        page.locator("li.lm-MenuBar-item", has_text="Run").first.click()
        page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()

        # the lab widget renders with its figures; then the last cell (the export) finishes
        page.wait_for_selector(MEMORY_PLOT, timeout=240_000)
        page.wait_for_selector(".jp-OutputArea-output:has-text('llama-server -m')", timeout=240_000)
        page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").wait_for(timeout=240_000)
        lab = page.locator(".gpulab-splitlab").first
        lab.scroll_into_view_if_needed()
        before = bar_paths(page)
        assert before, "no memory bars rendered"
        lab.screenshot(path=str(ARTIFACTS / "lab_browser_before.png"))

        # the tour left the first slider at its maximum: drag it to the left
        drag_first_split_slider(page, lab, dx=-80)
        after = wait_changed(page, before)
        lab.screenshot(path=str(ARTIFACTS / "lab_browser_after.png"))
        assert after != before, "the memory bars did not change after moving the slider"
    except Exception:
        page.screenshot(path=str(ARTIFACTS / "lab_browser_failure.png"))
        raise
