"""What the dashboard's pages show, computed from the API's own records.

Pure functions of :mod:`laulima.core.protocol` objects (the same ones the REST API serves),
so the dashboard can never show more than a person may read through the API, and every
number on a page is one a test can compare with the API's answer.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from markupsafe import Markup

from laulima import __version__
from laulima.core.crosssite import round_records
from laulima.core.privacy.messages import EPSILON_METRIC
from laulima.core.protocol import (
    CrossSiteMatrix,
    ExperimentPublic,
    ExperimentStatus,
    MetricRecord,
    RoundPublic,
    TaskKind,
)
from laulima.core.reading import (
    final_epsilon,
    format_epsilon,
    headline_metrics,
    metric_label,
    ordered_metrics,
    privacy_settings,
    privacy_settings_line,
    weighted_mean,
)
from laulima.web.charts import Series, bar_chart, bar_colours, legend_colours, line_chart

__all__ = [
    "MEAN",
    "Chart",
    "CrossSiteView",
    "charts",
    "cross_site_view",
    "model_card",
    "round_rows",
    "spec_summary",
]

MEAN = "mean (weighted by cases)"
"""The series of the sample-weighted mean over the sites."""
MAX_CHARTS = 24
MAX_TABLE_ROWS = 100
"""A chart's table lists at most the last this many rounds (the API serves them all)."""
KIND_TITLES = {TaskKind.EVALUATE: "Evaluation of the global model", TaskKind.TRAIN: "Training at the sites"}


@dataclass(frozen=True)
class ChartRow:
    x: int | str
    """The row's round (line charts) or group (bar charts)."""
    values: list[float | None]


@dataclass(frozen=True)
class Chart:
    """One chart: its SVG, legend, and its numbers as table rows (for screen readers and copying)."""

    id: str
    title: str
    svg: Markup
    legend: dict[str, tuple[str, str]]
    columns: list[str]
    rows: list[ChartRow]
    x_label: str = "round"
    primary: bool = True
    """Shown at once; the others wait behind "Every other metric"."""


def charts(metrics: Sequence[MetricRecord]) -> list[Chart]:
    """Per-round charts, what a reader looks for first marked ``primary``: the evaluation's
    headline metrics (mean Dice and the BraTS regions, mean HD95; or its first four), the
    training metrics (loss first) and ε; then every other evaluation metric, up to
    :data:`MAX_CHARTS` in all.

    Each chart has one line per site and, when more than one site reported, the mean over
    the sites weighted by their cases: the number FedAvg's global model is judged by.
    """
    records = round_records(metrics)
    prepared: dict[TaskKind, tuple[list[MetricRecord], dict[int, dict[str, float]], list[str]]] = {}
    for kind in (TaskKind.EVALUATE, TaskKind.TRAIN):
        of_kind = sorted((r for r in records if r.kind == kind), key=lambda r: (r.round, r.site))
        by_round: dict[int, list[MetricRecord]] = defaultdict(list)
        for r in of_kind:
            by_round[r.round].append(r)
        means = {rnd: weighted_mean(rs) for rnd, rs in by_round.items()}  # every metric's, once per round
        prepared[kind] = (of_kind, means, ordered_metrics({k for r in of_kind for k in r.metrics} - {EPSILON_METRIC}))
    evaluated = prepared[TaskKind.EVALUATE][2]
    headline = [k for k in headline_metrics(evaluated) if k in evaluated] or evaluated[:4]
    plan = [(TaskKind.EVALUATE, k, True) for k in headline]
    plan += [(TaskKind.TRAIN, k, True) for k in prepared[TaskKind.TRAIN][2]]
    plan += [(TaskKind.EVALUATE, k, False) for k in evaluated if k not in headline]
    labels = _labels(plan)
    out: list[Chart] = []
    epsilon = _epsilon_chart(records)
    for kind, key, primary in plan[: MAX_CHARTS - (epsilon is not None)]:
        of_kind, means, _ = prepared[kind]
        out.append(_metric_chart(of_kind, means, kind, key, labels[(kind, key)], primary=primary))
    if epsilon is not None:
        out.insert(sum(c.primary for c in out), epsilon)
    return out


def _labels(plan: Sequence[tuple[TaskKind, str, bool]]) -> dict[tuple[TaskKind, str], str]:
    """Each metric's name for a reader; two fields that would read the same keep their field name too
    (``dice_et`` and ``dice_enhancing_tumour`` are both "Dice enhancing tumour")."""
    plain = {(kind, key): metric_label(key) for kind, key, _ in plan}
    seen: dict[tuple[TaskKind, str], list[str]] = defaultdict(list)
    for (kind, key), label in plain.items():
        seen[(kind, label)].append(key)
    shared = {name for name, keys in seen.items() if len(keys) > 1}
    return {where: f"{label} ({where[1]})" if (where[0], label) in shared else label for where, label in plain.items()}


