"""Reading one image (NIfTI file, DICOM series, or a series reference) or one dataset case into channel-first arrays.

A series reference (``*.series.json``, ``imaging/series_ref.py``) stands for a DICOM series
left where the hospital keeps it; reading it reads those files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from laulima.errors import DataError
from laulima.imaging.layouts import Case
from laulima.imaging.nifti import is_nifti_name, read_label_array, read_nifti
from laulima.imaging.series_ref import is_series_ref_name

__all__ = ["read_case", "read_image"]


def read_image(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A NIfTI file (3D or 4D), a DICOM series folder (or single DICOM file) or a series reference
    as float32 [C,X,Y,Z] and RAS affine."""
    path = Path(path)
    if is_series_ref_name(path):
        from laulima.imaging.series_ref import read_series_ref

        return read_series_ref(path)
    if path.is_dir():
        from laulima.imaging.dicom import read_dicom

        return read_dicom(path)
    if is_nifti_name(path):
        return read_nifti(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder", file=str(path))
    with path.open("rb") as fh:
        head = fh.read(132)
    if head[128:132] == b"DICM":
        from laulima.imaging.dicom import read_dicom

        return read_dicom(path)
    raise DataError(
        f"{path}: neither NIfTI (.nii, .nii.gz) nor DICOM (a series folder, or a file with the DICM preamble); "
        "convert it to NIfTI",
        file=str(path),
    )


def read_case(case: Case, n_channels: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Image float32 [C,X,Y,Z] (channel files concatenated), label uint8 [X,Y,Z] or None, affine 4x4."""
    parts = [read_image(path) for path in case.images]
    image = parts[0][0] if len(parts) == 1 else np.concatenate([data for data, _ in parts], axis=0)
    affine = parts[0][1]
    if image.shape[0] != n_channels:
        raise DataError(
            f"case {case.id}: {image.shape[0]} channel(s) in {', '.join(p.name for p in case.images)}, "
            f"expected {n_channels}; check the dataset's channel list",
            file=str(case.images[0]),
        )
    if case.label is None:
        return image, None, affine
    stored, _ = read_label_array(case.label)
    if stored.shape != image.shape[1:]:
        raise DataError(
            f"case {case.id}: label {case.label.name} has shape {stored.shape}, image {image.shape[1:]}",
            file=str(case.label),
        )
    if stored.size and (stored.min() < 0 or stored.max() > 255 or not np.array_equal(stored, np.round(stored))):
        raise DataError(
            f"case {case.id}: label {case.label.name} holds values outside integers 0..255", file=str(case.label)
        )
    return image, stored.astype(np.uint8), affine
