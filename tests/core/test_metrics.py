"""Metric rules, shared by evaluation results and update metadata: bounded, finite, sane names."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from laulima.core.metrics import MAX_METRICS, METRIC_NAME_MAX, METRIC_VALUE_MAX, checked_metrics
from laulima.core.protocol import N_SAMPLES_MAX, EvaluationResult, TaskFailure


def test_plain_metrics_pass_as_floats() -> None:
    metrics = {"loss": 0.25, "steps": 40, "dice_grey matter": 0.9, "dice/class-1": -1e15}
    assert checked_metrics(metrics) == {"loss": 0.25, "steps": 40.0, "dice_grey matter": 0.9, "dice/class-1": -1e15}
    assert checked_metrics({f"m{i}": i for i in range(MAX_METRICS)}) == {f"m{i}": float(i) for i in range(MAX_METRICS)}


@pytest.mark.parametrize(
    ("metrics", "message"),
    [
        ({"loss": float("nan")}, "metric 'loss' is nan; metric values must be finite"),
        ({"loss": float("inf")}, "metric 'loss' is inf"),
        ({"loss": -float("inf")}, "metric 'loss' is -inf"),
        ({"loss": 1e16}, "above 1e+15 in magnitude"),
        ({"loss": -(10**30)}, "above 1e+15 in magnitude"),
        ({"loss": "0.5"}, "metric values must be numbers"),
        ({"loss": True}, "metric values must be numbers"),
        ({"loss": None}, "metric values must be numbers"),
        ({"x" * (METRIC_NAME_MAX + 1): 1.0}, "names are 1 to 128 printable characters"),
        ({"": 1.0}, "metric name '' is not accepted"),
        ({" loss": 1.0}, "no space at either end"),
        ({"lo\nss": 1.0}, "is not accepted"),
        ({f"m{i}": 1.0 for i in range(MAX_METRICS + 1)}, f"{MAX_METRICS + 1} metrics reported; at most {MAX_METRICS}"),
        ([1.0], "metrics must be an object"),
    ],
)
def test_bad_metrics_are_refused_naming_the_entry(metrics: object, message: str) -> None:
    with pytest.raises(ValueError) as info:
        checked_metrics(metrics)
    assert message in str(info.value)


def test_evaluation_result_applies_the_metric_rules_and_bounds_n_samples() -> None:
    assert EvaluationResult(n_samples=N_SAMPLES_MAX, metrics={"dice": 0.5}).metrics == {"dice": 0.5}
    body = {"n_samples": 3, "metrics": {"dice": float("nan")}}
    with pytest.raises(ValidationError, match="metric 'dice' is nan"):
        EvaluationResult.model_validate(body)
    with pytest.raises(ValidationError, match="metric 'dice' is nan"):  # NaN as JSON spells it
        EvaluationResult.model_validate_json(json.dumps(body))
    with pytest.raises(ValidationError, match="metric 'dice' is inf"):
        EvaluationResult.model_validate_json('{"n_samples": 3, "metrics": {"dice": Infinity}}')
    with pytest.raises(ValidationError, match="less than or equal to 1000000000"):
        EvaluationResult.model_validate_json('{"n_samples": 1000000000000000000000000000000, "metrics": {}}')
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        EvaluationResult(n_samples=-1, metrics={})
    assert METRIC_VALUE_MAX == 1e15


def test_task_failure_reason_stays_bounded() -> None:
    assert TaskFailure(reason="x" * 4000).reason == "x" * 4000
    with pytest.raises(ValidationError, match="at most 4000 characters"):
        TaskFailure(reason="x" * 4001)
