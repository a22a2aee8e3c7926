"""FedMedian: the coordinate-wise median of the sites' models, robust to outlying sites.

Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning: Towards
Optimal Statistical Rates", ICML 2018 (arXiv:1803.01498), the coordinate-wise median.
Unweighted, as in the paper: a site's ``n_samples`` is checked but cannot buy it more
influence, which is the point of a robust aggregator. Memory: one tensor times the
number of sites (see ``_stack``). The middle two of an even number of sites are averaged
in float64, so values near the float32 limit cannot overflow.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import numpy as np

from laulima.core.strategies._checks import check_aggregation
from laulima.core.strategies._fold import cast_back
from laulima.core.strategies._stack import stacked_by_key
from laulima.core.strategies.base import FitResult, Strategy
from laulima.core.weights import Weights

__all__ = ["FedMedian"]


class FedMedian(Strategy):
    """Per-coordinate median; with an even number of sites, the mean of the middle two."""

    name: ClassVar[str] = "fedmedian"

    def aggregate(self, global_weights: Mapping[str, np.ndarray], results: Sequence[FitResult]) -> Weights:
        schema = check_aggregation(self.name, global_weights, results)
        return {
            key: cast_back(median_of_stack(stack), np.dtype(schema[key].dtype))
            for key, stack in stacked_by_key(self.name, schema, results)
        }


def median_of_stack(stack: np.ndarray) -> np.ndarray:
    """Median along axis 0, partitioning ``stack`` in place; an even count's middle pair is
    averaged in float64 (``np.median`` averages in the stack's dtype: 3e38 and 3e38 give inf)."""
    k = len(stack) // 2
    if len(stack) % 2:
        stack.partition(k, axis=0)
        return np.asarray(stack[k])
    stack.partition((k - 1, k), axis=0)
    mid = np.array(stack[k - 1], dtype=np.float64)  # an array even for 0-d tensors
    np.add(mid, stack[k], out=mid)
    return np.multiply(mid, 0.5, out=mid)
