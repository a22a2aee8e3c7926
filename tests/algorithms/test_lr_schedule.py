"""One learning-rate schedule for federated rounds, local-only models and baselines."""

from __future__ import annotations

import pytest

from laulima.algorithms.segmentation.model import learning_rate, parse_params
from laulima.errors import ConfigurationError, DataError
from laulima.site.taskdir import training_progress

PARAMS = {"in_channels": 1, "out_channels": 2, "lr": 0.01}


def test_constant_is_the_default_and_ignores_progress():
    p = parse_params(PARAMS)
    assert p.lr_schedule == "constant"
    assert learning_rate(p, (0.5, 0.75), 3, 10) == 0.01


def test_poly_decays_over_the_whole_training_as_nnunet_does():
    p = parse_params({**PARAMS, "lr_schedule": "poly"})
    assert learning_rate(p, (0.0, 1.0), 0, 100) == pytest.approx(0.01)
    assert learning_rate(p, (0.0, 1.0), 50, 100) == pytest.approx(0.01 * 0.5**0.9)
    assert learning_rate(p, (0.0, 1.0), 99, 100) == pytest.approx(0.01 * 0.01**0.9)


def test_a_federated_round_continues_the_schedule_where_the_last_one_stopped():
    """Round r of R covers ((r-1)/R, r/R): its steps get the rates a model trained in one go gets."""
    p = parse_params({**PARAMS, "lr_schedule": "poly"})
    rounds, steps = 4, 10
    whole = [learning_rate(p, (0.0, 1.0), i, rounds * steps) for i in range(rounds * steps)]
    by_round = [
        learning_rate(p, ((r - 1) / rounds, r / rounds), i, steps) for r in range(1, rounds + 1) for i in range(steps)
    ]
    assert by_round == pytest.approx(whole)


def test_an_unknown_schedule_is_refused_naming_the_field():
    with pytest.raises(ConfigurationError, match="lr_schedule"):
        parse_params({**PARAMS, "lr_schedule": "cosine-ish"})


def test_the_site_checks_the_progress_window_the_hub_sends():
    assert training_progress(None) == [0.0, 1.0]
    assert training_progress([0.25, 0.5]) == [0.25, 0.5]
    for bad in ([0.5, 0.25], [0.0, 2.0], [float("nan"), 1.0], "0,1", [0.1], [True, 1.0]):
        with pytest.raises(DataError, match="progress"):
            training_progress(bad)
