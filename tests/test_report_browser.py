"""The report in a real browser (headless Chromium) at 1200 x 900 CSS pixels: nothing overflows
the page sideways, no table or image is wider than its container, and the comparison table
ends within the first screen.

Needs the Debian packages ``chromium`` and ``chromium-driver`` (``make test`` installs them)
and the Python package ``selenium`` (the dev extra). A missing one fails the test: a layout
check that does not run proves nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from laulima.report import ArmEvaluation, write_report
from tests.helpers import report_data as rd
from tests.helpers.browser import chromium

WIDTH, HEIGHT = 1200, 900

#: Elements whose box is wider than their parent's content box (half a pixel of rounding allowed).
TOO_WIDE = """
const out = [];
for (const el of document.querySelectorAll('table, img, figure, pre, .table-wrap, .headline')) {
  const parent = el.parentElement;
  const style = getComputedStyle(parent);
  const room = parent.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight);
  const width = el.getBoundingClientRect().width;
  const where = `${el.tagName}#${el.id} in ${parent.tagName}.${parent.className}`;
  if (width > room + 0.5) out.push(`${where}: ${width} > ${room}`);
}
return out;
"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium with a 1200 x 900 viewport; fails, never skips, naming what is missing."""
    with chromium(WIDTH, HEIGHT, what="the report's browser test") as driver:
        yield driver


def many_sites_data() -> rd.ReportData:
    """Six sites with long names: the widest comparison and site tables a demo would make."""
    sites = [f"university-hospital-{n}" for n in ("north", "south", "east", "west", "central", "harbour")]
    metrics = rd.tumour_metrics(0.05)
    arms = [
        ArmEvaluation(name, {s: metrics for s in sites}, metrics, 100, 1.0)
        for name in ["federated", "centralized", *(f"local:{s}" for s in sites)]
    ]
    data = rd.report_data(overlay=rd.overlay([a.name for a in arms]))
    data.arms = arms
    data.sites = {s: rd.site_info(i) for i, s in enumerate(sites)}
    return data


REPORTS = {
    "tumour, everything": lambda: rd.report_data(
        meta={"strategy": "fedavg", "seed": 0, "date": "2025-01-01", "spec": {"name": "x" * 400}},
        overlay=rd.overlay(["federated", "centralized", "local:site-a", "local:site-b", "local:site-c"]),
        strategy_comparison=[{"strategy": "fedavg", "dice_mean_pooled": {"federated": 0.7}, "wall_s": 1.0}],
    ),
    "brain tissue, original fields only": lambda: rd.report_data(tumour=False),
    "six sites with long names": many_sites_data,
}


@pytest.mark.parametrize("name", list(REPORTS))
def test_the_report_fits_a_1200_px_window_and_the_comparison_is_on_the_first_screen(browser, tmp_path, name):
    page = write_report(REPORTS[name](), tmp_path)
    browser.get(page.resolve().as_uri())
    width, height = browser.execute_script("return [window.innerWidth, window.innerHeight]")
    assert (width, height) == (WIDTH, HEIGHT)
    scroll_width = browser.execute_script("return document.documentElement.scrollWidth")
    assert scroll_width <= width, f"the page scrolls sideways: {scroll_width} px in a {width} px window"
    assert browser.execute_script(TOO_WIDE) == []
    images = browser.execute_script(
        "return [...document.images].map(i => [i.getAttribute('src'), i.complete && i.naturalWidth > 0])"
    )
    assert images and all(ok for _, ok in images), images
    bottom = browser.execute_script("return document.getElementById('comparison-table').getBoundingClientRect().bottom")
    assert 0 < bottom <= HEIGHT, f"the comparison table ends at {bottom} px, below the first screen"
