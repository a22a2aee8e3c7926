"""FedDC's handoff schedule and Krum / multi-Krum's selection, against hand-worked cases."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pytest

from laulima.core.spec import StrategySpec, parse_spec
from laulima.core.strategies import FedAvg, FedDC, FitResult, Krum, NotEnoughResults, Strategy, build_strategy
from laulima.core.strategies.feddc import derangement
from laulima.core.strategies.krum import krum_scores, pairwise_sq_distances
from laulima.core.weights import TensorSpec
from laulima.errors import ConfigurationError, SpecError

SITES = [f"site-{c}" for c in "abcdefg"]


# --------------------------------------------------------------------------- FedDC


def test_every_other_strategy_hands_nothing_on() -> None:
    for name in ("fedavg", "fedprox", "fedadam", "fedyogi", "fedmedian", "trimmed_mean", "krum"):
        strategy = build_strategy(StrategySpec(name=name), seed=3)  # type: ignore[arg-type]
        assert strategy.handoff(1, SITES) is None, name


def test_feddc_follows_the_papers_periods() -> None:
    dc = FedDC(daisy_period=2, aggregation_period=6, seed=5)
    plans = {r: dc.handoff(r, SITES[:4]) for r in range(1, 13)}
    for r, plan in plans.items():
        if r % 6 == 0:
            assert plan is None, f"round {r} aggregates"
        elif r % 2 == 0:
            assert plan is not None and all(receiver != sender for receiver, sender in plan.items()), r
        else:
            assert plan == {s: s for s in SITES[:4]}, f"round {r}: each site keeps its own model"


def test_feddc_permutation_is_a_reproducible_derangement() -> None:
    dc = FedDC(daisy_period=1, aggregation_period=1000, seed=42)
    for r in range(1, 60):
        plan = dc.handoff(r, SITES)
        assert plan is not None
        assert sorted(plan) == SITES and sorted(plan.values()) == SITES, "a permutation of the sites"
        assert all(receiver != sender for receiver, sender in plan.items()), "every model moves"
        again = FedDC(daisy_period=1, aggregation_period=1000, seed=42).handoff(r, list(reversed(SITES)))
        assert again == plan, "same seed, round and sites (in any order): same permutation"
    plans = [dc.handoff(r, SITES) for r in range(1, 30)]
    assert len({tuple(sorted(p.items())) for p in plans if p}) > 20, "rounds draw different permutations"
    other = FedDC(daisy_period=1, aggregation_period=1000, seed=43)
    assert any(other.handoff(r, SITES) != dc.handoff(r, SITES) for r in range(1, 10)), "the seed matters"


def test_feddc_with_two_sites_swaps_and_with_one_keeps_its_model() -> None:
    dc = FedDC(daisy_period=1, aggregation_period=4, seed=0)
    assert dc.handoff(1, ["b", "a"]) == {"a": "b", "b": "a"}
    assert dc.handoff(1, ["a"]) == {"a": "a"}
    assert dc.handoff(4, ["a", "b"]) is None
    assert dc.handoff(1, []) == {}


def test_derangements_are_uniform_enough() -> None:
    rng = np.random.default_rng(0)
    seen: dict[tuple[int, ...], int] = {}
    for _ in range(900):
        perm = tuple(derangement(3, rng))
        seen[perm] = seen.get(perm, 0) + 1
    assert set(seen) == {(1, 2, 0), (2, 0, 1)}, "3 elements have exactly two derangements"
    assert all(350 < n < 550 for n in seen.values())
    with pytest.raises(ValueError, match="at least 2"):
        derangement(1, rng)


def test_feddc_aggregates_like_fedavg() -> None:
    g = {"w": np.zeros(3, np.float32)}
    results = [
        FitResult("a", {"w": np.array([1, 2, 3], np.float32)}, 1),
        FitResult("b", {"w": np.array([5, 6, 7], np.float32)}, 3),
    ]
    np.testing.assert_array_equal(FedDC().aggregate(g, results)["w"], FedAvg().aggregate(g, results)["w"])
    np.testing.assert_allclose(FedDC().aggregate(g, results)["w"], [4, 5, 6])


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"daisy_period": 0}, "daisy_period"), ({"aggregation_period": 0}, "aggregation_period"), ({"seed": -1}, "seed")],
)
def test_feddc_refuses_bad_parameters(kwargs: dict[str, int], field: str) -> None:
    with pytest.raises(ConfigurationError, match=field):
        FedDC(**kwargs)


# --------------------------------------------------------------------------- Krum


class Lazy(Mapping[str, np.ndarray]):
    """A lazy weight set that records every read, like the hub's files."""

    def __init__(self, arrays: dict[str, np.ndarray], log: list[tuple[str, str]], site: str) -> None:
        self._arrays, self._log, self._site = arrays, log, site
        self.schema = {k: TensorSpec(a.shape, a.dtype.name) for k, a in arrays.items()}

    def __getitem__(self, key: str) -> np.ndarray:
        self._log.append((self._site, key))
        return self._arrays[key].copy()

    def __iter__(self) -> Iterator[str]:
        return iter(self._arrays)

    def __len__(self) -> int:
        return len(self._arrays)


