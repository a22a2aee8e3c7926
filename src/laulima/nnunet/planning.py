"""nnU-Net's own experiment planning, run on the federation's merged fingerprint where the experiment is submitted.

The hub merges the sites' fingerprints into nnU-Net's ``dataset_fingerprint.json``
(``laulima.core.fingerprint``) but never imports nnU-Net or torch; this module runs on the
submitting machine and turns that fingerprint into ``nnUNetPlans.json`` with nnU-Net v2's
default ``ExperimentPlanner``, unchanged in every planning rule. nnU-Net reads its inputs
from the folders named by ``nnUNet_raw`` / ``nnUNet_preprocessed`` (looked up in
``os.environ`` at each use, ``nnunetv2/paths.py``), so planning writes them to a temporary
folder and points those variables there for its duration. That makes a call process-wide:
do not plan in two threads at once.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from laulima.core.fingerprint import MAX_AXIS, MAX_CASES, MAX_CHANNELS, SPACING_RANGE_MM
from laulima.errors import ConfigurationError
from laulima.nnunet.environment import environment

__all__ = ["PLANS_NAME", "nnunet_dataset_name", "plan_experiment"]

PLANS_NAME = "nnUNetPlans"
FILE_ENDING = ".nii.gz"
_DATASET_NAME = re.compile(r"^Dataset\d{3}_[A-Za-z0-9_-]+$")
_INTENSITY_KEYS = ("mean", "median", "std", "min", "max", "percentile_99_5", "percentile_00_5")
_FEATURES_RANGE = (1, 4096)
_GPU_MEMORY_RANGE_GB = (0.1, 1024.0)
_INTENSITY_MAX = 1e15


def nnunet_dataset_name(dataset: str, dataset_id: int = 500) -> str:
    """nnU-Net's ``DatasetXXX_Name`` for a Laulima dataset: "brain-tumour" -> "Dataset500_BrainTumour".

    nnU-Net names folders, plans and checkpoints after it, so only letters and digits of the
    Laulima name are kept (each word capitalised); a name without any becomes "Laulima".
    """
    if isinstance(dataset_id, bool) or not isinstance(dataset_id, int) or not 1 <= dataset_id <= 999:
        raise ConfigurationError(
            f"dataset_id must be an integer 1..999 (nnU-Net's three-digit dataset number), got {dataset_id!r}",
            field="dataset_id",
        )
    words = re.findall(r"[A-Za-z0-9]+", str(dataset))
    name = "".join(word[:1].upper() + word[1:] for word in words)[:64] or "Laulima"
    return f"Dataset{dataset_id:03d}_{name}"


def plan_experiment(
    fingerprint: Mapping[str, Any],
    dataset_json: Mapping[str, Any],
    *,
    dataset_name: str = "Dataset500_Laulima",
    base_features: int = 32,
    max_features: int = 320,
    max_features_2d: int | None = None,
    gpu_memory_target_gb: float = 8.0,
) -> dict[str, Any]:
    """``nnUNetPlans.json`` (as a dict) that nnU-Net's default planner makes from ``fingerprint``.

    ``fingerprint``: nnU-Net's ``dataset_fingerprint.json``; ``dataset_json``: its v2
    ``dataset.json`` (channel_names, labels, numTraining, file_ending ".nii.gz").
    ``base_features``: features of the first U-Net stage, doubled per stage up to
    ``max_features`` (3D) or ``max_features_2d`` (2D); nnU-Net's defaults are 32, 320 and 512.
    ``max_features_2d`` None keeps nnU-Net's 2D/3D ratio: ``max_features * 8 // 5`` (320 -> 512).
    ``gpu_memory_target_gb``: the GPU memory nnU-Net sizes patch and batch for.
    """
    name = _check_name(dataset_name)
    features = _check_features(base_features, max_features, max_features_2d)
    memory = _check_memory(gpu_memory_target_gb)
    fp = _check_fingerprint(fingerprint)
    ds = _check_dataset_json(dataset_json, n_cases=len(fp["spacings"]), n_channels=_n_channels(fp))
    with tempfile.TemporaryDirectory(prefix="laulima-plan-") as tmp:
        raw, preprocessed = Path(tmp) / "nnUNet_raw", Path(tmp) / "nnUNet_preprocessed"
        (raw / name / "imagesTr").mkdir(parents=True)
        (preprocessed / name).mkdir(parents=True)
        # "dataset": {} is nnU-Net's explicit (here empty) case list: without it the planner lists
        # imagesTr through a pool of 12 worker processes, for a folder that is empty by design.
        (raw / name / "dataset.json").write_text(json.dumps({**ds, "dataset": {}}), "utf-8")
        (preprocessed / name / "dataset_fingerprint.json").write_text(json.dumps(fp), "utf-8")
        paths = {"nnUNet_raw": str(raw), "nnUNet_preprocessed": str(preprocessed)}
        with environment(paths), contextlib.redirect_stdout(io.StringIO()):
            planner = _planner_class()(name, gpu_memory_target_in_gb=memory, plans_name=PLANS_NAME)
            planner.UNet_base_num_features = features[0]
            planner.UNet_max_features_3d = features[1]
            planner.UNet_max_features_2d = features[2]
            planner.plan_experiment()
        plans: dict[str, Any] = json.loads((preprocessed / name / f"{PLANS_NAME}.json").read_text("utf-8"))
    # The planning rules are the default planner's, unchanged: record it as such, so that nnU-Net's
    # tools (and a pooled run to compare with) see the same plans.
    plans["experiment_planner_used"] = "ExperimentPlanner"
    return plans


def _planner_class() -> type:
    """nnU-Net's ``ExperimentPlanner`` for a machine that holds the fingerprint but none of the images."""
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    class FederatedPlanner(ExperimentPlanner):  # type: ignore[misc]
        """The default planner; only the image reader is chosen without an image to try.

        nnU-Net picks the reader by trying to open the first training image with each reader
        that supports the file ending. Images stay at the sites, so this asks for the reader
        by file ending alone: for the sites' raw views (3D ``.nii.gz`` written by Laulima) the
        first candidate, SimpleITKIO, is what nnU-Net picks on the images too.
        """

        def determine_reader_writer(self) -> type:
            return determine_reader_writer_from_dataset_json(self.dataset_json, None, verbose=False)

    return FederatedPlanner


