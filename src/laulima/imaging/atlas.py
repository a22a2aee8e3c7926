"""The MNI152 tissue atlas that every phantom is deformed from, built offline from nilearn's own files.

nilearn ships the ICBM 2009a symmetric MNI152 T1 template and its grey- and white-matter
probability maps inside its package, so nothing is downloaded. The 2 mm maps are smoothed
(a Gaussian whose FWHM makes up the difference to the target voxel size, so nothing
aliases) and resampled with linear interpolation onto a grid of the target spacing centred
on the brain. Labels are the argmax of the *resampled* probability maps
``[1 - brain, clip(brain - GM - WM, 0, 1), GM, WM]``: labelling before resampling would give
nearest-neighbour staircases instead of the majority tissue of each coarse voxel.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

__all__ = ["BACKGROUND", "CSF", "GREY_MATTER", "TISSUE_NAMES", "WHITE_MATTER", "Atlas", "load_atlas"]

BACKGROUND, CSF, GREY_MATTER, WHITE_MATTER = 0, 1, 2, 3
TISSUE_NAMES: tuple[str, ...] = ("background", "CSF", "grey matter", "white matter")
_SOURCE_SPACING_MM = 2.0
_FWHM_TO_SIGMA = 1.0 / (2.0 * np.sqrt(2.0 * np.log(2.0)))


@dataclass(frozen=True, eq=False)
class Atlas:
    """Template, tissue probabilities and labels on one grid; arrays are read-only (the atlas is cached)."""

    spacing_mm: float
    affine: np.ndarray  # 4x4 voxel -> RAS mm (MNI space)
    template: np.ndarray  # float32 [X,Y,Z], T1 intensities scaled to [0, 1]
    probabilities: np.ndarray  # float32 [4,X,Y,Z]: background, CSF, GM, WM; sums to 1
    labels: np.ndarray  # uint8 [X,Y,Z]: argmax of ``probabilities``
    tissue_means: np.ndarray  # float32 [4]: least-squares template intensity of each pure tissue

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.labels.shape)  # type: ignore[return-value]


def load_atlas(spacing_mm: float = 4.0, shape: tuple[int, int, int] = (48, 48, 48)) -> Atlas:
    """The atlas at ``spacing_mm`` on a ``shape`` grid centred on the brain (cached per process)."""
    if spacing_mm < _SOURCE_SPACING_MM:
        raise ValueError(f"spacing_mm={spacing_mm} is finer than the 2 mm template; use 2 mm or more")
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"shape={shape} must be three sizes of at least 8 voxels")
    return _build(float(spacing_mm), tuple(int(n) for n in shape))


@functools.lru_cache(maxsize=4)
def _build(spacing_mm: float, shape: tuple[int, int, int]) -> Atlas:
    from nilearn import datasets
    from scipy import ndimage

    template_img = datasets.load_mni152_template(resolution=2)
    source_affine = np.asarray(template_img.affine, dtype=np.float64)
    template = np.asarray(template_img.get_fdata(), dtype=np.float32)
    grey = np.asarray(datasets.load_mni152_gm_template(resolution=2).get_fdata(), dtype=np.float32)
    white = np.asarray(datasets.load_mni152_wm_template(resolution=2).get_fdata(), dtype=np.float32)
    brain = np.asarray(datasets.load_mni152_brain_mask(resolution=2).get_fdata(), dtype=np.float32)

    # Target grid: same axes as the template (RAS), centred on the brain's bounding box.
    inside = np.argwhere(brain > 0)
    centre_vox = (inside.min(0) + inside.max(0)) / 2.0
    centre_mm = np.round(source_affine[:3, :3] @ centre_vox + source_affine[:3, 3])
    affine = np.diag([spacing_mm, spacing_mm, spacing_mm, 1.0])
    affine[:3, 3] = centre_mm - (np.asarray(shape) - 1) / 2.0 * spacing_mm

    # Voxel indices of the target grid expressed in source voxels.
    to_source = np.linalg.inv(source_affine) @ affine
    grid = np.indices(shape, dtype=np.float32).reshape(3, -1)
    coords = (to_source[:3, :3] @ grid + to_source[:3, 3:4]).reshape(3, *shape)
    sigma = np.sqrt(spacing_mm**2 - _SOURCE_SPACING_MM**2) * _FWHM_TO_SIGMA / _SOURCE_SPACING_MM

    def resample(volume: np.ndarray) -> np.ndarray:
        smooth = ndimage.gaussian_filter(volume, sigma) if sigma > 0 else volume
        return ndimage.map_coordinates(smooth, coords, order=1, mode="constant", cval=0.0).astype(np.float32)

    template_t, grey_t, white_t, brain_t = (resample(v) for v in (template, grey, white, brain))
    probabilities = np.stack([1.0 - brain_t, np.clip(brain_t - grey_t - white_t, 0.0, 1.0), grey_t, white_t]).clip(
        0.0, 1.0
    )
    probabilities /= probabilities.sum(axis=0, keepdims=True)
    labels = probabilities.argmax(axis=0).astype(np.uint8)
    design = probabilities.reshape(4, -1).T
    means = np.linalg.lstsq(design, template_t.ravel(), rcond=None)[0].astype(np.float32)

    for array in (affine, template_t, probabilities, labels, means):
        array.setflags(write=False)
    return Atlas(spacing_mm, affine, template_t, probabilities, labels, means)
