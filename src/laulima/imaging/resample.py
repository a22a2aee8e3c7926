"""Reorient and resample images and label maps onto a model's grid, and back, with correct affines.

A model learns at one voxel size and orientation (the demo's: 4 mm, RAS); a scan arrives
at its own (a clinical T1 is often 1 mm, LPS or oblique). :func:`plan_grid` gives the grid
of the model's spacing and orientation that covers the scan's field of view, centred on
it; :func:`resample_image` and :func:`resample_labels` carry a volume from one grid to
another through world (RAS mm) coordinates, so any affine (flipped, permuted, oblique)
lands where it belongs.

Images are interpolated linearly after a Gaussian prefilter along every axis that gets
coarser (the FWHM makes up the difference between the two voxel sizes, as
:mod:`laulima.imaging.atlas` does when it makes the phantoms' 4 mm anatomy): a 1 mm scan
sampled at 4 mm without it would alias noise and thin structures into the model's input.
Label maps use the nearest voxel (no label is invented between two others). A volume
already on the target grid comes back unchanged, bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from nibabel.orientations import axcodes2ornt
from scipy import ndimage

from laulima.errors import DataError

__all__ = ["Grid", "check_affine", "orientation_matrix", "plan_grid", "resample_image", "resample_labels"]

_FWHM_TO_SIGMA = 1.0 / (2.0 * np.sqrt(2.0 * np.log(2.0)))
_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


@dataclass(frozen=True, eq=False)
class Grid:
    """A voxel grid: ``affine`` (voxel index -> RAS mm) and spatial ``shape``."""

    affine: np.ndarray
    shape: tuple[int, int, int]

    @property
    def spacing(self) -> np.ndarray:
        return np.linalg.norm(self.affine[:3, :3], axis=0)


def check_affine(affine: np.ndarray, *, where: str) -> np.ndarray:
    """``affine`` as a float64 4x4 with finite, invertible voxel axes; a DataError names ``where`` otherwise."""
    array = np.asarray(affine, dtype=np.float64)
    if array.shape != (4, 4) or not np.all(np.isfinite(array)):
        raise DataError(
            f"{where}: the affine must be a finite 4x4 matrix (voxel -> RAS mm), got shape {list(array.shape)}; "
            "fix the file's header (NIfTI sform/qform, DICOM ImagePositionPatient/PixelSpacing)",
            file=where,
        )
    if abs(np.linalg.det(array[:3, :3])) < 1e-9:
        raise DataError(
            f"{where}: the affine's voxel axes are degenerate (zero spacing or parallel axes); "
            "the image has no geometry to resample; fix the file's header",
            file=where,
        )
    return array


def orientation_matrix(orientation: str) -> np.ndarray:
    """3x3 matrix whose column k is the RAS unit vector that voxel axis k of ``orientation`` points to.

    ``"RAS"`` is the identity; ``"LPS"`` (DICOM's) flips x and y. Raises ValueError for a code
    that does not name each of L/R, P/A, I/S exactly once.
    """
    codes = tuple(str(orientation).upper())
    if len(codes) != 3:
        raise ValueError(f"orientation {orientation!r} must be three letters such as 'RAS' or 'LPS'")
    try:
        ornt = axcodes2ornt(codes, labels=_RAS_LABELS)
    except ValueError as exc:
        raise ValueError(f"orientation {orientation!r}: {exc}; use one of L/R, P/A, I/S per axis, e.g. 'RAS'") from exc
    if np.isnan(ornt).any() or len({int(a) for a in ornt[:, 0]}) != 3:
        raise ValueError(f"orientation {orientation!r} must name each of L/R, P/A, I/S once, e.g. 'RAS'")
    matrix = np.zeros((3, 3))
    for k, (axis, flip) in enumerate(ornt):
        matrix[int(axis), k] = flip
    return matrix


def plan_grid(affine: np.ndarray, shape: Sequence[int], spacing_mm: Sequence[float], orientation: str = "RAS") -> Grid:
    """The grid of ``spacing_mm`` voxels in ``orientation`` covering the field of view of (``affine``, ``shape``).

    Its bounding box (voxel edges, not centres) holds the source's, rounded up to whole
    voxels and centred on the source's centre, so a source already on such a grid gets
    the same grid back (and is not resampled at all).
    """
    source = np.asarray(affine, dtype=np.float64)
    spacing = np.asarray(spacing_mm, dtype=np.float64)
    direction = orientation_matrix(orientation)
    dims = np.asarray(shape, dtype=np.float64)
    edges = [(-0.5, n - 0.5) for n in dims]
    corners = np.array([[x, y, z] for x in edges[0] for y in edges[1] for z in edges[2]])
    world = corners @ source[:3, :3].T + source[:3, 3]
    along = world @ direction  # each corner's coordinate along the target axes (mm)
    extent = along.max(axis=0) - along.min(axis=0)
    n = np.maximum(1, np.ceil(extent / spacing - 1e-3)).astype(int)
    centre = source[:3, :3] @ ((dims - 1) / 2.0) + source[:3, 3]
    linear = direction * spacing  # columns scaled by the voxel size
    target = np.eye(4)
    target[:3, :3] = linear
    target[:3, 3] = centre - linear @ ((n - 1) / 2.0)
    return Grid(target, (int(n[0]), int(n[1]), int(n[2])))


def _to_source(source_affine: np.ndarray, grid: Grid) -> np.ndarray:
    return np.linalg.inv(np.asarray(source_affine, dtype=np.float64)) @ grid.affine


def _same_grid(matrix: np.ndarray, source_shape: Sequence[int], grid: Grid) -> bool:
    return tuple(source_shape) == grid.shape and np.allclose(matrix, np.eye(4), atol=1e-4)


def resample_image(
    image: np.ndarray, source_affine: np.ndarray, grid: Grid, *, antialias: bool = True, order: int = 1
) -> np.ndarray:
    """``image`` ([C,X,Y,Z] or [X,Y,Z]) from ``source_affine``'s grid onto ``grid``, float32.

    Linear interpolation (``order`` 1) through world coordinates; with ``antialias`` each
    channel is first smoothed along the source axes that get coarser. Outside the source's
    field of view the nearest edge voxel is repeated (a scan's edge is background, and a
    hard zero there would be a contrast the model never saw).
    """
    array = np.asarray(image)
    channels = array if array.ndim == 4 else array[None]
    matrix = _to_source(source_affine, grid)
    if _same_grid(matrix, channels.shape[1:], grid):
        out = channels.astype(np.float32, copy=True)
        return out if array.ndim == 4 else out[0]
    sigma = np.zeros(3)
    if antialias:
        # Column j of the 3x3 part is one target voxel step in source voxels: the footprint of
        # a target voxel along source axis i is the largest of those steps' i-th components.
        footprint = np.abs(matrix[:3, :3]).max(axis=1)
        sigma = np.sqrt(np.clip(footprint**2 - 1.0, 0.0, None)) * _FWHM_TO_SIGMA
    out = np.empty((channels.shape[0], *grid.shape), dtype=np.float32)
    for c, channel in enumerate(channels):
        source = np.asarray(channel, dtype=np.float32)
        if sigma.any():
            source = ndimage.gaussian_filter(source, sigma, mode="nearest")
        out[c] = ndimage.affine_transform(
            source, matrix[:3, :3], offset=matrix[:3, 3], output_shape=grid.shape, order=order, mode="nearest"
        )
    return out if array.ndim == 4 else out[0]


def resample_labels(label: np.ndarray, source_affine: np.ndarray, grid: Grid) -> np.ndarray:
    """A label map [X,Y,Z] onto ``grid`` by nearest voxel (dtype kept; outside the source: 0)."""
    array = np.asarray(label)
    matrix = _to_source(source_affine, grid)
    if _same_grid(matrix, array.shape, grid):
        return array.copy()
    return ndimage.affine_transform(
        array, matrix[:3, :3], offset=matrix[:3, 3], output_shape=grid.shape, order=0, mode="constant", cval=0
    )
