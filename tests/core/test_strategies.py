"""Aggregation strategies against hand-computed numbers and plain numpy references."""

from __future__ import annotations

import statistics
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pytest

import laulima.core.strategies as strategies
from laulima.core.spec import StrategySpec
from laulima.core.strategies import (
    FedAdam,
    FedAvg,
    FedDC,
    FedMedian,
    FedProx,
    FedYogi,
    FitResult,
    Krum,
    Strategy,
    TrimmedMean,
    build_strategy,
)
from laulima.core.strategies._checks import check_aggregation
from laulima.core.strategies._fold import weighted_mean_into
from laulima.core.strategies.fedavg import weighted_means
from laulima.core.weights import TensorSpec, check_weights_finite, from_safetensors, schema_of, to_safetensors
from laulima.errors import ConfigurationError, DataError, WeightsError

# --------------------------------------------------------------------------- helpers


class CountingMapping(Mapping[str, np.ndarray]):
    """A lazy weight set: counts every tensor read, like the hub's memory-mapped files."""

    def __init__(self, arrays: dict[str, np.ndarray], *, declare_schema: bool = True) -> None:
        self._arrays = arrays
        self.reads: dict[str, int] = dict.fromkeys(arrays, 0)
        if declare_schema:
            self.schema = {k: TensorSpec(a.shape, a.dtype.name) for k, a in arrays.items()}

    def __getitem__(self, key: str) -> np.ndarray:
        self.reads[key] += 1
        return self._arrays[key].copy()  # a fresh array per read, as a file-backed load would be

    def __iter__(self) -> Iterator[str]:
        return iter(self._arrays)

    def __len__(self) -> int:
        return len(self._arrays)


def two_sites() -> tuple[dict[str, np.ndarray], list[FitResult]]:
    """Site a (1 sample) and site b (3 samples): FedAvg weighs them 1/4 and 3/4."""
    global_weights: dict[str, np.ndarray] = {
        "w": np.zeros(2, np.float32),
        "b": np.zeros(1, np.float32),
        "h": np.zeros(2, np.float16),
        "num_batches_tracked": np.zeros((), np.int64),
    }
    a: dict[str, np.ndarray] = {
        "w": np.array([1.0, 2.0], np.float32),
        "b": np.array([4.0], np.float32),
        "h": np.array([1.0, 2.0], np.float16),
        "num_batches_tracked": np.array(10, np.int64),
    }
    b: dict[str, np.ndarray] = {
        "w": np.array([5.0, 6.0], np.float32),
        "b": np.array([0.0], np.float32),
        "h": np.array([3.0, 2.0], np.float16),
        "num_batches_tracked": np.array(30, np.int64),
    }
    return global_weights, [FitResult("a", a, 1), FitResult("b", b, 3)]


def random_round(
    rng: np.random.Generator, n_sites: int, dtype: type = np.float32
) -> tuple[dict[str, np.ndarray], list[FitResult]]:
    shapes: dict[str, tuple[int, ...]] = {"conv.weight": (8, 4, 3, 3), "conv.bias": (8,), "fc": (33, 17), "scale": ()}
    global_weights: dict[str, np.ndarray] = {k: np.asarray(rng.standard_normal(s), dtype) for k, s in shapes.items()}
    results = [
        FitResult(
            f"site{i}",
            {k: np.asarray(global_weights[k] + rng.standard_normal(s), dtype) for k, s in shapes.items()},
            int(rng.integers(1, 500)),
        )
        for i in range(n_sites)
    ]
    return global_weights, results


