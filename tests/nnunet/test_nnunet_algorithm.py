"""NnUNet, the federated nnU-Net algorithm, on one tiny brain-tumour site under a tiny nnU-Net plan.

The plan is nnU-Net's own planner's (``plan_experiment``) for the site's fingerprint, with 8 to
32 feature maps so that a step takes a fraction of a second on one CPU thread.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from laulima.algorithms.base import SiteContext, TrainConfig
from laulima.core.fingerprint import merge_fingerprints
from laulima.errors import ConfigurationError
from laulima.imaging import load_dataset, write_site_dataset
from laulima.nnunet.algorithm import NnUNet, poly_lr
from laulima.nnunet.fingerprint import site_fingerprint
from laulima.nnunet.network import build_network
from laulima.nnunet.params import parse_params
from laulima.nnunet.planning import plan_experiment
from laulima.nnunet.preprocess import cached_raw_view, preprocess_cases

BRATS = {"wt": [1, 2, 3], "tc": [2, 3], "et": [3]}


def tiny_site(base: Path) -> tuple[Path, dict[str, Any]]:
    """A 3 + 1 case brain-tumour site (32³ at 6 mm) and the ``[config]`` of a tiny nnU-Net plan for it."""
    torch.set_num_threads(1)
    root = write_site_dataset(
        base / "site0", task="brain-tumour", site_index=0, n_sites=3, seed=0, n_train=3, n_test=1,
        spacing_mm=6.0, shape=(32, 32, 32),
    )  # fmt: skip
    merged = merge_fingerprints([site_fingerprint(root, base / "fingerprint")])
    plans = plan_experiment(merged.fingerprint, merged.dataset_json, base_features=8, max_features=32)
    return root, {"plans": plans, "dataset_json": merged.dataset_json, "regions": BRATS}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    return tiny_site(tmp_path_factory.mktemp("nnunet-algorithm"))


def _context(root: Path, config: dict[str, Any], work: Path) -> SiteContext:
    work.mkdir(parents=True, exist_ok=True)
    return SiteContext(site="site0", dataset="brain", dataset_path=root, work_dir=work, params=config, seed=0)


def test_initial_weights_are_seeded_and_fit_the_plans_network(site: tuple[Path, dict[str, Any]]) -> None:
    _, config = site
    algo = NnUNet()
    a, b, c = algo.initial_weights(config, 0), algo.initial_weights(config, 0), algo.initial_weights(config, 1)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.array_equal(a[k], c[k]) for k in a)
    state = build_network(parse_params(config), deep_supervision=False).state_dict()
    assert list(a) == list(state)
    assert all(a[k].shape == tuple(state[k].shape) for k in a)


def test_train_follows_the_poly_schedule_and_evaluate_scores(site: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    root, config = site
    algo = NnUNet()
    start = algo.initial_weights(config, 0)
    algo.setup(_context(root, config, tmp_path / "task"))

    early = algo.train(start, TrainConfig(round=1, local_steps=3, seed=7, progress=(0.0, 0.01)))
    early_lrs = list(algo.lr_history)
    late = algo.train(start, TrainConfig(round=1, local_steps=3, seed=7, progress=(0.99, 1.0)))
    late_lrs = list(algo.lr_history)

    assert early.n_samples == 3  # the labelled test case is held out, all training cases train
    assert math.isfinite(early.metrics["loss"]) and early.metrics["steps"] == 3
    assert any(not np.array_equal(early.weights[k], start[k]) for k in start)
    assert early.weights.keys() == start.keys()
    assert early_lrs == pytest.approx([poly_lr(1e-2, (0.0, 0.01), i, 3) for i in range(3)])
    assert late_lrs == pytest.approx([poly_lr(1e-2, (0.99, 1.0), i, 3) for i in range(3)])
    assert early_lrs[0] == pytest.approx(1e-2) and max(late_lrs) < 0.02 * min(early_lrs)
    # the smaller rate moves the weights less
    moved = [sum(float(np.abs(u.weights[k] - start[k]).sum()) for k in start) for u in (early, late)]
    assert moved[1] < moved[0]

    again = algo.train(start, TrainConfig(round=1, local_steps=3, seed=7, progress=(0.0, 0.01)))
    assert all(np.array_equal(again.weights[k], early.weights[k]) for k in start)  # seeded: same task, same result
    prox = algo.train(start, TrainConfig(round=1, local_steps=3, seed=7, progress=(0.0, 0.01), proximal_mu=10.0))
    assert math.isfinite(prox.metrics["loss"]) and any(
        not np.array_equal(prox.weights[k], early.weights[k]) for k in start
    )

    evaluation = algo.evaluate(early.weights)
    metrics = evaluation.metrics
    assert evaluation.n_samples == 1 and metrics["held_out_test"] == 1.0
    dice = {k: v for k, v in metrics.items() if k.startswith("dice_")}
    assert {"dice_mean", "dice_wt", "dice_tc", "dice_et"} <= dice.keys() and len(dice) == 7
    assert all(0.0 <= v <= 1.0 for v in dice.values())
    assert {"hd95_wt", "hd95_tc", "hd95_et", "hd95_mean"} <= metrics.keys()
    assert all(math.isfinite(v) for v in metrics.values())


def test_a_task_starts_no_process(
    site: tuple[Path, dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A site runs each task in a forked, sandboxed child that may not fork or spawn again."""
    import multiprocessing.util
    import os
    import subprocess

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the task tried to start a process")

    root, config = site
    algo = NnUNet()
    start = algo.initial_weights(config, 0)
    algo.setup(_context(root, {**config, "mirroring": True}, tmp_path / "task"))
    for module, name in (
        (os, "fork"),
        (os, "posix_spawn"),
        (subprocess, "Popen"),
        (multiprocessing.util, "spawnv_passfds"),
    ):
        monkeypatch.setattr(module, name, refuse)
    update = algo.train(start, TrainConfig(round=1, local_steps=2, seed=0))
    assert algo.evaluate(update.weights).n_samples == 1