def _metric_chart(
    records: Sequence[MetricRecord],
    means: Mapping[int, Mapping[str, float]],
    kind: TaskKind,
    key: str,
    label: str,
    *,
    primary: bool,
) -> Chart:
    """``records`` in round and site order; ``means``: each round's case-weighted means."""
    by_site: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for r in records:
        if key in r.metrics:
            by_site[r.site].append((float(r.round), r.metrics[key]))
    series = [Series(site, pts) for site, pts in sorted(by_site.items())]
    if len(by_site) > 1:
        mean = [(float(rnd), means[rnd][key]) for rnd in sorted(means) if key in means[rnd]]
        series.append(Series(MEAN, mean, emphasis=True))
    chart_id = f"chart-{kind}-{_slug(key)}"
    title = f"{label} — {'evaluation' if kind == TaskKind.EVALUATE else 'training'}"
    dice = key.startswith("dice")
    svg = line_chart(series, title=title, y_label=label, chart_id=chart_id, y_range=(0.0, 1.0) if dice else None)
    return Chart(chart_id, title, svg, legend_colours(series), *_table(series), primary=primary)


def _epsilon_chart(records: Sequence[MetricRecord]) -> Chart | None:
    by_site: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for r in records:
        if r.kind == TaskKind.TRAIN and EPSILON_METRIC in r.metrics:
            by_site[r.site].append((float(r.round), r.metrics[EPSILON_METRIC]))
    if not by_site:
        return None
    series = [Series(site, sorted(pts)) for site, pts in sorted(by_site.items())]
    title = "Privacy spent: ε per site (each site's own accounting)"
    svg = line_chart(series, title=title, y_label="ε", chart_id="chart-epsilon")
    return Chart("chart-epsilon", title, svg, legend_colours(series), *_table(series))


def _table(series: Sequence[Series]) -> tuple[list[str], list[ChartRow]]:
    columns = [s.name for s in series]
    values: dict[int, dict[str, float]] = defaultdict(dict)
    for s in series:
        for x, y in s.points:
            values[int(x)][s.name] = y
    rows = [ChartRow(x, [values[x].get(c) for c in columns]) for x in sorted(values)[-MAX_TABLE_ROWS:]]
    return columns, rows


def _slug(key: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in key.lower())


@dataclass(frozen=True)
class RoundRow:
    index: int
    status: str
    sites: str
    updates: int
    started_at: float
    closed_at: float | None
    seconds: float | None
    left_out: dict[str, str]
    note: str


def round_rows(rounds: Sequence[RoundPublic], *, newest_first: bool = True, limit: int = 200) -> list[RoundRow]:
    rows = [
        RoundRow(
            r.index,
            str(r.status),
            ", ".join(r.sites),
            r.n_updates,
            r.started_at,
            r.closed_at,
            (r.closed_at - r.started_at) if r.closed_at is not None else None,
            dict(r.left_out),
            r.note,
        )
        for r in rounds
    ]
    rows.sort(key=lambda row: row.index, reverse=newest_first)
    return rows[:limit]


MatrixRow = tuple[str, list[float | None], float | None]
"""A model, its value at each site (None: no result), and pooled over the sites."""


@dataclass(frozen=True)
class CrossSiteView:
    """The cross-site matrix for one metric: rows are models, columns sites, then pooled."""

    metric: str
    label: str
    sites: list[str]
    rows: list[MatrixRow]
    failures: list[tuple[str, str, str]]
    complete: bool
    others: list[tuple[str, list[MatrixRow]]] = field(default_factory=list)
    """Every other metric the sites reported: its label and its rows."""
    chart: Chart | None = None


def cross_site_view(matrix: CrossSiteMatrix) -> CrossSiteView | None:
    """The matrix on its headline metric (mean Dice where reported) as a table and grouped bars,
    and every other metric as a table; None before any cell."""
    keys = {k for cells in matrix.cells.values() for cell in cells.values() for k in cell.metrics}
    if not keys:
        return None
    ordered = ordered_metrics(keys)
    metric = (headline_metrics(keys) or ordered or sorted(keys))[0]
    rows = _matrix_rows(matrix, metric)
    failures = [(f.model, f.site, f.reason) for f in matrix.failures]
    label = metric_label(metric)
    groups = [*matrix.sites, "all sites"]
    bars = {model: [*values, pooled] for model, values, pooled in rows}
    title = f"{label} of each model at each site (the cross-site evaluation)"
    svg = bar_chart(
        groups,
        bars,
        title=title,
        y_label=label,
        chart_id="chart-cross-site",
        y_range=(0.0, 1.0) if metric.startswith("dice") else None,
    )
    table_rows = [ChartRow(group, [bars[m][i] for m in bars]) for i, group in enumerate(groups)]
    chart = Chart("chart-cross-site", title, svg, bar_colours(list(bars)), list(bars), table_rows, "site")
    others = [(metric_label(k), _matrix_rows(matrix, k)) for k in ordered if k != metric]
    return CrossSiteView(metric, label, list(matrix.sites), rows, failures, matrix.complete, others, chart)


