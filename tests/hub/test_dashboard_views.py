"""What the dashboard's pages compute from the API's records (laulima.hub.ui.views)."""

from __future__ import annotations

import re

import pytest

from laulima.core.crosssite import cross_site_matrix
from laulima.core.privacy.messages import EPSILON_METRIC
from laulima.core.protocol import ExperimentPublic, MetricRecord, RoundPublic, TaskKind
from laulima.hub.ui import views


def record(rnd: int, site: str, kind: str, n: int, model: str | None = None, **metrics: float) -> MetricRecord:
    return MetricRecord(round=rnd, site=site, kind=TaskKind(kind), n_samples=n, metrics=metrics, model=model)


def test_one_chart_per_metric_with_a_line_per_site_and_their_case_weighted_mean() -> None:
    records = [
        record(1, "a", "evaluate", 1, dice_mean=0.2),
        record(1, "b", "evaluate", 3, dice_mean=0.6),
        record(2, "a", "evaluate", 1, dice_mean=0.4),
        record(1, "a", "train", 1, loss=1.0, steps=5.0),
        record(1, "a", "train", 1, **{EPSILON_METRIC: 0.5}),
        record(3, "a", "evaluate", 1, model="global", dice_mean=0.9),  # the cross-site matrix's: not a round
    ]
    charts = {c.id: c for c in views.charts(records)}
    assert list(charts) == ["chart-evaluate-dice-mean", "chart-train-loss", "chart-epsilon"]  # steps: bookkeeping
    dice = charts["chart-evaluate-dice-mean"]
    assert dice.columns == ["a", "b", views.MEAN]
    assert [(r.x, r.values) for r in dice.rows] == [(1, [0.2, 0.6, pytest.approx(0.5)]), (2, [0.4, None, 0.4])]
    assert 'data-points="5"' in str(dice.svg)
    assert charts["chart-train-loss"].columns == ["a"]  # one site: no mean line


def test_the_cross_site_view_shows_the_headline_metric_per_model_and_site_and_pooled() -> None:
    records = [
        record(4, "a", "evaluate", 2, model="global", dice_mean=0.8, loss=0.1),
        record(4, "b", "evaluate", 6, model="global", dice_mean=0.4, loss=0.2),
        record(4, "a", "evaluate", 2, model="local:a", dice_mean=0.9, loss=0.1),
    ]
    view = views.cross_site_view(cross_site_matrix(1, 4, records))
    assert view is not None and view.metric == "dice_mean" and view.sites == ["a", "b"]
    assert view.rows[0] == ("global", [0.8, 0.4], pytest.approx(0.5))
    assert view.rows[1] == ("local:a", [0.9, None], pytest.approx(0.9))
    assert view.chart is not None and 'data-bars="5"' in str(view.chart.svg)
    assert view.others == [("loss", [("global", [0.1, 0.2], pytest.approx(0.175)), ("local:a", [0.1, None], 0.1)])]


def test_the_model_card_carries_the_digest_the_sites_and_the_last_evaluation() -> None:
    experiment = ExperimentPublic(
        id=7,
        name="x",
        status="completed",
        rounds_done=2,
        rounds=2,
        created_at=0.0,
        finished_at=1.0,
        global_digest="ab" * 32,
        error=None,
        spec={"algorithm": "m:C", "strategy": {"name": "fedavg"}},
        owner="alice",
    )
    rounds = [
        RoundPublic(
            index=i,
            status="aggregated",
            sites=["a", "b"],
            n_updates=2,
            started_at=0,
            closed_at=1,
            global_digest="cd" * 32,
        )
        for i in (1, 2)
    ]
    records = [
        record(2, "a", "evaluate", 1, dice_mean=0.2),
        record(2, "b", "evaluate", 3, dice_mean=0.6),
        record(1, "a", "evaluate", 1, dice_mean=0.0),
    ]
    card = views.model_card(experiment, rounds, records)
    assert card["weights"]["sha256"] == "ab" * 32 and card["sites"] == ["a", "b"] and card["strategy"] == "fedavg"
    assert card["evaluation"]["round"] == 2
    assert card["evaluation"]["mean_weighted_by_cases"]["dice_mean"] == pytest.approx(0.5)
    assert card["privacy"]["settings"] is None and re.match(r"\d{4}-\d\d-\d\dT", card["created_at"])


def test_headline_metrics_training_and_epsilon_come_first_and_the_rest_waits_behind_a_summary() -> None:
    tumour = {"dice_mean": 0.5, "dice_wt": 0.6, "dice_tc": 0.5, "dice_et": 0.4, "hd95_mean": 9.0,
              "dice_enhancing_tumour": 0.4, "dice_edema": 0.6, "hd95_wt": 8.0}  # fmt: skip
    records = [
        record(1, "a", "evaluate", 1, **tumour),
        record(1, "a", "train", 1, loss=0.3, **{EPSILON_METRIC: 1.0}),
    ]
    charts = views.charts(records)
    primary = [c.id for c in charts if c.primary]
    assert primary == [
        "chart-evaluate-dice-mean", "chart-evaluate-dice-wt", "chart-evaluate-dice-tc", "chart-evaluate-dice-et",
        "chart-evaluate-hd95-mean", "chart-train-loss", "chart-epsilon",
    ]  # fmt: skip
    others = {c.id for c in charts if not c.primary}
    assert others == {"chart-evaluate-dice-enhancing-tumour", "chart-evaluate-dice-edema", "chart-evaluate-hd95-wt"}
    # two fields that read the same keep their field names
    titles = {c.id: c.title for c in charts}
    assert titles["chart-evaluate-dice-et"].startswith("Dice enhancing tumour (dice_et)")
    assert titles["chart-evaluate-dice-enhancing-tumour"].startswith("Dice enhancing tumour (dice_enhancing_tumour)")
