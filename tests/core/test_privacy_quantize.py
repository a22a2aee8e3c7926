"""Quantisation to uint32 for secure aggregation, and the clipping it relies on."""

from __future__ import annotations

import math

import numpy as np
import pytest

from laulima.core.privacy.clipping import clip, flatten, gaussian_noise, l2_norm, secure_rng, unflatten
from laulima.core.privacy.quantize import dequantize, error_bound, quantize, scale_for
from laulima.errors import ConfigurationError, DataError

HALF = 2**31


# --- quantize ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("bound", "n_sites"), [(1.0, 1), (1.0, 5), (0.37, 100), (1e6, 3), (1e-9, 2)])
def test_scale_for_is_the_largest_scale_that_cannot_wrap(bound: float, n_sites: int) -> None:
    scale = scale_for(bound, n_sites)
    assert n_sites * (bound * scale + 1) < HALF
    bigger = scale * (1 + 1e-9)
    assert n_sites * (bound * bigger + 1) >= HALF


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_worst_case_sum_does_not_wrap(sign: float) -> None:
    bound, n_sites = 2.5, 7
    scale = scale_for(bound, n_sites)
    rng = np.random.default_rng(1)
    values = np.full(1000, sign * bound)
    total = np.zeros(1000, dtype=np.uint32)
    for _ in range(n_sites):
        total += quantize(values, scale, rng)
    got = dequantize(total, scale)
    assert np.all(np.abs(got - sign * bound * n_sites) <= error_bound(scale, n_sites))


def test_round_trip_within_error_bound_with_negative_values() -> None:
    rng = np.random.default_rng(2)
    n_sites, bound = 5, 1.0
    scale = scale_for(bound, n_sites)
    vectors = [rng.uniform(-bound, bound, 10_000) for _ in range(n_sites)]
    total = np.zeros(10_000, dtype=np.uint32)
    for vector in vectors:
        quantised = quantize(vector, scale, rng)
        assert quantised.dtype == np.uint32
        assert np.all(np.abs(dequantize(quantised, scale) - vector) < 1 / scale)
        total += quantised
    err = np.abs(dequantize(total, scale) - np.sum(vectors, axis=0))
    assert err.max() < error_bound(scale, n_sites)
    assert err.max() > 0  # it is a real rounding, not a float pass-through


def test_stochastic_rounding_is_unbiased_and_takes_only_the_neighbours() -> None:
    rng = np.random.default_rng(3)
    values = np.full(200_000, 0.3)
    quantised = quantize(values, 1.0, rng).view(np.int32)
    assert set(np.unique(quantised).tolist()) == {0, 1}
    assert quantised.mean() == pytest.approx(0.3, abs=0.005)
    negative = quantize(np.full(200_000, -2.75), 1.0, rng).view(np.int32)
    assert set(np.unique(negative).tolist()) == {-3, -2}
    assert negative.mean() == pytest.approx(-2.75, abs=0.005)
    assert np.array_equal(quantize(np.array([5.0, -7.0]), 1.0, rng).view(np.int32), [5, -7])


def test_quantize_refuses_values_out_of_range_or_not_finite() -> None:
    rng = np.random.default_rng(4)
    with pytest.raises(DataError, match="range"):
        quantize(np.array([0.0, float(HALF - 1)]), 1.0, rng)
    with pytest.raises(DataError, match="range"):
        quantize(np.array([-float(HALF)]), 1.0, rng)
    with pytest.raises(DataError, match="NaN"):
        quantize(np.array([0.0, math.nan]), 1.0, rng)
    with pytest.raises(DataError, match="NaN"):
        quantize(np.array([math.inf]), 1.0, rng)


def test_bad_parameters_raise() -> None:
    for bound in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ConfigurationError, match="bound"):
            scale_for(bound, 3)
    for n_sites in (0, -1, 2**31):
        with pytest.raises(ConfigurationError, match="n_sites|sites"):
            scale_for(1.0, n_sites)
    with pytest.raises(ConfigurationError, match="scale"):
        quantize(np.zeros(3), 0.0, np.random.default_rng(0))
    with pytest.raises(ConfigurationError, match="scale"):
        dequantize(np.zeros(3, dtype=np.uint32), math.nan)
    with pytest.raises(DataError, match="uint32"):
        dequantize(np.zeros(3, dtype=np.int64), 1.0)
    with pytest.raises(ConfigurationError, match="n_sites"):
        error_bound(1.0, 0)


# --- clipping ---------------------------------------------------------------------------------


def test_flatten_unflatten_round_trip_in_key_order() -> None:
    weights = {"b": np.arange(6, dtype=np.float32).reshape(2, 3), "a": np.array([7.0, 8.0])}
    flat = flatten(weights, ["a", "b"])
    assert flat.dtype == np.float64
    assert flat.tolist() == [7.0, 8.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    back = unflatten(flat, {"a": (2,), "b": (2, 3)})
    assert list(back) == ["a", "b"]
    assert all(back[k].dtype == np.float64 for k in back)
    assert np.array_equal(back["b"], weights["b"])
    assert np.array_equal(back["a"], weights["a"])
    with pytest.raises(DataError, match="8"):
        unflatten(flat[:-1], {"a": (2,), "b": (2, 3)})
    with pytest.raises(DataError, match="missing"):
        flatten(weights, ["a", "c"])


def test_clip_scales_down_only_when_needed() -> None:
    rng = np.random.default_rng(5)
    vector = rng.normal(size=100_000)
    norm = float(np.sqrt(np.sum(vector**2)))
    clipped, original = clip(vector, 1.0)
    assert original == pytest.approx(norm)
    assert l2_norm(clipped) <= 1.0
    assert l2_norm(clipped) == pytest.approx(1.0)
    assert np.allclose(clipped * norm, vector)  # same direction
    small = vector / (2 * norm)
    kept, small_norm = clip(small, 1.0)
    assert np.array_equal(kept, small)
    assert small_norm == pytest.approx(0.5)
    with pytest.raises(ConfigurationError, match="bound"):
        clip(vector, 0.0)
    with pytest.raises(DataError, match="NaN"):
        clip(np.array([1.0, math.nan]), 1.0)


def test_gaussian_noise_and_secure_rng() -> None:
    noise = gaussian_noise(200_000, 0.5, secure_rng())
    assert noise.shape == (200_000,)
    assert noise.mean() == pytest.approx(0.0, abs=0.01)
    assert noise.std() == pytest.approx(0.5, rel=0.01)
    assert not np.any(gaussian_noise(10, 0.0, secure_rng()))
    with pytest.raises(ConfigurationError, match="standard deviation"):
        gaussian_noise(10, -1.0, secure_rng())
    # never reproducible, whatever numpy's global seed
    np.random.seed(0)
    first = secure_rng().random(4)
    np.random.seed(0)
    assert not np.array_equal(first, secure_rng().random(4))