def test_without_test_labels_a_validation_part_of_training_is_held_out(
    site: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    _, config = site  # (the same task and grid: the plan fits)
    root = write_site_dataset(
        tmp_path / "site", task="brain-tumour", site_index=0, n_sites=3, seed=1, n_train=3, n_test=0,
        spacing_mm=6.0, shape=(32, 32, 32),
    )  # fmt: skip
    algo = NnUNet()
    start = algo.initial_weights(config, 0)
    algo.setup(_context(root, config, tmp_path / "task"))
    update = algo.train(start, TrainConfig(round=1, local_steps=1, seed=0))
    evaluation = algo.evaluate(update.weights)
    assert update.n_samples == 2 and evaluation.n_samples == 1  # round(0.2 * 3) = 1 case held out
    assert evaluation.metrics["held_out_test"] == 0.0


def test_preprocessing_is_cached_by_its_inputs(site: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    root, config = site
    params = parse_params(config)
    view = cached_raw_view(load_dataset(root), tmp_path, split="training", dataset_name="Dataset500_Site")
    assert cached_raw_view(load_dataset(root), tmp_path, split="training", dataset_name="Dataset500_Site") == view
    first = preprocess_cases(params, view.cases, tmp_path)
    assert not first.reused and sorted(p.name for p in first.folder.iterdir())[:3] == [
        "case_0000.b2nd", "case_0000_seg.b2nd", "case_0001.b2nd",
    ]  # fmt: skip
    assert (first.folder / "properties" / "case_0000.json").is_file()
    again = preprocess_cases(params, view.cases, tmp_path)
    assert again.reused and again.folder == first.folder
    other = preprocess_cases(parse_params({**config, "batch_size": 1}), view.cases, tmp_path)
    assert not other.reused and other.key != first.key  # another plan, another entry
    assert not any(p.name.endswith(".partial") for p in (tmp_path / "nnunet").iterdir())


def _patch(config: dict[str, Any], **entries: Any) -> dict[str, Any]:
    out = copy.deepcopy(config)
    out["plans"]["configurations"]["3d_fullres"].update(entries)
    return out


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda c: _patch(c, patch_size=[512, 512, 512]), "config.plans.configurations.3d_fullres.patch_size"),
        (lambda c: _patch(c, batch_size=1000), "config.plans.configurations.3d_fullres.batch_size"),
        (
            lambda c: _patch(
                c,
                architecture={
                    **c["plans"]["configurations"]["3d_fullres"]["architecture"],
                    "network_class_name": "os.system",
                },
            ),
            "config.plans.configurations.3d_fullres.architecture.network_class_name",
        ),
        (lambda c: {**c, "configuration": "2d_nope"}, "config.configuration"),
        (lambda c: {**c, "initial_lr": float("nan")}, "config.initial_lr"),
        (lambda c: {**c, "batch_size": 99}, "config.batch_size"),
        (lambda c: {**c, "lr": 0.1}, "config.lr"),
        (lambda c: {k: v for k, v in c.items() if k != "plans"}, "config.plans"),
    ],
)
def test_bad_config_is_refused_naming_the_field(site: tuple[Path, dict[str, Any]], change: Any, field: str) -> None:
    _, config = site
    with pytest.raises(ConfigurationError) as info:
        NnUNet().initial_weights(change(config), 0)
    assert info.value.context["field"] == field
    assert "fix the experiment's [config]" in str(info.value)


def test_the_checked_plan_keeps_one_resolved_configuration(site: tuple[Path, dict[str, Any]]) -> None:
    _, config = site
    plans = copy.deepcopy(config["plans"])
    plans["configurations"]["small"] = {"inherits_from": "3d_fullres", "batch_size": 1}
    params = parse_params({**config, "plans": plans, "configuration": "small"})
    assert list(params.plans["configurations"]) == ["small"]
    assert params.batch_size == 1 and params.config["patch_size"] == plans["configurations"]["3d_fullres"]["patch_size"]
