"""The preprocessing plan: the grid and the intensity scale a model is trained at, applied the same everywhere.

A U-Net learns at one voxel size: its receptive field counts voxels, not millimetres, so
a 1 mm scan shown to a model trained at 4 mm is a head four times too large, and it
answers nonsense. The plan (``[config] preprocessing`` of an experiment) fixes the grid
(voxel spacing and orientation) and the intensity normalisation; every site applies it
when it loads cases for training and evaluation, the exported model card records it, and
``laulima predict`` applies it to the scan and maps the labels back onto the scan's own
grid.

Normalisation (``zscore-foreground``): per channel, the mean and standard deviation of the
*foreground* voxels, those brighter than ``foreground_fraction`` of the way from the
channel's minimum to its ``foreground_percentile``-th percentile, and every voxel shifted
and scaled by them. Unlike a z-score over the non-zero voxels (MONAI's ``nonzero=True``),
this does not depend on whether the background is exactly zero: a skull-stripped scan
(zeros outside the brain) and the same scan with scanner noise outside (no exact zeros,
like the demo's phantoms) get nearly the same foreground, so nearly the same brain
intensities, and the background maps to the same low value instead of to 0, the mean of
the brain.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np
import torch

from laulima.errors import ConfigurationError
from laulima.imaging.resample import Grid, orientation_matrix, plan_grid, resample_image, resample_labels

__all__ = [
    "DEFAULT_PLAN",
    "NORMALIZATIONS",
    "PreprocessingPlan",
    "normalize",
    "parse_plan",
    "to_plan_grid",
]

NORMALIZATIONS: tuple[str, ...] = ("zscore-foreground", "none")
"""``zscore-foreground`` (see the module doc) or ``none`` (images already on the model's scale)."""


@dataclass(frozen=True)
class PreprocessingPlan:
    """Grid and intensity scale of a model; the defaults are the demo phantoms' (4 mm, RAS)."""

    spacing_mm: tuple[float, float, float] = (4.0, 4.0, 4.0)
    """Voxel size of the model's grid along its three axes."""
    orientation: str = "RAS"
    """Where the grid's axes point (nibabel axis codes): RAS = +x right, +y anterior, +z superior."""
    normalization: str = "zscore-foreground"
    foreground_fraction: float = 0.2
    """Foreground: brighter than this fraction of the way from the minimum to the percentile below.

    0.2 lies above the Rician background of the demo's noisiest scanner (sigma 0.04 of a
    white-matter level near 0.9: about one voxel in 10^5 crosses it) and below T1 CSF
    (about 0.4 of that level), so the foreground is the brain, with or without noise outside.
    At 0.1 the noisy background's tail entered the foreground and moved the normalised
    brain by up to one unit against the zero-background scan."""
    foreground_percentile: float = 99.0
    """A high percentile rather than the maximum: one hot voxel must not move the threshold."""

    def as_config(self) -> dict[str, Any]:
        """JSON-able; :func:`parse_plan` turns it back into this plan."""
        return {
            "spacing_mm": list(self.spacing_mm),
            "orientation": self.orientation,
            "normalization": self.normalization,
            "foreground_fraction": self.foreground_fraction,
            "foreground_percentile": self.foreground_percentile,
        }

    def describe(self) -> str:
        """One line for people (the model card's ``preprocessing.summary``)."""
        grid = " x ".join(f"{s:g}" for s in self.spacing_mm)
        if self.normalization == "none":
            scale = "no intensity normalisation"
        else:
            scale = (
                f"per-channel z-score over the foreground (voxels above {self.foreground_fraction:g} of the way "
                f"from the minimum to the {self.foreground_percentile:g}th percentile)"
            )
        return f"resampled to {grid} mm voxels in {self.orientation} orientation; {scale}"

    def grid(self, affine: np.ndarray, shape: tuple[int, ...]) -> Grid:
        """The plan's grid over the field of view of an image on (``affine``, ``shape``)."""
        return plan_grid(affine, shape[-3:], self.spacing_mm, self.orientation)


DEFAULT_PLAN = PreprocessingPlan()
_FIELDS = tuple(PreprocessingPlan.__dataclass_fields__)


def parse_plan(value: Mapping[str, Any] | PreprocessingPlan | None) -> PreprocessingPlan:
    """Check ``[config] preprocessing``; every error names the key (``config.preprocessing.<key>``) and the value."""
    if value is None:
        return DEFAULT_PLAN
    if isinstance(value, PreprocessingPlan):
        return value
    if not isinstance(value, Mapping):
        _fail("", value, "must be a table, e.g. {spacing_mm = 4.0, orientation = 'RAS'}")
    unknown = sorted(set(value) - set(_FIELDS))
    if unknown:
        _fail(unknown[0], value[unknown[0]], f"is not a preprocessing setting (known: {', '.join(_FIELDS)})")
    spacing = value.get("spacing_mm", DEFAULT_PLAN.spacing_mm)
    if _is_number(spacing):
        spacing = (spacing,) * 3
    if (
        isinstance(spacing, str)
        or not isinstance(spacing, list | tuple)
        or len(spacing) != 3
        or not all(_is_number(s) and 0 < float(s) < 100 for s in spacing)
    ):
        _fail("spacing_mm", spacing, "must be a voxel size in mm (0 < s < 100), or three of them [x, y, z]")
    orientation = value.get("orientation", DEFAULT_PLAN.orientation)
    try:
        orientation_matrix(orientation)
    except ValueError as exc:
        _fail("orientation", orientation, f"is not an orientation ({exc})")
    normalization = value.get("normalization", DEFAULT_PLAN.normalization)
    if normalization not in NORMALIZATIONS:
        _fail("normalization", normalization, f"must be one of {list(NORMALIZATIONS)}")
    fraction = value.get("foreground_fraction", DEFAULT_PLAN.foreground_fraction)
    if not (_is_number(fraction) and 0 <= float(fraction) < 1):
        _fail("foreground_fraction", fraction, "must be a number in [0, 1)")
    percentile = value.get("foreground_percentile", DEFAULT_PLAN.foreground_percentile)
    if not (_is_number(percentile) and 50 <= float(percentile) <= 100):
        _fail("foreground_percentile", percentile, "must be a number in [50, 100]")
    return PreprocessingPlan(
        spacing_mm=(float(spacing[0]), float(spacing[1]), float(spacing[2])),
        orientation=str(orientation).upper(),
        normalization=str(normalization),
        foreground_fraction=float(fraction),
        foreground_percentile=float(percentile),
    )


def to_plan_grid(
    image: np.ndarray, affine: np.ndarray, plan: PreprocessingPlan, label: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None, Grid]:
    """``image`` [C,X,Y,Z] (and its ``label`` [X,Y,Z]) on the plan's grid, not yet normalised; and that grid."""
    grid = plan.grid(affine, image.shape)
    resampled = resample_image(image, affine, grid)
    labels = None if label is None else resample_labels(label, affine, grid)
    return resampled, labels, grid


def normalize(image: np.ndarray | torch.Tensor, plan: PreprocessingPlan = DEFAULT_PLAN) -> torch.Tensor:
    """``image`` [C,X,Y,Z] on the model's intensity scale, per channel (see the module doc); float32 tensor.

    A channel whose foreground is a single value (or empty) is only shifted, never divided
    by zero.
    """
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    array = np.asarray(array, dtype=np.float32)
    if plan.normalization == "none":
        return torch.from_numpy(array.copy())
    out = np.empty_like(array)
    for c, channel in enumerate(array):
        values = channel[np.isfinite(channel)]
        if values.size == 0:
            out[c] = 0.0
            continue
        low = float(values.min())
        high = float(np.percentile(values, plan.foreground_percentile))
        foreground = values[values > low + plan.foreground_fraction * (high - low)]
        if foreground.size < 2:
            foreground = values
        mean = float(foreground.mean(dtype=np.float64))
        std = float(foreground.std(dtype=np.float64))
        out[c] = (channel - mean) / std if std > 0 else channel - mean
    return torch.from_numpy(np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0))


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))


def _fail(key: str, value: object, why: str) -> NoReturn:
    name = f"preprocessing.{key}" if key else "preprocessing"
    raise ConfigurationError(
        f"segmentation config: {name} = {value!r} {why}; fix the experiment's [config] table",
        field=f"config.{name}",
    )