def read_only(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    for a in weights.values():
        a.setflags(write=False)
    return weights


# --------------------------------------------------------------------------- FedAvg


def test_fedavg_hand_computed() -> None:
    global_weights, results = two_sites()
    new = FedAvg().aggregate(global_weights, results)
    # w: 1/4 * [1, 2] + 3/4 * [5, 6] = [4, 5];  b: 1/4 * 4 + 3/4 * 0 = 1
    np.testing.assert_allclose(new["w"], [4.0, 5.0], rtol=1e-6)
    np.testing.assert_allclose(new["b"], [1.0], rtol=1e-6)
    # float16 averages in float64: 1/4 * [1, 2] + 3/4 * [3, 2] = [2.5, 2]
    np.testing.assert_array_equal(new["h"], np.array([2.5, 2.0], np.float16))
    # integers: 1/4 * 10 + 3/4 * 30 = 25
    assert new["num_batches_tracked"] == 25
    assert {k: v.dtype for k, v in new.items()} == {k: v.dtype for k, v in global_weights.items()}
    assert {k: v.shape for k, v in new.items()} == {k: v.shape for k, v in global_weights.items()}


def test_fedavg_integer_mean_rounds_half_to_even() -> None:
    g = {"n": np.zeros((), np.int64)}
    results = [FitResult("a", {"n": np.array(10)}, 1), FitResult("b", {"n": np.array(20)}, 3)]
    assert FedAvg().aggregate(g, results)["n"] == 18  # 1/4 * 10 + 3/4 * 20 = 17.5 -> 18


def test_fedavg_single_site_is_its_model() -> None:
    global_weights, results = two_sites()
    new = FedAvg().aggregate(global_weights, results[:1])
    for key, array in results[0].weights.items():
        np.testing.assert_array_equal(new[key], array)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_fedavg_matches_numpy_average(dtype: type) -> None:
    rng = np.random.default_rng(1)
    global_weights, results = random_round(rng, 7, dtype)
    new = FedAvg().aggregate(global_weights, results)
    counts = [r.n_samples for r in results]
    rtol = {"float16": 1e-3, "float32": 1e-5, "float64": 1e-12}[np.dtype(dtype).name]
    for key in global_weights:
        stack = np.stack([np.asarray(r.weights[key], np.float64) for r in results])
        expected = np.average(stack, axis=0, weights=counts)
        assert new[key].dtype == np.dtype(dtype)
        np.testing.assert_allclose(new[key].astype(np.float64), expected, rtol=rtol, atol=rtol)


def test_fedavg_equal_counts_is_plain_mean() -> None:
    rng = np.random.default_rng(2)
    global_weights, results = random_round(rng, 4)
    results = [FitResult(r.site, r.weights, 10) for r in results]
    new = FedAvg().aggregate(global_weights, results)
    for key in global_weights:
        expected = np.mean([np.asarray(r.weights[key], np.float64) for r in results], axis=0)
        np.testing.assert_allclose(new[key], expected, rtol=1e-5, atol=1e-6)


def test_fedavg_does_not_modify_its_inputs() -> None:
    rng = np.random.default_rng(3)
    global_weights, results = random_round(rng, 3)
    read_only(global_weights)
    for r in results:
        read_only(dict(r.weights))
    before = [{k: a.copy() for k, a in r.weights.items()} for r in results]
    FedAvg().aggregate(global_weights, results)
    for r, saved in zip(results, before, strict=True):
        for k in saved:
            np.testing.assert_array_equal(r.weights[k], saved[k])


def test_fedavg_reads_each_lazy_tensor_once() -> None:
    rng = np.random.default_rng(4)
    global_weights, plain = random_round(rng, 5)
    lazy = [FitResult(r.site, CountingMapping(dict(r.weights)), r.n_samples) for r in plain]
    new = FedAvg().aggregate(global_weights, lazy)
    for r in lazy:
        assert isinstance(r.weights, CountingMapping)
        assert r.weights.reads == dict.fromkeys(global_weights, 1)
    expected = FedAvg().aggregate(global_weights, plain)
    for key in global_weights:
        np.testing.assert_array_equal(new[key], expected[key])


def test_fedavg_lazy_mapping_without_schema_still_works() -> None:
    rng = np.random.default_rng(5)
    global_weights, plain = random_round(rng, 3)
    lazy = [FitResult(r.site, CountingMapping(dict(r.weights), declare_schema=False), r.n_samples) for r in plain]
    new = FedAvg().aggregate(global_weights, lazy)
    expected = FedAvg().aggregate(global_weights, plain)
    for key in global_weights:
        np.testing.assert_array_equal(new[key], expected[key])
    # Without a declared schema the checks look at each tensor once more (documented).
    for r in lazy:
        assert isinstance(r.weights, CountingMapping)
        assert set(r.weights.reads.values()) == {2}


def test_lazy_mapping_whose_schema_lies_is_refused_when_read() -> None:
    global_weights, results = two_sites()
    liar = CountingMapping(dict(results[1].weights))
    liar._arrays["w"] = np.zeros(3, np.float32)  # declared schema still says shape (2,)
    with pytest.raises(WeightsError, match=r"site 'b'.*'w' read as shape \[3\]"):
        FedAvg().aggregate(global_weights, [results[0], FitResult("b", liar, 3)])


def test_weighted_means_identical_for_any_number_of_workers() -> None:
    rng = np.random.default_rng(6)
    global_weights, results = random_round(rng, 9)
    schema = check_aggregation("fedavg", global_weights, results)
    one = dict(weighted_means("fedavg", schema, results, workers=1))
    for workers in (2, 3):
        many = dict(weighted_means("fedavg", schema, results, workers=workers))
        assert list(many) == list(one)
        for key in one:
            np.testing.assert_array_equal(many[key], one[key])


@pytest.mark.parametrize("counts", [[1, 1_000_000, 1, 3], [1_000_000, 1, 999_999, 2], list(range(1, 61))])
def test_weighted_mean_kernel_extreme_and_many_counts(counts: list[int]) -> None:
    """The Horner form rescales by n_prev / n: huge ratios neither overflow nor lose accuracy."""
    rng = np.random.default_rng(len(counts))
    tensors = [rng.standard_normal(1000).astype(np.float32) for _ in counts]
    out = np.empty(1000, np.float32)
    weighted_mean_into(out, iter(tensors), counts, chunk=256)
    expected = np.average(np.stack(tensors).astype(np.float64), axis=0, weights=counts)
    np.testing.assert_allclose(out, expected, rtol=2e-5, atol=2e-6)


def test_weighted_mean_kernel_chunks_and_casts() -> None:
    rng = np.random.default_rng(7)
    tensors = [rng.standard_normal((5, 7)).astype(np.float16) for _ in range(4)]
    tensors[2] = np.asfortranarray(tensors[2])  # not C-contiguous: must still work
    counts = [3, 1, 4, 1]
    out = np.empty((5, 7), np.float32)
    weighted_mean_into(out, iter(tensors), counts, chunk=4)  # 35 elements in chunks of 4
    expected = np.average(np.stack(tensors).astype(np.float64), axis=0, weights=counts)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="at least one tensor"):
        weighted_mean_into(out, iter([]), [])


