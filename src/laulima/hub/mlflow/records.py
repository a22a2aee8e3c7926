"""What the hub logs to MLflow, derived from its database rows alone: keys, parameters and per-round points.

Apart from the exporter so that what a run holds is decided without MLflow, a thread or a
server: these functions read the database in the session they are given and return plain data.

*What is logged.* Parameters, once: the stored spec flattened (``rounds``, ``strategy.name``,
``config.lr``, ...), each value as ``str()`` like ``mlflow.log_params`` (lists as JSON). A
value over MLflow's 6000 characters is cut and a key over its 250 skipped, with a logged note;
characters MLflow refuses in a key become ``_``. Metrics, with step = round: per site
``<site>/<kind>/<metric>`` (kind ``train`` or ``evaluate``), and per round and kind the mean
over the sites weighted by their sample counts as ``<kind>/<metric>``
(:func:`laulima.core.crosssite.pooled`, the cross-site matrix's pooling). Only the per-round
records (:func:`laulima.core.crosssite.round_records`); the model-labelled records after
training form the cross-site matrix, which the hub serves. Each point carries the hub's own
time of the result (the task's ``finished_at``; for a mean, its latest record's), so a point
logged again is the same point. The run ends FINISHED, FAILED or KILLED when the experiment
completes, fails or is cancelled (tags ``laulima.status``, ``laulima.error``).

*A round is logged once, whole, when it is final*: closed, and no task of it (its training
or its evaluation, created with the round's checkpoint) still open, so its records can no
longer change. Rounds go in order, and the cursor is one number per experiment.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from laulima.core.crosssite import pooled, round_records
from laulima.core.protocol import CrossSiteCell, ExperimentStatus, MetricRecord, RoundStatus, TaskStatus
from laulima.hub.db import Experiment, Metric, MlflowExport, Round, Site, Task
from laulima.hub.ownership import owner_of
from laulima.hub.service import OPEN_TASK, algorithm_digest, metric_record

__all__ = [
    "Cursor",
    "Plan",
    "Point",
    "batches",
    "flatten_spec",
    "metric_key",
    "ms",
    "read_plan",
    "round_points",
    "run_key",
]

# MLflow's limits (mlflow/utils/validation.py), stable across 2.x and 3.x.
MAX_KEY_CHARS = 250
MAX_PARAM_CHARS = 6000
MAX_TAG_CHARS = 8000
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100

_REFUSED_KEY_CHARS = re.compile(r"[^\w.\- ]")
"""MLflow accepts alphanumerics, ``_ - . /``, spaces and (off Windows) ``:``; ``:`` is replaced
too, so the keys are the same whatever the server runs on. ``/`` separates the parts."""

Note = Callable[[int, str], None]
"""Where a note about one experiment goes (its id, the note): a key skipped, a value cut."""


def metric_key(*parts: str) -> str | None:
    """``parts`` joined by ``/`` as a key MLflow accepts (refused characters become ``_``,
    empty or dot-only path segments get a ``_`` before them); None when it is too long."""
    segments: list[str] = []
    for part in parts:
        for segment in part.split("/"):
            segment = _REFUSED_KEY_CHARS.sub("_", segment)
            segments.append("_" + segment if segment.strip(".") == "" else segment)
    key = "/".join(segments)
    return key if len(key) <= MAX_KEY_CHARS else None


def flatten_spec(spec: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, str]]:
    """A stored spec as ``(dotted key, value)`` pairs: nested tables flattened, scalars as
    ``str()`` (what ``mlflow.log_params`` writes), lists and empty tables as JSON."""
    for name, value in spec.items():
        key = f"{prefix}{name}"
        if isinstance(value, Mapping) and value:
            yield from flatten_spec(value, key + ".")
        elif isinstance(value, list | tuple | Mapping):
            yield key, json.dumps(value, sort_keys=True)
        else:
            yield key, str(value)


@dataclass(frozen=True)
class Point:
    key: str
    value: float
    timestamp: int
    """Milliseconds since the epoch, MLflow's unit."""
    step: int


@dataclass(frozen=True)
class Cursor:
    run_id: str | None = None
    params_done: bool = False
    rounds_done: int = 0
    finished: bool = False


@dataclass
class Plan:
    """What the database holds for one experiment beyond its cursor (read in one session)."""

    experiment_id: int
    name: str
    created_at: float
    finished_at: float | None
    status: ExperimentStatus
    error: str | None
    spec: dict[str, Any]
    tags: dict[str, str]
    cursor: Cursor
    rounds: list[tuple[int, list[Point]]]
    """The final rounds after the cursor, in order, with their points."""
    all_final: bool
    """No round after those is still open or waiting for a task."""


def ms(seconds: float) -> int:
    return int(round(seconds * 1000))


def run_key(exp: Experiment) -> str:
    return f"{exp.id}@{exp.created_at:.6f}"


