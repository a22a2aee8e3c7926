"""Site-level DP on a model update: one flat vector, clipped to an L2 bound, plus Gaussian noise.

The L2 sensitivity of a sum of updates is the clipping bound only if the *whole* update (every
tensor together) is clipped, so the update is flattened first, in an order both sides agree on
(the caller passes the key order). The noise comes from :func:`secure_rng`, never from the
experiment seed: reproducible noise could be subtracted again by anyone who knows the seed.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence

import numpy as np

from laulima.errors import ConfigurationError, DataError

__all__ = [
    "clip",
    "clip_in_place",
    "flatten",
    "gaussian_noise",
    "l2_norm",
    "secure_rng",
    "unflatten",
]


def flatten(weights: Mapping[str, np.ndarray], keys: Sequence[str]) -> np.ndarray:
    """The arrays under `keys`, in that order, as one float64 vector."""
    missing = [key for key in keys if key not in weights]
    if missing:
        raise DataError(
            f"cannot flatten the update: {len(missing)} key(s) missing, first {missing[0]!r}; "
            "the update must hold every key of the model",
            key=missing[0],
        )
    if not keys:
        return np.zeros(0, dtype=np.float64)
    return np.concatenate([np.asarray(weights[key], dtype=np.float64).ravel() for key in keys])


def unflatten(vector: np.ndarray, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """The inverse of :func:`flatten`: float64 arrays of `shapes`, in the order of `shapes`."""
    flat = np.asarray(vector, dtype=np.float64)
    sizes = [math.prod(shape) for shape in shapes.values()]
    if flat.ndim != 1 or flat.size != sum(sizes):
        raise DataError(
            f"cannot unflatten a vector of shape {flat.shape}: the {len(sizes)} tensor(s) need "
            f"a 1-D vector of {sum(sizes)} values; flatten and unflatten with the same keys and shapes",
        )
    out: dict[str, np.ndarray] = {}
    start = 0
    for (key, shape), size in zip(shapes.items(), sizes, strict=True):
        out[key] = flat[start : start + size].reshape(shape).copy()
        start += size
    return out


def l2_norm(vector: np.ndarray) -> float:
    """The Euclidean norm, in float64."""
    return float(np.linalg.norm(np.asarray(vector, dtype=np.float64).ravel()))


def clip(vector: np.ndarray, bound: float) -> tuple[np.ndarray, float]:
    """`vector` scaled down so its L2 norm is at most `bound` (unchanged if already within), and
    its original norm."""
    clipped = np.array(vector, dtype=np.float64)
    return clipped, clip_in_place(clipped, bound)


def clip_in_place(vector: np.ndarray, bound: float) -> float:
    """Scale the float64 `vector` itself down to L2 norm at most `bound` (no second copy of a
    model-sized vector); its original norm."""
    if not math.isfinite(bound) or bound <= 0:
        raise ConfigurationError(
            f"the clipping bound must be a finite number > 0, got {bound!r}; set the L2 bound of one update",
            field="clip_norm",
        )
    norm = l2_norm(vector)
    if not math.isfinite(norm):
        raise DataError("cannot clip the update: it holds NaN or infinite values; the local training diverged")
    if norm > bound:
        vector *= bound / norm
        # rounding can leave the norm a hair above the bound; shrink by a tiny factor until it is not
        while l2_norm(vector) > bound:
            vector *= 1.0 - 1e-12
    return norm


def gaussian_noise(length: int, std: float, rng: np.random.Generator) -> np.ndarray:
    """`length` independent N(0, std²) draws, float64."""
    if length < 0:
        raise ConfigurationError(f"noise length must be >= 0, got {length}", field="length")
    if not math.isfinite(std) or std < 0:
        raise ConfigurationError(
            f"the noise standard deviation must be a finite number >= 0, got {std!r}; "
            "use noise_multiplier * clipping bound",
            field="std",
        )
    return rng.normal(0.0, std, size=length) if std > 0 else np.zeros(length, dtype=np.float64)


def secure_rng() -> np.random.Generator:
    """A generator seeded with 256 bits from the OS (``secrets``): DP noise must not be predictable,
    so it never derives from the experiment seed."""
    return np.random.Generator(np.random.PCG64(secrets.randbits(256)))