# --------------------------------------------------------------------------- FedProx


def test_fedprox_aggregates_like_fedavg_and_sends_mu() -> None:
    global_weights, results = two_sites()
    prox = FedProx(proximal_mu=0.05)
    assert prox.fit_config(3) == {"proximal_mu": 0.05}
    assert FedAvg().fit_config(3) == {}
    new, avg = prox.aggregate(global_weights, results), FedAvg().aggregate(global_weights, results)
    for key in avg:
        np.testing.assert_array_equal(new[key], avg[key])


# --------------------------------------------------------------------------- FedAdam / FedYogi


def opt_round(x: float, value_a: float, value_b: float) -> tuple[dict[str, np.ndarray], list[FitResult]]:
    g = {"x": np.array([x]), "n": np.array([7], np.int64)}
    results = [
        FitResult("a", {"x": np.array([value_a]), "n": np.array([8], np.int64)}, 1),
        FitResult("b", {"x": np.array([value_b]), "n": np.array([12], np.int64)}, 3),
    ]
    return g, results


# Two rounds from x = 1 with eta 0.1, beta_1 0.9, beta_2 0.99, tau 1e-3, m = 0, v = tau^2.
# Round 1: sites send 2 (1 sample) and 4 (3 samples): mean 3.5, delta 2.5, m 0.25.
#   Adam: v = 0.99e-6 + 0.01 * 6.25        = 0.06250099; x = 1 + 0.1 * 0.25 / (sqrt(v) + 1e-3)
#   Yogi: v = 1e-6 - 0.01 * 6.25 * sign(-) = 0.06250100
# Round 2: sites send 1 and 2: mean 1.75, delta = 1.75 - x1.
EXPECTED = {
    "fedadam": [1.0996008079329929, 1.2119709471526927],
    "fedyogi": [1.0996007999968, 1.2114454929989988],
}


@pytest.mark.parametrize("cls", [FedAdam, FedYogi])
def test_fedopt_hand_computed_two_rounds(cls: type[FedAdam] | type[FedYogi]) -> None:
    strategy = cls(server_lr=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3)
    g, results = opt_round(1.0, 2.0, 4.0)
    x1 = strategy.aggregate(g, results)
    np.testing.assert_allclose(x1["x"], [EXPECTED[cls.name][0]], rtol=1e-13)
    assert x1["n"].tolist() == [11]  # integer buffers take FedAvg's rounded mean: 2 + 9
    np.testing.assert_allclose(strategy.state_dict()["m/x"], [0.25], rtol=1e-13)
    g, results = opt_round(float(x1["x"][0]), 1.0, 2.0)
    x2 = strategy.aggregate(g, results)
    np.testing.assert_allclose(x2["x"], [EXPECTED[cls.name][1]], rtol=1e-13)
    assert sorted(strategy.state_dict()) == ["m/x", "v/x"]


