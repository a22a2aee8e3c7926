"""Terminal views of an experiment: live progress and metric tables (rich)."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from laulima.core.crosssite import round_records
from laulima.core.privacy.messages import EPSILON_METRIC
from laulima.core.protocol import ExperimentPublic, MetricRecord, TaskKind
from laulima.core.reading import (
    HEADLINE_METRIC,
    HIDDEN_METRICS,
    REGIONS,
    epsilon_by_site,
    final_epsilon,
    format_epsilon,
    headline_metrics,
    lower_is_better,
    metric_label,
    ordered_metrics,
    privacy_settings,
    privacy_settings_line,
    weighted_mean,
)
from laulima.core.reading import brief as _g

__all__ = [
    "EPSILON_METRIC",
    "ArmLike",
    "Comparison",
    "ComparisonColumn",
    "ComparisonRow",
    "SimProgress",
    "Verdict",
    "budget_line",
    "compare_arms",
    "comparison_table",
    "comparison_verdict",
    "epsilon_by_site",
    "final_epsilon",
    "format_epsilon",
    "format_metric",
    "headline_metrics",
    "lower_is_better",
    "metric_label",
    "metrics_table",
    "ordered_metrics",
    "privacy_line",
    "privacy_settings",
    "privacy_settings_line",
    "privacy_table",
    "weighted_mean",
]

def metrics_table(metrics: list[MetricRecord], *, last_round_only: bool = False) -> Table:
    """Evaluation metrics per round and site, plus the sample-weighted mean (records labelled
    by model belong to the cross-site matrix, shown by ``laulima experiment cross-site``)."""
    evals = [m for m in round_records(metrics) if m.kind == TaskKind.EVALUATE]
    if last_round_only and evals:
        last = max(m.round for m in evals)
        evals = [m for m in evals if m.round == last]
    keys = sorted({k for m in evals for k in m.metrics} - HIDDEN_METRICS)
    headers = [k.removeprefix("dice_").replace("_", " ") for k in keys]
    title = "evaluation of the global model" + (" (Dice)" if any(k.startswith("dice_") for k in keys) else "")
    table = Table("round", "site", "n", *headers, title=title)
    by_round: dict[int, list[MetricRecord]] = defaultdict(list)
    for m in evals:
        by_round[m.round].append(m)
    for rnd in sorted(by_round):
        for m in sorted(by_round[rnd], key=lambda r: r.site):
            table.add_row(str(rnd), m.site, str(m.n_samples), *(_fmt(m.metrics.get(k)) for k in keys))
        mean = weighted_mean(by_round[rnd])
        n = sum(m.n_samples for m in by_round[rnd])
        table.add_row(str(rnd), "[bold]all[/]", str(n), *(f"[bold]{_fmt(mean.get(k))}[/]" for k in keys))
    return table


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


class SimProgress:
    """A live progress bar of rounds and a per-site line for the current round."""

    def __init__(self, console: Console, rounds: int) -> None:
        self._progress = Progress(
            TextColumn("[bold]rounds"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            console=console,
        )
        self._task = self._progress.add_task("rounds", total=rounds)
        self._sites = Table.grid(padding=(0, 2))
        self._live = Live(Group(self._progress, self._sites), console=console, refresh_per_second=4)

    def __enter__(self) -> SimProgress:
        self._live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._live.__exit__(*exc)

    def update(self, exp: ExperimentPublic, metrics: list[MetricRecord]) -> None:
        self._progress.update(self._task, completed=exp.rounds_done)
        current = exp.rounds_done + 1 if exp.rounds_done < exp.rounds else exp.rounds
        metrics = round_records(metrics)
        done = {m.site: m for m in metrics if m.kind == TaskKind.TRAIN and m.round == current}
        evals = [m for m in metrics if m.kind == TaskKind.EVALUATE]
        grid = Table.grid(padding=(0, 2))
        phase = f", {exp.phase}" if exp.phase else ""
        grid.add_row(f"[bold]round {current}[/]", f"status: {exp.status}{phase}")
        for site in sorted({m.site for m in metrics} | set(done)):
            rec = done.get(site)
            state = "[green]update received[/]" if rec else "[yellow]training…[/]"
            shown = ", ".join(_progress_metric(k, v) for k, v in sorted(rec.metrics.items())) if rec else ""
            grid.add_row(site, state, shown)
        if evals:
            last = max(m.round for m in evals)
            mean = weighted_mean([m for m in evals if m.round == last])
            grid.add_row(f"global model, round {last}", ", ".join(f"{k}={v:.3f}" for k, v in sorted(mean.items())))
        self._live.update(Group(self._progress, grid))


def _progress_metric(key: str, value: float) -> str:
    return f"ε={format_epsilon(value)}" if key == EPSILON_METRIC else f"{key}={value:.3f}"


# -- differential privacy ------------------------------------------------------------------
def privacy_line(metrics: Iterable[MetricRecord], *, delta: float | None = None) -> str | None:
    """ε per site after its last round, e.g. "differential privacy: ε after round 20 (each site's own
    accounting, δ 1e-05): site-a 7.98, site-b 7.98"; None when no site reported ε."""
    final = final_epsilon(metrics)
    if not final:
        return None
    rounds = sorted({r for r, _ in final.values()})
    when = f"round {rounds[0]}" if len(rounds) == 1 else "each site's last round"
    at = f", δ {_g(delta)}" if delta is not None else ""
    if len(rounds) == 1:
        per_site = ", ".join(f"{site} {format_epsilon(eps)}" for site, (_, eps) in final.items())
    else:
        per_site = ", ".join(f"{site} {format_epsilon(eps)} (round {r})" for site, (r, eps) in final.items())
    return f"differential privacy: ε after {when} (each site's own accounting{at}): {per_site}"


