"""Trimmed mean: per coordinate, drop the largest and smallest values, average the rest.

Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning: Towards
Optimal Statistical Rates", ICML 2018 (arXiv:1803.01498), the coordinate-wise
beta-trimmed mean. With ``m`` sites, ``floor(trim_fraction * m)`` values are dropped at
each end (none when that is 0: then it is the plain mean). Unweighted, as in the paper.
The mean is taken in float64, so float32 values near their limit cannot overflow it.
Memory: one tensor times the number of sites (see ``_stack``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import ClassVar

import numpy as np

from laulima.core.strategies._checks import check_aggregation
from laulima.core.strategies._fold import cast_back
from laulima.core.strategies._stack import stacked_by_key
from laulima.core.strategies.base import FitResult, Strategy
from laulima.core.weights import Weights
from laulima.errors import ConfigurationError

__all__ = ["TrimmedMean"]


class TrimmedMean(Strategy):
    """Coordinate-wise trimmed mean; ``trim_fraction`` in [0, 0.5) is cut at each end."""

    name: ClassVar[str] = "trimmed_mean"

    def __init__(self, trim_fraction: float = 0.2) -> None:
        if not 0 <= trim_fraction < 0.5:
            raise ConfigurationError(
                f"trimmed_mean: trim_fraction must be in [0, 0.5), got {trim_fraction}",
                field="trim_fraction",
            )
        self.trim_fraction = float(trim_fraction)

    def trimmed(self, n_sites: int) -> int:
        """How many values are dropped at each end with ``n_sites`` results."""
        # The epsilon keeps 0.3 * 10 = 2.9999999999999996 from trimming 2 instead of 3.
        return math.floor(self.trim_fraction * n_sites + 1e-9)

    def aggregate(self, global_weights: Mapping[str, np.ndarray], results: Sequence[FitResult]) -> Weights:
        schema = check_aggregation(self.name, global_weights, results)
        k = self.trimmed(len(results))
        out: Weights = {}
        for key, stack in stacked_by_key(self.name, schema, results):
            if k:
                stack.sort(axis=0)
                stack = stack[k : len(results) - k]
            mean = np.asarray(stack.mean(axis=0, dtype=np.float64))
            out[key] = cast_back(mean, np.dtype(schema[key].dtype))
        return out
