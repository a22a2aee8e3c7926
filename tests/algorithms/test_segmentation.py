"""UNetSegmentation: deterministic start, learns a sphere, FedProx, metric keys, clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from laulima.algorithms.base import SiteContext, TrainConfig
from laulima.algorithms.segmentation import UNetSegmentation, build_unet, load_numpy_weights, parse_params
from laulima.errors import ConfigurationError, DataError, WeightsError
from tests.algorithms.test_segmentation_data import write_sphere_site

TINY = {"in_channels": 1, "out_channels": 2, "channels": [8, 16], "num_res_units": 1, "roi_size": [24, 24, 24]}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sphere_site(tmp_path_factory.mktemp("spheres"), n_train=8, n_test=3, size=24, seed=1)


def algo(path: Path, site: str = "site-a", **params) -> UNetSegmentation:
    a = UNetSegmentation()
    a.setup(SiteContext(site=site, dataset="spheres", dataset_path=path, work_dir=path, params={**TINY, **params}))
    return a


def distance(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(float(((a[k].astype(np.float64) - b[k]) ** 2).sum()) for k in a)))


def test_initial_weights_are_deterministic_from_the_seed_and_match_the_state_dict():
    before = torch.get_rng_state()
    w = UNetSegmentation().initial_weights(TINY, seed=3)
    assert torch.equal(torch.get_rng_state(), before), "torch's global RNG must be left alone"
    same = UNetSegmentation().initial_weights(TINY, seed=3)
    other = UNetSegmentation().initial_weights(TINY, seed=4)
    assert list(w) == list(build_unet(TINY).state_dict())
    assert all(np.array_equal(w[k], same[k]) for k in w)
    assert any(not np.array_equal(w[k], other[k]) for k in w)
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in w.values())


def test_task_gives_the_channels_without_data():
    w = UNetSegmentation().initial_weights({"task": "brain-tumour", "channels": [8, 16]}, seed=0)
    model = build_unet({"task": "brain-tumour", "channels": [8, 16]})
    load_numpy_weights(model, w)
    assert model(torch.zeros(1, 4, 16, 16, 16)).shape == (1, 4, 16, 16, 16)
    assert parse_params({"task": "brain-tissue"}).in_channels == 1


def test_batch_norm_keeps_integer_buffers():
    w = UNetSegmentation().initial_weights({**TINY, "norm": "batch"}, seed=0)
    counters = [k for k in w if k.endswith("num_batches_tracked")]
    assert counters and all(w[k].dtype == np.int64 for k in counters)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("channels", [8]),
        ("channels", "16,32"),
        ("strides", [2, 2]),
        ("num_res_units", -1),
        ("roi_size", [24, 24, 25]),
        ("roi_size", [24, 24]),
        ("lr", 0),
        ("batch_size", True),
        ("task", "brain-bones"),
        ("norm", "group"),
        ("device", "tpu"),
        ("threads", 0),
        ("sw_overlap", 1.0),
        ("unknown_knob", 1),
    ],
)
def test_bad_params_name_the_parameter(name: str, value: object):
    with pytest.raises(ConfigurationError) as info:
        UNetSegmentation().initial_weights({**TINY, name: value}, seed=0)
    assert info.value.context["field"] == f"config.{name}"
    assert name in str(info.value)


def test_channels_are_needed_without_a_task():
    with pytest.raises(ConfigurationError, match="in_channels"):
        UNetSegmentation().initial_weights({"out_channels": 2}, seed=0)


def test_learns_the_sphere(site: Path):
    a = algo(site)
    start = a.initial_weights(TINY, seed=0)
    before = a.evaluate(start)
    update = a.train(start, TrainConfig(round=0, local_steps=120, seed=0))
    after = a.evaluate(update.weights)
    assert update.n_samples == 8 and update.metrics["steps"] == 120.0
    assert after.n_samples == 3
    assert after.metrics["loss"] < before.metrics["loss"]
    assert after.metrics["dice_sphere"] > 0.8 > before.metrics["dice_sphere"]


def test_training_is_deterministic_and_round_trips(site: Path):
    a = algo(site)
    start = a.initial_weights(TINY, seed=0)
    frozen = {k: v.copy() for k, v in start.items()}
    one = a.train(start, TrainConfig(round=2, local_steps=3, seed=9))
    two = algo(site).train(start, TrainConfig(round=2, local_steps=3, seed=9))
    other_round = a.train(start, TrainConfig(round=3, local_steps=3, seed=9))
    assert all(np.array_equal(start[k], frozen[k]) for k in start), "train() must not modify its input"
    assert list(one.weights) == list(start)
    assert all(one.weights[k].dtype == start[k].dtype and one.weights[k].shape == start[k].shape for k in start)
    assert all(np.array_equal(one.weights[k], two.weights[k]) for k in start)
    assert any(not np.array_equal(one.weights[k], other_round.weights[k]) for k in start)
    model = build_unet(TINY)
    load_numpy_weights(model, one.weights)
    assert all(np.array_equal(v.numpy(), one.weights[k]) for k, v in model.state_dict().items())


def test_local_epochs_count_batches(site: Path):
    update = algo(site, batch_size=3).train(UNetSegmentation().initial_weights(TINY, 0), TrainConfig(round=0))
    assert update.metrics["steps"] == 3.0  # ceil(8 / 3)


def test_half_precision_weights_come_back_in_half_precision(site: Path):
    start = {k: v.astype(np.float16) for k, v in UNetSegmentation().initial_weights(TINY, 0).items()}
    update = algo(site).train(start, TrainConfig(round=0, local_steps=1))
    assert all(v.dtype == np.float16 for v in update.weights.values())


def test_fedprox_keeps_weights_closer_to_the_global_model(site: Path):
    a = algo(site, lr=1e-2)
    start = a.initial_weights(TINY, seed=0)
    free = a.train(start, TrainConfig(round=0, local_steps=8, seed=1))
    prox = a.train(start, TrainConfig(round=0, local_steps=8, seed=1, proximal_mu=50.0))
    assert distance(prox.weights, start) < 0.9 * distance(free.weights, start)


def test_evaluate_returns_the_documented_keys(site: Path):
    evaluation = algo(site).evaluate(UNetSegmentation().initial_weights(TINY, 0))
    assert set(evaluation.metrics) == {"dice_sphere", "dice_mean", "loss", "held_out_test"}
    assert evaluation.metrics["held_out_test"] == 1.0 and evaluation.n_samples == 3
    assert 0.0 <= evaluation.metrics["dice_mean"] <= 1.0


def test_without_test_labels_a_validation_split_is_scored(tmp_path: Path):
    root = write_sphere_site(tmp_path, n_train=5, n_test=1, size=16, test_labels=False)
    a = algo(root, roi_size=[16, 16, 16])
    evaluation = a.evaluate(UNetSegmentation().initial_weights(TINY, 0))
    assert evaluation.metrics["held_out_test"] == 0.0 and evaluation.n_samples == 1
    assert a.train(UNetSegmentation().initial_weights(TINY, 0), TrainConfig(round=0, local_steps=1)).n_samples == 4


def test_label_names_are_sanitised(tmp_path: Path):
    labels = {0: "background", 1: "Grey matter (GM)", 2: "CSF"}
    root = write_sphere_site(tmp_path, n_train=2, n_test=1, size=16, labels=labels)
    params = {**TINY, "out_channels": 3, "roi_size": [16, 16, 16]}
    a = algo(root, **params)
    metrics = a.evaluate(UNetSegmentation().initial_weights(params, 0)).metrics
    assert {"dice_grey_matter_gm", "dice_csf", "dice_mean"} <= set(metrics)


def test_setup_refuses_a_dataset_with_other_channels(site: Path):
    with pytest.raises(DataError, match=r"1 image channel.*in_channels = 4"):
        algo(site, in_channels=4)


def test_setup_refuses_a_dataset_with_other_labels(site: Path):
    with pytest.raises(DataError, match=r"out_channels = 4"):
        algo(site, out_channels=4)


def test_setup_passes_the_dataset_error_on(tmp_path: Path):
    with pytest.raises(DataError):
        algo(tmp_path)


def test_weights_of_another_model_are_refused(site: Path):
    other = UNetSegmentation().initial_weights({**TINY, "channels": [4, 8]}, seed=0)
    with pytest.raises(WeightsError, match="shape"):
        algo(site).evaluate(other)