def privacy_table(metrics: Iterable[MetricRecord], *, delta: float | None = None) -> Table | None:
    """ε per round (rows) and site (columns), as each site accounted it; None without differential privacy."""
    by_site = epsilon_by_site(metrics)
    if not by_site:
        return None
    sites = list(by_site)
    at = f" at δ = {_g(delta)}" if delta is not None else ""
    table = Table("round", *sites, title=f"differential privacy: site-level ε spent so far{at}")
    for rnd in sorted({r for by_round in by_site.values() for r in by_round}):
        table.add_row(str(rnd), *(format_epsilon(by_site[s].get(rnd)) if rnd in by_site[s] else "" for s in sites))
    return table




# -- the comparison of models --------------------------------------------------------------
class ArmLike(Protocol):
    """What the comparison needs of a trained model's evaluation (``report.ArmEvaluation``)."""

    @property
    def name(self) -> str: ...
    @property
    def per_site(self) -> Mapping[str, Mapping[str, float]]: ...
    @property
    def pooled(self) -> Mapping[str, float]: ...
    @property
    def steps(self) -> int: ...


@dataclass(frozen=True)
class ComparisonColumn:
    """One number per model: ``metric`` pooled over all sites' test subjects (``site`` None) or on
    one site's own test subjects."""

    metric: str
    site: str | None = None

    @property
    def label(self) -> str:
        return metric_label(self.metric)


@dataclass(frozen=True)
class ComparisonRow:
    name: str
    steps: int
    values: tuple[float | None, ...]


@dataclass(frozen=True)
class Comparison:
    """The table a reader came for, independent of how it is drawn (terminal or HTML), so both
    show the same numbers and the same winners."""

    columns: tuple[ComparisonColumn, ...]
    rows: tuple[ComparisonRow, ...]

    def best(self, column: int) -> float | None:
        """The best value in a column (highest Dice, lowest HD95 or loss); None when it is empty."""
        values = [v for r in self.rows if (v := r.values[column]) is not None and not math.isnan(v)]
        if not values:
            return None
        return min(values) if lower_is_better(self.columns[column].metric) else max(values)

    def is_best(self, row: int, column: int) -> bool:
        value = self.rows[row].values[column]
        return value is not None and value == self.best(column)

    def pooled_columns(self) -> list[ComparisonColumn]:
        return [c for c in self.columns if c.site is None]

    def site_columns(self) -> list[ComparisonColumn]:
        return [c for c in self.columns if c.site is not None]


