"""Label maps back into the hospital's archive as DICOM Segmentation (SEG) objects, and read back.

A model's output is only useful to radiologists if their PACS viewer can overlay it on the
series it came from. A DICOM SEG does that: it lives in the same study, shares the source's
Frame of Reference, and each of its frames names the source slice it lies on. We write
BINARY segmentations with highdicom, one segment per label the model declares (so a label
the model did not find in this case is still a described, empty segment, and segment
numbers equal the model's label values in every viewer).

Voxel order. Laulima label maps are ``[X, Y, Z]`` arrays on the grid :func:`read_dicom`
builds: x is the column index, y the row index, z the slice index after sorting the slices
by position along the slice normal (row direction x column direction). Their affine is RAS,
but that only relabels patient axes: voxel ``[x, y, z]`` is pixel ``(row y, column x)`` of
the z-th slice in that order. So frame ``k`` of the SEG is ``labels[:, :, k].T`` and goes
with the k-th source slice *sorted by position*, never by file name or InstanceNumber.

Coded concepts. Each segment carries a Segmented Property Category (CID 7150) and Type. We
use SNOMED CT codes from pydicom's code dictionary where one exists:

=====================================================  ==============================  =====================
label name (case-, spelling- and punctuation-blind)    category (CID 7150)             type
=====================================================  ==============================  =====================
brain, whole brain, brain mask                         Anatomical Structure 91723000   Brain 12738006
grey / gray matter, GM                                 Anatomical Structure 91723000   Gray Matter 389081007
white matter, WM                                       Anatomical Structure 91723000   White Matter 389080008
CSF, cerebrospinal fluid                               Anatomical Structure 91723000   CSF 65216001
(o)edema, peritumoral (o)edema, ED                     Morph. Abnormal Struct. 49755003  Edema 79654002
necrosis, necrotic (tumour) core, NCR, NCR/NET         Morph. Abnormal Struct. 49755003  Necrosis 6574001
non-enhancing tumo(u)r (core), NET, tumo(u)r core, TC  Morph. Abnormal Struct. 49755003  Neoplasm 108369006
enhancing tumo(u)r, ET, tumo(u)r, neoplasm             Morph. Abnormal Struct. 49755003  Neoplasm 108369006
lesion                                                 Morph. Abnormal Struct. 49755003  Lesion 52988006
any other name with tumo(u)r/lesion/(o)edema/necro/    Morph. Abnormal Struct. 49755003  Morph. Abnormal
metasta/abnormal in it                                                                   Struct. 49755003
anything else                                          Tissue 85756007                 Tissue 85756007
=====================================================  ==============================  =====================

SNOMED CT has no concept for "enhancing" or "non-enhancing" tumour, so both are Neoplasm;
the segment label and description keep the model's own name, which is what tells them
apart. The fallbacks are real, generic SNOMED CT codes, so no private coding scheme is ever
needed.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from laulima.errors import ConfigurationError, DataError
from laulima.imaging.series_ref import is_series_ref_name, load_series_ref

__all__ = [
    "SEGMENTATION_STORAGE",
    "SegmentConcept",
    "concept_for",
    "is_dicom_input",
    "read_segmentation",
    "read_source_series",
    "series_affine",
    "write_segmentation",
]

#: SOP Class UID of Segmentation Storage.
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class SegmentConcept:
    """SNOMED CT category and type of one segment, and a recommended display colour (RGB 0..255)."""

    category: str  # attribute name in pydicom.sr.codedict.codes.SCT
    type: str
    rgb: tuple[int, int, int]


_ANATOMY, _ABNORMAL, _TISSUE = "AnatomicalStructure", "MorphologicallyAbnormalStructure", "Tissue"

# Colours follow common practice (FreeSurfer-like tissues, BraTS-like tumour sub-regions).
_CONCEPTS: dict[str, SegmentConcept] = {
    **dict.fromkeys(("brain", "whole brain", "brain mask"), SegmentConcept(_ANATOMY, "Brain", (220, 180, 140))),
    **dict.fromkeys(("gray matter", "gm"), SegmentConcept(_ANATOMY, "GrayMatter", (130, 130, 130))),
    **dict.fromkeys(("white matter", "wm"), SegmentConcept(_ANATOMY, "WhiteMatter", (245, 245, 245))),
    **dict.fromkeys(("csf", "cerebrospinal fluid"), SegmentConcept(_ANATOMY, "CerebrospinalFluid", (60, 120, 230))),
    **dict.fromkeys(("edema", "peritumoral edema", "ed"), SegmentConcept(_ABNORMAL, "Edema", (40, 200, 40))),
    **dict.fromkeys(
        ("necrosis", "necrotic core", "necrotic tumor core", "ncr", "ncr net", "necrotic and non enhancing tumor core"),
        SegmentConcept(_ABNORMAL, "Necrosis", (230, 220, 40)),
    ),
    **dict.fromkeys(
        ("non enhancing tumor", "non enhancing tumor core", "net", "tumor core", "tc"),
        SegmentConcept(_ABNORMAL, "Neoplasm", (240, 140, 30)),
    ),
    **dict.fromkeys(
        ("enhancing tumor", "enhancing tumor rim", "et", "tumor", "neoplasm"),
        SegmentConcept(_ABNORMAL, "Neoplasm", (220, 40, 40)),
    ),
    "lesion": SegmentConcept(_ABNORMAL, "Lesion", (200, 60, 160)),
}
_ABNORMAL_WORDS = ("tumor", "lesion", "edema", "necro", "metasta", "abnormal")


def _normalise(name: str) -> str:
    text = re.sub(r"[^a-z0-9]+", " ", name.lower()).strip()
    for british, american in (("tumour", "tumor"), ("oedema", "edema"), ("grey", "gray")):
        text = text.replace(british, american)
    text = re.sub(r"\bnon ?enhancing\b", "non enhancing", text)
    return text


def concept_for(name: str) -> SegmentConcept:
    """The coded concept for a label name, per the table in this module's docstring."""
    key = _normalise(name)
    if key in _CONCEPTS:
        return _CONCEPTS[key]
    if any(word in key for word in _ABNORMAL_WORDS):
        return SegmentConcept(_ABNORMAL, _ABNORMAL, (200, 60, 160))
    return SegmentConcept(_TISSUE, _TISSUE, (180, 160, 120))


