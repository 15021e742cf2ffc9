"""Helpers of the real-browser tests (imported as `browser.kit`: tests/ is on the path): a free
port, waiting for a local server, and the lab's memory bars as the page renders them."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
# the lab's memory-bar figure (its title says whether the plan fits) and its bars
MEMORY_PLOT = ".gpulab-splitlab .js-plotly-plot:has(.gtitle:text-matches('memory per device|DOES NOT FIT'))"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                r.read()
            return
        except urllib.error.HTTPError:
            return            # any HTTP answer: the server is up
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"{url} did not come up:\n" + log.read_text()[-3000:])
            time.sleep(0.5)




def bar_paths(page) -> list[str]:
    return page.eval_on_selector_all(f"{MEMORY_PLOT} .point path", "els => els.map(e => e.getAttribute('d'))")


def drag_first_split_slider(page, lab, dx: int = -80) -> None:
    """Drag the first device's tensor_split slider handle by dx pixels, as a person would."""
    handle = lab.locator(".widget-slider .noUi-handle").first
    handle.scroll_into_view_if_needed()
    box = handle.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    step = 10 if dx > 0 else -10
    for d in range(step, dx + step, step):
        page.mouse.move(x + d, y)
        page.wait_for_timeout(30)
    page.mouse.up()


def wait_changed(page, before: list[str], timeout: float = 30) -> list[str]:
    deadline = time.monotonic() + timeout
    after = bar_paths(page)
    while after == before and time.monotonic() < deadline:
        page.wait_for_timeout(250)
        after = bar_paths(page)
    return after
