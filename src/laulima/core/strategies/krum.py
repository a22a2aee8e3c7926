"""Krum and multi-Krum: keep the update(s) closest to their neighbours, drop the outliers.

Blanchard, El Mhamdi, Guerraoui, Stainer, "Machine Learning with Adversaries: Byzantine
Tolerant Gradient Descent", NeurIPS 2017. With ``n`` results of which at most ``f`` are
Byzantine, the score of update ``i`` is the sum of squared L2 distances to its ``n - f - 2``
nearest other updates; Krum returns the update with the lowest score. Multi-Krum averages
the ``m`` lowest-scored updates (``m = 1`` is Krum). The guarantee needs ``n >= 2f + 3``:
with fewer results :class:`NotEnoughResults` is raised and the hub fails the round instead
of aggregating without the robustness the experiment asked for.

Unweighted, as in the paper: the selected updates are averaged with equal weight, so a
site's self-reported ``n_samples`` cannot buy it influence (the same choice as FedMedian).
Ties in score go to the site first in name order.

Memory: the n x n distance matrix is built key by key from one stacked tensor per key
(``_stack``: one tensor times n, plus one float64 difference), never n whole models; the
selected updates are then read a second time and folded like FedAvg's mean. Distances are
summed in float64 from exact pairwise differences (no ``|x|^2 + |y|^2 - 2xy`` shortcut,
which cancels catastrophically when honest updates are close and large).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import ClassVar

import numpy as np

from laulima.core.strategies._checks import check_aggregation
from laulima.core.strategies._stack import stacked_by_key
from laulima.core.strategies.base import FitResult, NotEnoughResults, Strategy
from laulima.core.strategies.fedavg import weighted_means
from laulima.core.weights import Weights, WeightsSchema
from laulima.errors import ConfigurationError

__all__ = ["Krum", "krum_scores", "pairwise_sq_distances"]


class Krum(Strategy):
    """Krum (``m = 1``) or multi-Krum (``m > 1``), tolerating ``f`` Byzantine sites."""

    name: ClassVar[str] = "krum"

    def __init__(self, f: int = 1, m: int = 1) -> None:
        if isinstance(f, bool) or not isinstance(f, int) or f < 0:
            raise ConfigurationError(f"krum: krum_f must be a whole number >= 0, got {f!r}", field="krum_f")
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ConfigurationError(f"krum: krum_m must be a whole number >= 1, got {m!r}", field="krum_m")
        self.f = f
        self.m = m

    def min_results(self) -> int:
        """Fewest results Krum's guarantee holds for: ``2f + 3``, and at least ``m + f``."""
        return max(2 * self.f + 3, self.m + self.f)

    def aggregate(self, global_weights: Mapping[str, np.ndarray], results: Sequence[FitResult]) -> Weights:
        schema = check_aggregation(self.name, global_weights, results)
        n = len(results)
        if n < self.min_results():
            raise NotEnoughResults(
                f"krum: {n} result(s), but krum_f = {self.f} and krum_m = {self.m} need at least "
                f"{self.min_results()} (2 * krum_f + 3, and krum_m + krum_f); nothing was aggregated — "
                "raise min_sites to at least that, or lower krum_f / krum_m",
                strategy=self.name,
                results=n,
            )
        chosen = self._chosen(schema, results)
        equal = [replace(results[i], n_samples=1) for i in chosen]  # plain mean, as in the paper
        return dict(weighted_means(self.name, schema, equal, cast=True))

    def selected(self, global_weights: Mapping[str, np.ndarray], results: Sequence[FitResult]) -> list[str]:
        """The sites whose updates :meth:`aggregate` averages, in name order (for tests and logs)."""
        schema = check_aggregation(self.name, global_weights, results)
        return [results[i].site for i in self._chosen(schema, results)]

    def _chosen(self, schema: WeightsSchema, results: Sequence[FitResult]) -> list[int]:
        scores = krum_scores(pairwise_sq_distances(self.name, schema, results), self.f)
        return sorted(int(i) for i in np.argsort(scores, kind="stable")[: self.m])


def pairwise_sq_distances(strategy: str, schema: WeightsSchema, results: Sequence[FitResult]) -> np.ndarray:
    """The n x n matrix of squared L2 distances between the results, in float64, summed key
    by key (one tensor of every result in memory at a time)."""
    n = len(results)
    dist = np.zeros((n, n), dtype=np.float64)
    for _, stack in stacked_by_key(strategy, schema, results):
        flat = stack.reshape(n, -1)
        for i in range(n):
            for j in range(i + 1, n):
                diff = np.subtract(flat[i], flat[j], dtype=np.float64)
                dist[i, j] += float(np.dot(diff, diff))
        del stack, flat
    return dist + dist.T


def krum_scores(dist: np.ndarray, f: int) -> np.ndarray:
    """Score of each row: the sum of its ``n - f - 2`` smallest distances to the others."""
    n = len(dist)
    k = n - f - 2
    if k < 1:
        raise ValueError(f"krum needs n - f - 2 >= 1 neighbours, got n = {n}, f = {f}")
    others = np.where(np.eye(n, dtype=bool), np.inf, dist)
    return np.sort(others, axis=1)[:, :k].sum(axis=1)