def numpy_fedopt(
    kind: str, x: np.ndarray, mean: np.ndarray, m: np.ndarray, v: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    eta, b1, b2, tau = 0.05, 0.8, 0.95, 1e-2
    delta = mean - x
    m = b1 * m + (1 - b1) * delta
    if kind == "fedadam":
        v = b2 * v + (1 - b2) * delta**2
    else:
        v = v - (1 - b2) * delta**2 * np.sign(v - delta**2)
    return x + eta * m / (np.sqrt(v) + tau), m, v


@pytest.mark.parametrize("cls", [FedAdam, FedYogi])
def test_fedopt_matches_numpy_reference(cls: type[FedAdam] | type[FedYogi]) -> None:
    rng = np.random.default_rng(8)
    strategy = cls(server_lr=0.05, beta_1=0.8, beta_2=0.95, tau=1e-2)
    global_weights, _ = random_round(rng, 1, np.float64)
    m = {k: np.zeros_like(a) for k, a in global_weights.items()}
    v = {k: np.full_like(a, 1e-4) for k, a in global_weights.items()}
    for _ in range(3):
        _, results = random_round(rng, 4, np.float64)
        new = strategy.aggregate(global_weights, results)
        counts = [r.n_samples for r in results]
        for key, x in global_weights.items():
            mean = np.average(np.stack([r.weights[key] for r in results]), axis=0, weights=counts)
            expected, m[key], v[key] = numpy_fedopt(cls.name, x, mean, m[key], v[key])
            np.testing.assert_allclose(new[key], expected, rtol=1e-9, atol=1e-12)
        global_weights = new


@pytest.mark.parametrize("cls", [FedAdam, FedYogi])
def test_fedopt_state_round_trip_continues_bit_identically(cls: type[FedAdam] | type[FedYogi]) -> None:
    rng = np.random.default_rng(9)
    global_weights, round1 = random_round(rng, 3)
    _, round2 = random_round(rng, 3)
    running = cls()
    g1 = running.aggregate(global_weights, round1)
    saved = to_safetensors(running.state_dict())  # what the hub checkpoints

    restarted = cls()
    restarted.load_state_dict(from_safetensors(saved))
    assert set(restarted.state_dict()) == {f"{p}/{k}" for p in "mv" for k in global_weights}
    a, b = running.aggregate(g1, round2), restarted.aggregate(g1, round2)
    for key in a:
        assert a[key].dtype == np.float32
        np.testing.assert_array_equal(a[key], b[key])
    for key, array in running.state_dict().items():
        np.testing.assert_array_equal(restarted.state_dict()[key], array)


def test_fedopt_state_dict_is_a_copy() -> None:
    global_weights, results = opt_round(1.0, 2.0, 4.0)
    strategy = FedAdam()
    strategy.aggregate(global_weights, results)
    state = strategy.state_dict()
    state["m/x"][:] = 123.0
    assert strategy.state_dict()["m/x"][0] != 123.0


def test_fedopt_refuses_malformed_state() -> None:
    strategy = FedAdam()
    with pytest.raises(WeightsError, match="neither 'm/<tensor>' nor 'v/<tensor>'"):
        strategy.load_state_dict({"x": np.zeros(1)})
    with pytest.raises(WeightsError, match="only one of 'm/x' and 'v/x'"):
        strategy.load_state_dict({"m/x": np.zeros(1)})
    with pytest.raises(WeightsError, match="differ in shape"):
        strategy.load_state_dict({"m/x": np.zeros(1), "v/x": np.zeros(2)})
    with pytest.raises(WeightsError, match="not a float array"):
        strategy.load_state_dict({"m/x": np.zeros(1, np.int64), "v/x": np.zeros(1, np.int64)})


def test_fedopt_refuses_state_of_another_model_and_keeps_it() -> None:
    global_weights, results = opt_round(1.0, 2.0, 4.0)
    strategy = FedYogi()
    strategy.load_state_dict({"m/y": np.zeros(1), "v/y": np.ones(1)})
    with pytest.raises(WeightsError, match="state belongs to another model"):
        strategy.aggregate(global_weights, results)
    strategy.load_state_dict({"m/x": np.zeros(2), "v/x": np.ones(2)})
    with pytest.raises(WeightsError, match=r"state for 'x' is float64\[2\], expected float64\[1\]"):
        strategy.aggregate(global_weights, results)
    assert sorted(strategy.state_dict()) == ["m/x", "v/x"]


def test_fedopt_failed_round_leaves_state_unchanged() -> None:
    global_weights, results = opt_round(1.0, 2.0, 4.0)
    strategy = FedAdam()
    strategy.aggregate(global_weights, results)
    before = strategy.state_dict()
    liar = CountingMapping(dict(results[1].weights))
    liar._arrays["x"] = np.zeros(1, np.float32)  # declared float64, reads as float32
    with pytest.raises(WeightsError, match="site 'b'"):
        strategy.aggregate(global_weights, [results[0], FitResult("b", liar, 3)])
    for key, array in strategy.state_dict().items():
        np.testing.assert_array_equal(array, before[key])


# --------------------------------------------------------------------------- robust strategies


def scalar_round(values: list[float], counts: list[int] | None = None) -> tuple[dict[str, np.ndarray], list[FitResult]]:
    counts = counts or [1] * len(values)
    g = {"x": np.zeros(1, np.float32), "n": np.zeros((), np.int32)}
    results = [
        FitResult(f"s{i}", {"x": np.array([v], np.float32), "n": np.array(int(v), np.int32)}, c)
        for i, (v, c) in enumerate(zip(values, counts, strict=True))
    ]
    return g, results


def test_fedmedian_hand_computed() -> None:
    g, results = scalar_round([1, 2, 3, 4, 100], counts=[1, 1, 1, 1, 10_000])
    new = FedMedian().aggregate(g, results)
    assert new["x"].tolist() == [3.0]  # unweighted: 10,000 samples buy site s4 nothing
    assert new["n"] == 3 and new["n"].dtype == np.int32
    g, results = scalar_round([1, 2, 3, 100])
    assert FedMedian().aggregate(g, results)["x"].tolist() == [2.5]


def test_trimmed_mean_hand_computed() -> None:
    g, results = scalar_round([1, 2, 3, 4, 100])
    # 0.2 * 5 = 1 value cut at each end: mean of [2, 3, 4] = 3
    assert TrimmedMean(0.2).aggregate(g, results)["x"].tolist() == [3.0]
    # 0.1 * 5 = 0.5 -> nothing cut: plain mean of all five = 22
    assert TrimmedMean(0.1).aggregate(g, results)["x"].tolist() == [22.0]
    # 0.3 * 10 = 3 (not 2.9999...): [10..100 step 10] minus 3 at each end = mean of 40..70 = 55
    g, results = scalar_round([10.0 * i for i in range(10, 0, -1)])
    assert TrimmedMean(0.3).trimmed(10) == 3
    assert TrimmedMean(0.3).aggregate(g, results)["x"].tolist() == [55.0]


@pytest.mark.parametrize("n_sites", [1, 2, 5, 8])
def test_robust_strategies_match_numpy(n_sites: int) -> None:
    rng = np.random.default_rng(10 + n_sites)
    global_weights, results = random_round(rng, n_sites)
    median = FedMedian().aggregate(global_weights, results)
    trim = TrimmedMean(0.25)
    trimmed = trim.aggregate(global_weights, results)
    k = trim.trimmed(n_sites)
    for key in global_weights:
        stack = np.stack([r.weights[key] for r in results]).astype(np.float64)
        np.testing.assert_allclose(median[key], np.median(stack, axis=0), rtol=1e-6, atol=1e-6)
        flat = stack.reshape(n_sites, -1)
        expected = [statistics.fmean(sorted(flat[:, j])[k : n_sites - k]) for j in range(flat.shape[1])]
        np.testing.assert_allclose(trimmed[key].reshape(-1), expected, rtol=1e-5, atol=1e-6)
        assert median[key].dtype == trimmed[key].dtype == global_weights[key].dtype


def test_robust_strategies_read_each_lazy_tensor_once() -> None:
    rng = np.random.default_rng(11)
    global_weights, plain = random_round(rng, 4)
    for strategy in (FedMedian(), TrimmedMean(0.25)):
        lazy = [FitResult(r.site, CountingMapping(dict(r.weights)), r.n_samples) for r in plain]
        strategy.aggregate(global_weights, lazy)
        for r in lazy:
            assert isinstance(r.weights, CountingMapping)
            assert r.weights.reads == dict.fromkeys(global_weights, 1)


# --------------------------------------------------------------------------- preconditions

ALL = [FedAvg(), FedProx(), FedAdam(), FedYogi(), FedMedian(), TrimmedMean()]


@pytest.mark.parametrize("strategy", ALL, ids=lambda s: s.name)
def test_refuses_empty_results(strategy: Strategy) -> None:
    global_weights, _ = two_sites()
    with pytest.raises(DataError, match=rf"^{strategy.name}: no results to aggregate; nothing was aggregated"):
        strategy.aggregate(global_weights, [])


@pytest.mark.parametrize("strategy", ALL, ids=lambda s: s.name)
@pytest.mark.parametrize("n_samples", [0, -3, 2.0, True, None])
def test_refuses_bad_sample_counts(strategy: Strategy, n_samples: object) -> None:
    global_weights, (a, b) = two_sites()
    bad = FitResult("b", b.weights, n_samples)  # type: ignore[arg-type]
    with pytest.raises(DataError, match=rf"site 'b' reported n_samples={n_samples!r}.*drop this result") as info:
        strategy.aggregate(global_weights, [a, bad])
    assert info.value.context["site"] == "b"
    assert not isinstance(info.value, WeightsError)


def test_refuses_duplicate_site() -> None:
    global_weights, (a, _) = two_sites()
    with pytest.raises(DataError, match="site 'a' has more than one result"):
        FedAvg().aggregate(global_weights, [a, a])


def test_refuses_empty_or_non_numeric_global_model() -> None:
    _, results = two_sites()
    with pytest.raises(WeightsError, match="global model has no tensors"):
        FedAvg().aggregate({}, results)
    with pytest.raises(WeightsError, match="global tensor 's' is <U1"):
        FedAvg().aggregate({"s": np.array(["x"])}, results)


@pytest.mark.parametrize("strategy", ALL, ids=lambda s: s.name)
def test_refuses_mismatched_keys_shapes_dtypes(strategy: Strategy) -> None:
    global_weights, (a, b) = two_sites()
    cases: dict[str, tuple[Any, str]] = {
        "missing": ({k: v for k, v in b.weights.items() if k != "b"}, r"missing 'b'"),
        "extra": ({**b.weights, "z": np.zeros(1, np.float32)}, r"unexpected 'z'"),
        "shape": ({**b.weights, "w": np.zeros(3, np.float32)}, r"'w' has shape \[3\], expected \[2\]"),
        "dtype": ({**b.weights, "w": np.zeros(2, np.float64)}, r"'w' has dtype float64, expected float32"),
        "not array": ({**b.weights, "w": [5.0, 6.0]}, r"'w' is list, not a numpy array"),
    }
    for weights, message in cases.values():
        with pytest.raises(WeightsError, match=rf"^{strategy.name}: update from site 'b'.*{message}") as info:
            strategy.aggregate(global_weights, [a, FitResult("b", weights, 3)])
        assert "nothing was aggregated" in str(info.value)
        assert info.value.context["site"] == "b"


def test_checks_run_before_any_read() -> None:
    """A bad last result is refused before a single tensor of the first is read."""
    global_weights, (a, b) = two_sites()
    lazy_a = CountingMapping(dict(a.weights))
    bad_b = FitResult("b", {**b.weights, "w": np.zeros(3, np.float32)}, 3)
    with pytest.raises(WeightsError):
        FedAvg().aggregate(global_weights, [FitResult("a", lazy_a, 1), bad_b])
    assert set(lazy_a.reads.values()) == {0}


def test_refuses_non_mapping_weights_and_bad_schema() -> None:
    global_weights, (a, _) = two_sites()
    with pytest.raises(WeightsError, match="sent weights as list"):
        FedAvg().aggregate(global_weights, [a, FitResult("b", [1, 2], 3)])  # type: ignore[arg-type]
    odd = CountingMapping(dict(a.weights))
    odd.schema = {"w": "float32"}  # type: ignore[dict-item]
    with pytest.raises(WeightsError, match="'schema' is not a mapping of TensorSpec"):
        FedAvg().aggregate(global_weights, [FitResult("b", odd, 3)])


def test_constructors_refuse_out_of_range_parameters() -> None:
    with pytest.raises(ConfigurationError, match="trim_fraction must be in"):
        TrimmedMean(0.5)
    with pytest.raises(ConfigurationError, match="proximal_mu must be >= 0"):
        FedProx(-0.1)
    with pytest.raises(ConfigurationError, match="fedadam: server_lr = 0"):
        FedAdam(server_lr=0)
    with pytest.raises(ConfigurationError, match="fedyogi: beta_2 = 1"):
        FedYogi(beta_2=1)
    with pytest.raises(ConfigurationError, match="tau = nan"):
        FedAdam(tau=float("nan"))


# --------------------------------------------------------------------------- build_strategy


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("fedavg", FedAvg),
        ("fedprox", FedProx),
        ("fedadam", FedAdam),
        ("fedyogi", FedYogi),
        ("fedmedian", FedMedian),
        ("trimmed_mean", TrimmedMean),
        ("feddc", FedDC),
        ("krum", Krum),
    ],
)
def test_build_strategy_every_name(name: str, cls: type[Strategy]) -> None:
    spec = StrategySpec(
        name=name,  # type: ignore[arg-type]
        proximal_mu=0.3,
        server_lr=0.02,
        beta_1=0.5,
        beta_2=0.75,
        tau=0.004,
        trim_fraction=0.1,
        daisy_period=2,
        aggregation_period=5,
        krum_f=2,
        krum_m=3,
    )
    strategy = build_strategy(spec, seed=11)
    assert type(strategy) is cls
    assert strategy.name == name
    if isinstance(strategy, FedProx):
        assert strategy.fit_config(1) == {"proximal_mu": 0.3}
    if isinstance(strategy, FedAdam | FedYogi):
        params = (strategy.server_lr, strategy.beta_1, strategy.beta_2, strategy.tau)
        assert params == (0.02, 0.5, 0.75, 0.004)
    if isinstance(strategy, TrimmedMean):
        assert strategy.trim_fraction == 0.1
    if isinstance(strategy, FedDC):
        assert (strategy.daisy_period, strategy.aggregation_period, strategy.seed) == (2, 5, 11)
    if isinstance(strategy, Krum):
        assert (strategy.f, strategy.m) == (2, 3)