# -- source series ------------------------------------------------------------------
def is_dicom_input(path: Path) -> bool:
    """Whether ``path`` names a DICOM series: a folder, a file with the DICM preamble, or a ``*.series.json``."""
    path = Path(path)
    if path.is_dir():
        return True
    if is_series_ref_name(path):
        return True
    if path.is_file():
        with path.open("rb") as fh:
            return fh.read(132)[128:132] == b"DICM"
    return False


def read_source_series(path: Path) -> list[Any]:
    """The headers (no pixel data) of the series at ``path``: a folder, one file, or a ``*.series.json``.

    A SEG needs only the source's metadata (UIDs, patient, study, geometry), so pixel data
    is not read: this stays cheap for large series.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    path = Path(path)
    if is_series_ref_name(path):
        files = list(load_series_ref(path).files)
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".") and p.name != "DICOMDIR")
    elif path.is_file():
        files = [path]
    else:
        raise DataError(f"{path}: no such file or folder", file=str(path))
    if not files:
        raise DataError(f"{path}: no files; a DICOM series folder holds one file per slice", file=str(path))
    datasets = []
    for file in files:
        try:
            datasets.append(pydicom.dcmread(file, stop_before_pixels=True))
        except (InvalidDicomError, OSError, EOFError, ValueError, KeyError) as exc:
            raise DataError(f"{file}: not a readable DICOM file ({exc})", file=str(file)) from exc
    return datasets


def _sorted_series(source: Sequence[Any]) -> tuple[list[Any], np.ndarray]:
    """The source slices sorted along the slice normal, as :func:`read_dicom` orders them, and their RAS affine."""
    if not source:
        raise DataError("the source series is empty; a SEG must reference at least one image")
    series = {str(ds.get("SeriesInstanceUID", "?")) for ds in source}
    if len(series) != 1:
        raise DataError(f"the source holds {len(series)} series ({', '.join(sorted(series)[:4])}); give one series")
    for ds in source:
        missing = [
            k
            for k in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing", "FrameOfReferenceUID")
            if k not in ds
        ]
        if missing:
            raise DataError(
                f"source image {ds.get('SOPInstanceUID', '?')}: no {', '.join(missing)}; a SEG can only be "
                "placed on cross-sectional images with a frame of reference",
                series_uid=next(iter(series)),
            )
    orientation = np.asarray([float(v) for v in source[0].ImageOrientationPatient], dtype=np.float64)
    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, col_dir)
    slices = sorted(source, key=lambda ds: float(np.asarray([float(v) for v in ds.ImagePositionPatient]) @ normal))
    positions = np.asarray([[float(v) for v in ds.ImagePositionPatient] for ds in slices], dtype=np.float64)
    spacing = [float(v) for v in slices[0].PixelSpacing]  # (between rows, between columns)
    if len(slices) > 1:
        step = (positions[-1] - positions[0]) / (len(slices) - 1)
    else:
        ds = slices[0]
        step = normal * float(ds.get("SpacingBetweenSlices", 0) or ds.get("SliceThickness", 0) or 1.0)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * spacing[1]
    lps[:3, 1] = col_dir * spacing[0]
    lps[:3, 2] = step
    lps[:3, 3] = positions[0]
    return slices, _LPS_TO_RAS @ lps


def series_affine(source: Sequence[Any]) -> np.ndarray:
    """The RAS affine of the series' voxel grid, as :func:`laulima.imaging.dicom.read_dicom` gives it."""
    return _sorted_series(source)[1]


