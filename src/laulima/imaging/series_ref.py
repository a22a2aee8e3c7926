"""The series reference file: one DICOM case of a registered dataset, pointing at files left in place.

A hospital's DICOM tree is not copied when it is registered ("images stay where they
are"): the catalog writes, per case, ``<case_id>.series.json``::

    {"format": "laulima-dicom-series/1", "study_uid": ..., "series_uid": ...,
     "frame_of_reference_uid": ..., "modality": "MR", "series_description": ...,
     "files": [absolute paths, sorted along the slice normal],
     "shape": [X, Y, Z], "affine": [[4 x 4 RAS]]}

``shape`` and ``affine`` are the geometry found at registration: dataset validation reads
them instead of opening every slice, and reading the series checks the files still give
them, so a series changed behind the catalog's back is refused instead of trained on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from laulima.errors import DataError

__all__ = [
    "SERIES_REF_FORMAT",
    "SERIES_REF_SUFFIX",
    "SeriesRef",
    "is_series_ref_name",
    "load_series_ref",
    "read_series_ref",
    "write_series_ref",
]

SERIES_REF_FORMAT = "laulima-dicom-series/1"
SERIES_REF_SUFFIX = ".series.json"
_MAX_BYTES = 64 << 20
_GEOMETRY_TOLERANCE_MM = 1e-3


def is_series_ref_name(path: Path | str) -> bool:
    return str(path).endswith(SERIES_REF_SUFFIX)


@dataclass(frozen=True, eq=False)
class SeriesRef:
    path: Path
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    modality: str
    series_description: str
    files: tuple[Path, ...]
    shape: tuple[int, int, int] | None
    affine: np.ndarray | None

    def missing(self) -> list[Path]:
        """The referenced files that are gone (a stat each: cheap)."""
        return [file for file in self.files if not file.is_file()]


def write_series_ref(
    path: Path,
    *,
    study_uid: str,
    series_uid: str,
    frame_of_reference_uid: str,
    modality: str,
    series_description: str,
    files: list[Path] | tuple[Path, ...],
    shape: tuple[int, int, int],
    affine: np.ndarray,
) -> None:
    """Write the reference (files as absolute paths, in the order given: along the slice normal)."""
    payload = {
        "format": SERIES_REF_FORMAT,
        "study_uid": study_uid,
        "series_uid": series_uid,
        "frame_of_reference_uid": frame_of_reference_uid,
        "modality": modality,
        "series_description": series_description,
        "files": [str(Path(f).absolute()) for f in files],
        "shape": [int(n) for n in shape],
        "affine": np.asarray(affine, dtype=np.float64).tolist(),
    }
    Path(path).write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")


def _fail(path: Path, what: str) -> DataError:
    return DataError(
        f"{path}: {what}; it is written by `laulima site dataset add`, re-register the dataset", file=str(path)
    )


def load_series_ref(path: Path) -> SeriesRef:
    """The reference at ``path``, its fields checked; DataError naming what is wrong otherwise."""
    path = Path(path)
    try:
        if path.stat().st_size > _MAX_BYTES:
            raise _fail(path, f"larger than {_MAX_BYTES >> 20} MiB, not a series reference")
        data: Any = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise DataError(f"{path}: no such series reference file; re-register the dataset", file=str(path)) from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(path, f"not a readable series reference ({exc})") from exc
    if not isinstance(data, dict) or data.get("format") != SERIES_REF_FORMAT:
        raise _fail(path, f"not a series reference (format is not {SERIES_REF_FORMAT!r})")
    files = data.get("files")
    if not isinstance(files, list) or not files or not all(isinstance(f, str) and Path(f).is_absolute() for f in files):
        raise _fail(path, "'files' must be a non-empty list of absolute paths")
    texts = {}
    for key in ("study_uid", "series_uid", "frame_of_reference_uid", "modality", "series_description"):
        value = data.get(key, "")
        if not isinstance(value, str):
            raise _fail(path, f"{key!r} must be a string")
        texts[key] = value
    shape, affine = data.get("shape"), data.get("affine")
    try:
        geometry_shape = tuple(int(n) for n in shape) if shape is not None else None
        geometry_affine = np.asarray(affine, dtype=np.float64) if affine is not None else None
    except (TypeError, ValueError) as exc:
        raise _fail(path, f"'shape' or 'affine' is malformed ({exc})") from exc
    if (geometry_shape is not None and len(geometry_shape) != 3) or (
        geometry_affine is not None and geometry_affine.shape != (4, 4)
    ):
        raise _fail(path, "'shape' must hold 3 integers and 'affine' 4x4 numbers")
    return SeriesRef(
        path,
        texts["study_uid"],
        texts["series_uid"],
        texts["frame_of_reference_uid"],
        texts["modality"],
        texts["series_description"],
        tuple(Path(f) for f in files),
        geometry_shape,  # type: ignore[arg-type]  # checked: three integers
        geometry_affine,
    )


def read_series_ref(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The referenced series as float32 ``[1,X,Y,Z]`` and its RAS affine, as ``read_dicom`` gives it.

    Raises DataError if a file is gone, belongs to another series, or the geometry is no
    longer what was registered.
    """
    from laulima.imaging.dicom import read_dicom_files

    ref = load_series_ref(path)
    missing = ref.missing()
    if missing:
        shown = ", ".join(str(f) for f in missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise DataError(
            f"{ref.path}: {len(missing)} of the series' {len(ref.files)} DICOM files are gone ({shown}); "
            "restore them, or re-register the dataset (`laulima site dataset verify` lists what changed)",
            file=str(missing[0]),
        )
    volume, affine = read_dicom_files(ref.files, where=ref.path, series_uid=ref.series_uid or None)
    if ref.shape is not None and tuple(volume.shape[1:]) != ref.shape:
        raise _fail(ref.path, f"the series now has shape {volume.shape[1:]}, registered as {ref.shape}")
    if ref.affine is not None and not np.allclose(affine, ref.affine, rtol=0.0, atol=_GEOMETRY_TOLERANCE_MM):
        raise _fail(ref.path, "the series' geometry (affine) changed since it was registered")
    return volume, affine
