"""Line and bar charts as inline SVG, drawn on the server: no chart library, no script.

Every point is an element with its series, x and y in ``data-`` attributes and a ``<title>``
(the tooltip, and what a screen reader reads); the chart itself is ``role="img"`` with a
title and a description that states each series' last value. Colours are the Okabe-Ito
palette darkened until each reaches 3:1 against white (WCAG's contrast for graphics), and
series also differ by marker shape, so no reading depends on colour alone.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from markupsafe import Markup

__all__ = ["PALETTE", "Series", "bar_chart", "bar_colours", "legend_colours", "line_chart", "nice_ticks", "series_from"]

PALETTE = ("#0072B2", "#C75000", "#00785A", "#A8327E", "#6E5E00", "#5A4FA3", "#B3261E", "#2F6F8F")
"""Line colours, each at least 3:1 against the white background."""
MEAN_COLOUR = "#1A1A1A"
MARKERS = ("circle", "square", "diamond", "triangle")
MAX_MARKERS = 60
"""A series with more points is drawn as its line alone: 500 rounds x 20 sites of markers
would be tens of thousands of elements per chart; the chart's table keeps the numbers."""

WIDTH, HEIGHT = 520, 280
LEFT, RIGHT, TOP, BOTTOM = 60, 14, 14, 44


@dataclass(frozen=True)
class Series:
    """One line: its name (a site, or ``mean``) and its points (x, y), x ascending."""

    name: str
    points: Sequence[tuple[float, float]]
    emphasis: bool = False
    """Drawn darker and thicker: the weighted mean over the sites."""


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values covering [low, high] (1, 2 or 5 times a power of ten apart)."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return [0.0, 1.0]
    if high <= low:
        pad = abs(low) * 0.1 or 1.0
        low, high = low - pad, high + pad
    raw = (high - low) / max(1, count - 1)
    power = 10 ** math.floor(math.log10(raw))
    ratio = raw / power
    step = power * (1 if ratio < 1.5 else 2 if ratio < 3 else 5 if ratio < 7 else 10)
    first = math.floor(low / step) * step
    ticks: list[float] = []
    value = first
    while len(ticks) < 50:
        ticks.append(round(value, 12))
        if value >= high - step * 1e-9:  # the last tick is at or above the highest value
            break
        value += step
    return ticks


def line_chart(
    series: Sequence[Series],
    *,
    title: str,
    y_label: str,
    x_label: str = "round",
    chart_id: str,
    y_range: tuple[float, float] | None = None,
) -> Markup:
    """An SVG line chart of ``series`` (x: integer rounds); an empty chart says there is no data yet."""
    drawn = [s for s in series if s.points]
    xs = [x for s in drawn for x, _ in s.points]
    ys = [y for s in drawn for _, y in s.points if math.isfinite(y)]
    count = f'data-points="{sum(len(s.points) for s in drawn)}"'
    parts = _frame(chart_id, title, _describe(drawn, x_label), count)
    if not xs or not ys:
        return _empty(parts)
    x_lo, x_hi = min(xs), max(xs)
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    y_ticks = nice_ticks(*(y_range or (min(ys), max(ys))))
    y_lo, y_hi = y_ticks[0], y_ticks[-1]
    if y_hi == y_lo:
        y_hi = y_lo + 1

    def px(x: float) -> float:
        return LEFT + (x - x_lo) / (x_hi - x_lo) * (WIDTH - LEFT - RIGHT)

    py = _y_scale(y_lo, y_hi)
    _y_axis(parts, y_ticks, py, y_label)
    for x in _x_ticks(x_lo, x_hi):
        parts.append(f'<text x="{px(x):.1f}" y="{HEIGHT - BOTTOM + 18}" text-anchor="middle">{_t(_tick(x))}</text>')
    parts.append(
        f'<text x="{(LEFT + WIDTH - RIGHT) / 2}" y="{HEIGHT - 6}" text-anchor="middle" class="label">'
        f"{_t(x_label)}</text>"
    )
    parts.append("</g>")
    colours = iter(PALETTE * 8)
    for index, s in enumerate(drawn):
        colour = MEAN_COLOUR if s.emphasis else next(colours)
        marker = MARKERS[index % len(MARKERS)]
        finite = [(x, y) for x, y in s.points if math.isfinite(y)]
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in finite)
        width = 3 if s.emphasis else 2
        dash = ' stroke-dasharray="6 3"' if s.emphasis else ""
        parts.append(f'<g class="series" data-series="{_a(s.name)}">')
        parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="{width}"{dash}/>')
        for x, y in finite if len(finite) <= MAX_MARKERS else ():
            label = f"{s.name}, {x_label} {_tick(x)}: {_tick(y, 4)}"
            parts.append(_marker(marker, px(x), py(y), colour, s.name, x, y, label))
        parts.append("</g>")
    parts.append("</svg>")
    return Markup("".join(parts))


