"""Headless Chromium for tests, through Selenium and Debian's chromium + chromium-driver.

A missing browser, driver or selenium fails the test with what to install: a browser test
that does not run proves nothing. Chromium starts with a fresh profile, without the
background networking this machine's closed network refuses, and accepts the test CA's
self-signed hub certificate (the tests check their own TLS elsewhere).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = ("chromium", "/usr/bin/chromium")
CHROMEDRIVER = ("chromium-driver", "/usr/bin/chromedriver")
ARTEFACTS = Path(__file__).resolve().parents[2] / "test-artefacts"
"""Where browser tests save screenshots (ignored by git; CI keeps the folder)."""


def missing() -> list[str]:
    found = [
        f"the Debian package {package!r} ({path} or {Path(path).name} on PATH)"
        for package, path in (CHROMIUM, CHROMEDRIVER)
        if not (Path(path).is_file() or shutil.which(Path(path).name))
    ]
    try:
        import selenium  # noqa: F401
    except ImportError:
        found.append("the Python package 'selenium' (pip install -e '.[dev]')")
    return found


@contextmanager
def chromium(width: int = 1280, height: int = 900, *, what: str = "this browser test") -> Iterator[Any]:
    """A Selenium driver of headless Chromium with a ``width`` x ``height`` viewport."""
    absent = missing()
    if absent:
        pytest.fail(f"{what} needs " + ", ".join(absent) + "; `make test` installs them", False)
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="laulima-chromium-")
    options = Options()
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--hide-scrollbars",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(arg)
    options.accept_insecure_certs = True
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    binary = CHROMIUM[1] if Path(CHROMIUM[1]).is_file() else shutil.which("chromium")
    driver_path = CHROMEDRIVER[1] if Path(CHROMEDRIVER[1]).is_file() else shutil.which("chromedriver")
    options.binary_location = str(binary)
    driver = webdriver.Chrome(service=Service(str(driver_path)), options=options)
    try:
        driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def console_problems(driver: Any) -> list[str]:
    """What the page's console reported at warning level or above since the last call: a
    refused script or style (Content-Security-Policy), a failed request, a script error."""
    return [
        f"{e.get('level')}: {e.get('message')}"
        for e in driver.get_log("browser")
        if e.get("level") in ("WARNING", "SEVERE")
    ]


def screenshot(driver: Any, name: str) -> Path:
    """The whole page as ``test-artefacts/<name>.png`` (full height, not just the viewport)."""
    ARTEFACTS.mkdir(exist_ok=True)
    height = driver.execute_script("return Math.ceil(document.documentElement.scrollHeight)")
    width = driver.execute_script("return window.innerWidth")
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": max(height, 400), "deviceScaleFactor": 1, "mobile": False},
    )
    path = ARTEFACTS / f"{name}.png"
    try:
        driver.save_screenshot(str(path))
    finally:
        driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False},
        )
    return path


#: Text elements whose colour contrast against their effective background is below WCAG AA
#: (4.5:1, or 3:1 for large text), as [text, ratio] pairs.
LOW_CONTRAST = """
function rgb(s) { const m = s.match(/[\\d.]+/g); return m ? m.map(Number) : [0,0,0,0]; }
function lum(c) { const f = v => { v /= 255; return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4); };
  return 0.2126 * f(c[0]) + 0.7152 * f(c[1]) + 0.0722 * f(c[2]); }
function background(el) {
  for (let e = el; e; e = e.parentElement) {
    const c = rgb(getComputedStyle(e).backgroundColor);
    if (c.length < 4 || c[3] > 0) return c;
  }
  return [255, 255, 255];
}
const out = [];
const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
while (walker.nextNode()) {
  const node = walker.currentNode; const el = node.parentElement;
  if (!node.textContent.trim() || !el || el.closest('svg')) continue;
  const style = getComputedStyle(el);
  const box = el.getBoundingClientRect();
  if (style.visibility === 'hidden' || style.display === 'none' || box.width === 0 || box.left < -1000) continue;
  const fg = rgb(style.color), bg = background(el);
  const a = lum(fg), b = lum(bg);
  const ratio = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
  const size = parseFloat(style.fontSize), bold = Number(style.fontWeight) >= 700;
  const needed = (size >= 24 || (bold && size >= 18.66)) ? 3 : 4.5;
  if (ratio < needed) out.push([node.textContent.trim().slice(0, 40), Math.round(ratio * 100) / 100]);
}
return out;
"""

#: Form controls without an accessible name (a label, aria-label or aria-labelledby).
UNLABELLED = """
const out = [];
for (const el of document.querySelectorAll('input:not([type=hidden]), textarea, select, button')) {
  const named = (el.labels && el.labels.length) || el.getAttribute('aria-label') || el.getAttribute('aria-labelledby')
    || (el.tagName === 'BUTTON' && el.textContent.trim());
  if (!named) out.push(el.outerHTML.slice(0, 80));
}
return out;
"""


def check_page(driver: Any, name: str) -> None:
    """What every dashboard page passes: text at WCAG AA contrast, every control labelled, no
    sideways scrolling, and a quiet console (no refused script or style, no failed load)."""
    assert driver.execute_script(LOW_CONTRAST) == [], f"{name}: text below WCAG AA contrast"
    assert driver.execute_script(UNLABELLED) == [], f"{name}: form controls without a label"
    assert driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth"), (
        f"{name}: the page scrolls sideways"
    )
    problems = [p for p in console_problems(driver) if "favicon.ico" not in p]
    assert problems == [], f"{name}: the browser's console reported {problems}"
