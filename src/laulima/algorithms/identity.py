"""An algorithm that changes nothing: benchmarks use it to measure pure round overhead.

Its model is ``model_mb`` MB (10^6 bytes; default 5) of float32 spread over ``n_tensors``
tensors (default 4); training returns the weights it got with ``n_samples = 1``. It reads
no data, so the catalog entry it is given may point at any existing folder.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from laulima.algorithms.base import Algorithm, Evaluation, SiteContext, TrainConfig, Update
from laulima.core.weights import Weights
from laulima.errors import ConfigurationError

__all__ = ["Identity"]


class Identity(Algorithm):
    """Returns its input; ``params``: ``model_mb`` (5), ``n_tensors`` (4)."""

    def initial_weights(self, params: Mapping[str, Any], seed: int) -> Weights:
        model_mb = float(params.get("model_mb", 5))
        n_tensors = int(params.get("n_tensors", 4))
        if model_mb <= 0 or n_tensors < 1:
            raise ConfigurationError(
                f"Identity: model_mb = {model_mb} must be > 0 and n_tensors = {n_tensors} >= 1", field="config"
            )
        total = max(n_tensors, round(model_mb * 1e6 / 4))
        sizes = [total // n_tensors + (1 if i < total % n_tensors else 0) for i in range(n_tensors)]
        rng = np.random.default_rng([seed, 0x1D])
        return {f"layer{i}.weight": rng.random(size, dtype=np.float32) for i, size in enumerate(sizes)}

    def setup(self, ctx: SiteContext) -> None:
        pass

    def train(self, weights: Weights, config: TrainConfig) -> Update:
        return Update(weights=dict(weights), n_samples=1, metrics={})

    def evaluate(self, weights: Weights) -> Evaluation:
        return Evaluation(n_samples=1, metrics={})
