"""Random smooth deformations that turn the one atlas into many distinct phantom anatomies.

One displacement field per phantom moves image and labels together: a random affine
(rotations, per-axis scale, shift, about the grid centre) plus an elastic field (Gaussian
control-point displacements on a coarse grid, cubic-upsampled, so it is smooth and cheap).
The four tissue probability maps are warped with linear interpolation and the labels are
their argmax afterwards. Warping the label map with nearest-neighbour interpolation instead
would duplicate and drop voxels wherever the field stretches or compresses (jagged,
one-voxel islands); warping the probabilities moves boundaries by sub-voxel amounts and
keeps labels consistent with the intensities synthesised from the same warped maps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = ["Deformation", "random_deformation", "warp"]


@dataclass(frozen=True)
class Deformation:
    """Limits of the random deformation (uniform ranges, Gaussian elastic amplitude)."""

    max_rotation_deg: float = 10.0
    max_scale: float = 0.10
    max_shift_mm: float = 4.0
    elastic_sigma_mm: float = 3.0
    elastic_control_points: int = 5


def _rotation(angles: np.ndarray) -> np.ndarray:
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def random_deformation(
    rng: np.random.Generator, shape: tuple[int, int, int], spacing_mm: float, limits: Deformation = Deformation()
) -> np.ndarray:
    """Source voxel coordinates [3,X,Y,Z] for every output voxel (for ``scipy.ndimage.map_coordinates``)."""
    angles = np.deg2rad(rng.uniform(-limits.max_rotation_deg, limits.max_rotation_deg, 3))
    scale = 1.0 + rng.uniform(-limits.max_scale, limits.max_scale, 3)
    shift = rng.uniform(-limits.max_shift_mm, limits.max_shift_mm, 3) / spacing_mm
    n = limits.elastic_control_points
    control = rng.normal(0.0, limits.elastic_sigma_mm / spacing_mm, (3, n, n, n))
    zoom = [s / n for s in shape]
    elastic = np.stack([ndimage.zoom(c, zoom, order=3, mode="nearest") for c in control])

    centre = (np.asarray(shape, dtype=np.float64) - 1.0) / 2.0
    matrix = _rotation(angles) @ np.diag(1.0 / scale)  # output -> source: scale >1 enlarges the anatomy
    grid = np.indices(shape, dtype=np.float32).reshape(3, -1) - centre[:, None]
    coords = (matrix @ grid).reshape(3, *shape) + (centre + shift)[:, None, None, None]
    return (coords + elastic).astype(np.float32)


def warp(volume: np.ndarray, coords: np.ndarray, *, cval: float = 0.0) -> np.ndarray:
    """``volume`` sampled at ``coords`` with linear interpolation; outside the grid it is ``cval``."""
    return ndimage.map_coordinates(volume, coords, order=1, mode="constant", cval=cval, output=np.float32)