def _arm_order(name: str) -> tuple[int, str]:
    """Federated first, then centralized, then the local-only models by site, then anything else."""
    if name == "federated":
        return 0, ""
    if name == "centralized":
        return 1, ""
    return (2, name) if name.startswith("local:") else (3, name)


def compare_arms(arms: Sequence[ArmLike], *, sites: Sequence[str], metric: str = HEADLINE_METRIC) -> Comparison:
    """Pooled headline metrics, then ``metric`` on each site's own test subjects, one row per model."""
    pooled_keys = headline_metrics(k for a in arms for k in a.pooled)
    if metric not in pooled_keys and any(metric in a.pooled for a in arms):
        pooled_keys.insert(0, metric)
    columns = (*(ComparisonColumn(k) for k in pooled_keys), *(ComparisonColumn(metric, s) for s in sites))
    rows = tuple(
        ComparisonRow(a.name, a.steps, tuple(_value(a, c) for c in columns))
        for a in sorted(arms, key=lambda a: _arm_order(a.name))
    )
    return Comparison(tuple(columns), rows)


def _value(arm: ArmLike, column: ComparisonColumn) -> float | None:
    metrics = arm.pooled if column.site is None else arm.per_site.get(column.site, {})
    value = metrics.get(column.metric)
    return None if value is None else float(value)


def comparison_table(
    arms: Sequence[ArmLike], *, budget_line: str, sites: Sequence[str], metric: str = HEADLINE_METRIC
) -> Table:
    """One row per model, federated first: pooled metrics, then ``metric`` per site; the best value
    of each column in bold green; the budget in the caption so the comparison is read as fair.

    Compact (short headers explained in the caption, three decimals, no vertical rules) so the
    whole table fits an 80-column terminal; the report shows the same numbers in full."""
    comparison = compare_arms(arms, sites=sites, metric=metric)
    legend = [f"{_short_label(c.metric)}: {metric_label(c.metric)}" for c in comparison.pooled_columns()]
    legend.append("all: every site's test subjects pooled")
    legend.append(f"per site: {metric_label(metric)} on that site's own test subjects")
    caption = escape(budget_line) + "\n" + escape("; ".join(legend))
    table = Table(
        title="every model on every site's held-out test subjects",
        caption=caption,
        box=box.SIMPLE_HEAD,
        padding=(0, 1),
        pad_edge=False,
        collapse_padding=True,
    )
    table.add_column("model", no_wrap=True)
    for column in comparison.columns:
        if column.site is None:
            header = f"{escape(_short_label(column.metric))}\n[dim]all[/]"
        else:
            header = f"{escape(column.site)}\n[dim]{escape(_short_label(metric))}[/]"
        table.add_column(header, justify="right", no_wrap=True)
    for i, row in enumerate(comparison.rows):
        cells = [_cell(comparison, i, j) for j in range(len(comparison.columns))]
        name = f"[bold]{escape(row.name)}[/]" if row.name == "federated" else escape(row.name)
        table.add_row(name, *cells)
    return table


def _short_label(key: str) -> str:
    """A column header for the terminal: "Dice", "WT", "HD95", "grey matter"."""
    if key == "dice_mean":
        return "Dice"
    if key == "hd95_mean":
        return "HD95"
    prefix, _, rest = key.partition("_")
    if rest in REGIONS:
        return rest.upper() if prefix == "dice" else f"HD95 {rest.upper()}"
    return rest.replace("_", " ") if prefix == "dice" and rest else metric_label(key)


def _cell(comparison: Comparison, row: int, column: int) -> str:
    """A terminal cell: Dice to three decimals (the report keeps four), distances in mm to two."""
    value = comparison.rows[row].values[column]
    metric = comparison.columns[column].metric
    finite = value is not None and math.isfinite(value)
    text = f"{value:.3f}" if finite and not metric.startswith("hd95") else format_metric(metric, value)
    return f"[bold green]{text}[/]" if comparison.is_best(row, column) else text


