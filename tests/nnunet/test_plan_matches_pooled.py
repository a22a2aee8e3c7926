"""nnU-Net's plans from the merged fingerprint (no images at hand) against its plans for the pooled raw dataset."""

from __future__ import annotations

import math
import os
from typing import Any

import pytest

from laulima.core.fingerprint import MergedFingerprint, SiteFingerprint, merge_fingerprints
from laulima.errors import ConfigurationError
from laulima.nnunet.planning import nnunet_dataset_name, plan_experiment
from tests.nnunet.conftest import POOLED_NAME, Pooled

ARCH_KEYS = (
    "n_stages",
    "features_per_stage",
    "kernel_sizes",
    "strides",
    "n_conv_per_stage",
    "n_conv_per_stage_decoder",
)
CONFIG_KEYS = (
    "spacing", "patch_size", "batch_size", "median_image_size_in_voxels", "normalization_schemes",
    "use_mask_for_norm", "batch_dice", "data_identifier",
)  # fmt: skip
PLAN_KEYS = (
    "dataset_name", "plans_name", "image_reader_writer", "transpose_forward", "transpose_backward",
    "original_median_spacing_after_transp", "original_median_shape_after_transp", "experiment_planner_used",
    "label_manager",
)  # fmt: skip


@pytest.fixture(scope="module")
def merged(site_fingerprints: list[SiteFingerprint]) -> MergedFingerprint:
    return merge_fingerprints(site_fingerprints)


@pytest.fixture(scope="module")
def plans(merged: MergedFingerprint) -> dict[str, Any]:
    return plan_experiment(merged.fingerprint, merged.dataset_json, dataset_name=POOLED_NAME)


def test_the_pooled_plan_is_not_trivial(pooled: Pooled) -> None:
    """Guard on the test data: the sites' spacings make nnU-Net transpose, and plan a 3D network."""
    assert pooled.plans["transpose_forward"] != [0, 1, 2]
    assert {"2d", "3d_fullres"} <= set(pooled.plans["configurations"])
    assert pooled.plans["image_reader_writer"] == "SimpleITKIO"


def test_plan_matches_pooled(plans: dict[str, Any], pooled: Pooled) -> None:
    for key in PLAN_KEYS:
        assert plans[key] == pooled.plans[key], key
    assert set(plans["configurations"]) == set(pooled.plans["configurations"])
    for name, theirs in pooled.plans["configurations"].items():
        ours = plans["configurations"][name]
        for key in CONFIG_KEYS:
            assert ours.get(key) == theirs.get(key), f"{name}.{key}"
        for key in ARCH_KEYS:
            assert ours["architecture"]["arch_kwargs"][key] == theirs["architecture"]["arch_kwargs"][key], (
                f"{name}.architecture.arch_kwargs.{key}"
            )


def test_plan_differs_from_pooled_only_in_sampled_intensity_statistics(plans: dict[str, Any], pooled: Pooled) -> None:
    """Everything but the intensity percentiles (a quantile-sketch merge) is identical, key for key."""
    key = "foreground_intensity_properties_per_channel"
    assert {k: v for k, v in plans.items() if k != key} == {k: v for k, v in pooled.plans.items() if k != key}
    assert plans[key].keys() == pooled.plans[key].keys()
    for channel, theirs in pooled.plans[key].items():
        for stat in ("mean", "std", "min", "max"):
            assert math.isclose(plans[key][channel][stat], theirs[stat], rel_tol=1e-9), f"{channel}.{stat}"


def test_features_reach_the_network(merged: MergedFingerprint, plans: dict[str, Any]) -> None:
    small = plan_experiment(merged.fingerprint, merged.dataset_json, base_features=4, max_features=16)
    for name in ("2d", "3d_fullres"):
        n = small["configurations"][name]["architecture"]["arch_kwargs"]["n_stages"]
        cap = 16 if name == "3d_fullres" else 16 * 8 // 5
        expected = [min(cap, 4 * 2**i) for i in range(n)]
        assert small["configurations"][name]["architecture"]["arch_kwargs"]["features_per_stage"] == expected
    default = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["features_per_stage"]
    assert default[0] == 32 and max(default) <= 320
    assert small["dataset_name"] == "Dataset500_Laulima"


