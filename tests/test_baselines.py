"""Baselines: central and local training on the same budget, scored per site and pooled."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from laulima.algorithms.segmentation import UNetSegmentation, build_unet, load_numpy_weights
from laulima.baselines import evaluate_on_sites, run_baseline
from laulima.errors import ConfigurationError, DataError
from tests.algorithms.test_segmentation_data import write_sphere_site

PARAMS = {"in_channels": 1, "out_channels": 2, "channels": [8, 16], "num_res_units": 1, "roi_size": [16, 16, 16]}
METRICS = {"dice_sphere", "dice_mean", "loss", "n"}


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("baseline-sites")
    return {
        "site-a": write_sphere_site(root / "a", n_train=3, n_test=2, size=16, seed=1),
        "site-b": write_sphere_site(root / "b", n_train=2, n_test=3, size=16, seed=2),
    }


def check_structure(evaluation: dict, sites: dict[str, Path]) -> None:
    assert set(evaluation) == {"per_site", "pooled"}
    assert set(evaluation["per_site"]) == set(sites)
    assert evaluation["per_site"]["site-a"]["n"] == 2 and evaluation["per_site"]["site-b"]["n"] == 3
    assert all(set(m) == METRICS for m in evaluation["per_site"].values())
    assert set(evaluation["pooled"]) == METRICS and evaluation["pooled"]["n"] == 5
    a, b = evaluation["per_site"]["site-a"], evaluation["per_site"]["site-b"]
    pooled = (2 * a["dice_sphere"] + 3 * b["dice_sphere"]) / 5  # over subjects, not the mean of site means
    assert evaluation["pooled"]["dice_sphere"] == pytest.approx(pooled)


def test_central_trains_one_model_on_every_site(sites: dict[str, Path]):
    progress: list[tuple[str, int, int, float]] = []
    result = run_baseline("central", sites, PARAMS, steps=3, seed=0, on_progress=lambda *a: progress.append(a))
    assert result.mode == "central" and list(result.models) == ["central"]
    model = result.models["central"]
    assert model.trained_on == ("site-a", "site-b") and model.n_train == 5 and model.steps == 3
    assert [(name, step, total) for name, step, total, _ in progress] == [("central", i, 3) for i in (1, 2, 3)]
    check_structure(model.evaluation, sites)
    assert set(model.weights) == set(UNetSegmentation().initial_weights(PARAMS, 0))
    summary = result.to_json()
    assert "weights" not in summary["models"]["central"] and summary["models"]["central"]["pooled"]["n"] == 5


def test_local_trains_one_model_per_site_and_scores_it_everywhere(sites: dict[str, Path]):
    result = run_baseline("local", sites, PARAMS, steps=2, seed=0)
    assert list(result.models) == ["site-a", "site-b"]
    assert result.models["site-b"].trained_on == ("site-b",) and result.models["site-b"].n_train == 2
    for model in result.models.values():
        check_structure(model.evaluation, sites)
    again = run_baseline("local", sites, PARAMS, steps=2, seed=0)
    w1, w2 = result.models["site-a"].weights, again.models["site-a"].weights
    assert all(np.array_equal(w1[k], w2[k]) for k in w1), "deterministic from the seed"


def test_evaluate_on_sites_scores_given_weights_like_the_baselines(sites: dict[str, Path]):
    result = run_baseline("central", sites, PARAMS, steps=1, seed=0)
    model = result.models["central"]
    again = evaluate_on_sites(model.weights, sites, PARAMS)
    check_structure(again, sites)
    assert again["pooled"] == pytest.approx(model.evaluation["pooled"])
    load_numpy_weights(build_unet(PARAMS), model.weights)


def test_bad_mode_steps_and_mismatched_sites_are_refused(sites: dict[str, Path], tmp_path: Path):
    with pytest.raises(ConfigurationError, match="mode"):
        run_baseline("federated", sites, PARAMS, steps=1, seed=0)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="steps"):
        run_baseline("central", sites, PARAMS, steps=0, seed=0)
    other = write_sphere_site(tmp_path / "c", n_train=2, n_test=1, size=16, labels={0: "background", 1: "Ball"})
    with pytest.raises(DataError, match="labels"):
        evaluate_on_sites(UNetSegmentation().initial_weights(PARAMS, 0), {**sites, "site-c": other}, PARAMS)
