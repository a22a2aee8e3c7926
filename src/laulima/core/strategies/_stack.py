"""Coordinate-wise strategies see every site's value of a coordinate at once: stack per key.

Memory: the new model plus one tensor times the number of sites (the current key, from
every result, in the accumulator dtype). Keys are processed one at a time and each stack
is dropped before the next key is read, so it never holds whole updates side by side.
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
        stack = np.empty((len(results), *spec.shape), dtype=accumulator_dtype(np.dtype(spec.dtype)))
        for i, result in enumerate(results):
            stack[i] = read_tensor(strategy, result, key, spec)
        yield key, stack
