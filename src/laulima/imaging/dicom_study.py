"""A folder tree of DICOM files checked case by case before it becomes a dataset.

Hospitals export studies as trees of files named anything (``IM0001``, UIDs, ``*.dcm``),
several series per folder or one series spread over folders. So the tree is walked
recursively, every file's header is read with pydicom (``stop_before_pixels``: cheap), and
files are grouped by StudyInstanceUID / SeriesInstanceUID, never by folder or name.

Which series are cases
    One case per volumetric image series: CT, MR or PET Image Storage (single-frame
    slices) with at least 3 slices in one orientation. Not cases, and only noted: series
    marked ImageType LOCALIZER, series of fewer than 3 slices, series whose slices take
    several orientations with fewer than 3 slices in each (a tri-planar scout, whether
    marked or not), and series of other SOP classes (radiographs, secondary captures,
    reports, RT objects, presentation states). Files without the DICOM preamble (``DICM``
    at byte 128), hidden files and DICOMDIR files (by name or Media Storage Directory
    class) are not DICOM here; they are ignored and counted.

What makes a case bad (one line per bad case, naming the file and what is wrong)
    missing tags (position, orientation, pixel spacing, size, UIDs), a file that claims to
    be DICOM but cannot be parsed, another SOP class mixed into an image series,
    multi-frame or colour images, orientation, pixel spacing or image size varying within
    the series, a duplicate slice position, a gap (a missing slice) or uneven slice
    spacing, and a label whose geometry does not match its image.

Labels (``--labels`` folder and DICOM SEG)
    A DICOM SEG object anywhere in the tree labels the series it references
    (ReferencedSeriesSequence); its frames must lie on the slices of that series (same
    frame of reference, orientation, pixel spacing, size, and each frame's position on a
    slice). Segment number N becomes label value N. A NIfTI label map in the ``--labels``
    folder is matched by name: ``<SeriesInstanceUID>.nii.gz`` (or ``.nii``) labels that
    series; ``<StudyInstanceUID>.nii.gz`` labels the study's case when the study has
    exactly one. Its shape and affine must equal the series' (tolerance 1e-3 mm), its values
    be integers 0..255. An optional ``labels.json`` there (``{"0": "background", "1":
    "tumour"}``) names the values; otherwise SEG segment labels name them, else "label N".
    A label file that matches no series is a problem too: a typo in a UID must not leave
    a case silently unlabelled.

Case ids are ``dcm-`` and 16 hex digits of the SHA-256 of the SeriesInstanceUID: stable,
safe in file names, and naming no patient when they appear in logs or metrics.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from laulima.errors import DataError
from laulima.imaging.dicom import LPS_TO_RAS, slice_normal, stack_affine
from laulima.imaging.nifti import NIFTI_SUFFIXES, is_nifti_name, read_header, read_label_array

__all__ = [
    "SEG_STORAGE",
    "VOLUME_SOP_CLASSES",
    "BadCase",
    "DicomCase",
    "DicomInspection",
    "LabelSource",
    "case_id_for",
    "inspect_dicom_tree",
    "is_dicom_file",
    "label_map",
    "orientation_code",
]

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
VOLUME_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2": "CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.4": "MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.128": "Positron Emission Tomography Image Storage",
}
"""Single-frame cross-sectional image classes whose series become volumes."""
MIN_SLICES = 3
LABEL_NAMES_FILE = "labels.json"
_REQUIRED = ("SOPInstanceUID", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns")
_MEDIA_DIRECTORY = "1.2.840.10008.1.3.10"
_ORIENTATION_ATOL = 1e-4
_GEOMETRY_ATOL_MM = 1e-3


def case_id_for(series_uid: str) -> str:
    return "dcm-" + hashlib.sha256(series_uid.encode()).hexdigest()[:16]


def orientation_code(affine: np.ndarray) -> str:
    """Axis codes of a RAS affine, like nibabel's ``aff2axcodes``: "RAS", "LPS", ..."""
    import nibabel as nib

    return "".join(str(c) for c in nib.aff2axcodes(np.asarray(affine)))