def read_plan(s: Session, experiment_id: int, *, target: str, hub_url: str, note: Note) -> Plan | None:
    """What is left to export of one experiment to the tracking server ``target``; None if
    the experiment is gone."""
    exp = s.get(Experiment, experiment_id)
    if exp is None:
        return None
    row = s.get(MlflowExport, (experiment_id, target))
    cursor = Cursor(row.run_id, row.params_done, row.rounds_done, row.finished) if row is not None else Cursor()
    later = list(
        s.scalars(
            select(Round)
            .where(Round.experiment_id == experiment_id, Round.index > cursor.rounds_done)
            .order_by(Round.index)
        )
    )
    busy = set(
        s.scalars(
            select(Task.round)
            .where(
                Task.experiment_id == experiment_id,
                Task.round > cursor.rounds_done,
                Task.status.in_(OPEN_TASK),
                Task.model.is_(None),
            )
            .distinct()
        )
    )
    final: list[Round] = []
    ended = exp.status != ExperimentStatus.RUNNING  # an ended experiment's records no longer change
    for rnd in later:
        if not ended and (rnd.status == RoundStatus.OPEN or rnd.index in busy):
            break
        final.append(rnd)
    rounds = round_points(s, experiment_id, final, note=note) if final else []
    spec = json.loads(exp.spec_json)
    tags = {
        "laulima.experiment_id": str(exp.id),
        "laulima.run_key": run_key(exp),
        "laulima.owner": owner_of(exp),
        "laulima.mode": str(spec.get("mode") or "train"),
        "laulima.algorithm_digest": algorithm_digest(exp),
    }
    if hub_url:
        tags["laulima.hub"] = hub_url
    return Plan(
        experiment_id=exp.id,
        name=exp.name,
        created_at=exp.created_at,
        finished_at=exp.finished_at,
        status=ExperimentStatus(exp.status),
        error=exp.error,
        spec=spec,
        tags=tags,
        cursor=cursor,
        rounds=rounds,
        all_final=len(final) == len(later),
    )


def round_points(
    s: Session, experiment_id: int, final: Sequence[Round], *, note: Note
) -> list[tuple[int, list[Point]]]:
    """The points of the rounds ``final`` (consecutive, in order), by round index."""
    first, last = final[0].index, final[-1].index
    rows = s.scalars(
        select(Metric)
        .where(Metric.experiment_id == experiment_id, Metric.round >= first, Metric.round <= last)
        .order_by(Metric.round, Metric.kind, Metric.site, Metric.id)
    )
    records = round_records(metric_record(m) for m in rows)
    finished: dict[tuple[int, str, str], float] = {}
    for rnd, site, kind, at in s.execute(
        select(Task.round, Site.name, Task.kind, Task.finished_at)
        .join(Site, Site.id == Task.site_id)
        .where(
            Task.experiment_id == experiment_id,
            Task.round >= first,
            Task.round <= last,
            Task.status == TaskStatus.COMPLETED,
            Task.model.is_(None),
        )
    ):
        if at is not None:
            finished[(rnd, site, kind)] = min(at, finished.get((rnd, site, kind), at))
    groups: dict[tuple[int, str], list[MetricRecord]] = defaultdict(list)
    for record in records:
        groups[(record.round, str(record.kind))].append(record)
    by_round: dict[int, list[Point]] = {r.index: [] for r in final}
    fallback = {r.index: r.closed_at or r.started_at for r in final}
    for (rnd, kind), group in sorted(groups.items()):
        if rnd not in by_round:
            continue
        points = by_round[rnd]
        latest = 0
        for record in group:
            at = ms(finished.get((rnd, record.site, kind), fallback[rnd]))
            latest = max(latest, at)
            for name, value in record.metrics.items():
                key = metric_key(record.site, kind, name)
                if key is None:
                    note(experiment_id, f"metric {record.site}/{kind}/{name[:80]}... skipped: key too long")
                    continue
                points.append(Point(key, float(value), at, rnd))
        mean = pooled(CrossSiteCell(n_samples=r.n_samples, metrics=r.metrics) for r in group)
        for name, value in mean.metrics.items():
            key = metric_key(kind, name)
            if key is None:
                note(experiment_id, f"metric {kind}/{name[:80]}... skipped: key too long")
                continue
            points.append(Point(key, float(value), latest, rnd))
    return sorted(by_round.items())


def batches(rounds: list[tuple[int, list[Point]]]) -> Iterator[list[tuple[int, list[Point]]]]:
    """Whole rounds, as many as fit in one ``log_batch`` (a larger round is one batch of its own)."""
    batch: list[tuple[int, list[Point]]] = []
    size = 0
    for index, points in rounds:
        if batch and size + len(points) > MAX_METRICS_PER_BATCH:
            yield batch
            batch, size = [], 0
        batch.append((index, points))
        size += len(points)
    if batch:
        yield batch
