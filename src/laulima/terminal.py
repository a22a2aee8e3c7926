"""Terminal views of an experiment: live progress and metric tables (rich)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from laulima.core.protocol import ExperimentPublic, MetricRecord, TaskKind

__all__ = ["SimProgress", "metrics_table", "weighted_mean"]

#: Bookkeeping values algorithms report that do not belong in a results table.
HIDDEN_METRICS = frozenset({"held_out_test", "steps"})


def weighted_mean(records: list[MetricRecord]) -> dict[str, float]:
    """Sample-weighted mean of each metric over ``records``."""
    sums: dict[str, float] = defaultdict(float)
    weights: dict[str, float] = defaultdict(float)
    for r in records:
        for key, value in r.metrics.items():
            sums[key] += value * max(r.n_samples, 0)
            weights[key] += max(r.n_samples, 0)
    return {k: sums[k] / weights[k] for k in sums if weights[k] > 0}


def metrics_table(metrics: list[MetricRecord], *, last_round_only: bool = False) -> Table:
    """Evaluation metrics per round and site, plus the sample-weighted mean."""
    evals = [m for m in metrics if m.kind == TaskKind.EVALUATE]
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
            TextColumn("[bold]rounds"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(), console=console,
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
        done = {m.site: m for m in metrics if m.kind == TaskKind.TRAIN and m.round == current}
        evals = [m for m in metrics if m.kind == TaskKind.EVALUATE]
        grid = Table.grid(padding=(0, 2))
        grid.add_row(f"[bold]round {current}[/]", f"status: {exp.status}")
        for site in sorted({m.site for m in metrics} | set(done)):
            rec = done.get(site)
            state = "[green]update received[/]" if rec else "[yellow]training…[/]"
            shown = ", ".join(f"{k}={v:.3f}" for k, v in sorted(rec.metrics.items())) if rec else ""
            grid.add_row(site, state, shown)
        if evals:
            last = max(m.round for m in evals)
            mean = weighted_mean([m for m in evals if m.round == last])
            grid.add_row(f"global model, round {last}", ", ".join(f"{k}={v:.3f}" for k, v in sorted(mean.items())))
        self._live.update(Group(self._progress, grid))
