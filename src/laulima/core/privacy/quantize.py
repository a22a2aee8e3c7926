"""Floats <-> integers modulo 2^32, the ring secure aggregation adds in.

Masks only cancel in modular arithmetic, so each site's (clipped) update is scaled, rounded to
an integer and stored in two's complement as ``np.uint32``; numpy's uint32 addition wraps
modulo 2^32 by itself. The scale is chosen so the *sum* over all sites still fits in the signed
range (:func:`scale_for`): then the centred lift of the total (values >= 2^31 are negative) is
the exact integer sum, and dequantising it is off by at most one unit per site.

Rounding is stochastic (up with probability equal to the fractional part), so it is unbiased
and the error of each site is below one unit: ``|dequantize(sum) - sum| < n_sites / scale``.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from laulima.errors import ConfigurationError, DataError

__all__ = [
    "MODULUS_BITS",
    "dequantize",
    "error_bound",
    "quantize",
    "scale_for",
]

MODULUS_BITS = 32
"""Arrays are ``np.uint32``; additions wrap modulo 2^32."""

_HALF = 2 ** (MODULUS_BITS - 1)
_LIMIT = _HALF - 1
"""Largest |value * scale| :func:`quantize` accepts (rounding up adds at most one)."""


def _check_scale(scale: float) -> None:
    if not math.isfinite(scale) or scale <= 0:
        raise ConfigurationError(
            f"the quantisation scale must be a finite number > 0, got {scale!r}; compute it with scale_for()",
            field="scale",
        )


def _check_sites(n_sites: int) -> None:
    if isinstance(n_sites, bool) or not isinstance(n_sites, int) or n_sites < 1:
        raise ConfigurationError(
            f"n_sites must be an integer >= 1, got {n_sites!r}; give how many sites' vectors are summed",
            field="n_sites",
        )


def scale_for(bound: float, n_sites: int) -> float:
    """The largest scale s with ``n_sites * (bound * s + 1) < 2^31``: the sum of `n_sites` values of
    magnitude <= `bound`, each rounded by less than one unit, cannot wrap."""
    if isinstance(bound, bool) or not isinstance(bound, int | float) or not math.isfinite(bound) or bound <= 0:
        raise ConfigurationError(
            f"the bound on one value must be a finite number > 0, got {bound!r}; "
            "use the clipping bound (an L2 bound also bounds every coordinate)",
            field="bound",
        )
    _check_sites(n_sites)
    room = _HALF / n_sites - 1  # bound * s must stay strictly below this
    if room <= 0:
        raise ConfigurationError(
            f"{n_sites} sites are too many to sum in {MODULUS_BITS}-bit integers without wrapping; "
            "aggregate fewer sites per round",
            field="n_sites",
        )
    scale = room / bound
    if not math.isfinite(scale):
        raise ConfigurationError(
            f"the bound {bound!r} is too small to quantise in {MODULUS_BITS}-bit integers; use a larger clipping bound",
            field="bound",
        )
    # float rounding can leave bound * scale a hair too large: step down until the inequality holds
    # both exactly (in rationals, for the product as numpy computes it) and in floats; a few steps
    for _ in range(64):
        product = bound * scale
        if n_sites * (Fraction(product) + 1) < _HALF and n_sites * (product + 1) < _HALF:
            return scale
        scale = math.nextafter(scale, 0.0)
    raise AssertionError(f"scale_for({bound!r}, {n_sites}) did not converge")  # pragma: no cover


def quantize(values: np.ndarray, scale: float, rng: np.random.Generator) -> np.ndarray:
    """``values * scale`` stochastically rounded (unbiased) to integers, as uint32 two's complement."""
    _check_scale(scale)
    scaled = np.asarray(values, dtype=np.float64) * scale
    if not np.all(np.isfinite(scaled)):
        raise DataError("cannot quantise the update: it holds NaN or infinite values; the local training diverged")
    if scaled.size and float(np.max(np.abs(scaled))) >= _LIMIT:
        raise DataError(
            f"cannot quantise the update: a value times the scale {scale:g} reaches "
            f"{float(np.max(np.abs(scaled))):.6g}, beyond the {MODULUS_BITS}-bit range; "
            "clip the update to the bound the scale was computed for",
        )
    floor = np.floor(scaled)
    rounded = floor + (rng.random(scaled.shape) < (scaled - floor))
    return rounded.astype(np.int64).astype(np.uint32)


def dequantize(total: np.ndarray, scale: float) -> np.ndarray:
    """A uint32 (sum of quantised vectors) back to float64: values >= 2^31 are negative, then / scale."""
    _check_scale(scale)
    ints = np.asarray(total)
    if ints.dtype != np.uint32:
        raise DataError(f"dequantize() takes a uint32 array, got {ints.dtype}; pass the modular sum as it is")
    return ints.view(np.int32).astype(np.float64) / scale


def error_bound(scale: float, n_sites: int) -> float:
    """The largest |dequantize(sum of quantised) - sum of values| per coordinate: one unit per site."""
    _check_scale(scale)
    _check_sites(n_sites)
    return n_sites / scale
