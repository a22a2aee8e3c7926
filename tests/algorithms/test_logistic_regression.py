"""LogisticRegression: learns, is deterministic, honours FedProx and local steps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from laulima.algorithms.base import SiteContext, TrainConfig
from laulima.algorithms.tabular import BIAS, WEIGHT, LogisticRegression
from laulima.algorithms.tabular_data import write_tabular_site
from laulima.errors import DataError


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("tabular")
    return [write_tabular_site(root / f"site-{i}", i, 3, seed=7) for i in range(3)]


def algo(path: Path, site: str = "site-a", **params) -> LogisticRegression:
    a = LogisticRegression()
    a.setup(SiteContext(site=site, dataset="tab", dataset_path=path, work_dir=path, params=params))
    return a


def test_initial_weights_shapes_and_dtypes():
    w = LogisticRegression().initial_weights({"n_features": 5, "n_classes": 4}, seed=1)
    assert w[WEIGHT].shape == (4, 5) and w[BIAS].shape == (4,)
    assert w[WEIGHT].dtype == np.float32 and w[BIAS].dtype == np.float32
    same = LogisticRegression().initial_weights({"n_features": 5, "n_classes": 4}, seed=1)
    assert np.array_equal(w[WEIGHT], same[WEIGHT])


def test_learns_well_above_chance(sites):
    a = algo(sites[0])
    start = a.initial_weights({}, seed=0)
    before = a.evaluate(start)
    update = a.train(start, TrainConfig(round=0, local_epochs=5))
    after = a.evaluate(update.weights)
    assert after.metrics["accuracy"] > 0.8 > 1 / 3
    assert after.metrics["loss"] < before.metrics["loss"]
    assert update.n_samples == 400 and after.n_samples == 200
    assert set(update.metrics) == {"train_loss", "train_accuracy", "steps"}
    assert {k: v.dtype for k, v in update.weights.items()} == {WEIGHT: np.float32, BIAS: np.float32}


def test_federated_average_beats_a_single_site_on_the_others(sites):
    algos = [algo(p, site=f"site-{i}") for i, p in enumerate(sites)]
    start = algos[0].initial_weights({}, seed=0)
    local = algos[2].train(start, TrainConfig(round=0, local_epochs=20)).weights
    g = start
    for r in range(10):
        updates = [a.train(g, TrainConfig(round=r, local_epochs=2)) for a in algos]
        total = sum(u.n_samples for u in updates)
        g = {k: sum(u.weights[k] * (u.n_samples / total) for u in updates).astype(np.float32) for k in g}
    fed_acc = np.mean([a.evaluate(g).metrics["accuracy"] for a in algos])
    local_acc = np.mean([a.evaluate(local).metrics["accuracy"] for a in algos])
    assert fed_acc > local_acc + 0.05


def test_deterministic_given_seed_round_and_site(sites):
    start = LogisticRegression().initial_weights({}, seed=0)
    cfg = TrainConfig(round=3, local_epochs=1, seed=11)
    a = algo(sites[0]).train(start, cfg).weights
    b = algo(sites[0]).train(start, cfg).weights
    c = algo(sites[0]).train(start, TrainConfig(round=4, local_epochs=1, seed=11)).weights
    d = algo(sites[0], site="site-b").train(start, cfg).weights
    assert np.array_equal(a[WEIGHT], b[WEIGHT])
    assert not np.array_equal(a[WEIGHT], c[WEIGHT])
    assert not np.array_equal(a[WEIGHT], d[WEIGHT])


def test_fedprox_keeps_weights_closer_to_the_start(sites):
    start = LogisticRegression().initial_weights({}, seed=0)
    dist = {}
    for mu in (0.0, 1.0):
        w = algo(sites[1]).train(start, TrainConfig(round=0, local_epochs=5, proximal_mu=mu)).weights
        dist[mu] = float(np.linalg.norm(w[WEIGHT] - start[WEIGHT]))
    assert dist[1.0] < 0.7 * dist[0.0]


def test_local_steps_replace_epochs(sites):
    start = LogisticRegression().initial_weights({}, seed=0)
    a = algo(sites[0], batch_size=50)
    assert a.train(start, TrainConfig(round=0, local_epochs=2)).metrics["steps"] == 16
    assert a.train(start, TrainConfig(round=0, local_epochs=2, local_steps=3)).metrics["steps"] == 3
    zero = a.train(start, TrainConfig(round=0, local_epochs=0))
    assert np.array_equal(zero.weights[WEIGHT], start[WEIGHT])


def test_feature_count_mismatch_is_a_data_error(sites):
    a = algo(sites[0], n_features=3)
    with pytest.raises(DataError, match="has 8 feature columns, the experiment expects n_features = 3"):
        a.train(a.initial_weights({"n_features": 3}, seed=0), TrainConfig(round=0))
