"""Three small brain-tumour sites, and the nnU-Net fingerprint and plans of their pooled cases, once per session.

The sites differ the way hospitals do where nnU-Net's fingerprint looks: voxel spacing (one
site acquires thicker slices along the first NIfTI axis, so the median spacing is anisotropic
and the planner transposes), field of view, cohort size, and one case whose label map is
empty (no foreground: it adds geometry but no intensity samples). Images are skull-stripped
(background set to 0) as BraTS images are, so cropping to the non-zero region matters.

The pooled reference is nnU-Net's own ``DatasetFingerprintExtractor.run()`` and
``ExperimentPlanner`` on one raw dataset holding every site's cases.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import ndimage

from laulima.core.fingerprint import SAMPLES_PER_CASE, SiteFingerprint
from laulima.imaging import write_site_dataset
from laulima.imaging.nifti import read_label_array, read_nifti, write_label_nifti, write_nifti
from laulima.nnunet.fingerprint import site_fingerprint
from laulima.nnunet.rawview import build_raw_view

POOLED_NAME = "Dataset501_Pooled"


@dataclass(frozen=True)
class SiteSpec:
    spacing_mm: float
    shape: tuple[int, int, int]
    n_train: int
    stretch_x: float = 1.0  # thicker slices along the first NIfTI axis (nnU-Net's last axis)
    empty_label: int | None = None  # index of a training case whose label map is emptied


SITES = (
    SiteSpec(6.0, (32, 32, 32), n_train=3, stretch_x=1.5),
    SiteSpec(5.0, (38, 38, 38), n_train=2, stretch_x=1.6, empty_label=1),
    SiteSpec(7.0, (28, 28, 28), n_train=2),
)
N_CASES = sum(site.n_train for site in SITES)


@dataclass(frozen=True)
class Pooled:
    fingerprint: dict[str, Any]  # nnU-Net's dataset_fingerprint.json of all sites' cases
    plans: dict[str, Any]  # nnU-Net's nnUNetPlans.json from it, with the images present


def _skull_strip_and_stretch(root: Path, spec: SiteSpec) -> None:
    """Zero the background of every training image and give the grid ``spec``'s slice thickness."""
    entries = json.loads((root / "dataset.json").read_text("utf-8"))["training"]
    for index, entry in enumerate(entries):
        image_path, label_path = root / entry["image"], root / entry["label"]
        image, affine = read_nifti(image_path)
        label, _ = read_label_array(label_path)
        head = ndimage.binary_fill_holes(ndimage.gaussian_filter(image.mean(axis=0), 1.0) > 0.15)
        image[:, ~head] = 0.0
        affine = affine.copy()
        affine[:3, 0] *= spec.stretch_x
        if index == spec.empty_label:
            label = np.zeros_like(label)
        write_nifti(image_path, image, affine)
        write_label_nifti(label_path, label, affine)


@pytest.fixture(scope="session")
def site_datasets(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The three sites' Decathlon datasets (read-only: copy one to change it)."""
    import torch

    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("nnunet-sites")
    roots = []
    for index, spec in enumerate(SITES):
        root = write_site_dataset(
            base / f"site{index}", task="brain-tumour", site_index=index, n_sites=len(SITES), seed=0,
            n_train=spec.n_train, n_test=1, spacing_mm=spec.spacing_mm, shape=spec.shape,
        )  # fmt: skip
        _skull_strip_and_stretch(root, spec)
        roots.append(root)
    return roots


@pytest.fixture(scope="session")
def site_fingerprints(site_datasets: list[Path], tmp_path_factory: pytest.TempPathFactory) -> list[SiteFingerprint]:
    work = tmp_path_factory.mktemp("nnunet-work")
    return [site_fingerprint(root, work / f"site{i}") for i, root in enumerate(site_datasets)]


@contextlib.contextmanager
def nnunet_env(base: Path) -> Iterator[tuple[Path, Path]]:
    """nnU-Net's raw and preprocessed folders under ``base``, set in the environment for the block."""
    raw, preprocessed = base / "nnUNet_raw", base / "nnUNet_preprocessed"
    raw.mkdir(exist_ok=True)
    preprocessed.mkdir(exist_ok=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("nnUNet_raw", str(raw))
        mp.setenv("nnUNet_preprocessed", str(preprocessed))
        mp.setenv("nnUNet_n_proc_DA", "1")  # the VRAM estimate sets torch's threads to this, then back
        yield raw, preprocessed


def _pool_raw_views(site_datasets: list[Path], scratch: Path, dest: Path) -> int:
    """One nnU-Net raw dataset with every site's labelled training cases (renumbered), from the sites' raw views."""
    (dest / "imagesTr").mkdir(parents=True)
    (dest / "labelsTr").mkdir()
    number, dataset_json = 0, None
    for i, root in enumerate(site_datasets):
        view = build_raw_view(root, scratch / f"site{i}")
        dataset_json = view.dataset_json
        for case in view.cases:
            new = f"case_{number:04d}"
            for channel, image in enumerate(case.images):
                shutil.copyfile(image, dest / "imagesTr" / f"{new}_{channel:04d}.nii.gz")
            shutil.copyfile(case.label, dest / "labelsTr" / f"{new}.nii.gz")
            number += 1
    assert dataset_json is not None
    (dest / "dataset.json").write_text(json.dumps({**dataset_json, "numTraining": number}), "utf-8")
    return number


@pytest.fixture(scope="session")
def pooled(site_datasets: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Pooled:
    """nnU-Net's own fingerprint and plans of the pooled cases.

    nnU-Net samples 10^8 / N foreground voxels per case in a pooled run; here it samples
    ``SAMPLES_PER_CASE``, as every site does, by setting the extractor's total to
    ``SAMPLES_PER_CASE * N``. Its sampler draws with a fixed seed per case, so both sides then
    sample the same voxels, and any difference is the federated aggregation's alone (10^8 /
    N per case would also need gigabytes for a few cases).
    """
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

    base = tmp_path_factory.mktemp("nnunet-pooled")
    with nnunet_env(base) as (raw, preprocessed):
        n = _pool_raw_views(site_datasets, base / "views", raw / POOLED_NAME)
        assert n == N_CASES
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            extractor = DatasetFingerprintExtractor(POOLED_NAME, num_processes=1)
            extractor.show_progress_bar = False
            extractor.num_foreground_voxels_for_intensitystats = SAMPLES_PER_CASE * n
            extractor.run()
            ExperimentPlanner(POOLED_NAME).plan_experiment()
        folder = preprocessed / POOLED_NAME
        fingerprint = json.loads((folder / "dataset_fingerprint.json").read_text("utf-8"))
        plans = json.loads((folder / "nnUNetPlans.json").read_text("utf-8"))
    return Pooled(fingerprint, plans)