def test_build_strategy_default_is_fedavg() -> None:
    assert type(build_strategy(StrategySpec())) is FedAvg


def test_public_names() -> None:
    assert sorted(strategies.__all__) == [
        "FedAdam",
        "FedAvg",
        "FedDC",
        "FedMedian",
        "FedProx",
        "FedYogi",
        "FitResult",
        "Krum",
        "NotEnoughResults",
        "Strategy",
        "TrimmedMean",
        "build_strategy",
    ]
    assert {getattr(strategies, n).name for n in strategies.__all__ if hasattr(getattr(strategies, n), "name")} == {
        "fedavg",
        "fedprox",
        "fedadam",
        "fedyogi",
        "fedmedian",
        "trimmed_mean",
        "feddc",
        "krum",
    }


def test_schema_of_helper_agrees_with_checks() -> None:
    global_weights, results = two_sites()
    assert check_aggregation("fedavg", global_weights, results) == schema_of(global_weights)


# --------------------------------------------------------------------------- overflow from finite inputs

F32_MAX = float(np.finfo(np.float32).max)
STRATEGY_CLASSES: list[type[Strategy]] = [FedAvg, FedProx, FedAdam, FedYogi, FedMedian, TrimmedMean]


def float32_round(values: list[float], counts: list[int]) -> tuple[dict[str, np.ndarray], list[FitResult]]:
    g = {"x": np.zeros(2, np.float32)}
    results = [
        FitResult(f"s{i}", {"x": np.array([v, -v], np.float32)}, c)
        for i, (v, c) in enumerate(zip(values, counts, strict=True))
    ]
    return g, results