def is_dicom_file(path: Path) -> bool:
    """A DICOM Part 10 file: ``DICM`` at byte 128 (the only check; reads 132 bytes)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(132)[128:132] == b"DICM"
    except OSError:
        return False


@dataclass(frozen=True)
class LabelSource:
    kind: str  # "seg" | "nifti"
    path: Path
    segments: dict[int, str] = field(default_factory=dict)  # SEG segment number -> label (SEG only)


@dataclass(frozen=True, eq=False)
class DicomCase:
    case_id: str
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    modality: str
    series_description: str
    files: tuple[Path, ...]  # sorted along the slice normal
    sop_instance_uids: tuple[str, ...]  # in the same order
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    affine: np.ndarray  # RAS
    label: LabelSource | None = None

    @property
    def orientation(self) -> str:
        return orientation_code(self.affine)


@dataclass(frozen=True)
class BadCase:
    """A bad case (``series_uid`` set) or a problem of the source not tied to one case."""

    file: str  # relative to the inspected root (or absolute outside it)
    what: str
    series_uid: str | None = None

    @property
    def line(self) -> str:
        return f"{self.file}: {self.what}"


@dataclass(frozen=True)
class DicomInspection:
    root: Path
    labels_root: Path | None
    cases: tuple[DicomCase, ...]
    bad: tuple[BadCase, ...]
    not_cases: tuple[str, ...]  # series that are no cases, and why (localizers, radiographs, ...)
    ignored_files: int  # files that are not DICOM
    dicom_files: int
    label_names: dict[int, str]

    @property
    def lines(self) -> list[str]:
        return [b.line for b in self.bad]

    def raise_if_bad(self) -> None:
        """DataError listing every bad case, unless there is none (and at least one good case)."""
        if not self.bad and self.cases:
            return
        if not self.bad:
            raise DataError(
                f"{self.root}: no volumetric DICOM image series found ({self.dicom_files} DICOM file(s), "
                f"{self.ignored_files} other file(s)"
                + (f"; not cases: {'; '.join(self.not_cases[:5])}" if self.not_cases else "")
                + "); point at a folder holding CT, MR or PET series of at least 3 slices",
                file=str(self.root),
            )
        shown = self.lines[:50] + ([f"... and {len(self.lines) - 50} more"] if len(self.lines) > 50 else [])
        raise DataError(
            f"{self.root}: {len(self.bad)} bad case(s) or problem(s), {len(self.cases)} good case(s); nothing was "
            "registered. Fix these, or register the good cases with --skip-bad:\n  " + "\n  ".join(shown),
            file=str(self.root),
            problems=list(self.lines),
        )


@dataclass
class _Slice:
    path: Path
    ds: Any


class _Inspector:
    def __init__(self, root: Path, labels: Path | None) -> None:
        self.root = root
        self.labels_root = labels
        self.bad: list[BadCase] = []
        self.not_cases: list[str] = []
        self.ignored = 0
        self.n_dicom = 0

    def rel(self, path: Path) -> str:
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return str(path)

    def fail(self, path: Path, what: str, series_uid: str | None = None) -> None:
        self.bad.append(BadCase(self.rel(path), what, series_uid))

    # -- discovery -----------------------------------------------------------------
    def walk(self) -> Iterator[Path]:
        for folder, dirs, files in os.walk(self.root):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                path = Path(folder) / name
                if name.startswith(".") or name.upper() == "DICOMDIR" or not is_dicom_file(path):
                    self.ignored += 1
                    continue
                yield path

    def read_headers(self) -> tuple[dict[tuple[str, str], list[_Slice]], list[_Slice]]:
        import pydicom
        from pydicom.errors import InvalidDicomError

        series: dict[tuple[str, str], list[_Slice]] = defaultdict(list)
        segs: list[_Slice] = []
        for path in self.walk():
            self.n_dicom += 1
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError) as exc:
                self.fail(path, f"not a readable DICOM file ({exc}); re-export it or remove it from the tree")
                continue
            if str(ds.file_meta.get("MediaStorageSOPClassUID", "")) == _MEDIA_DIRECTORY:  # a DICOMDIR by any name
                self.n_dicom -= 1
                self.ignored += 1
                continue
            missing = [k for k in ("SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID") if not ds.get(k)]
            if missing:
                self.fail(path, f"missing tag(s) {', '.join(missing)}; the file cannot be put in a series")
                continue
            if str(ds.SOPClassUID) == SEG_STORAGE:
                segs.append(_Slice(path, ds))
            else:
                series[(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID))].append(_Slice(path, ds))
        return series, segs

    # -- one series ------------------------------------------------------------------
    def series_case(self, study: str, uid: str, slices: list[_Slice]) -> DicomCase | None:
        description = str(slices[0].ds.get("SeriesDescription", "") or "")
        named = f"series {uid}" + (f" ({description})" if description else "")
        classes = Counter(str(s.ds.SOPClassUID) for s in slices)
        main = classes.most_common(1)[0][0]
        if main not in VOLUME_SOP_CLASSES:
            from pydicom.uid import UID

            self.not_cases.append(f"{named}: {len(slices)} {UID(main).name} object(s), not a cross-sectional image")
            return None
        if any("LOCALIZER" in [str(v).upper() for v in _multi(s.ds.get("ImageType"))] for s in slices):
            self.not_cases.append(f"{named}: a localizer (ImageType LOCALIZER), {len(slices)} slice(s)")
            return None
        mixed = [s for s in slices if str(s.ds.SOPClassUID) != main]
        if mixed:
            from pydicom.uid import UID

            self.fail(
                mixed[0].path,
                f"a {UID(str(mixed[0].ds.SOPClassUID)).name} object mixed into {VOLUME_SOP_CLASSES[main]} {named} "
                f"({len(mixed)} such file(s)); an image series holds only its images, move the others out",
                uid,
            )
            return None
        for s in slices:
            absent = [k for k in _REQUIRED if s.ds.get(k) in (None, "")]
            if absent:
                self.fail(
                    s.path,
                    f"missing tag(s) {', '.join(absent)} in {named}, so the slice has no place in the volume; "
                    "re-export the series with its geometry",
                    uid,
                )
                return None
            if int(s.ds.get("NumberOfFrames", 1) or 1) > 1 or int(s.ds.get("SamplesPerPixel", 1) or 1) != 1:
                self.fail(
                    s.path,
                    f"multi-frame or colour image in {named}; only single-frame greyscale slices are read, "
                    "export the series as one file per slice",
                    uid,
                )
                return None
        try:
            geometry = [
                (
                    s,
                    np.asarray([float(v) for v in s.ds.ImageOrientationPatient]),
                    np.asarray([float(v) for v in s.ds.ImagePositionPatient]),
                    np.asarray([float(v) for v in s.ds.PixelSpacing]),
                )
                for s in slices
            ]
        except (TypeError, ValueError) as exc:
            self.fail(slices[0].path, f"unreadable geometry tags in {named} ({exc})", uid)
            return None
        if any(g[1].shape != (6,) or g[2].shape != (3,) or g[3].shape != (2,) for g in geometry):
            bad = next(g for g in geometry if g[1].shape != (6,) or g[2].shape != (3,) or g[3].shape != (2,))
            self.fail(bad[0].path, f"malformed orientation, position or pixel spacing in {named}", uid)
            return None
        groups: list[list[tuple[Any, ...]]] = []
        for g in geometry:
            for group in groups:
                if np.allclose(group[0][1], g[1], atol=_ORIENTATION_ATOL):
                    group.append(g)
                    break
            else:
                groups.append([g])
        if len(groups) > 1:
            if all(len(group) < MIN_SLICES for group in groups):
                self.not_cases.append(
                    f"{named}: {len(slices)} slices in {len(groups)} orientations (a localizer or scout)"
                )
                return None
            groups.sort(key=len, reverse=True)
            odd = groups[1][0]
            self.fail(
                odd[0].path,
                f"orientation {np.round(odd[1], 4).tolist()} differs from the {len(groups[0])} other slices of "
                f"{named} ({np.round(groups[0][0][1], 4).tolist()}); a series must be one stack, re-export it",
                uid,
            )
            return None
        if len(slices) < MIN_SLICES:
            self.not_cases.append(f"{named}: {len(slices)} slice(s), fewer than {MIN_SLICES}")
            return None
        first = geometry[0]
        for g in geometry[1:]:
            if not np.allclose(g[3], first[3], rtol=0, atol=1e-4):
                self.fail(
                    g[0].path,
                    f"pixel spacing {g[3].tolist()} differs from {first[3].tolist()} ({self.rel(first[0].path)}) "
                    f"within {named}; a series must have one voxel size",
                    uid,
                )
                return None
            size, first_size = (
                (int(g[0].ds.Rows), int(g[0].ds.Columns)),
                (int(first[0].ds.Rows), int(first[0].ds.Columns)),
            )
            if size != first_size:
                self.fail(g[0].path, f"image size {size} differs from {first_size} within {named}", uid)
                return None
        normal = slice_normal(first[1])
        geometry.sort(key=lambda g: float(g[2] @ normal))
        along = np.array([float(g[2] @ normal) for g in geometry])
        steps = np.diff(along)
        for k, step in enumerate(steps):
            if step <= _GEOMETRY_ATOL_MM:
                self.fail(
                    geometry[k + 1][0].path,
                    f"duplicate slice position {np.round(geometry[k + 1][2], 3).tolist()}, the same as "
                    f"{self.rel(geometry[k][0].path)} in {named}; remove the duplicate or split the series",
                    uid,
                )
                return None
        typical = float(np.median(steps))
        for k, step in enumerate(steps):
            if step > 1.5 * typical:
                self.fail(
                    geometry[k + 1][0].path,
                    f"gap of {step:.3f} mm before this slice (the series' step is {typical:.3f} mm; about "
                    f"{round(step / typical) - 1} slice(s) missing after {self.rel(geometry[k][0].path)}) in {named}; "
                    "restore the missing slices",
                    uid,
                )
                return None
        if np.ptp(steps) > 0.01 * steps.mean() + 1e-3:
            k = int(np.argmax(np.abs(steps - typical)))
            self.fail(
                geometry[k + 1][0].path,
                f"slice spacing varies within {named} ({steps.min():.3f} to {steps.max():.3f} mm); "
                "a volume needs evenly spaced slices, re-export or resample the series",
                uid,
            )
            return None
        positions = np.stack([g[2] for g in geometry])
        affine = stack_affine(first[1], first[3], positions)
        ds0 = first[0].ds
        shape = (int(ds0.Columns), int(ds0.Rows), len(geometry))
        spacing = tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))
        return DicomCase(
            case_id=case_id_for(uid),
            study_uid=study,
            series_uid=uid,
            frame_of_reference_uid=str(ds0.get("FrameOfReferenceUID", "") or ""),
            modality=str(ds0.get("Modality", "") or ""),
            series_description=description,
            files=tuple(g[0].path for g in geometry),
            sop_instance_uids=tuple(str(g[0].ds.SOPInstanceUID) for g in geometry),
            shape=shape,
            spacing=(spacing[0], spacing[1], spacing[2]),
            affine=affine,
        )

    # -- labels -------------------------------------------------------------------------
    def seg_problem(self, seg: _Slice, case: DicomCase) -> str | None:
        """Why the SEG's frames do not lie on the case's slices, or None."""
        ds = seg.ds
        if (int(ds.get("Rows", 0)), int(ds.get("Columns", 0))) != (case.shape[1], case.shape[0]):
            image = f"{case.shape[1]}x{case.shape[0]}"
            return f"label size {ds.get('Rows')}x{ds.get('Columns')} (rows x columns) differs from the image's {image}"
        if case.frame_of_reference_uid and ds.get("FrameOfReferenceUID") != case.frame_of_reference_uid:
            return "label frame of reference differs from the image's"
        frames = list(ds.get("PerFrameFunctionalGroupsSequence", []))
        shared = ds.get("SharedFunctionalGroupsSequence", [None])[0]
        if not frames:
            return "the SEG has no per-frame functional groups (no frame positions)"
        lps = np.linalg.inv(LPS_TO_RAS @ case.affine)  # patient LPS -> voxel indices
        for i, frame in enumerate(frames):
            orientation = _functional(frame, shared, "PlaneOrientationSequence", "ImageOrientationPatient")
            spacing = _functional(frame, shared, "PixelMeasuresSequence", "PixelSpacing")
            position = _functional(frame, shared, "PlanePositionSequence", "ImagePositionPatient")
            if orientation is None or spacing is None or position is None:
                return f"frame {i + 1} has no orientation, pixel spacing or position"
            given = np.asarray([float(v) for v in orientation])
            image = LPS_TO_RAS @ case.affine
            expected = np.concatenate([image[:3, 0] / case.spacing[0], image[:3, 1] / case.spacing[1]])
            if given.shape != (6,) or not np.allclose(given, expected, atol=_ORIENTATION_ATOL):
                return (
                    f"frame {i + 1} orientation {np.round(given, 4).tolist()} differs from the image's "
                    f"{np.round(expected, 4).tolist()}"
                )
            if not np.allclose([float(v) for v in spacing], [case.spacing[1], case.spacing[0]], atol=1e-4):
                return f"frame {i + 1} pixel spacing {[float(v) for v in spacing]} differs from the image's"
            index = lps @ np.array([*[float(v) for v in position], 1.0])
            k = round(float(index[2]))
            if np.abs(index[:2]).max() > 1e-2 or abs(index[2] - k) > 1e-2 or not 0 <= k < case.shape[2]:
                return (
                    f"frame {i + 1} at {[round(float(v), 3) for v in position]} does not lie on a slice of the "
                    "image (its origin falls at voxel "
                    f"{np.round(index[:3], 2).tolist()})"
                )
        return None

    def attach_labels(
        self, cases: dict[str, DicomCase], bad_series: set[str], bad_studies: set[str], segs: list[_Slice]
    ) -> None:
        labels: dict[str, LabelSource] = {}
        for seg in segs:
            referenced = [str(item.get("SeriesInstanceUID", "")) for item in seg.ds.get("ReferencedSeriesSequence", [])]
            target = next((cases[uid] for uid in referenced if uid in cases), None)
            if target is None:
                if not any(uid in bad_series for uid in referenced):
                    self.not_cases.append(
                        f"{self.rel(seg.path)}: SEG for series {', '.join(referenced) or '(none named)'}, "
                        "which is not a case in this tree"
                    )
                continue
            if target.series_uid in labels:
                self.fail(
                    seg.path,
                    f"a second label for series {target.series_uid} (the first: "
                    f"{self.rel(labels[target.series_uid].path)}); keep one",
                    target.series_uid,
                )
                continue
            problem = self.seg_problem(seg, target)
            if problem is not None:
                self.fail(
                    seg.path,
                    f"label geometry does not match its image, series {target.series_uid}: {problem}; "
                    "segment the series as it is stored",
                    target.series_uid,
                )
                continue
            segments = {
                int(item.SegmentNumber): str(item.get("SegmentLabel", "") or f"segment {item.SegmentNumber}")
                for item in seg.ds.get("SegmentSequence", [])
            }
            if any(not 1 <= n <= 255 for n in segments):
                self.fail(seg.path, f"segment numbers {sorted(segments)} outside 1..255", target.series_uid)
                continue
            labels[target.series_uid] = LabelSource("seg", seg.path, segments)
        if self.labels_root is not None:
            self.nifti_labels(cases, bad_series | bad_studies, labels)
        for uid, source in labels.items():
            case = cases[uid]
            cases[uid] = DicomCase(**{**case.__dict__, "label": source})

    def nifti_labels(self, cases: dict[str, DicomCase], bad_uids: set[str], labels: dict[str, LabelSource]) -> None:
        """Match the labels folder's NIfTI files to cases; ``bad_uids``: series and studies already refused."""
        assert self.labels_root is not None
        by_study: dict[str, list[DicomCase]] = defaultdict(list)
        for case in cases.values():
            by_study[case.study_uid].append(case)
        for path in sorted(self.labels_root.iterdir()):
            if path.name.startswith(".") or path.name == LABEL_NAMES_FILE or not path.is_file():
                continue
            if not is_nifti_name(path):
                self.fail(path, "not a NIfTI label map (.nii.gz or .nii) in the labels folder; move it out")
                continue
            uid = next(path.name[: -len(s)] for s in NIFTI_SUFFIXES if path.name.endswith(s))
            if uid in cases:
                target = cases[uid]
            elif uid in by_study and len(by_study[uid]) == 1:
                target = by_study[uid][0]
            elif uid in by_study:
                self.fail(
                    path,
                    f"study {uid} has {len(by_study[uid])} cases; name the label by the SeriesInstanceUID it labels",
                )
                continue
            elif uid in bad_uids:
                continue  # its series is bad already, and said so
            else:
                self.fail(
                    path,
                    "matches no series or study of the tree (a label is named <SeriesInstanceUID>.nii.gz or "
                    "<StudyInstanceUID>.nii.gz); rename it or remove it",
                )
                continue
            if target.series_uid in labels:
                self.fail(
                    path,
                    f"a second label for series {target.series_uid} (the first: "
                    f"{self.rel(labels[target.series_uid].path)}); keep one",
                    target.series_uid,
                )
                continue
            problem = self.nifti_problem(path, target)
            if problem is not None:
                self.fail(path, problem, target.series_uid)
                continue
            labels[target.series_uid] = LabelSource("nifti", path)

    def nifti_problem(self, path: Path, case: DicomCase) -> str | None:
        try:
            header = read_header(path)
            if header.n_channels != 1:
                return f"label map has {header.n_channels} channels; store one 3D label volume"
            if header.shape != case.shape or not np.allclose(
                header.affine, case.affine, rtol=0.0, atol=_GEOMETRY_ATOL_MM
            ):
                return (
                    f"label geometry does not match its image, series {case.series_uid}: shape {header.shape} vs "
                    f"{case.shape}, affine {_fmt(header.affine)} vs {_fmt(case.affine)}; resample the label onto "
                    "the series' grid (nearest neighbour)"
                )
            values, _ = read_label_array(path)
        except DataError as exc:
            return exc.message
        if values.size and (values.min() < 0 or values.max() > 255 or not np.array_equal(values, np.round(values))):
            return "label values are not integers 0..255; store a label map"
        return None

    def label_names(self, cases: list[DicomCase]) -> dict[int, str]:
        names: dict[int, str] = {0: "background"}
        if self.labels_root is not None and (self.labels_root / LABEL_NAMES_FILE).is_file():
            path = self.labels_root / LABEL_NAMES_FILE
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                given = {int(k): str(v) for k, v in data.items()}
            except (OSError, ValueError, AttributeError, TypeError) as exc:
                self.fail(path, f'not a JSON object like {{"0": "background", "1": "tumour"}} ({exc}); fix it')
                return names
            if any(not 0 <= k <= 255 for k in given):
                self.fail(path, f"label values {sorted(given)} must be 0..255; fix it")
                return names
            names.update(given)
            return dict(sorted(names.items()))
        for case in cases:
            if case.label is not None:
                for number, label in case.label.segments.items():
                    names.setdefault(number, label)
        return dict(sorted(names.items()))


