"""The spec's [privacy] and [secure_aggregation] tables, the threshold and noise each task
carries, and when a secure-aggregation phase closes."""

from __future__ import annotations

import math

import pytest

from laulima.core.privacy.accountant import GaussianRelease, epsilon
from laulima.core.privacy.phases import PhaseView, decide_phase
from laulima.core.privacy.tasks import NOISE_TAIL, secure_threshold, task_privacy, task_secure_aggregation
from laulima.core.spec import parse_spec, with_calibrated_noise
from laulima.errors import SpecError


def _spec(**extra):
    base = {"name": "p", "algorithm": "laulima.algorithms.identity:Identity", "dataset": "d", "rounds": 10}
    return parse_spec({**base, **extra})


def test_target_epsilon_is_calibrated_into_a_noise_multiplier_that_meets_it():
    spec = with_calibrated_noise(_spec(privacy={"clip": 1.0, "target_epsilon": 3.0, "delta": 1e-5}))
    sigma = spec.privacy.noise_multiplier
    assert epsilon([GaussianRelease(sigma, count=10)], 1e-5) <= 3.0
    assert epsilon([GaussianRelease(sigma * 0.97, count=10)], 1e-5) > 3.0, "the smallest noise that meets it"
    given = _spec(privacy={"clip": 1.0, "noise_multiplier": 1.3})
    assert with_calibrated_noise(given) is given


@pytest.mark.parametrize(
    ("extra", "field", "words"),
    [
        ({"privacy": {"clip": 1.0}}, "privacy.noise_multiplier", "target_epsilon"),
        ({"privacy": {"clip": 1.0, "noise_multiplier": 1, "mode": "distributed"}}, "privacy.mode", "secure"),
        ({"secure_aggregation": {}, "min_sites": 2}, "secure_aggregation.clip", "L2 bound"),
        ({"secure_aggregation": {"clip": 1}, "min_sites": 5, "strategy": {"name": "krum"}}, "strategy.name", "sum"),
        ({"secure_aggregation": {"clip": 1}}, "min_sites", "at least 2"),
        (
            {"privacy": {"clip": 1, "noise_multiplier": 1}, "evaluation": {"cross_site": True, "local_models": True}},
            "evaluation.local_models",
            "without clipping",
        ),
        ({"privacy": {"clip": 1, "noise_multiplier": 1, "delta": 0.5}}, "privacy.delta", ""),
        ({"privacy": {"clip": -1, "noise_multiplier": 1}}, "privacy.clip", ""),
    ],
)
def test_privacy_tables_that_cannot_work_are_refused_naming_the_field(extra, field, words):
    with pytest.raises(SpecError) as err:
        _spec(**extra)
    assert f"field '{field}'" in str(err.value) and words in str(err.value)


def test_untrained_modes_take_no_privacy_table():
    with pytest.raises(SpecError, match="field 'privacy'"):
        _spec(mode="evaluate", rounds=0, privacy={"clip": 1.0, "noise_multiplier": 1.0})


@pytest.mark.parametrize(
    ("n", "max_dropouts", "threshold"), [(2, None, 2), (3, None, 2), (10, None, 6), (10, 2, 8), (10, 9, 6)]
)
def test_the_threshold_is_a_strict_majority_lowered_only_by_max_dropouts(n, max_dropouts, threshold):
    assert secure_threshold(n, max_dropouts) == threshold
    assert threshold > n / 2


def test_distributed_noise_is_shared_so_the_unmaskable_sum_carries_all_of_it():
    spec = _spec(
        min_sites=2,
        privacy={"clip": 2.0, "noise_multiplier": 1.5, "mode": "distributed"},
        secure_aggregation={},
    )
    config = task_secure_aggregation(spec, n_sites=5, max_weight=40)
    privacy = task_privacy(spec)
    assert config is not None and privacy is not None
    assert config.threshold == 3 and config.max_weight == 1, "under DP every site weighs 1"
    share = 1.5 * 2.0 / math.sqrt(3)
    assert config.bound == pytest.approx(2.0 + NOISE_TAIL * share)
    assert 3 * share**2 == pytest.approx((1.5 * 2.0) ** 2), "threshold shares add up to the full variance"


def test_without_dp_a_site_weighs_its_samples_up_to_the_cap():
    spec = _spec(min_sites=2, secure_aggregation={"clip": 3.0})
    config = task_secure_aggregation(spec, n_sites=4, max_weight=25)
    assert config is not None and (config.max_weight, config.bound, config.threshold) == (25, 75.0, 3)


def _view(**kw):
    base = dict(
        phase="shares",
        expected=frozenset("abcd"),
        arrived=frozenset(),
        failed=frozenset(),
        threshold=3,
        now=10.0,
        closes_at=20.0,
    )
    return PhaseView(**{**base, **kw})


def test_a_phase_waits_advances_or_aborts():
    assert decide_phase(_view(arrived=frozenset("abc"))).action == "wait"
    done = decide_phase(_view(arrived=frozenset("abc"), failed=frozenset("d")))
    assert (done.action, done.members) == ("advance", frozenset("abc"))
    late = decide_phase(_view(arrived=frozenset("abc"), now=20.0))
    assert (late.action, late.members) == ("advance", frozenset("abc"))
    short = decide_phase(_view(arrived=frozenset("ab"), now=20.0))
    assert (
        short.action == "abort" and "2 of 4 sites sent their shares" in short.reason and "missing: c, d" in short.reason
    )
    hopeless = decide_phase(_view(failed=frozenset("ab")))
    assert hopeless.action == "abort" and "only 2 of 4 sites can still take part" in hopeless.reason
