"""A single DICOM series (a folder of 2D slices, or one slice) read into a volume with a RAS affine.

Slices are ordered by their position along the slice normal (``ImageOrientationPatient``'s
row x column direction), not by file name or InstanceNumber, which scanners and exporters
do not keep reliably. Stored values pass through RescaleSlope/Intercept, slice by slice.
DICOM patient coordinates are LPS; the affine is converted to RAS so it means what a NIfTI
affine from nibabel means. Array axes: x = column index, y = row index, z = slice.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from laulima.errors import DataError

__all__ = ["LPS_TO_RAS", "read_dicom", "read_dicom_files", "slice_geometry", "slice_normal", "stack_affine"]

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
"""DICOM patient coordinates (LPS) to NIfTI's (RAS): its own inverse."""


def _series_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".") and p.name != "DICOMDIR")
    if not files:
        raise DataError(
            f"{path}: no files in this folder; a DICOM series folder holds one file per slice", file=str(path)
        )
    return files


def _read(file: Path) -> Any:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(file)
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError) as exc:
        raise DataError(
            f"{file}: not a readable DICOM file ({exc}); a series folder must hold only that series' DICOM files",
            file=str(file),
        ) from exc


def slice_geometry(ds: Any, file: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ImageOrientationPatient, ImagePositionPatient and PixelSpacing of one slice, as float arrays."""
    missing = [k for k in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing") if k not in ds]
    if missing:
        raise DataError(
            f"{file}: no {', '.join(missing)}, so the slice has no position in the patient; "
            "only cross-sectional images (CT, MR, PET) can be read as volumes",
            file=str(file),
        )
    orientation = np.asarray([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64)
    position = np.asarray([float(v) for v in ds.ImagePositionPatient], dtype=np.float64)
    spacing = np.asarray([float(v) for v in ds.PixelSpacing], dtype=np.float64)  # (between rows, between columns)
    return orientation, position, spacing


def _pixels(ds: Any, file: Path) -> np.ndarray:
    if "PixelData" not in ds:
        raise DataError(
            f"{file}: no pixel data ({ds.get('Modality', '?')} object); point at an image series", file=str(file)
        )
    if int(ds.get("NumberOfFrames", 1) or 1) > 1 or int(ds.get("SamplesPerPixel", 1)) != 1:
        raise DataError(
            f"{file}: multi-frame or colour image; only single-frame greyscale slices are supported, "
            "export the series as one file per slice",
            file=str(file),
        )
    try:
        stored = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for missing codecs and bad pixel data
        raise DataError(
            f"{file}: pixel data cannot be decoded ({exc}); install the codec (e.g. pylibjpeg) or export uncompressed",
            file=str(file),
        ) from exc
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    return (stored.astype(np.float32) * np.float32(slope) + np.float32(intercept)).T  # (columns, rows)


def read_dicom(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Volume float32 ``[1,X,Y,Z]`` and its RAS affine from a series folder or a single slice file."""
    return read_dicom_files(_series_files(path), where=path)


def read_dicom_files(
    files: Sequence[Path], *, where: Path | str, series_uid: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Volume float32 ``[1,X,Y,Z]`` and RAS affine from the slice files of one series, in any order.

    ``where`` names the series in messages (a folder, or a series reference file);
    ``series_uid``, when given, is the series the files must belong to: a file replaced by
    one of another series is refused rather than read into the volume.
    """
    path = where
    datasets = [(file, _read(file)) for file in files]
    series = sorted({str(ds.get("SeriesInstanceUID", "?")) for _, ds in datasets})
    if len(series) > 1:
        raise DataError(
            f"{path}: {len(series)} series ({', '.join(series[:4])}); put each series in a folder of its own",
            file=str(path),
        )
    if series_uid is not None and series != [series_uid]:
        raise DataError(
            f"{path}: the files hold series {series[0]}, not {series_uid}; the series changed since it was "
            "registered, re-register the dataset",
            file=str(path),
        )
    geometry = [(file, ds, *slice_geometry(ds, file)) for file, ds in datasets]
    orientation, spacing = geometry[0][2], geometry[0][4]
    for file, _, other_orientation, _, other_spacing in geometry[1:]:
        if not (np.allclose(other_orientation, orientation, atol=1e-4) and np.allclose(other_spacing, spacing)):
            raise DataError(
                f"{file}: orientation or pixel spacing differs from the other slices of {path}", file=str(file)
            )
    normal = slice_normal(orientation)
    geometry.sort(key=lambda item: float(item[3] @ normal))
    positions = np.stack([item[3] for item in geometry])

    if len(geometry) > 1:
        gaps = np.diff(positions @ normal)
        if gaps.min() <= 1e-3 or np.ptp(gaps) > 0.01 * gaps.mean() + 1e-3:
            raise DataError(
                f"{path}: slices are not evenly spaced along the normal (gaps {np.round(gaps, 3).tolist()[:8]}...); "
                "a slice is missing, duplicated, or the folder mixes acquisitions",
                file=str(path),
            )
        thickness = 0.0
    else:
        ds = geometry[0][1]
        thickness = float(ds.get("SpacingBetweenSlices", 0) or ds.get("SliceThickness", 0) or 1.0)

    planes = [_pixels(ds, file) for file, ds, *_ in geometry]
    if len({plane.shape for plane in planes}) != 1:
        raise DataError(f"{path}: slices differ in size; the folder mixes acquisitions", file=str(path))
    volume = np.stack(planes, axis=-1)[None]
    affine = stack_affine(orientation, spacing, positions, single_slice_thickness=thickness)
    return np.ascontiguousarray(volume, dtype=np.float32), affine


def slice_normal(orientation: np.ndarray) -> np.ndarray:
    """The slice normal (row direction x column direction) of an ImageOrientationPatient, in LPS."""
    return np.cross(orientation[:3], orientation[3:])


def stack_affine(
    orientation: np.ndarray, spacing: np.ndarray, positions: np.ndarray, *, single_slice_thickness: float = 1.0
) -> np.ndarray:
    """The RAS affine of slices sorted along their normal (``positions``: LPS ImagePositionPatient per slice).

    The slice axis is the mean step between first and last position, so a gantry tilt
    (positions not along the normal) is kept; one slice gets the normal times its thickness.
    """
    row_dir, col_dir = orientation[:3], orientation[3:]
    if len(positions) > 1:
        step = (positions[-1] - positions[0]) / (len(positions) - 1)
    else:
        step = slice_normal(orientation) * single_slice_thickness
    lps = np.eye(4)
    lps[:3, 0] = row_dir * spacing[1]
    lps[:3, 1] = col_dir * spacing[0]
    lps[:3, 2] = step
    lps[:3, 3] = positions[0]
    return LPS_TO_RAS @ lps