# --------------------------------------------------------------------------- input checks


def _bad(field: str, what: str, fix: str) -> ConfigurationError:
    return ConfigurationError(f"{field}: {what}; {fix}", field=field)


def _check_name(dataset_name: str) -> str:
    if not isinstance(dataset_name, str) or not _DATASET_NAME.fullmatch(dataset_name):
        raise _bad(
            "dataset_name",
            f"{dataset_name!r} is not an nnU-Net dataset name",
            "use DatasetXXX_Name (see nnunet_dataset_name)",
        )
    return dataset_name


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_features(base: int, max_3d: int, max_2d: int | None) -> tuple[int, int, int]:
    lo, hi = _FEATURES_RANGE
    given: dict[str, Any] = {"base_features": base, "max_features": max_3d, "max_features_2d": max_2d}
    for field, value in given.items():
        if value is None and field == "max_features_2d":
            continue
        if not _is_int(value) or not lo <= value <= hi:
            raise _bad(field, f"must be an integer {lo}..{hi}, got {value!r}", "nnU-Net's defaults are 32, 320, 512")
    max_2d = min(max_3d * 8 // 5, hi) if max_2d is None else max_2d
    for field, value in (("max_features", max_3d), ("max_features_2d", max_2d)):
        if value < base:
            raise _bad(field, f"{value} is below base_features {base}", "give at least base_features")
    return base, max_3d, max_2d


def _check_memory(value: float) -> float:
    lo, hi = _GPU_MEMORY_RANGE_GB
    if not _is_number(value) or not lo <= value <= hi:
        raise _bad("gpu_memory_target_gb", f"must be a number {lo}..{hi} GB, got {value!r}", "nnU-Net's default is 8")
    return float(value)


def _n_channels(fingerprint: Mapping[str, Any]) -> int:
    return len(fingerprint["foreground_intensity_properties_per_channel"])


def _check_fingerprint(fingerprint: Mapping[str, Any]) -> dict[str, Any]:
    """A clean copy of ``fingerprint`` (plain lists, floats and ints) after checking every value nnU-Net uses."""
    if not isinstance(fingerprint, Mapping):
        raise _bad("fingerprint", f"is {type(fingerprint).__name__}, not an object", "pass dataset_fingerprint.json")
    missing = [k for k in ("spacings", "shapes_after_crop", "foreground_intensity_properties_per_channel",
                           "median_relative_size_after_cropping") if k not in fingerprint]  # fmt: skip
    if missing:
        raise _bad("fingerprint", f"missing {', '.join(missing)}", "pass the merged dataset_fingerprint.json")
    spacings = _table(fingerprint["spacings"], "fingerprint.spacings", float)
    shapes = _table(fingerprint["shapes_after_crop"], "fingerprint.shapes_after_crop", int)
    if len(shapes) != len(spacings):
        raise _bad(
            "fingerprint.shapes_after_crop",
            f"{len(shapes)} shapes for {len(spacings)} spacings",
            "give one spacing and one shape per case",
        )
    channels = _intensities(fingerprint["foreground_intensity_properties_per_channel"])
    size = fingerprint["median_relative_size_after_cropping"]
    if not _is_number(size) or not 0.0 < size <= 1.0:
        raise _bad("fingerprint.median_relative_size_after_cropping", f"must lie in (0, 1], got {size!r}", "fix it")
    return {
        "spacings": spacings,
        "shapes_after_crop": shapes,
        "foreground_intensity_properties_per_channel": channels,
        "median_relative_size_after_cropping": float(size),
    }


def _table(rows: Any, field: str, kind: type) -> list[list[Any]]:
    """One row of three positive values per case (spacing in mm within range, or shape in voxels)."""
    if not isinstance(rows, list | tuple) or not rows:
        raise _bad(field, "is empty or not a list", "give one row per training case")
    if len(rows) > MAX_CASES:
        raise _bad(field, f"lists {len(rows)} cases, more than {MAX_CASES}", "check the fingerprint")
    lo, hi = SPACING_RANGE_MM if kind is float else (1, MAX_AXIS)
    out = []
    for i, row in enumerate(rows):
        ok_type = _is_number if kind is float else _is_int
        if not isinstance(row, list | tuple) or len(row) != 3 or not all(ok_type(v) for v in row):
            raise _bad(
                f"{field}[{i}]",
                f"is {row!r}, not three finite {'numbers' if kind is float else 'integers'}",
                "nnU-Net plans 3D images (x, y, z)",
            )
        if not all(lo <= v <= hi for v in row):
            raise _bad(f"{field}[{i}]", f"{list(row)} is outside {lo}..{hi}", "check the images' headers")
        out.append([kind(v) for v in row])
    return out


def _intensities(value: Any) -> dict[str, dict[str, float]]:
    field = "fingerprint.foreground_intensity_properties_per_channel"
    if not isinstance(value, Mapping) or not 1 <= len(value) <= MAX_CHANNELS:
        raise _bad(field, f"must be an object with 1..{MAX_CHANNELS} channels", 'give {"0": {"mean": ...}, ...}')
    if sorted(str(k) for k in value) != sorted(str(i) for i in range(len(value))):
        raise _bad(field, f"keys {sorted(value)} are not 0..{len(value) - 1}", "number the channels from 0")
    out: dict[str, dict[str, float]] = {}
    for key, stats in value.items():
        where = f"{field}.{key}"
        if not isinstance(stats, Mapping) or any(k not in stats for k in _INTENSITY_KEYS):
            raise _bad(where, "lacks some of " + ", ".join(_INTENSITY_KEYS), "pass the merged fingerprint")
        for k in _INTENSITY_KEYS:
            v = stats[k]
            if not _is_number(v) or abs(v) > _INTENSITY_MAX:
                raise _bad(f"{where}.{k}", f"must be a finite number, got {v!r}", "check the sites' images")
        if stats["std"] < 0 or stats["min"] > stats["max"]:
            raise _bad(where, "has std < 0 or min > max", "pass the merged fingerprint")
        out[str(key)] = {k: float(stats[k]) for k in _INTENSITY_KEYS}
    return out


def _check_dataset_json(dataset_json: Mapping[str, Any], *, n_cases: int, n_channels: int) -> dict[str, Any]:
    if not isinstance(dataset_json, Mapping):
        raise _bad("dataset_json", f"is {type(dataset_json).__name__}, not an object", "pass the merged dataset.json")
    missing = [k for k in ("channel_names", "labels", "numTraining", "file_ending") if k not in dataset_json]
    if missing:
        raise _bad("dataset_json", f"missing {', '.join(missing)}", "pass the merged dataset.json")
    channels = dataset_json["channel_names"]
    if (
        not isinstance(channels, Mapping)
        or sorted(channels) != sorted(str(i) for i in range(len(channels)))
        or not all(isinstance(v, str) and v for v in channels.values())
    ):
        raise _bad("dataset_json.channel_names", f"is {channels!r}", 'give {"0": "FLAIR", "1": ...}')
    if len(channels) != n_channels:
        raise _bad(
            "dataset_json.channel_names",
            f"names {len(channels)} channel(s) but the fingerprint has intensities for {n_channels}",
            "pass the dataset.json merged with this fingerprint",
        )
    labels = dataset_json["labels"]
    if (
        not isinstance(labels, Mapping)
        or labels.get("background") != 0
        or len(labels) < 2
        or not all(isinstance(k, str) and _is_int(v) and 0 <= v <= 255 for k, v in labels.items())
    ):
        raise _bad("dataset_json.labels", f"is {labels!r}", 'give {"background": 0, "tumour": 1, ...}')
    if len(set(labels.values())) != len(labels):
        raise _bad("dataset_json.labels", f"values repeat in {labels!r}", "give every label its own value")
    n = dataset_json["numTraining"]
    if not _is_int(n) or n != n_cases:
        raise _bad(
            "dataset_json.numTraining",
            f"is {n!r} but the fingerprint describes {n_cases} case(s)",
            "pass the dataset.json merged with this fingerprint",
        )
    if dataset_json["file_ending"] != FILE_ENDING:
        raise _bad(
            "dataset_json.file_ending",
            f"is {dataset_json['file_ending']!r}",
            f"sites' raw views are {FILE_ENDING}; plan with that",
        )
    return {
        "channel_names": {str(k): str(v) for k, v in sorted(channels.items(), key=lambda kv: int(kv[0]))},
        "labels": dict(labels),
        "numTraining": n,
        "file_ending": FILE_ENDING,
    }
