"""Helpers for the explorer page's browser tests: find Chromium, launch it through Playwright, open a
page and collect its JavaScript errors.

Playwright's own browser download is not used: the tests launch a system Chromium (the Debian
package `chromium`, or the executable named by JFIG_CHROMIUM). Without Chromium or without the
`playwright` package the tests are skipped with a reason saying what to install.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from jfig.explorer.page import render_page

VIEWPORT = {"width": 1400, "height": 900}
TIMEOUT_MS = 60_000
NO_CHROMIUM = "Chromium not found: install it with `apt-get install -y chromium` (or set JFIG_CHROMIUM)"
NO_PLAYWRIGHT = "playwright is not installed: `pip install playwright` (the tests use the system Chromium)"


def chromium_path() -> str | None:
    """The Chromium executable: $JFIG_CHROMIUM, else chromium / chromium-browser / google-chrome on PATH."""
    env = os.environ.get("JFIG_CHROMIUM")
    if env:
        return env if Path(env).exists() else shutil.which(env)
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def browser():
    """A headless Chromium for the test module (skips with the reason when it cannot be launched)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip(NO_PLAYWRIGHT)
    path = chromium_path()
    if path is None:
        pytest.skip(NO_CHROMIUM)
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=path, args=["--no-sandbox"], headless=True)
        try:
            yield b
        finally:
            b.close()


@dataclass
class Opened:
    """A page showing the explorer, with the JavaScript errors it has reported so far."""
    page: object
    path: Path | None
    errors: list = field(default_factory=list)
    allowed: list = field(default_factory=list)

    def unexpected_errors(self) -> list:
        return [e for e in self.errors if not any(a in e for a in self.allowed)]

    def assert_no_errors(self):
        assert not self.unexpected_errors(), f"the page reported errors: {self.unexpected_errors()}"


def write_page(payload: dict, directory: Path, name: str = "explorer.html") -> Path:
    path = Path(directory) / name
    path.write_text(render_page(payload), encoding="utf-8")
    return path


@pytest.fixture
def page_for(browser, tmp_path):
    """open(payload=None, *, url=None, suffix="", allow=()) -> Opened: writes the payload's page to
    tmp_path (or opens `url`), waits until the page says it is ready, and checks at the end of the
    test that the page reported no JavaScript errors (page errors or console errors, except
    messages containing one of `allow`)."""
    opened: list[tuple[object, Opened]] = []

    def open_(payload: dict | None = None, *, url: str | None = None, suffix: str = "", allow=(), name="explorer.html"):
        context = browser.new_context(viewport=VIEWPORT, accept_downloads=True)
        context.set_default_timeout(TIMEOUT_MS)
        page = context.new_page()
        path = None
        if url is None:
            path = write_page(payload, tmp_path, name)
            url = path.as_uri() + suffix
        o = Opened(page=page, path=path, allowed=list(allow))
        page.on("pageerror", lambda exc: o.errors.append(f"pageerror: {exc}"))
        page.on("console", lambda msg: o.errors.append(f"console.{msg.type}: {msg.text}") if msg.type == "error" else None)
        page.goto(url, wait_until="load", timeout=TIMEOUT_MS)
        page.wait_for_function("window.jfigExplorer && window.jfigExplorer.ready === true", timeout=TIMEOUT_MS)
        opened.append((context, o))
        return o

    yield open_
    failures = []
    for context, o in opened:
        failures += o.unexpected_errors()
        context.close()
    if failures:
        pytest.fail(f"the page reported JavaScript errors: {failures}")


def canvas_pixel(page, x: float, y: float) -> list[int]:
    """RGBA of the canvas pixel under viewport point (x, y) (CSS pixels)."""
    return page.evaluate(
        """([x, y]) => {
            const c = document.getElementById('graph');
            const r = c.getBoundingClientRect();
            const k = c.width / r.width;
            const d = c.getContext('2d').getImageData(Math.floor((x - r.left) * k), Math.floor((y - r.top) * k), 1, 1).data;
            return [d[0], d[1], d[2], d[3]];
        }""", [x, y])


def background_pixel(page) -> list[int]:
    """RGBA of a canvas pixel where nothing is drawn (the bottom-left corner, inside the margin)."""
    return page.evaluate(
        """() => {
            const c = document.getElementById('graph');
            const d = c.getContext('2d').getImageData(2, c.height - 3, 1, 1).data;
            return [d[0], d[1], d[2], d[3]];
        }""")