def bar_chart(
    groups: Sequence[str],
    bars: Mapping[str, Sequence[float | None]],
    *,
    title: str,
    y_label: str,
    chart_id: str,
    y_range: tuple[float, float] | None = None,
) -> Markup:
    """Grouped bars: one group per entry of ``groups`` (e.g. the sites a model was evaluated
    at), one bar per entry of ``bars`` (e.g. the models) in each; a missing value leaves a gap."""
    values = [v for vs in bars.values() for v in vs if v is not None and math.isfinite(v)]
    described = "; ".join(
        f"{name}: " + ", ".join(f"{g} {_tick(v, 4)}" for g, v in zip(groups, vs, strict=False) if v is not None)
        for name, vs in bars.items()
    )
    parts = _frame(chart_id, title, described or "No data yet.", f'data-bars="{len(values)}"')
    if not values or not groups:
        return _empty(parts)
    y_ticks = nice_ticks(*(y_range or (min(0.0, *values), max(values))))
    y_lo, y_hi = y_ticks[0], y_ticks[-1]
    py = _y_scale(y_lo, y_hi)
    _y_axis(parts, y_ticks, py, y_label)
    group_width = (WIDTH - LEFT - RIGHT) / len(groups)
    bar_width = group_width * 0.8 / max(1, len(bars))
    for g, group in enumerate(groups):
        centre = LEFT + group_width * (g + 0.5)
        parts.append(f'<text x="{centre:.1f}" y="{HEIGHT - BOTTOM + 18}" text-anchor="middle">{_t(group)}</text>')
    parts.append("</g>")
    base = py(max(y_lo, min(0.0, y_hi)))
    for b, (name, vs) in enumerate(bars.items()):
        colour = PALETTE[b % len(PALETTE)]
        parts.append(f'<g class="series" data-series="{_a(name)}">')
        for g, value in enumerate(vs):
            if value is None or not math.isfinite(value) or g >= len(groups):
                continue
            x = LEFT + group_width * g + group_width * 0.1 + bar_width * b
            top = py(value)
            label = f"{name} at {groups[g]}: {_tick(value, 4)}"
            parts.append(
                f'<rect class="bar" x="{x:.1f}" y="{min(top, base):.1f}" width="{bar_width:.1f}" '
                f'height="{abs(base - top):.1f}" fill="{colour}" data-series="{_a(name)}" data-group="{_a(groups[g])}" '
                f'data-y="{value:.6g}"><title>{_t(label)}</title></rect>'
            )
        parts.append("</g>")
    parts.append("</svg>")
    return Markup("".join(parts))


def _frame(chart_id: str, title: str, description: str, count: str) -> list[str]:
    """The opening of a chart: its title and description for assistive technology, and
    ``count`` (a ``data-`` attribute with how many points or bars it draws) for tests."""
    title_id, desc_id = f"{chart_id}-title", f"{chart_id}-desc"
    return [
        f'<svg class="chart" id="{_a(chart_id)}" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-labelledby="{_a(title_id)} {_a(desc_id)}" {count}>',
        f'<title id="{_a(title_id)}">{_t(title)}</title>',
        f'<desc id="{_a(desc_id)}">{_t(description)}</desc>',
    ]