def _multi(value: Any) -> list[Any]:
    if value is None:
        return []
    return [value] if isinstance(value, str) or not hasattr(value, "__iter__") else list(value)


def _functional(frame: Any, shared: Any, sequence: str, keyword: str) -> Any:
    for group in (frame, shared):
        if group is not None and sequence in group and len(group[sequence].value):
            value = group[sequence].value[0].get(keyword)
            if value is not None:
                return value
    return None


def _fmt(affine: np.ndarray) -> str:
    return np.array2string(np.asarray(affine)[:3], precision=3, suppress_small=True).replace("\n", "")


def inspect_dicom_tree(root: Path, *, labels: Path | None = None) -> DicomInspection:
    """Every case of the DICOM tree at ``root`` checked: good cases, bad ones with reasons, what was ignored.

    Reads headers only (pixel data is not decoded here; a NIfTI label is read to check its
    values). Raises DataError only if ``root`` or ``labels`` is not a folder; everything
    wrong inside is reported in the result, for the caller to refuse or skip.
    """
    root = Path(os.path.abspath(root))
    if not root.is_dir():
        raise DataError(f"{root}: no such folder; give the folder holding the DICOM files", file=str(root))
    labels_root = Path(os.path.abspath(labels)) if labels is not None else None
    if labels_root is not None and not labels_root.is_dir():
        raise DataError(f"{labels_root}: no such labels folder", file=str(labels_root))
    inspector = _Inspector(root, labels_root)
    series, segs = inspector.read_headers()
    cases: dict[str, DicomCase] = {}
    for (study, uid), slices in sorted(series.items()):
        case = inspector.series_case(study, uid, slices)
        if case is not None:
            cases[uid] = case
    bad_series = {b.series_uid for b in inspector.bad if b.series_uid is not None}
    bad_studies = {study for study, uid in series if uid in bad_series}
    inspector.attach_labels(cases, bad_series, bad_studies, segs)
    bad_series = {b.series_uid for b in inspector.bad if b.series_uid is not None}
    good = [c for uid, c in sorted(cases.items(), key=lambda item: item[1].case_id) if uid not in bad_series]
    names = inspector.label_names(good)
    return DicomInspection(
        root=root,
        labels_root=labels_root,
        cases=tuple(good),
        bad=tuple(inspector.bad),
        not_cases=tuple(inspector.not_cases),
        ignored_files=inspector.ignored,
        dicom_files=inspector.n_dicom,
        label_names=names,
    )


