"""Fixtures of the real-browser tests: headless Debian Chromium through Playwright.

No `playwright install`: the system browser is launched through executable_path. Tests skip,
with the reason, when /usr/bin/chromium or the playwright package is missing.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from browser.kit import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS


@pytest.fixture(scope="module")
def playwright_api():
    # module, not session: sync Playwright keeps its asyncio loop registered as the running loop
    # of the main thread while it is open, which would leak into every later test
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: apt-get install chromium (scripts/setup.sh does this as root)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright Python package is missing: .venv/bin/pip install playwright")
    with sync_playwright() as p:
        yield p


@pytest.fixture
def browser_page(playwright_api):
    ARTIFACTS.mkdir(exist_ok=True)
    browser = playwright_api.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
    page = browser.new_page(viewport={"width": 1500, "height": 2000})
    yield page
    browser.close()

