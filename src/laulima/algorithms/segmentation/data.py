"""Site-local cases in memory: read once per task, put on the plan's grid and scale once, augmented per batch.

Every case goes through the experiment's preprocessing plan
(:mod:`laulima.algorithms.segmentation.preprocessing`) as it is read: resampled to the
plan's voxel size and orientation (a no-op for the demo's 4 mm RAS phantoms) and
normalised, so every site trains and scores on the grid the exported model records.

The demo's cases are small (48³, at most four channels), so a task reads its whole split
into memory; batches are drawn in this process (no data-loader workers: the task is a
forked child and must not fork again). Randomness comes only from the seed handed in: a
numpy Generator orders the cases and the transforms carry their own RandomState, so no
global RNG state is read or left behind.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.transforms import Compose, RandCropByPosNegLabeld, RandFlipd, SpatialPadd
from monai.utils import convert_to_tensor

from laulima.algorithms.segmentation.preprocessing import DEFAULT_PLAN, PreprocessingPlan, normalize, to_plan_grid
from laulima.errors import DataError
from laulima.imaging import Case, SegmentationDataset, read_case

__all__ = [
    "Sample",
    "Split",
    "augmentation",
    "batches",
    "load_samples",
    "normalize",
    "poisson_batches",
    "split_cases",
]


@dataclass(frozen=True)
class Sample:
    """One subject in memory on the plan's grid: normalised image [C, X, Y, Z] float32, label [1, X, Y, Z] uint8."""

    id: str
    image: torch.Tensor
    label: torch.Tensor


@dataclass(frozen=True)
class Split:
    """The cases a site trains on and the labelled cases it is evaluated on."""

    train: tuple[Case, ...]
    held_out: tuple[Case, ...]
    source: str
    """``"test"`` (imagesTs with labels) or ``"validation"`` (carved from training: no test labels)."""


def split_cases(dataset: SegmentationDataset, val_fraction: float = 0.2) -> Split:
    """Test subjects with labels are held out; without any, a fixed ``val_fraction`` of training is.

    The validation subjects are the ones whose ids hash lowest (sha256), so the split is the
    same on every run and every machine and does not depend on the order of the listing.
    """
    labelled = tuple(case for case in dataset.test if case.label is not None)
    if labelled:
        return Split(train=tuple(dataset.training), held_out=labelled, source="test")
    training = tuple(dataset.training)
    n_val = min(len(training) - 1, max(1, round(val_fraction * len(training))))
    ranked = sorted(training, key=lambda case: hashlib.sha256(case.id.encode("utf-8")).hexdigest())
    chosen = {case.id for case in ranked[:n_val]}
    return Split(
        train=tuple(c for c in training if c.id not in chosen),
        held_out=tuple(c for c in training if c.id in chosen),
        source="validation",
    )


def load_samples(cases: Sequence[Case], n_channels: int, plan: PreprocessingPlan = DEFAULT_PLAN) -> list[Sample]:
    """Read ``cases``, resample image and label to ``plan``'s grid and normalise; each case must have a label."""
    samples = []
    for case in cases:
        image, label, affine = read_case(case, n_channels)
        if label is None:
            raise DataError(
                f"case {case.id!r} ({case.images[0]}) has no label; only labelled cases can be trained on or scored",
                file=str(case.images[0]),
            )
        image, label, _ = to_plan_grid(image, affine, plan, label)
        assert label is not None
        samples.append(
            Sample(id=case.id, image=normalize(image, plan), label=torch.from_numpy(np.ascontiguousarray(label))[None])
        )
    return samples


def augmentation(roi_size: Sequence[int], seed: int) -> Compose:
    """Pad to ``roi_size``, crop ``roi_size`` centred on foreground or background (1:1), flip each axis (p = 0.5)."""
    keys = ["image", "label"]
    transform = Compose(
        [
            SpatialPadd(keys, spatial_size=roi_size),
            RandCropByPosNegLabeld(keys, label_key="label", spatial_size=roi_size, pos=1.0, neg=1.0, num_samples=1),
            RandFlipd(keys, prob=0.5, spatial_axis=0),
            RandFlipd(keys, prob=0.5, spatial_axis=1),
            RandFlipd(keys, prob=0.5, spatial_axis=2),
        ]
    )
    return transform.set_random_state(seed=seed)


def batches(
    samples: Sequence[Sample], batch_size: int, roi_size: Sequence[int], seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (image [B, C, *roi], label [B, 1, *roi] float32) batches; epochs are shuffled permutations."""
    if not samples:
        raise ValueError("no training cases")
    sequence = np.random.SeedSequence(seed)
    order_seed, transform_seed = sequence.generate_state(2)
    rng = np.random.default_rng(order_seed)
    transform = augmentation(roi_size, int(transform_seed))
    order: list[int] = []
    while True:
        images, labels = [], []
        for _ in range(batch_size):
            if not order:
                order = rng.permutation(len(samples)).tolist()
            sample = samples[order.pop()]
            out = transform({"image": sample.image, "label": sample.label})
            crop = out[0] if isinstance(out, list) else out
            images.append(convert_to_tensor(crop["image"], dtype=torch.float32, track_meta=False))
            labels.append(convert_to_tensor(crop["label"], dtype=torch.float32, track_meta=False))
        yield torch.stack(images), torch.stack(labels)


def poisson_batches(
    samples: Sequence[Sample], rate: float, roi_size: Sequence[int], seed: int, rng: np.random.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless batches for DP-SGD: each case joins each batch independently with probability ``rate``.

    Poisson sampling is what the accountant's subsampled Gaussian assumes: a batch's size
    varies (it may be empty: [0, C, *roi] and [0, 1, *roi]) and a case gives at most one
    crop per batch, so a case is the unit protected. Who joins is drawn from ``rng``, which
    must be secret (the caller seeds it from the OS): the amplification by subsampling holds
    only if the hub cannot recompute the sample. Crops and flips come from ``seed``, as in
    :func:`batches`; they need no secrecy, since each case's gradient is clipped whatever its crop.
    """
    if not samples:
        raise ValueError("no training cases")
    if not 0 < rate <= 1:
        raise ValueError(f"sampling rate {rate!r} is not in (0, 1]")
    transform = augmentation(roi_size, int(np.random.SeedSequence(seed).generate_state(1)[0]))
    channels = samples[0].image.shape[0]
    while True:
        chosen = np.flatnonzero(rng.random(len(samples)) < rate)
        if not len(chosen):
            yield torch.zeros((0, channels, *roi_size)), torch.zeros((0, 1, *roi_size))
            continue
        images, labels = [], []
        for index in chosen:
            sample = samples[int(index)]
            out = transform({"image": sample.image, "label": sample.label})
            crop = out[0] if isinstance(out, list) else out
            images.append(convert_to_tensor(crop["image"], dtype=torch.float32, track_meta=False))
            labels.append(convert_to_tensor(crop["label"], dtype=torch.float32, track_meta=False))
        yield torch.stack(images), torch.stack(labels)
