"""Coordinate-wise strategies see every site's value of a coordinate at once: stack per key.

Memory: the new model plus one tensor times the number of sites (the current key, from
every result). Float tensors are stacked in their own dtype: sorting and selecting need no
wider type, and the strategies take any mean of stacked values in float64 (so two float32
values of 3e38 average to 3e38, not inf) without a float64 copy of the stack. Integer and
boolean tensors are stacked in float64. Keys are processed one at a time and each stack is
dropped before the next key is read, so it never holds whole updates side by side.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from laulima.core.strategies._checks import read_tensor
from laulima.core.strategies._fold import accumulator_dtype
from laulima.core.strategies.base import FitResult
from laulima.core.weights import WeightsSchema

__all__ = ["stacked_by_key"]


def stacked_by_key(
    strategy: str, schema: WeightsSchema, results: Sequence[FitResult]
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(key, stack)`` with ``stack[i]`` = result ``i``'s tensor, one key at a time.

    ``schema`` is what :func:`check_aggregation` returned; the stack is the caller's to modify.
    """
    for key, spec in schema.items():
        dtype = np.dtype(spec.dtype)
        stack = np.empty((len(results), *spec.shape), dtype=dtype if dtype.kind == "f" else accumulator_dtype(dtype))
        for i, result in enumerate(results):
            stack[i] = read_tensor(strategy, result, key, spec)
        yield key, stack
