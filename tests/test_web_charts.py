"""The dashboards' SVG charts: every point where its value says, labels escaped, ticks round."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import pytest

from laulima.web.charts import Series, bar_chart, line_chart, nice_ticks

SVG = "{http://www.w3.org/2000/svg}"


def parse(svg: str) -> ET.Element:
    return ET.fromstring(svg.replace("<svg ", '<svg xmlns="http://www.w3.org/2000/svg" ', 1))


@pytest.mark.parametrize(
    ("low", "high", "expected"),
    [
        (0.0, 1.0, [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]),
        (0.13, 0.87, [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]),
        (1.0, 5.0, [1, 2, 3, 4, 5]),
    ],
)
def test_ticks_are_round_numbers_covering_the_range(low: float, high: float, expected: list[float]) -> None:
    assert nice_ticks(low, high) == pytest.approx(expected)


def test_a_flat_or_non_finite_range_still_has_ticks() -> None:
    flat = nice_ticks(3.0, 3.0)
    assert flat[0] < 3.0 < flat[-1]
    assert nice_ticks(float("nan"), 1.0) == [0.0, 1.0]


def test_each_point_is_drawn_at_its_value_with_a_tooltip() -> None:
    series = [Series("site-a", [(1, 0.2), (2, 0.4)]), Series("mean", [(1, 0.3), (2, 0.5)], emphasis=True)]
    root = parse(str(line_chart(series, title="Dice", y_label="Dice", chart_id="c", y_range=(0.0, 1.0))))
    assert root.get("data-points") == "4" and root.get("role") == "img"
    points = [
        (p.get("data-series"), p.get("data-x"), p.get("data-y")) for p in root.iter() if p.get("class") == "point"
    ]
    assert points == [("site-a", "1", "0.2"), ("site-a", "2", "0.4"), ("mean", "1", "0.3"), ("mean", "2", "0.5")]
    circles = {(c.get("data-x"), c.get("data-y")): float(c.get("cy", "nan")) for c in root.iter(f"{SVG}circle")}
    # y grows downwards in SVG: 0.4 is drawn above 0.2, and twice as far from the zero line
    zero = 280 - 44
    assert zero - circles[("2", "0.4")] == pytest.approx(2 * (zero - circles[("1", "0.2")]), abs=0.2)
    tips = [t.text for t in root.iter(f"{SVG}title")]
    assert "site-a, round 2: 0.4" in tips
    assert "Latest values: site-a 0.4 at round 2; mean 0.5 at round 2." in root.find(f"{SVG}desc").text  # type: ignore[union-attr]


def test_names_from_sites_are_escaped_in_the_svg() -> None:
    hostile = '"><script>alert(1)</script>'
    svg = str(line_chart([Series(hostile, [(1, 1.0)])], title=hostile, y_label=hostile, chart_id="x"))
    assert "<script>" not in svg
    parse(svg)  # still well-formed: nothing broke out of an attribute


def test_an_empty_chart_says_so() -> None:
    svg = str(line_chart([Series("a", [])], title="t", y_label="y", chart_id="e"))
    assert "no data yet" in svg and 'data-points="0"' in svg


def test_bars_stand_on_zero_and_a_missing_value_leaves_a_gap() -> None:
    svg = str(
        bar_chart(
            ["s1", "s2"],
            {"global": [0.5, None], "local": [0.25, 1.0]},
            title="t",
            y_label="y",
            chart_id="b",
            y_range=(0.0, 1.0),
        )
    )
    root = parse(svg)
    bars = [(r.get("data-series"), r.get("data-group"), float(r.get("height", "0"))) for r in root.iter(f"{SVG}rect")]
    assert [(s, g) for s, g, _ in bars] == [("global", "s1"), ("local", "s1"), ("local", "s2")]
    heights = {(s, g): h for s, g, h in bars}
    assert heights[("global", "s1")] == pytest.approx(2 * heights[("local", "s1")], abs=0.2)
    assert re.search(r'data-bars="3"', svg)