def format_metric(key: str, value: float | None) -> str:
    """Dice and losses to 4 decimals, distances in mm to 2; "n/a" where a model has no value
    (a HD95 is undefined when a region is absent from the prediction or the truth)."""
    if value is None or math.isnan(value):
        return "n/a"
    if math.isinf(value):
        return "inf"
    return f"{value:.2f}" if key.startswith("hd95") else f"{value:.4f}"


def budget_line(budget: Mapping[str, Any]) -> str:
    """The demo's budget in one sentence, e.g. "budget: 40 rounds x 10 local steps x 3 sites = 1200
    optimizer steps for federated and centralized; 400 per local-only model"."""
    keys = ("rounds", "local_steps", "sites", "optimizer_steps_federated_and_centralized")
    if not all(k in budget for k in keys):
        return "budget: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in budget.items())
    line = (
        f"budget: {budget['rounds']} rounds x {budget['local_steps']} local steps x {budget['sites']} sites = "
        f"{budget['optimizer_steps_federated_and_centralized']} optimizer steps for federated and centralized"
    )
    per_local = budget.get("optimizer_steps_per_local_model")
    return line if per_local is None else f"{line}; {per_local} per local-only model"


@dataclass(frozen=True)
class Verdict:
    """Whether federation paid off, in the three numbers a reader asks for."""

    metric: str
    federated: float | None
    centralized: float | None
    best_local: str | None
    best_local_value: float | None
    sites_won: tuple[str, ...]
    """Sites whose own test subjects the federated model segments better than the site's local model."""
    sites_compared: tuple[str, ...]

    @property
    def ratio_to_centralized(self) -> float | None:
        if self.federated is None or not self.centralized:
            return None
        return self.federated / self.centralized

    @property
    def margin_over_best_local(self) -> float | None:
        """Positive when federated is better, whichever direction the metric improves in."""
        if self.federated is None or self.best_local_value is None:
            return None
        margin = self.federated - self.best_local_value
        return -margin if lower_is_better(self.metric) else margin

    def line(self) -> str:
        if self.federated is None:
            return f"no federated {metric_label(self.metric)} to compare"
        parts = [f"federated {metric_label(self.metric)} {self.federated:.4f}"]
        if (ratio := self.ratio_to_centralized) is not None:
            parts[0] += f" = {ratio:.2f} x centralized ({self.centralized:.4f})"
        if (margin := self.margin_over_best_local) is not None:
            best = f"{self.best_local}, {self.best_local_value:.4f}"
            parts.append(f"{margin:+.4f} over the best local-only model ({best})")
        if self.sites_compared:
            won = f" ({', '.join(self.sites_won)})" if self.sites_won else ""
            parts.append(
                f"beats the site's own local model at {len(self.sites_won)} of {len(self.sites_compared)} sites{won}"
            )
        return "; ".join(parts)


def comparison_verdict(arms: Sequence[ArmLike], *, sites: Sequence[str], metric: str = HEADLINE_METRIC) -> Verdict:
    """Federated vs centralized (ratio), vs the best local-only model (margin, pooled), and per site vs
    that site's own local-only model on the site's own test subjects."""
    by_name = {a.name: a for a in arms}
    fed, central = by_name.get("federated"), by_name.get("centralized")
    sign = -1.0 if lower_is_better(metric) else 1.0
    locals_ = [a for a in arms if a.name.startswith("local:") and metric in a.pooled]
    best = max(locals_, key=lambda a: sign * a.pooled[metric], default=None)
    won, compared = [], []
    for site in sites:
        own = by_name.get(f"local:{site}")
        fed_value = fed.per_site.get(site, {}).get(metric) if fed else None
        own_value = own.per_site.get(site, {}).get(metric) if own else None
        if fed_value is None or own_value is None:
            continue
        compared.append(site)
        if sign * fed_value > sign * own_value:
            won.append(site)
    return Verdict(
        metric=metric,
        federated=fed.pooled.get(metric) if fed else None,
        centralized=central.pooled.get(metric) if central else None,
        best_local=best.name if best else None,
        best_local_value=best.pooled[metric] if best else None,
        sites_won=tuple(won),
        sites_compared=tuple(compared),
    )