def test_gpu_memory_target_reaches_the_planner(merged: MergedFingerprint) -> None:
    """A small memory target gives a smaller 3D patch than nnU-Net's 8 GB default for the same (larger) images."""
    fingerprint = _copy(merged.fingerprint)
    fingerprint["shapes_after_crop"] = [[4 * n for n in shape] for shape in fingerprint["shapes_after_crop"]]
    patches = {
        gb: plan_experiment(fingerprint, merged.dataset_json, gpu_memory_target_gb=gb)["configurations"]["3d_fullres"][
            "patch_size"
        ]
        for gb in (0.5, 8.0)
    }
    assert math.prod(patches[0.5]) < math.prod(patches[8.0])


def test_planning_restores_nnunet_paths(merged: MergedFingerprint, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("nnUNet_raw", "/somewhere/raw")
    monkeypatch.delenv("nnUNet_preprocessed", raising=False)
    plan_experiment(merged.fingerprint, merged.dataset_json)
    assert os.environ["nnUNet_raw"] == "/somewhere/raw"
    assert "nnUNet_preprocessed" not in os.environ


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda fp, ds: fp["spacings"][0].__setitem__(1, float("nan")), "fingerprint.spacings[0]"),
        (lambda fp, ds: fp["spacings"].clear(), "fingerprint.spacings"),
        (lambda fp, ds: fp["spacings"][2].__setitem__(0, -1.0), "fingerprint.spacings[2]"),
        (lambda fp, ds: fp["shapes_after_crop"].pop(), "fingerprint.shapes_after_crop"),
        (lambda fp, ds: fp.__setitem__("median_relative_size_after_cropping", 0.0),
         "fingerprint.median_relative_size_after_cropping"),
        (lambda fp, ds: fp["foreground_intensity_properties_per_channel"]["1"].__setitem__("std", float("inf")),
         "fingerprint.foreground_intensity_properties_per_channel.1.std"),
        (lambda fp, ds: ds.__setitem__("numTraining", 3), "dataset_json.numTraining"),
        (lambda fp, ds: ds["labels"].pop("background"), "dataset_json.labels"),
        (lambda fp, ds: ds.__setitem__("file_ending", ".png"), "dataset_json.file_ending"),
    ],
)  # fmt: skip
def test_bad_fingerprint_is_refused_naming_the_field(merged: MergedFingerprint, change: Any, field: str) -> None:
    fingerprint, dataset_json = _copy(merged.fingerprint), _copy(merged.dataset_json)
    change(fingerprint, dataset_json)
    with pytest.raises(ConfigurationError) as caught:
        plan_experiment(fingerprint, dataset_json)
    assert caught.value.context["field"] == field
    assert field in str(caught.value)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"base_features": 0}, "base_features"),
        ({"base_features": 64, "max_features": 32}, "max_features"),
        ({"max_features": True}, "max_features"),
        ({"gpu_memory_target_gb": float("nan")}, "gpu_memory_target_gb"),
        ({"gpu_memory_target_gb": 0}, "gpu_memory_target_gb"),
        ({"dataset_name": "Task500_Brain"}, "dataset_name"),
    ],
)
def test_bad_settings_are_refused_naming_the_field(
    merged: MergedFingerprint, kwargs: dict[str, Any], field: str
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        plan_experiment(merged.fingerprint, merged.dataset_json, **kwargs)
    assert caught.value.context["field"] == field


def test_nnunet_dataset_name() -> None:
    assert nnunet_dataset_name("brain-tumour") == "Dataset500_BrainTumour"
    assert nnunet_dataset_name("laulima BraTS 2021!", 7) == "Dataset007_LaulimaBraTS2021"
    assert nnunet_dataset_name("---") == "Dataset500_Laulima"
    with pytest.raises(ConfigurationError):
        nnunet_dataset_name("brain", 1000)


def _copy(value: Any) -> Any:
    """A deep copy of JSON-like data (lists and dicts), so each case breaks its own."""
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value
