"""Segmentation data: a tiny synthetic Decathlon writer (shared by the segmentation tests), splits, batches."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from laulima.algorithms.segmentation.data import batches, load_samples, normalize, split_cases
from laulima.imaging import load_dataset

AFFINE = np.diag([4.0, 4.0, 4.0, 1.0])
AFFINE[:3, 3] = [-40.0, -50.0, -30.0]


def sphere_case(size: int, rng: np.random.Generator, n_channels: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """A noisy "head" (a large ball, zero outside) holding a bright sphere: label 1 is the sphere."""
    grid = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij"), axis=-1).astype(np.float32)
    head = np.linalg.norm(grid - (size - 1) / 2, axis=-1) < 0.48 * size
    radius = rng.uniform(size / 7, size / 5)
    centre = (size - 1) / 2 + rng.uniform(-size / 8, size / 8, size=3)
    label = (np.linalg.norm(grid - centre, axis=-1) < radius).astype(np.uint8)
    channels = []
    for c in range(n_channels):
        scale = rng.uniform(50, 150) * (1 + c)
        image = head * (1.0 + 0.15 * rng.standard_normal(head.shape)) + label * 1.2
        channels.append((image * scale * head).astype(np.float32))
    return np.stack(channels, axis=-1) if n_channels > 1 else channels[0], label


def write_sphere_site(
    root: Path,
    *,
    n_train: int,
    n_test: int,
    size: int = 24,
    n_channels: int = 1,
    seed: int = 0,
    test_labels: bool = True,
    labels: dict[int, str] | None = None,
) -> Path:
    """A Decathlon folder (dataset.json, imagesTr, labelsTr, imagesTs, labelsTs) of sphere phantoms."""
    rng = np.random.default_rng(seed)
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    training, test = [], []
    for i in range(n_train + n_test):
        case_id = f"sphere_{i:03d}"
        image, label = sphere_case(size, rng, n_channels)
        split = "Tr" if i < n_train else "Ts"
        nib.save(nib.Nifti1Image(image, AFFINE), str(root / f"images{split}" / f"{case_id}.nii.gz"))
        if split == "Tr" or test_labels:
            nib.save(nib.Nifti1Image(label, AFFINE), str(root / f"labels{split}" / f"{case_id}.nii.gz"))
        if split == "Tr":
            training.append({"image": f"./imagesTr/{case_id}.nii.gz", "label": f"./labelsTr/{case_id}.nii.gz"})
        else:
            test.append(f"./imagesTs/{case_id}.nii.gz")
    meta = {
        "name": "Spheres",
        "description": "synthetic test data",
        "tensorImageSize": "4D" if n_channels > 1 else "3D",
        "modality": {str(c): f"MR{c}" for c in range(n_channels)},
        "labels": {str(k): v for k, v in (labels or {0: "background", 1: "Sphere"}).items()},
        "numTraining": n_train,
        "numTest": n_test,
        "training": training,
        "test": test,
    }
    (root / "dataset.json").write_text(json.dumps(meta, indent=1))
    return root


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sphere_site(tmp_path_factory.mktemp("spheres"), n_train=5, n_test=2, size=20)


def test_split_uses_labelled_test_subjects(site: Path):
    split = split_cases(load_dataset(site))
    assert split.source == "test"
    assert len(split.train) == 5 and len(split.held_out) == 2


def test_split_falls_back_to_a_fixed_validation_split(tmp_path: Path):
    root = write_sphere_site(tmp_path, n_train=10, n_test=2, size=16, test_labels=False)
    first = split_cases(load_dataset(root), 0.2)
    assert first.source == "validation"
    assert len(first.held_out) == 2 and len(first.train) == 8
    assert not {c.id for c in first.held_out} & {c.id for c in first.train}
    assert split_cases(load_dataset(root), 0.2) == first


def test_normalize_is_a_per_channel_z_score_over_the_foreground():
    rng = np.random.default_rng(0)
    image = np.zeros((2, 8, 8, 8), np.float32)
    image[0, 2:6, 2:6, 2:6] = rng.normal(300, 20, (4, 4, 4))
    image[1, 2:6, 2:6, 2:6] = rng.normal(5, 1, (4, 4, 4))
    out = normalize(image)
    assert isinstance(out, torch.Tensor) and type(out) is torch.Tensor and out.dtype == torch.float32
    inside = out[:, 2:6, 2:6, 2:6].reshape(2, -1)
    assert torch.allclose(inside.mean(dim=1), torch.zeros(2), atol=1e-4)
    assert torch.allclose(inside.std(dim=1, unbiased=False), torch.ones(2), atol=1e-3)
    # The background is darker than every foreground value, not 0 (which is the foreground's mean).
    assert bool((out[:, 0, 0, 0] < inside.min(dim=1).values).all())


def test_normalize_gives_the_same_brain_with_or_without_a_zero_background():
    """A skull-stripped scan (exact zeros outside) and the same scan with Rician noise outside."""
    rng = np.random.default_rng(1)
    grid = np.indices((32, 32, 32)).astype(np.float32)
    brain = np.linalg.norm(grid - 15.5, axis=0) < 11
    tissue = np.where(np.linalg.norm(grid - 15.5, axis=0) < 6, 0.9, 0.55) + 0.03 * rng.standard_normal(brain.shape)
    stripped = np.where(brain, tissue, 0.0).astype(np.float32)[None]
    noise = 0.04 * np.abs(rng.standard_normal(brain.shape) + 1j * rng.standard_normal(brain.shape))
    noisy = np.where(brain, tissue, noise).astype(np.float32)[None]
    a, b = normalize(stripped)[0][brain], normalize(noisy)[0][brain]
    assert float((a - b).abs().max()) < 0.05
    # MONAI's z-score over non-zero voxels, what training used before, moves the brain by a whole unit.
    from monai.transforms import NormalizeIntensity

    old_a = torch.as_tensor(NormalizeIntensity(nonzero=True)(torch.from_numpy(stripped)))[0][brain]
    old_b = torch.as_tensor(NormalizeIntensity(nonzero=True)(torch.from_numpy(noisy)))[0][brain]
    assert float((old_a - old_b).abs().mean()) > 0.5


def test_batches_are_deterministic_from_the_seed_and_leave_global_rng_alone(site: Path):
    samples = load_samples(split_cases(load_dataset(site)).train, 1)
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()[1].copy()
    a = [b for _, b in zip(range(3), batches(samples, 2, (16, 16, 16), seed=5), strict=False)]
    b = [b for _, b in zip(range(3), batches(samples, 2, (16, 16, 16), seed=5), strict=False)]
    c = next(batches(samples, 2, (16, 16, 16), seed=6))
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0][0], c[0])
    assert a[0][0].shape == (2, 1, 16, 16, 16) and a[0][1].shape == (2, 1, 16, 16, 16)
    assert type(a[0][0]) is torch.Tensor
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], numpy_state)


def test_batches_pad_volumes_smaller_than_the_crop(site: Path):
    samples = load_samples(split_cases(load_dataset(site)).train, 1)
    image, label = next(batches(samples, 1, (32, 32, 32), seed=0))
    assert image.shape == (1, 1, 32, 32, 32) and set(label.unique().tolist()) <= {0.0, 1.0}
