"""Small algorithms for end-to-end tests: predictable updates, adjustable duration."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from laulima.algorithms.base import Algorithm, Evaluation, SiteContext, TrainConfig, Update
from laulima.core.weights import Weights


class SlowCounter(Algorithm):
    """Adds 1 to every weight after sleeping ``params["sleep_s"]`` times n, where n (also its
    n_samples) is the site's letter index + 1: site-a answers first and site-c last, so a test
    can act in the middle of a round, and FedAvg results are predictable."""

    def initial_weights(self, params: Mapping[str, Any], seed: int) -> Weights:
        return {"w": np.zeros(int(params.get("size", 8)), dtype=np.float32)}

    def setup(self, ctx: SiteContext) -> None:
        self.ctx = ctx
        self.n = ord(ctx.site[-1]) - ord("a") + 1

    def train(self, weights: Weights, config: TrainConfig) -> Update:
        time.sleep(float(self.ctx.params.get("sleep_s", 0.0)) * self.n)
        return Update({"w": weights["w"] + 1.0}, n_samples=self.n, metrics={"round": float(config.round)})

    def evaluate(self, weights: Weights) -> Evaluation:
        return Evaluation(n_samples=self.n, metrics={"mean_w": float(weights["w"].mean())})
