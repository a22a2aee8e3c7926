"""The cross-site matrix and its pooling (pure), and the spec rules of evaluate mode and cross-site."""

from __future__ import annotations

import pytest

from laulima.core.crosssite import cross_site_matrix, local_label, pooled, site_of_local
from laulima.core.protocol import CrossSiteCell, CrossSiteFailure, MetricRecord, TaskKind
from laulima.core.spec import parse_spec
from laulima.errors import SpecError

BASE = {"name": "x", "algorithm": "laulima.algorithms.identity:Identity", "dataset": "d"}


def rec(site: str, model: str | None, n: int, round_: int = 3, kind: TaskKind = TaskKind.EVALUATE, **m: float):
    return MetricRecord(round=round_, site=site, kind=kind, n_samples=n, metrics=m, model=model)


def test_pooled_is_the_sample_weighted_mean_per_metric_over_the_sites_reporting_it():
    cells = [
        CrossSiteCell(n_samples=10, metrics={"dice": 0.5, "loss": 1.0}),
        CrossSiteCell(n_samples=30, metrics={"dice": 0.9}),
    ]
    out = pooled(cells)
    assert out.n_samples == 40
    assert out.metrics["dice"] == pytest.approx(0.8)  # not the plain mean 0.7
    assert out.metrics["loss"] == 1.0  # only the site that reported it


def test_pooled_falls_back_to_the_plain_mean_when_no_samples_were_counted():
    out = pooled([CrossSiteCell(n_samples=0, metrics={"dice": 0.2}), CrossSiteCell(n_samples=0, metrics={"dice": 0.4})])
    assert out.metrics["dice"] == pytest.approx(0.3) and out.n_samples == 0


def test_the_matrix_takes_only_labelled_evaluations_of_its_round():
    records = [
        rec("b", "global", 30, dice=0.9),
        rec("a", "global", 10, dice=0.5),
        rec("a", local_label("a"), 10, dice=0.7),
        rec("a", None, 10, dice=0.1),  # an ordinary round's evaluation
        rec("a", "global", 10, round_=2, dice=0.1),  # another round
        rec("a", local_label("a"), 10, kind=TaskKind.TRAIN, loss=0.3),  # the local model's training
    ]
    failure = CrossSiteFailure(model="local:b", site="b", kind=TaskKind.TRAIN, reason="refused")
    m = cross_site_matrix(5, 3, records, failures=[failure], sites=["c"])
    assert m.models == ["global", "local:a"]  # local:b has no result: only in failures
    assert m.sites == ["a", "b", "c"] and list(m.cells["global"]) == ["a", "b"]
    assert m.pooled["global"].metrics["dice"] == pytest.approx(0.8)
    assert m.pooled["local:a"].n_samples == 10 and m.failures == [failure]
    assert site_of_local("local:a") == "a" and site_of_local("global") is None


def test_evaluate_mode_needs_no_rounds_and_refuses_training_settings():
    spec = parse_spec({**BASE, "mode": "evaluate", "min_sites": 2})
    assert spec.rounds == 0 and spec.final_index == 1 and spec.has_finale
    again = parse_spec(spec.model_dump(mode="json"))  # what the hub stores and re-reads
    assert again == spec
    for field, value in [("rounds", 2), ("local_epochs", 3), ("max_update_norm", 1.0), ("evaluation", {"every": 2})]:
        with pytest.raises(SpecError, match=rf"field '{field}': .*mode = 'evaluate'"):
            parse_spec({**BASE, "mode": "evaluate", field: value})


def test_a_training_spec_still_needs_a_round_and_local_models_need_cross_site():
    with pytest.raises(SpecError, match=r"field 'rounds': Field required"):
        parse_spec(BASE)
    with pytest.raises(SpecError, match=r"field 'rounds': Input should be greater than or equal to 1"):
        parse_spec({**BASE, "rounds": 0})
    with pytest.raises(SpecError, match=r"field 'evaluation.local_models': .*cross_site = true"):
        parse_spec({**BASE, "rounds": 2, "evaluation": {"local_models": True}})
    with pytest.raises(SpecError, match=r"field 'mode'"):
        parse_spec({**BASE, "rounds": 2, "mode": "predict"})
    spec = parse_spec({**BASE, "rounds": 4, "evaluation": {"cross_site": True, "local_models": True}})
    assert spec.final_index == 5 and spec.has_finale and not parse_spec({**BASE, "rounds": 4}).has_finale