# -- writing ------------------------------------------------------------------------
def write_segmentation(
    labels: np.ndarray,
    source: Sequence[Any],
    label_names: Mapping[int, str],
    out_path: Path,
    *,
    algorithm_name: str,
    algorithm_version: str,
    series_description: str = "Laulima segmentation",
    affine: np.ndarray | None = None,
) -> Path:
    """Write ``labels`` (uint8 ``[X,Y,Z]`` on the grid of ``source``) as a BINARY DICOM SEG at ``out_path``.

    ``source`` is the series the labels were predicted on (headers suffice, any order);
    ``label_names`` the model's labels (0 is background and gets no segment; the others
    must be 1..N, which become segment numbers 1..N). Give ``affine`` (the label map's RAS
    affine) to have the grid checked against the series: a label map that was resampled or
    reoriented would otherwise be written onto the wrong voxels without any error.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    import laulima

    labels = np.asarray(labels)
    slices, grid = _sorted_series(source)
    first = slices[0]
    expected = (int(first.Columns), int(first.Rows), len(slices))
    if labels.ndim != 3 or labels.shape != expected:
        raise DataError(
            f"label map of shape {list(labels.shape)} does not fit series {first.SeriesInstanceUID} "
            f"({expected[0]} columns x {expected[1]} rows x {expected[2]} slices); predict on that series' grid",
            series_uid=str(first.SeriesInstanceUID),
        )
    if affine is not None and not np.allclose(np.asarray(affine, dtype=np.float64), grid, atol=1e-3, rtol=1e-4):
        raise DataError(
            f"the label map's affine differs from the grid of series {first.SeriesInstanceUID} "
            f"(label map {np.round(affine, 3).tolist()}, series {np.round(grid, 3).tolist()}); "
            "the labels must be on the source series' own grid",
            series_uid=str(first.SeriesInstanceUID),
        )
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_):
        raise DataError(f"label map has dtype {labels.dtype}; labels are integers 0..255")
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) > 255):
        raise DataError(f"label map holds values {int(labels.min())}..{int(labels.max())}; labels are 0..255")
    labels = labels.astype(np.uint8)

    names = {int(k): str(v) for k, v in label_names.items() if int(k) != 0}
    if sorted(names) != list(range(1, len(names) + 1)):
        raise ConfigurationError(
            f"label values {sorted(names)}: the non-background labels must be 1..N to become segment numbers",
            field="labels",
        )
    if not names:
        raise ConfigurationError("no labels besides background: a SEG needs at least one segment", field="labels")
    undeclared = sorted(set(np.unique(labels).tolist()) - set(names) - {0})
    if undeclared:
        raise DataError(
            f"label map holds value(s) {undeclared} that the model does not declare ({names}); "
            "is this the model that produced it?"
        )

    algorithm = hd.AlgorithmIdentificationSequence(
        name=algorithm_name[:64], family=codes.cid7162.ArtificialIntelligence, version=algorithm_version[:64]
    )
    descriptions = []
    for number, name in sorted(names.items()):
        concept = concept_for(name)
        description = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=name[:64],
            segmented_property_category=getattr(codes.SCT, concept.category),
            segmented_property_type=getattr(codes.SCT, concept.type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            display_color=hd.color.CIELabColor.from_rgb(*concept.rgb),
        )
        description.SegmentDescription = f"{name} (label {number} of {algorithm_name})"[:64]
        descriptions.append(description)

    frames = np.ascontiguousarray(labels.transpose(2, 1, 0))  # [slice, row, column], slices sorted by position
    series_number = int(first.get("SeriesNumber", 0) or 0) + 1000  # sorts next to its source in PACS lists
    try:
        seg = hd.seg.Segmentation(
            source_images=slices,
            pixel_array=frames,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=hd.UID(),
            series_number=series_number,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="Laulima",
            manufacturer_model_name=algorithm_name[:64],
            software_versions=f"laulima {laulima.__version__}",
            device_serial_number=algorithm_version[:64],  # the weights' identity: the "device" that segmented
            content_label="LAULIMA_SEG",
            content_description=series_description[:64],
            series_description=series_description[:64],
            omit_empty_frames=False,  # one frame per slice and segment: predictable for every reader
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise DataError(
            f"cannot build a DICOM SEG on series {first.SeriesInstanceUID} ({exc})",
            series_uid=str(first.SeriesInstanceUID),
        ) from exc

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out_path.name}.", dir=out_path.parent)
    os.close(fd)
    try:
        seg.save_as(tmp, enforce_file_format=True)
        os.replace(tmp, out_path)  # readers never see half a file
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out_path


# -- reading ------------------------------------------------------------------------
def read_segmentation(path: Path, source: Sequence[Any]) -> np.ndarray:
    """The label map (uint8 ``[X,Y,Z]``, values = segment numbers) of the SEG at ``path`` on ``source``'s grid.

    The SEG must reference ``source``'s series and frame of reference: reading it onto
    another series would silently misplace every voxel.
    """
    import highdicom as hd

    path = Path(path)
    slices, _ = _sorted_series(source)
    first = slices[0]
    try:
        seg = hd.seg.segread(path)
    except Exception as exc:  # pydicom and highdicom raise many types for foreign or damaged files
        raise DataError(f"{path}: not a readable DICOM SEG ({exc})", file=str(path)) from exc
    if str(seg.SOPClassUID) != SEGMENTATION_STORAGE:
        raise DataError(f"{path}: SOP Class {seg.SOPClassUID} is not Segmentation Storage", file=str(path))
    if str(seg.get("FrameOfReferenceUID", "")) != str(first.FrameOfReferenceUID):
        raise DataError(
            f"{path}: frame of reference {seg.get('FrameOfReferenceUID')} differs from the source series' "
            f"{first.FrameOfReferenceUID}; this SEG was made on other images",
            file=str(path),
        )
    referenced = {str(item.SeriesInstanceUID) for item in seg.get("ReferencedSeriesSequence", [])}
    if str(first.SeriesInstanceUID) not in referenced:
        raise DataError(
            f"{path}: references series {sorted(referenced)}, not the source series {first.SeriesInstanceUID}",
            file=str(path),
        )
    try:
        frames = seg.get_pixels_by_source_instance(
            [str(ds.SOPInstanceUID) for ds in slices],
            combine_segments=True,
            relabel=False,
            assert_missing_frames_are_empty=True,  # slices with no frame (omitted as empty) read as background
            dtype=np.uint8,
        )
    except (ValueError, RuntimeError, KeyError) as exc:
        raise DataError(f"{path}: cannot place its frames on the source slices ({exc})", file=str(path)) from exc
    return np.ascontiguousarray(frames.transpose(2, 1, 0))
