"""The rules every metric a site reports must follow, defined once.

Metrics arrive in two places: the JSON body of an evaluation (``EvaluationResult``) and the
``laulima.metrics`` header entry of an update. Both are stored, tabulated and plotted, so
both obey the same rules: a bounded number of entries, short printable names, finite values
of bounded magnitude. NaN or Infinity would be stored, served as ``null`` and break every
reader downstream; an enormous name or count would bloat the database and the reports.
Plain Python (no pydantic), so a site's worker process can apply the same rules.
"""

from __future__ import annotations

import math
import re

__all__ = ["MAX_METRICS", "METRIC_NAME_MAX", "METRIC_VALUE_MAX", "checked_metrics"]

MAX_METRICS = 64
"""Most metrics one result may report."""

METRIC_NAME_MAX = 128
"""Longest metric name, in characters."""

METRIC_VALUE_MAX = 1e15
"""Largest magnitude of a metric value; a loss beyond it is divergence, not a measurement."""

# Printable characters (class names such as "grey matter" have spaces), none at either end.
_NAME = re.compile(r"[^\s\x00-\x1f\x7f-\x9f](?:[^\x00-\x1f\x7f-\x9f]*[^\s\x00-\x1f\x7f-\x9f])?")


def checked_metrics(value: object) -> dict[str, float]:
    """``value`` as ``name -> float``; a ``ValueError`` names the entry and the rule it breaks."""
    if not isinstance(value, dict):
        raise ValueError(f"metrics must be an object of name -> number, got {type(value).__name__}")
    if len(value) > MAX_METRICS:
        raise ValueError(f"{len(value)} metrics reported; at most {MAX_METRICS} are accepted")
    out: dict[str, float] = {}
    for name, raw in value.items():
        if not isinstance(name, str) or len(name) > METRIC_NAME_MAX or not _NAME.fullmatch(name):
            shown = repr(name)[:60] if isinstance(name, str) else type(name).__name__
            raise ValueError(
                f"metric name {shown} is not accepted; names are 1 to {METRIC_NAME_MAX} printable "
                "characters with no space at either end"
            )
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise ValueError(f"metric {name!r} is {repr(raw)[:40]}; metric values must be numbers")
        if isinstance(raw, float) and not math.isfinite(raw):
            raise ValueError(f"metric {name!r} is {raw}; metric values must be finite (not NaN or Infinity)")
        if abs(raw) > METRIC_VALUE_MAX:  # ints compared exactly: float() of a huge int overflows
            raise ValueError(
                f"metric {name!r} is {repr(raw)[:40]}, above {METRIC_VALUE_MAX:g} in magnitude; report a bounded metric"
            )
        out[name] = float(raw)
    return out
