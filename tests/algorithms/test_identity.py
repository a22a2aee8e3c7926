"""Identity: a model of the requested size that comes back unchanged."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from laulima.algorithms.base import SiteContext, TrainConfig
from laulima.algorithms.identity import Identity


def test_size_and_round_trip(tmp_path: Path):
    algo = Identity()
    weights = algo.initial_weights({"model_mb": 2, "n_tensors": 3}, seed=0)
    assert len(weights) == 3
    assert sum(v.nbytes for v in weights.values()) == 2_000_000
    assert all(v.dtype == np.float32 for v in weights.values())
    algo.setup(SiteContext(site="s", dataset="none", dataset_path=tmp_path, work_dir=tmp_path))
    update = algo.train(weights, TrainConfig(round=0))
    assert update.n_samples == 1 and update.metrics == {}
    assert all(np.array_equal(update.weights[k], weights[k]) for k in weights)
    assert algo.evaluate(weights).metrics == {}


def test_default_is_five_megabytes():
    assert sum(v.nbytes for v in Identity().initial_weights({}, seed=0).values()) == 5_000_000