def exact_mean(values: list[float], counts: list[int]) -> float:
    """The weighted mean in exact rational arithmetic (float32 inputs are exact binary fractions)."""
    from fractions import Fraction

    total = sum(Fraction(float(np.float32(v))) * c for v, c in zip(values, counts, strict=True))
    return float(total / sum(counts))


@pytest.mark.parametrize(
    ("values", "counts"),
    [
        ([1e21, 1.0], [10**18, 1]),  # Horner rescaling in float32 reached 1e39
        ([1.0, 1e21], [1, 10**18]),
        ([3e38, 3e38], [1, 1]),  # the plain sum in float32 is inf
        ([3e38, 3e38], [1, 3]),
        ([F32_MAX] * 20, list(range(1, 21))),
        ([F32_MAX, -F32_MAX, F32_MAX], [10**18, 1, 10**18]),
        ([3e38, 1e-30, 2e38], [7, 10**18, 1]),
    ],
)
@pytest.mark.parametrize("cls", [FedAvg, FedProx])
def test_weighted_averages_do_not_overflow_on_finite_float32(
    cls: type[FedAvg], values: list[float], counts: list[int]
) -> None:
    g, results = float32_round(values, counts)
    new = cls().aggregate(g, results)["x"]
    assert new.dtype == np.float32 and np.isfinite(new).all()
    expected = exact_mean(values, counts)
    np.testing.assert_allclose(new, [expected, -expected], rtol=1e-6)
    check_weights_finite({"x": new})