def label_map(case: DicomCase) -> np.ndarray | None:
    """The case's label as uint8 ``[X,Y,Z]`` on the series' grid, or None without a label.

    A SEG is read with highdicom: each frame's segment pixels are placed on the slice at its
    position (checked by ``inspect_dicom_tree``), value = segment number; BINARY and
    FRACTIONAL (at half the maximum) and LABELMAP segmentations are read. Overlapping
    segments are refused: a label map holds one value per voxel.
    """
    if case.label is None:
        return None
    if case.label.kind == "nifti":
        values, _ = read_label_array(case.label.path)
        return values.astype(np.uint8)
    import highdicom as hd

    path = case.label.path
    try:
        seg = hd.seg.segread(path)
    except Exception as exc:  # highdicom and pydicom raise many types for a damaged object
        raise DataError(f"{path}: not a readable DICOM SEG ({exc}); re-export it", file=str(path)) from exc
    ras_to_index = np.linalg.inv(case.affine)
    out = np.zeros(case.shape, dtype=np.uint8)
    shared = seg.get("SharedFunctionalGroupsSequence", [None])[0]
    kind = str(seg.get("SegmentationType", "BINARY")).upper()
    maximum = float(seg.get("MaximumFractionalValue", 1) or 1)
    for i, frame in enumerate(seg.PerFrameFunctionalGroupsSequence):
        position = _functional(frame, shared, "PlanePositionSequence", "ImagePositionPatient")
        lps = np.array([*[float(v) for v in position], 1.0])
        k = round(float((ras_to_index @ (LPS_TO_RAS @ lps))[2]))
        pixels = np.asarray(seg.get_stored_frame(i + 1)).T  # (columns, rows) = (x, y)
        if kind == "LABELMAP":
            values = pixels.astype(np.int64)
            if values.size and (values.min() < 0 or values.max() > 255):
                raise DataError(f"{path}: LABELMAP values outside 0..255; renumber the segments", file=str(path))
        else:
            # Per frame, or shared by all frames (highdicom shares it when there is one segment).
            referenced = _functional(frame, shared, "SegmentIdentificationSequence", "ReferencedSegmentNumber")
            if referenced is None:
                raise DataError(f"{path}: frame {i + 1} names no segment; re-export the SEG", file=str(path))
            number = int(referenced)
            on = pixels >= maximum / 2 if kind == "FRACTIONAL" else pixels > 0
            values = np.where(on, number, 0)
        plane = out[:, :, k]
        overlap = (plane > 0) & (values > 0) & (plane != values)
        if overlap.any():
            raise DataError(
                f"{path}: segments overlap on slice {k}; a label map holds one value per voxel, "
                "export non-overlapping segments",
                file=str(path),
            )
        np.copyto(plane, values.astype(np.uint8), where=values > 0)
    return out
