"""DICOM studies on disk for tests: a phantom written as series, a localizer, a SEG label, and edits that break them.

Everything is written with the project's own ``write_dicom_series`` and highdicom's SEG
writer, so what the tests ingest is what a PACS export holds: files named by UID, several
series per study, a non-DICOM file beside them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.uid import generate_uid

from laulima.imaging.dicom_write import write_dicom_series

__all__ = ["Study", "edit", "write_localizer", "write_seg", "write_study"]


@dataclass(frozen=True)
class Study:
    root: Path
    study_uid: str
    frame_of_reference_uid: str
    t1_uid: str
    t1_files: list[Path]
    localizer_uid: str
    seg: Path | None


def edit(path: Path, **tags: Any) -> None:
    """Set (value) or delete (None) top-level tags of one DICOM file, in place."""
    ds = pydicom.dcmread(path)
    for keyword, value in tags.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)


def write_localizer(folder: Path, *, study_uid: str, frame_of_reference_uid: str) -> str:
    """A tri-planar scout: three 1-slice planes (axial, coronal, sagittal) in one series, ImageType LOCALIZER."""
    series_uid = generate_uid()
    plane = np.arange(64, dtype=np.float32).reshape(8, 8)[:, :, None]
    axial = np.diag([4.0, 4.0, 4.0, 1.0])
    coronal = np.array([[4.0, 0, 0, 0], [0, 0, 4.0, 0], [0, 4.0, 0, 0], [0, 0, 0, 1]])
    sagittal = np.array([[0, 0, 4.0, 0], [4.0, 0, 0, 0], [0, 4.0, 0, 0], [0, 0, 0, 1]])
    for i, affine in enumerate((axial, coronal, sagittal)):
        files = write_dicom_series(
            plane, affine, folder, study_uid=study_uid, series_uid=series_uid, series_description="localizer",
            frame_of_reference_uid=frame_of_reference_uid, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
        )  # fmt: skip
        files[0].rename(folder / f"loc{i}.dcm")
    return series_uid


def write_seg(label: np.ndarray, series_files: list[Path], path: Path, names: dict[int, str]) -> Path:
    """A DICOM SEG (highdicom, BINARY) of ``label`` [X,Y,Z] on the series of ``series_files`` (in z order)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    sources = [pydicom.dcmread(f) for f in series_files]
    pixels = np.stack([np.ascontiguousarray(label[:, :, k].T) for k in range(label.shape[2])]).astype(np.uint8)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=name,
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        )
        for number, name in sorted(names.items())
    ]
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=generate_uid(),
        series_number=99,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="Laulima tests",
        manufacturer_model_name="phantom",
        software_versions="0",
        device_serial_number="0",
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(path)
    return path


def write_study(
    root: Path,
    volume: np.ndarray,
    affine: np.ndarray,
    *,
    label: np.ndarray | None = None,
    names: dict[int, str] | None = None,
    patient: str = "PHANTOM",
) -> Study:
    """One study under ``root``: the T1 series, a localizer, a SEG of ``label`` (if given) and a README."""
    study_uid, frame = generate_uid(), generate_uid()
    t1_uid = generate_uid()
    t1 = write_dicom_series(
        volume, affine, root / "T1", study_uid=study_uid, series_uid=t1_uid, frame_of_reference_uid=frame,
        series_description="T1w MPRAGE", patient_id=patient,
    )  # fmt: skip
    localizer = write_localizer(root / "scout", study_uid=study_uid, frame_of_reference_uid=frame)
    seg = None
    if label is not None:
        seg = write_seg(label, t1, root / "seg" / "label.dcm", names or {1: "label 1"})
    (root / "README.txt").write_text("exported for tests\n")
    return Study(root, study_uid, frame, t1_uid, t1, localizer, seg)