def test_weighted_average_is_independent_of_result_order() -> None:
    rng = np.random.default_rng(12)
    global_weights, results = random_round(rng, 6)
    results = [FitResult(r.site, r.weights, n) for r, n in zip(results, [5, 10**12, 1, 70, 3, 900], strict=True)]
    first = FedAvg().aggregate(global_weights, results)
    again = FedAvg().aggregate(global_weights, list(reversed(results)))
    for key in first:
        np.testing.assert_array_equal(first[key], again[key])


def test_float16_averages_at_the_top_of_its_range() -> None:
    top = float(np.finfo(np.float16).max)
    g = {"h": np.zeros(3, np.float16)}
    results = [FitResult(f"s{i}", {"h": np.full(3, top, np.float16)}, c) for i, c in enumerate([10**18, 1, 5])]
    for cls in STRATEGY_CLASSES:
        new = cls().aggregate(g, results)["h"]
        assert new.dtype == np.float16 and np.isfinite(new).all()
        if cls not in (FedAdam, FedYogi):  # the averages; the optimizers take one bounded step
            np.testing.assert_array_equal(new, np.full(3, top, np.float16))


@pytest.mark.parametrize("values", [[3e38, 3e38], [F32_MAX, F32_MAX, -F32_MAX, F32_MAX], [3e38, 2e38, 3e38]])
def test_fedmedian_does_not_overflow_between_the_middle_pair(values: list[float]) -> None:
    g, results = float32_round(values, [1] * len(values))
    new = FedMedian().aggregate(g, results)["x"]
    expected = float(np.median(np.array(values, np.float64)))
    np.testing.assert_allclose(new, [expected, -expected], rtol=1e-7)
    assert np.isfinite(new).all()