def honest_and_byzantine(n_honest: int, n_bad: int, seed: int = 0) -> tuple[dict[str, np.ndarray], list[FitResult]]:
    """Honest updates near 1.0; Byzantine ones huge or poisoned (sign-flipped, far)."""
    rng = np.random.default_rng(seed)
    g = {"w": np.zeros((4, 5), np.float32), "b": np.zeros(3, np.float32)}
    results = []
    for i in range(n_honest):
        w = {k: (1.0 + 0.01 * rng.standard_normal(a.shape)).astype(np.float32) for k, a in g.items()}
        results.append(FitResult(f"honest-{i}", w, 10))
    for i in range(n_bad):
        scale = 1e30 if i % 2 == 0 else -50.0
        w = {k: np.full(a.shape, scale, np.float32) for k, a in g.items()}
        results.append(FitResult(f"evil-{i}", w, 10**6))  # claims many samples: buys nothing
    results.sort(key=lambda r: r.site)
    return g, results


def test_krum_picks_an_honest_update_despite_f_attackers() -> None:
    g, results = honest_and_byzantine(n_honest=5, n_bad=2)
    krum = Krum(f=2)
    chosen = krum.selected(g, results)
    assert len(chosen) == 1 and chosen[0].startswith("honest-")
    out = krum.aggregate(g, results)
    picked = next(r for r in results if r.site == chosen[0])
    for key in g:
        np.testing.assert_array_equal(out[key], picked.weights[key])  # Krum returns that update as is
        assert out[key].dtype == np.float32


def test_multi_krum_averages_the_m_best_unweighted() -> None:
    g, results = honest_and_byzantine(n_honest=5, n_bad=2, seed=1)
    krum = Krum(f=2, m=4)
    chosen = krum.selected(g, results)
    assert len(chosen) == 4 and all(s.startswith("honest-") for s in chosen)
    out = krum.aggregate(g, results)
    for key in g:
        expected = np.mean([np.float64(r.weights[key]) for r in results if r.site in chosen], axis=0)
        np.testing.assert_allclose(out[key], expected, rtol=1e-6)


def test_krum_score_is_the_sum_over_the_n_minus_f_minus_2_nearest() -> None:
    # Five points on a line: 0, 1, 2, 3, 10. n = 5, f = 1: sum of the 2 nearest squared distances.
    g = {"x": np.zeros(1, np.float32)}
    results = [FitResult(f"s{i}", {"x": np.array([v], np.float32)}, 1) for i, v in enumerate([0, 1, 2, 3, 10])]
    dist = pairwise_sq_distances("krum", {"x": TensorSpec((1,), "float32")}, results)
    assert dist[0, 4] == 100 and dist[4, 0] == 100 and np.all(np.diag(dist) == 0)
    np.testing.assert_array_equal(krum_scores(dist, f=1), [1 + 4, 1 + 1, 1 + 1, 1 + 4, 49 + 64])
    assert Krum(f=1).selected(g, results) == ["s1"], "ties go to the site first in name order"
    assert Krum(f=1, m=2).selected(g, results) == ["s1", "s2"]


