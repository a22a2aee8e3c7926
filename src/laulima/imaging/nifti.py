"""NIfTI in and out, with nibabel's exceptions turned into DataErrors and every write atomic.

Arrays inside Laulima are channel-first, ``[C,X,Y,Z]``; on disk a multi-channel image is
one 4D NIfTI ``(X,Y,Z,C)`` as the Decathlon stores it. A 5D ``(X,Y,Z,1,C)`` file (how ITK
writes vector images) is read as 4D. Affines are nibabel's: voxel indices to RAS+ mm.
"""

from __future__ import annotations

import os
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError

from laulima.errors import DataError

__all__ = [
    "NIFTI_SUFFIXES",
    "NiftiHeader",
    "is_nifti_name",
    "read_header",
    "read_label_array",
    "read_nifti",
    "write_label_nifti",
    "write_nifti",
]

NIFTI_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii")
_READ_ERRORS = (ImageFileError, OSError, EOFError, ValueError, zlib.error)


def is_nifti_name(path: Path | str) -> bool:
    return str(path).endswith(NIFTI_SUFFIXES)


@dataclass(frozen=True, eq=False)
class NiftiHeader:
    shape: tuple[int, int, int]  # spatial
    n_channels: int  # 1 for a 3D file, the last dimension for 4D
    affine: np.ndarray


def _load(path: Path, name: str | None) -> nib.Nifti1Image:
    shown = name or str(path)
    if not is_nifti_name(path):
        raise DataError(
            f"{shown}: not a NIfTI file (expected a name ending in .nii.gz or .nii); convert it to NIfTI",
            file=shown,
        )
    try:
        image = nib.load(str(path))
    except FileNotFoundError as exc:
        raise DataError(f"{shown}: file not found; add it or remove it from dataset.json", file=shown) from exc
    except _READ_ERRORS as exc:
        raise DataError(
            f"{shown}: not a readable NIfTI file ({exc}); re-export it from its source", file=shown
        ) from exc
    if not isinstance(image, nib.Nifti1Image | nib.Nifti2Image):
        raise DataError(f"{shown}: {type(image).__name__} is not NIfTI; convert it to NIfTI", file=shown)
    return image


def _channel_shape(shape: tuple[int, ...], shown: str) -> tuple[tuple[int, int, int], int]:
    if len(shape) == 3:
        return (shape[0], shape[1], shape[2]), 1
    if len(shape) == 4:
        return (shape[0], shape[1], shape[2]), shape[3]
    if len(shape) == 5 and shape[3] == 1:
        return (shape[0], shape[1], shape[2]), shape[4]
    raise DataError(
        f"{shown}: image of shape {shape}; expected 3D (X,Y,Z) or 4D with channels last (X,Y,Z,C)", file=shown
    )


def read_header(path: Path, *, name: str | None = None) -> NiftiHeader:
    """Shape, channel count and affine from the header alone (cheap: no voxel data is read)."""
    image = _load(path, name)
    spatial, channels = _channel_shape(tuple(int(n) for n in image.shape), name or str(path))
    return NiftiHeader(spatial, channels, np.asarray(image.affine, dtype=np.float64))


def _data(image: nib.Nifti1Image, dtype: type | None, shown: str) -> np.ndarray:
    try:
        return np.asarray(image.dataobj, dtype=dtype)
    except _READ_ERRORS as exc:
        raise DataError(
            f"{shown}: voxel data unreadable ({exc}); the file is damaged, re-export it", file=shown
        ) from exc


def read_nifti(path: Path, *, name: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Image as float32 ``[C,X,Y,Z]`` and its affine."""
    shown = name or str(path)
    image = _load(path, name)
    spatial, channels = _channel_shape(tuple(int(n) for n in image.shape), shown)
    data = _data(image, np.float32, shown).reshape(*spatial, channels)
    return np.ascontiguousarray(np.moveaxis(data, -1, 0)), np.asarray(image.affine, dtype=np.float64)


def read_label_array(path: Path, *, name: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Label map as stored (any numeric dtype, 3D) and its affine; values are checked by the caller."""
    shown = name or str(path)
    image = _load(path, name)
    spatial, channels = _channel_shape(tuple(int(n) for n in image.shape), shown)
    if channels != 1:
        raise DataError(
            f"{shown}: a label map must be 3D, found shape {image.shape}; store one label volume", file=shown
        )
    data = _data(image, None, shown).reshape(spatial)  # stored dtype, or float where the header scales values
    return data, np.asarray(image.affine, dtype=np.float64)


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    """Write ``data`` ([X,Y,Z], or [C,X,Y,Z] stored as (X,Y,Z,C)) atomically, with qform and sform set."""
    path = Path(path)
    if not is_nifti_name(path):
        raise DataError(f"{path}: a NIfTI file name must end in .nii.gz or .nii", file=str(path))
    array = np.moveaxis(data, 0, -1) if data.ndim == 4 else data
    image = nib.Nifti1Image(np.ascontiguousarray(array), np.asarray(affine, dtype=np.float64))
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm", "sec")
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else ".nii"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        nib.save(image, tmp)
        os.chmod(tmp, 0o644)  # mkstemp's 0o600 would follow the file to its final name
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_label_nifti(path: Path, label: np.ndarray, affine: np.ndarray) -> None:
    """Write a label map (integers 0..255) as uint8 NIfTI, atomically."""
    path, array = Path(path), np.asarray(label)
    if array.ndim != 3:
        raise DataError(f"{path}: a label map must be 3D, got shape {array.shape}", file=str(path))
    if array.size and (array.min() < 0 or array.max() > 255 or not np.array_equal(array, np.round(array))):
        raise DataError(f"{path}: label values must be integers 0..255 to store as uint8", file=str(path))
    write_nifti(path, array.astype(np.uint8), affine)