@pytest.mark.parametrize("trim", [0.0, 0.2, 0.4])
def test_trimmed_mean_does_not_overflow(trim: float) -> None:
    values = [3e38, F32_MAX, 2.5e38, 3.1e38, F32_MAX]
    g, results = float32_round(values, [1] * 5)
    new = TrimmedMean(trim).aggregate(g, results)["x"]
    k = TrimmedMean(trim).trimmed(5)
    expected = statistics.fmean(sorted(float(np.float32(v)) for v in values)[k : 5 - k])
    np.testing.assert_allclose(new, [expected, -expected], rtol=1e-6)


@pytest.mark.parametrize("cls", [FedAdam, FedYogi])
def test_fedopt_does_not_overflow_on_finite_float32(cls: type[FedAdam] | type[FedYogi]) -> None:
    # delta = 6e38 (beyond float32) and delta**2 = 3.6e77: both overflowed float32 moments.
    strategy = cls(server_lr=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3)
    g = {"x": np.array([-3e38, 0.0], np.float32)}
    results = [FitResult(s, {"x": np.array([3e38, 1e30], np.float32)}, n) for s, n in (("a", 10**18), ("b", 1))]
    x = np.asarray(g["x"], np.float64)
    m, v = np.zeros(2), np.full(2, 1e-6)
    for _ in range(3):
        new = strategy.aggregate(g, results)
        assert new["x"].dtype == np.float32 and np.isfinite(new["x"]).all()
        mean = np.array([exact_mean([3e38, 3e38], [10**18, 1]), exact_mean([1e30, 1e30], [10**18, 1])])
        expected, m, v = numpy_fedopt_with(cls.name, x, mean, m, v, eta=0.1, b1=0.9, b2=0.99, tau=1e-3)
        np.testing.assert_allclose(new["x"], expected, rtol=1e-6)
        g, x = new, np.asarray(new["x"], np.float64)
    state = strategy.state_dict()
    assert state["m/x"].dtype == state["v/x"].dtype == np.float64
    assert all(np.isfinite(a).all() for a in state.values())


def numpy_fedopt_with(
    kind: str, x: np.ndarray, mean: np.ndarray, m: np.ndarray, v: np.ndarray, **p: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    eta, b1, b2, tau = p["eta"], p["b1"], p["b2"], p["tau"]
    delta = mean - x
    m = b1 * m + (1 - b1) * delta
    if kind == "fedadam":
        v = b2 * v + (1 - b2) * delta**2
    else:
        v = v - (1 - b2) * delta**2 * np.sign(v - delta**2)
    return x + eta * m / (np.sqrt(v) + tau), m, v


@pytest.mark.parametrize("cls", STRATEGY_CLASSES, ids=lambda c: c.name)
def test_no_strategy_overflows_on_random_float32_near_its_limit(cls: type[Strategy]) -> None:
    rng = np.random.default_rng(13)
    shape = (64, 33)
    g = {"w": np.zeros(shape, np.float32), "n": np.zeros((), np.int64)}
    results = [
        FitResult(
            f"s{i:02d}",
            {"w": (rng.uniform(-1, 1, shape) * F32_MAX).astype(np.float32), "n": np.array(i, np.int64)},
            int(rng.choice([1, 7, 10**9, 10**18])),
        )
        for i in range(9)
    ]
    new = cls().aggregate(g, results)
    check_weights_finite(new)  # raises WeightsError naming the tensor otherwise
    assert new["w"].dtype == np.float32


def test_fedopt_widens_moments_saved_in_float32() -> None:
    global_weights, results = random_round(np.random.default_rng(14), 3)
    saved = FedAdam()
    saved.aggregate(global_weights, results)
    old = {k: a.astype(np.float32) for k, a in saved.state_dict().items()}  # as checkpoints were
    restored = FedAdam()
    restored.load_state_dict(old)
    new = restored.aggregate(global_weights, results)
    assert {a.dtype for a in restored.state_dict().values()} == {np.dtype(np.float64)}
    expected = saved.aggregate(global_weights, results)
    for key in new:
        np.testing.assert_allclose(new[key], expected[key], rtol=1e-5)