def test_krum_reads_one_tensor_of_every_site_at_a_time() -> None:
    log: list[tuple[str, str]] = []
    g = {"a": np.zeros(2, np.float32), "b": np.zeros(2, np.float32)}
    results = [
        FitResult(s, Lazy({k: np.full(2, i, np.float32) for k in g}, log, s), 1) for i, s in enumerate(SITES[:5])
    ]
    Krum(f=1).aggregate(g, results)
    distance_pass = log[:10]
    assert [k for _, k in distance_pass] == ["a"] * 5 + ["b"] * 5, "key by key, never whole models"
    assert len(log) == 10 + 2, "then only the chosen update is read again"


def test_krum_refuses_fewer_than_2f_plus_3_results() -> None:
    g, results = honest_and_byzantine(n_honest=4, n_bad=2)
    with pytest.raises(NotEnoughResults, match=r"6 result\(s\).*krum_f = 2.*at least 7.*min_sites"):
        Krum(f=2).aggregate(g, results)
    with pytest.raises(NotEnoughResults, match="at least 7"):
        Krum(f=1, m=6).aggregate(g, results)  # m + f = 7 > 6: a Byzantine update would be averaged


@pytest.mark.parametrize(("kwargs", "field"), [({"f": -1}, "krum_f"), ({"m": 0}, "krum_m"), ({"f": True}, "krum_f")])
def test_krum_refuses_bad_parameters(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigurationError, match=field):
        Krum(**kwargs)


# --------------------------------------------------------------------------- the spec


def spec_with(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"name": "x", "algorithm": "laulima.algorithms.identity:Identity", "dataset": "d"}
    return {"rounds": 3, **base, **fields}


def test_spec_defaults_and_bounds() -> None:
    s = StrategySpec()
    assert (s.daisy_period, s.aggregation_period, s.krum_f, s.krum_m) == (1, 4, 1, 1)
    spec = parse_spec(spec_with(strategy={"name": "feddc", "daisy_period": 2, "aggregation_period": 10}))
    assert isinstance(build_strategy(spec.strategy, seed=spec.seed), FedDC)
    spec = parse_spec(spec_with(min_sites=7, strategy={"name": "krum", "krum_f": 2, "krum_m": 3}))
    assert isinstance(build_strategy(spec.strategy), Krum)


@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        ({"strategy": {"name": "krum"}}, "min_sites", "min_sites = 1, but strategy krum with krum_f = 1"),
        ({"min_sites": 6, "strategy": {"name": "krum", "krum_f": 2}}, "min_sites", "needs at least 7"),
        ({"min_sites": 5, "strategy": {"name": "krum", "krum_m": 5}}, "min_sites", "needs at least 6"),
        ({"strategy": {"name": "feddc", "daisy_period": 4}}, "strategy.daisy_period", "not below aggregation_period"),
        ({"strategy": {"name": "feddc", "aggregation_period": 1}}, "strategy.aggregation_period", "greater than"),
        ({"strategy": {"name": "feddc", "daisy_period": 0}}, "strategy.daisy_period", "greater than"),
        ({"strategy": {"name": "krum", "krum_m": 0}}, "strategy.krum_m", "greater than"),
        ({"strategy": {"name": "krum", "krum_f": -1}}, "strategy.krum_f", "greater than"),
    ],
)
def test_spec_refuses_what_cannot_work(fields: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(SpecError, match=f"field '{field}'.*{words}"):
        parse_spec(spec_with(**fields))


def test_handoff_is_part_of_the_interface() -> None:
    assert Strategy.handoff.__doc__ and "receiver -> sender" in Strategy.handoff.__doc__