def _matrix_rows(matrix: CrossSiteMatrix, metric: str) -> list[MatrixRow]:
    rows = []
    for model in matrix.models:
        cells = matrix.cells.get(model, {})
        values = [cells[s].metrics.get(metric) if s in cells else None for s in matrix.sites]
        pooled = matrix.pooled.get(model)
        rows.append((model, values, pooled.metrics.get(metric) if pooled else None))
    return rows


def spec_summary(spec: Mapping[str, Any]) -> dict[str, str]:
    """The spec's settings a reader looks for first, as label -> text."""
    strategy = spec.get("strategy") or {}
    out = {
        "algorithm": str(spec.get("algorithm", "—")),
        "dataset": str(spec.get("dataset", "—")),
        "strategy": str(strategy.get("name", "—")) if isinstance(strategy, Mapping) else str(strategy),
        "sites": ", ".join(spec.get("sites") or []) or "every enrolled site",
        "minimum sites": str(spec.get("min_sites", "—")),
    }
    if spec.get("local_steps"):
        out["local training"] = _per_round(spec["local_steps"], "step")
    elif spec.get("local_epochs"):
        out["local training"] = _per_round(spec["local_epochs"], "epoch")
    settings = privacy_settings(spec)
    out["privacy"] = privacy_settings_line(settings)
    return out


def _per_round(count: object, unit: str) -> str:
    return f"{count} {unit}{'' if count == 1 else 's'} per round"


def epsilon_summary(metrics: Iterable[MetricRecord]) -> dict[str, str]:
    """Site -> ε it has spent so far on this experiment (its last report), formatted."""
    return {site: f"{format_epsilon(eps)} after round {rnd}" for site, (rnd, eps) in final_epsilon(metrics).items()}


def model_card(
    experiment: ExperimentPublic, rounds: Sequence[RoundPublic], metrics: Sequence[MetricRecord]
) -> dict[str, Any]:
    """The record that goes with the downloaded global model: what it is, how it was trained,
    where and how well it scored, under which privacy guarantee; its sha256 checks the file.

    Only what the hub holds: aggregate metrics per site, never anything per case. Exported
    for ``laulima predict`` with ``laulima experiment export``, which adds the network's
    own card (labels, preprocessing plan).
    """
    aggregated = [r for r in rounds if r.status == "aggregated"]
    sites = sorted({s for r in aggregated for s in r.sites})
    evaluations = [r for r in round_records(metrics) if r.kind == TaskKind.EVALUATE]
    last = max((r.round for r in evaluations), default=None)
    final = [r for r in evaluations if r.round == last]
    strategy = experiment.spec.get("strategy") or {}
    return {
        "format": "laulima-model-card",
        "version": 1,
        "experiment": experiment.name,
        "experiment_id": experiment.id,
        "owner": experiment.owner,
        "status": str(experiment.status),
        "finished": experiment.status != ExperimentStatus.RUNNING,
        "mode": experiment.mode,
        "algorithm": experiment.spec.get("algorithm"),
        "algorithm_digest": experiment.algorithm_digest or None,
        "strategy": strategy.get("name") if isinstance(strategy, Mapping) else strategy,
        "rounds": {"planned": experiment.rounds, "done": experiment.rounds_done},
        "weights": {"format": "safetensors", "sha256": experiment.global_digest, "round": experiment.rounds_done},
        "sites": sites,
        "evaluation": None
        if last is None
        else {
            "round": last,
            "mean_weighted_by_cases": weighted_mean(final),
            "per_site": {r.site: {"n_cases": r.n_samples, "metrics": r.metrics} for r in final},
        },
        "privacy": {
            "settings": privacy_settings(experiment.spec),
            "epsilon_per_site": {
                site: {"round": rnd, "epsilon": eps} for site, (rnd, eps) in final_epsilon(metrics).items()
            },
        },
        "spec": experiment.spec,
        "hub_version": __version__,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
