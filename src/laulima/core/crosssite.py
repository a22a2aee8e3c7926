"""The cross-site evaluation matrix: models x sites, and each model pooled over the sites.

Pure (no I/O): the hub serves it (``GET /experiments/{id}/cross-site``) and a client can
build the same matrix from an experiment's metric records, so both agree on how a model's
result at several hospitals is pooled.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from laulima.core.protocol import CrossSiteCell, CrossSiteFailure, CrossSiteMatrix, MetricRecord, TaskKind

__all__ = [
    "GLOBAL",
    "LOCAL_PREFIX",
    "MODEL",
    "cross_site_matrix",
    "local_label",
    "pooled",
    "round_records",
    "site_of_local",
]

GLOBAL = "global"
"""Label of the experiment's final global model."""
MODEL = "model"
"""Label of the model an evaluate-mode experiment scores."""
LOCAL_PREFIX = "local:"


def local_label(site: str) -> str:
    """The label of ``site``'s local-only model."""
    return f"{LOCAL_PREFIX}{site}"


def site_of_local(label: str) -> str | None:
    """The site whose local-only model ``label`` names, or None for another label."""
    return label[len(LOCAL_PREFIX) :] if label.startswith(LOCAL_PREFIX) else None


def round_records(records: Iterable[MetricRecord]) -> list[MetricRecord]:
    """The records of the training rounds and their per-round evaluations: every record not
    labelled by a model. Labelled ones (round ``rounds + 1``, or an evaluate-mode experiment's)
    form the cross-site matrix and belong in no per-round curve, table or log."""
    return [r for r in records if r.model is None]


def _model_order(label: str) -> tuple[int, str]:
    return (0, "") if label in (GLOBAL, MODEL) else (1, label)


def pooled(cells: Iterable[CrossSiteCell]) -> CrossSiteCell:
    """Per metric, the mean over the cells that report it, weighted by their ``n_samples``.

    Sample-weighted, so a model is judged as if all sites' test cases were one pool (what the
    demo's simulation computed by reading every site's data in one process); unweighted when
    the cells reporting a metric counted no samples at all. Non-finite values are skipped
    (the hub never stores them; a record from elsewhere might carry them)."""
    cells = list(cells)
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    plain: dict[str, list[float]] = {}
    for cell in cells:
        for name, value in cell.metrics.items():
            if not math.isfinite(value):
                continue
            sums[name] = sums.get(name, 0.0) + value * cell.n_samples
            weights[name] = weights.get(name, 0.0) + cell.n_samples
            plain.setdefault(name, []).append(value)
    metrics = {
        name: (sums[name] / weights[name]) if weights[name] > 0 else math.fsum(plain[name]) / len(plain[name])
        for name in sorted(plain)
    }
    return CrossSiteCell(n_samples=sum(c.n_samples for c in cells), metrics=metrics)


def cross_site_matrix(
    experiment_id: int,
    round_index: int,
    records: Iterable[MetricRecord],
    *,
    failures: Sequence[CrossSiteFailure] = (),
    sites: Sequence[str] = (),
    complete: bool = False,
) -> CrossSiteMatrix:
    """The matrix of the evaluation records of round ``round_index`` that carry a model label.

    ``sites``: columns to show even without a result (the participating sites); sites with
    results are added. Records of other rounds, training records and unlabelled records (the
    ordinary per-round evaluations) are ignored."""
    cells: dict[str, dict[str, CrossSiteCell]] = {}
    for r in records:
        if r.round != round_index or r.kind != TaskKind.EVALUATE or not r.model:
            continue
        cells.setdefault(r.model, {})[r.site] = CrossSiteCell(n_samples=r.n_samples, metrics=dict(r.metrics))
    models = sorted(cells, key=_model_order)  # a model with no result at all is only in ``failures``
    columns = sorted(set(sites) | {site for row in cells.values() for site in row})
    ordered = {m: {s: cells[m][s] for s in columns if s in cells.get(m, {})} for m in models}
    return CrossSiteMatrix(
        experiment_id=experiment_id,
        round=round_index,
        models=models,
        sites=columns,
        cells=ordered,
        pooled={m: pooled(row.values()) for m, row in ordered.items() if row},
        failures=list(failures),
        complete=complete,
    )
