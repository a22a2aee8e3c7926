"""Write a volume as a DICOM series: one MR (or CT) Image Storage file per slice.

What hospitals send is DICOM, so tests and demonstrations need DICOM studies whose true
geometry is known: this writes a volume ``[X,Y,Z]`` with a RAS affine (what nibabel gives)
such that ``read_dicom(folder)`` returns the same array and affine. Array axes follow
``imaging/dicom.py``: x = column index, y = row index, z = slice; the affine's first two
columns become ImageOrientationPatient (converted to LPS) and PixelSpacing, its third the
step between ImagePositionPatient of consecutive slices.

Values are stored as 16-bit signed integers with RescaleSlope/Intercept: an integer volume
that fits int16 round-trips exactly, any other to within half the slope (1/65534 of its
range). A right-handed affine (positive determinant, as nibabel's canonical RAS) comes back
as written; for a left-handed one the slice axis comes back reversed, since a reader sorts
slices along row x column direction; the voxels sit at the same places in the patient.

Each file is written under a temporary name and renamed, and a failure removes what this
call wrote, so a half-written series is never left in ``folder``.
"""

from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path

import numpy as np

from laulima.errors import DataError
from laulima.imaging.dicom import LPS_TO_RAS

__all__ = ["SOP_CLASSES", "write_dicom_series"]

SOP_CLASSES = {"MR": "1.2.840.10008.5.1.4.1.1.4", "CT": "1.2.840.10008.5.1.4.1.1.2"}
"""Modality -> the single-frame Image Storage SOP class written for it."""
_ORTHOGONAL_TOLERANCE = 1e-4


def _ds(value: float) -> str:
    """A Decimal String of at most 16 characters, as precise as the DICOM VR allows."""
    from pydicom.valuerep import format_number_as_ds

    return str(format_number_as_ds(float(value)))


def _quantise(volume: np.ndarray) -> tuple[np.ndarray, float, float]:
    """int16 stored values, slope and intercept (as they will read back from their DS strings)."""
    finite = volume[np.isfinite(volume)]
    if finite.size != volume.size:
        raise DataError("write_dicom_series: the volume holds NaN or infinite values; DICOM stores finite numbers")
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if np.array_equal(volume, np.round(volume)) and -32768 <= low and high <= 32767:
        return volume.astype(np.int16), 1.0, 0.0
    intercept = float(_ds((low + high) / 2))
    slope = float(_ds((high - low) / 65534)) if high > low else 1.0
    stored = np.clip(np.round((volume.astype(np.float64) - intercept) / slope), -32768, 32767)
    return stored.astype(np.int16), slope, intercept


def write_dicom_series(
    volume: np.ndarray,
    affine: np.ndarray,
    folder: Path,
    *,
    modality: str = "MR",
    series_description: str = "",
    study_uid: str | None = None,
    series_uid: str | None = None,
    patient_id: str = "PHANTOM",
    frame_of_reference_uid: str | None = None,
    series_number: int = 1,
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL"),
) -> list[Path]:
    """Write ``volume`` ``[X,Y,Z]`` (RAS ``affine``) into ``folder``; the files, in slice order.

    Missing UIDs are generated (pass the same ``study_uid`` and ``frame_of_reference_uid``
    to put several series in one study on one patient grid). Raises DataError if the
    volume is not 3D, the affine's in-plane axes are not orthogonal (DICOM cannot say so),
    or the modality has no single-frame image class here. ``image_type`` is ImageType
    (``("ORIGINAL", "PRIMARY", "LOCALIZER")`` makes a scout).
    """
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

    folder = Path(folder)
    array = np.asarray(volume)
    matrix = np.asarray(affine, dtype=np.float64)
    if array.ndim != 3 or 0 in array.shape:
        raise DataError(f"write_dicom_series: a volume [X,Y,Z] is needed, got shape {array.shape}")
    if matrix.shape != (4, 4):
        raise DataError(f"write_dicom_series: the affine must be 4x4, got {matrix.shape}")
    sop_class = SOP_CLASSES.get(modality)
    if sop_class is None:
        raise DataError(f"write_dicom_series: modality {modality!r} is not one of {', '.join(SOP_CLASSES)}")
    lps = LPS_TO_RAS @ matrix
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    if np.any(spacing <= 0):
        raise DataError(f"write_dicom_series: the affine has a zero-length axis (voxel sizes {spacing.tolist()})")
    row_dir, col_dir = lps[:3, 0] / spacing[0], lps[:3, 1] / spacing[1]
    if abs(float(row_dir @ col_dir)) > _ORTHOGONAL_TOLERANCE:
        raise DataError(
            "write_dicom_series: the affine's first two axes are not orthogonal; DICOM slices are "
            "rectangular grids, resample the volume first"
        )
    stored, slope, intercept = _quantise(array)

    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_of_reference_uid = frame_of_reference_uid or generate_uid()
    now = _dt.datetime.now()
    template = pydicom.Dataset()
    template.SOPClassUID = sop_class
    template.PatientName, template.PatientID = f"{patient_id}^", patient_id  # family name only
    template.PatientBirthDate, template.PatientSex = "", "O"
    template.StudyInstanceUID, template.StudyID, template.AccessionNumber = study_uid, "1", ""
    template.StudyDate, template.StudyTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    template.ReferringPhysicianName = ""
    template.Modality, template.SeriesInstanceUID, template.SeriesNumber = modality, series_uid, series_number
    template.SeriesDescription = series_description
    template.FrameOfReferenceUID, template.PositionReferenceIndicator = frame_of_reference_uid, ""
    template.Manufacturer = "Laulima"
    template.ImageType = list(image_type)
    template.Rows, template.Columns = int(array.shape[1]), int(array.shape[0])  # rows run along y, columns along x
    template.PixelSpacing = [_ds(spacing[1]), _ds(spacing[0])]  # between rows, between columns
    template.ImageOrientationPatient = [_ds(v) for v in (*row_dir, *col_dir)]
    template.SliceThickness = _ds(spacing[2])
    template.SpacingBetweenSlices = _ds(spacing[2])
    template.RescaleSlope, template.RescaleIntercept = _ds(slope), _ds(intercept)
    if modality == "MR":
        template.ScanningSequence, template.SequenceVariant, template.ScanOptions = "RM", "NONE", ""
        template.MRAcquisitionType, template.EchoTime, template.RepetitionTime = "3D", "", ""
        template.EchoTrainLength = 1
    else:
        template.KVP, template.RescaleType = "", "HU"
    template.SamplesPerPixel, template.PhotometricInterpretation = 1, "MONOCHROME2"
    template.BitsAllocated, template.BitsStored, template.HighBit, template.PixelRepresentation = 16, 16, 15, 1

    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    try:
        for k in range(array.shape[2]):
            ds = template.copy()
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = UID(sop_class)
            meta.MediaStorageSOPInstanceUID = generate_uid()
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.file_meta = meta
            ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
            ds.InstanceNumber = k + 1
            ds.ImagePositionPatient = [_ds(v) for v in (lps @ [0.0, 0.0, float(k), 1.0])[:3]]
            ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).astype("<i2").tobytes()
            path = folder / f"{series_uid}.{k + 1:04d}.dcm"
            tmp = folder / f".{path.name}.tmp"
            written.append(tmp)
            ds.save_as(tmp, enforce_file_format=True)
            os.replace(tmp, path)
            written[-1] = path
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return written
