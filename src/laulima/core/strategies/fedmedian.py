"""FedMedian: the coordinate-wise median of the sites' models, robust to outlying sites.

Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning: Towards
Optimal Statistical Rates", ICML 2018 (arXiv:1803.01498), the coordinate-wise median.
Unweighted, as in the paper: a site's ``n_samples`` is checked but cannot buy it more
influence, which is the point of a robust aggregator. Memory: one tensor times the
number of sites (see ``_stack``).
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
            key: cast_back(
                np.asarray(np.median(stack, axis=0, overwrite_input=True), dtype=stack.dtype),
                np.dtype(schema[key].dtype),
            )
            for key, stack in stacked_by_key(self.name, schema, results)
        }
