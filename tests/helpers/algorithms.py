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


#: Each site's slot in :class:`SiteLedger`'s vector and its n_samples: site-a 1, site-b 2, site-c 3.
LEDGER_SITES = {"site-a": 1, "site-b": 2, "site-c": 3}


class SiteLedger(Algorithm):
    """Like :class:`SlowCounter` (same timing, same n_samples), but each site's contribution
    can be told apart: site n (site-a 1, site-b 2, site-c 3) adds the round number to slot
    n - 1 of ``w`` only. With FedAvg, after a round with participants P the global model's
    slot n - 1 grows by ``n * round / sum(P's n)`` for each n in P, so a lost update, an
    update counted twice, a round aggregated twice or an update trained on the wrong model
    each leave a different vector. Evaluation reports the whole model (``w0``, ``w1``, ...;
    float32 values are exact in JSON's doubles), so a test can compare it, not a mean."""

    def initial_weights(self, params: Mapping[str, Any], seed: int) -> Weights:
        return {"w": np.zeros(len(LEDGER_SITES), dtype=np.float32)}

    def setup(self, ctx: SiteContext) -> None:
        self.ctx = ctx
        self.n = LEDGER_SITES[ctx.site]

    def train(self, weights: Weights, config: TrainConfig) -> Update:
        time.sleep(float(self.ctx.params.get("sleep_s", 0.0)) * self.n)
        w = np.array(weights["w"], dtype=np.float32)
        w[self.n - 1] += np.float32(config.round)
        return Update({"w": w}, n_samples=self.n, metrics={"round": float(config.round)})

    def evaluate(self, weights: Weights) -> Evaluation:
        return Evaluation(n_samples=self.n, metrics={f"w{i}": float(v) for i, v in enumerate(weights["w"])})