def _empty(parts: list[str]) -> Markup:
    parts.append(f'<text x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle" class="empty">no data yet</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def _y_scale(low: float, high: float) -> Callable[[float], float]:
    """Value -> SVG y (downwards), values outside [low, high] drawn at the edge."""
    span = (high - low) or 1.0

    def py(y: float) -> float:
        clamped = min(max(y, low), high)
        return HEIGHT - BOTTOM - (clamped - low) / span * (HEIGHT - TOP - BOTTOM)

    return py


def _y_axis(parts: list[str], ticks: Sequence[float], py: Callable[[float], float], label: str) -> None:
    """Opens the axis group: grid lines and tick labels, and the axis' label turned upright."""
    parts.append('<g class="axis">')
    for tick in ticks:
        y = py(tick)
        parts.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>')
        parts.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{_t(_tick(tick))}</text>')
    parts.append(
        f'<text transform="translate(14 {(TOP + HEIGHT - BOTTOM) / 2}) rotate(-90)" text-anchor="middle" '
        f'class="label">{_t(label)}</text>'
    )


def bar_colours(names: Sequence[str]) -> dict[str, tuple[str, str]]:
    """Bar name -> (colour, "bar"), as :func:`bar_chart` draws them, for an HTML legend."""
    return {name: (PALETTE[i % len(PALETTE)], "bar") for i, name in enumerate(names)}


def legend_colours(series: Sequence[Series]) -> dict[str, tuple[str, str]]:
    """Series name -> (colour, marker), as :func:`line_chart` draws them, for an HTML legend."""
    colours = iter(PALETTE * 8)
    out: dict[str, tuple[str, str]] = {}
    for index, s in enumerate(x for x in series if x.points):
        out[s.name] = (MEAN_COLOUR if s.emphasis else next(colours), MARKERS[index % len(MARKERS)])
    return out


def _marker(shape: str, x: float, y: float, colour: str, name: str, vx: float, vy: float, label: str) -> str:
    data = f'class="point" data-series="{_a(name)}" data-x="{vx:g}" data-y="{vy:.6g}" fill="{colour}"'
    tip = f"<title>{_t(label)}</title>"
    if shape == "square":
        return f'<rect x="{x - 4:.1f}" y="{y - 4:.1f}" width="8" height="8" {data}>{tip}</rect>'
    if shape == "diamond":
        corners = f"{x:.1f},{y - 5:.1f} {x + 5:.1f},{y:.1f} {x:.1f},{y + 5:.1f} {x - 5:.1f},{y:.1f}"
        return f'<polygon points="{corners}" {data}>{tip}</polygon>'
    if shape == "triangle":
        corners = f"{x:.1f},{y - 5:.1f} {x + 5:.1f},{y + 4:.1f} {x - 5:.1f},{y + 4:.1f}"
        return f'<polygon points="{corners}" {data}>{tip}</polygon>'
    return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" {data}>{tip}</circle>'


def _x_ticks(low: float, high: float) -> list[float]:
    """Whole rounds: the first one, then round multiples of a round step up to the last."""
    ticks = [t for t in nice_ticks(low, high, 8) if low < t <= high and float(t).is_integer()]
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
    if ticks and ticks[0] - low <= step / 2:
        ticks = ticks[1:]  # too close to the first round's label
    return [low, *ticks] if float(low).is_integer() else ticks or [low, high]


def _describe(series: Sequence[Series], x_label: str) -> str:
    if not series:
        return "No data yet."
    last = [f"{s.name} {_tick(s.points[-1][1], 4)} at {x_label} {_tick(s.points[-1][0])}" for s in series]
    return "Latest values: " + "; ".join(last) + "."


def _tick(value: float, digits: int = 3) -> str:
    if float(value).is_integer() and abs(value) < 1e9:
        return str(int(value))
    return f"{value:.{digits}g}"


def _t(text: str) -> str:
    return html.escape(text, quote=False)


def _a(text: str) -> str:
    return html.escape(text, quote=True)


def series_from(points: Mapping[str, Sequence[tuple[float, float]]], mean: str | None = None) -> list[Series]:
    """Series in name order, the one named ``mean`` (if any) last and emphasised."""
    out = [Series(name, pts) for name, pts in sorted(points.items()) if name != mean]
    if mean is not None and mean in points:
        out.append(Series(mean, points[mean], emphasis=True))
    return out
