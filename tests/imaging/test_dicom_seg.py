"""DICOM SEG out: label maps written onto their source series, read back by highdicom and by pydicom.

The series are real files (pydicom, shuffled file order, misleading InstanceNumbers, an
oblique orientation), the label maps are asymmetric along every axis, and geometry is
checked against the NIfTI label map's affine: a transposed or flipped frame fails.
"""

from __future__ import annotations

import json
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from laulima.errors import ConfigurationError, DataError
from laulima.imaging import read_image, write_label_nifti
from laulima.imaging.dicom_seg import (
    SEGMENTATION_STORAGE,
    concept_for,
    is_dicom_input,
    read_segmentation,
    read_source_series,
    series_affine,
    write_segmentation,
)
from laulima.imaging.nifti import read_label_array
from laulima.imaging.series_ref import SERIES_REF_FORMAT

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
SHAPE = (12, 10, 7)  # columns, rows, slices: all different, so a swapped axis cannot pass
TUMOUR = {0: "background", 1: "edema", 2: "non-enhancing tumor", 3: "enhancing tumour"}


def oblique_affine() -> np.ndarray:
    """RAS affine with a rotation about z and a flip of the slice axis: slices run inferior-ward."""
    angle = np.deg2rad(25)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([1.5, 2.0, -3.0])
    affine[:3, 3] = [-40.0, 25.0, 30.0]
    return affine


def write_mr_series(folder: Path, volume: np.ndarray, affine: np.ndarray, *, seed: int = 0) -> list[Path]:
    """An MR series of ``volume`` [X,Y,Z] (one file per z, shuffled names and InstanceNumbers), like a PACS export."""
    folder.mkdir(parents=True, exist_ok=True)
    lps = RAS_TO_LPS @ affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    row_dir, col_dir = lps[:3, 0] / spacing[0], lps[:3, 1] / spacing[1]
    study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    order = np.random.default_rng(seed).permutation(volume.shape[2])
    files = []
    for k in range(volume.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^One", "PHANTOM", "", "O"
        ds.StudyInstanceUID, ds.StudyID, ds.AccessionNumber = study, "1", ""
        ds.StudyDate, ds.StudyTime, ds.ReferringPhysicianName = "20240101", "120000", ""
        ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = "MR", series, 7
        ds.SeriesDescription, ds.InstanceNumber = "T1w", int(order[k]) + 1  # misleading on purpose
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_of_reference, ""
        ds.Manufacturer = "Phantom"
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]  # between rows, between columns
        ds.ImageOrientationPatient = [float(v) for v in (*row_dir, *col_dir)]
        ds.ImagePositionPatient = [float(v) for v in (lps @ [0, 0, k, 1])[:3]]
        ds.SliceThickness = float(spacing[2])
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = np.ascontiguousarray(volume[:, :, k].T.astype(np.uint16)).tobytes()  # rows = y
        path = folder / f"img_{order[k]:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def asymmetric_labels(shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    """Labels 1..3 in blocks that differ under every flip and transpose, plus one lone voxel."""
    labels = np.zeros(shape, dtype=np.uint8)
    labels[1:5, 2:4, 1:3] = 1
    labels[6:11, 1:8, 4] = 2
    labels[2, 7, 5] = 3
    labels[9:11, 8:10, 6] = 3
    return labels


@pytest.fixture
def series(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """A series folder and the RAS affine read_image gives it."""
    volume = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE) % 400
    write_mr_series(tmp_path / "mr", volume, oblique_affine())
    _, affine = read_image(tmp_path / "mr")
    return tmp_path / "mr", affine


def _write(labels: np.ndarray, folder: Path, out: Path, affine: np.ndarray | None = None) -> Path:
    return write_segmentation(
        labels,
        read_source_series(folder),
        TUMOUR,
        out,
        algorithm_name="Laulima U-Net",
        algorithm_version="sha256:0123456789ab",
        affine=affine,
    )


def test_round_trip_matches_the_nifti_label_map(series: tuple[Path, np.ndarray], tmp_path: Path):
    folder, affine = series
    labels = asymmetric_labels()
    # the writer laid slices inferior-ward; read back they are sorted along the normal, so z is flipped
    np.testing.assert_allclose(affine[:3, 2], -oblique_affine()[:3, 2], atol=1e-4)
    nifti = tmp_path / "labels.nii.gz"
    write_label_nifti(nifti, labels, affine)
    seg_path = _write(labels, folder, tmp_path / "out" / "labels.seg.dcm", affine=affine)

    assert np.array_equal(read_segmentation(seg_path, read_source_series(folder)), labels)

    # pydicom alone: every frame's position, source slice and pixels against the NIfTI's geometry
    truth, nifti_affine = read_label_array(nifti)  # nibabel reads the file back
    lps_affine = RAS_TO_LPS @ nifti_affine
    sources = {ds.SOPInstanceUID: ds for ds in read_source_series(folder)}
    seg = pydicom.dcmread(seg_path)
    assert seg.SOPClassUID == SEGMENTATION_STORAGE and seg.Modality == "SEG"
    assert seg.SegmentationType == "BINARY" and int(seg.NumberOfFrames) == SHAPE[2] * 3
    first = next(iter(sources.values()))
    assert seg.FrameOfReferenceUID == first.FrameOfReferenceUID and seg.StudyInstanceUID == first.StudyInstanceUID
    assert seg.PatientID == "PHANTOM" and seg.SeriesDescription == "Laulima segmentation"
    assert [s.SeriesInstanceUID for s in seg.ReferencedSeriesSequence] == [first.SeriesInstanceUID]
    assert {i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence} == set(
        sources
    )
    pixels = seg.pixel_array
    seen = set()
    for frame, item in zip(pixels, seg.PerFrameFunctionalGroupsSequence, strict=True):
        segment = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        position = np.asarray([float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient])
        z = int(np.rint((np.linalg.inv(lps_affine) @ [*position, 1])[2]))
        np.testing.assert_allclose(lps_affine @ [0, 0, z, 1], [*position, 1], atol=1e-3)
        source_uid = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        np.testing.assert_allclose(
            [float(v) for v in sources[source_uid].ImagePositionPatient], position, atol=1e-4
        )  # the frame names the slice it lies on
        assert np.array_equal(frame, (truth[:, :, z] == segment).T), f"segment {segment}, slice {z}"
        seen.add((segment, z))
    assert len(seen) == SHAPE[2] * 3


def test_highdicom_reads_the_volume_and_the_slices_back(series: tuple[Path, np.ndarray], tmp_path: Path):
    folder, affine = series
    labels = asymmetric_labels()
    seg = hd.seg.segread(_write(labels, folder, tmp_path / "s.dcm"))
    assert [seg.get_segment_description(n).SegmentLabel for n in seg.segment_numbers] == [
        "edema",
        "non-enhancing tumor",
        "enhancing tumour",
    ]

    volume = seg.get_volume(combine_segments=True, relabel=False)
    # voxel (i, j, k) of highdicom's volume and voxel (x, y, z) of ours at the same patient position
    to_ours = np.linalg.inv(RAS_TO_LPS @ affine) @ volume.affine
    assert np.allclose(to_ours, np.rint(to_ours), atol=1e-4)
    index = np.indices(volume.spatial_shape).reshape(3, -1)
    xyz = np.rint(to_ours[:3, :3] @ index + to_ours[:3, 3:]).astype(int)
    assert np.array_equal(volume.array.reshape(-1), labels[xyz[0], xyz[1], xyz[2]])

    sources = read_source_series(folder)  # file order: shuffled, not by position
    by_instance = seg.get_pixels_by_source_instance(
        [ds.SOPInstanceUID for ds in sources], combine_segments=True, relabel=False
    )
    lps = RAS_TO_LPS @ affine
    for ds, frame in zip(sources, by_instance, strict=True):
        z = int(np.rint((np.linalg.inv(lps) @ [*map(float, ds.ImagePositionPatient), 1])[2]))
        assert np.array_equal(frame, labels[:, :, z].T)


def test_segments_carry_snomed_codes_and_the_algorithm(series: tuple[Path, np.ndarray], tmp_path: Path):
    folder, _ = series
    seg = pydicom.dcmread(_write(asymmetric_labels(), folder, tmp_path / "s.dcm"))
    types = [
        (
            s.SegmentedPropertyTypeCodeSequence[0].CodeValue,
            s.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator,
        )
        for s in seg.SegmentSequence
    ]
    assert types == [("79654002", "SCT"), ("108369006", "SCT"), ("108369006", "SCT")]
    assert {s.SegmentedPropertyCategoryCodeSequence[0].CodeValue for s in seg.SegmentSequence} == {"49755003"}
    algorithm = seg.SegmentSequence[2].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "Laulima U-Net" and algorithm.AlgorithmVersion == "sha256:0123456789ab"
    assert seg.SegmentSequence[2].SegmentDescription.startswith("enhancing tumour")
    assert seg.SegmentSequence[0].SegmentAlgorithmType == "AUTOMATIC"


@pytest.mark.parametrize(
    ("name", "category", "kind"),
    [
        ("Grey matter", codes.SCT.AnatomicalStructure, codes.SCT.GrayMatter),
        ("white_matter", codes.SCT.AnatomicalStructure, codes.SCT.WhiteMatter),
        ("CSF", codes.SCT.AnatomicalStructure, codes.SCT.CerebrospinalFluid),
        ("brain", codes.SCT.AnatomicalStructure, codes.SCT.Brain),
        ("Oedema", codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Edema),
        ("necrotic tumour core", codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Necrosis),
        ("NCR/NET", codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Necrosis),
        ("Non-enhancing tumour", codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Neoplasm),
        ("brain metastasis", codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.MorphologicallyAbnormalStructure),
        ("label 1", codes.SCT.Tissue, codes.SCT.Tissue),
    ],
)
def test_label_names_map_to_real_codes(name: str, category: object, kind: object):
    concept = concept_for(name)
    assert getattr(codes.SCT, concept.category) == category and getattr(codes.SCT, concept.type) == kind


def test_an_empty_label_map_still_describes_every_segment(series: tuple[Path, np.ndarray], tmp_path: Path):
    folder, _ = series
    path = _write(np.zeros(SHAPE, np.uint8), folder, tmp_path / "s.dcm")
    assert len(pydicom.dcmread(path).SegmentSequence) == 3
    assert not read_segmentation(path, read_source_series(folder)).any()


def test_a_series_reference_file_is_a_source(series: tuple[Path, np.ndarray], tmp_path: Path):
    folder, affine = series
    files = sorted(folder.iterdir())
    reference = tmp_path / "case.series.json"
    reference.write_text(json.dumps({"format": SERIES_REF_FORMAT, "files": [str(f) for f in files]}))
    assert is_dicom_input(reference) and is_dicom_input(folder) and is_dicom_input(files[0])
    assert not is_dicom_input(tmp_path / "x.nii.gz")
    np.testing.assert_allclose(series_affine(read_source_series(reference)), affine, atol=1e-4)
    (tmp_path / "bad.series.json").write_text(json.dumps({"format": "other", "files": []}))
    with pytest.raises(DataError, match="not a series reference"):
        read_source_series(tmp_path / "bad.series.json")


def test_refuses_labels_off_the_source_grid(series: tuple[Path, np.ndarray], tmp_path: Path):
    folder, affine = series
    with pytest.raises(
        DataError, match=r"shape \[10, 12, 7\] does not fit series .* \(12 columns x 10 rows x 7 slices\)"
    ):
        _write(np.zeros((10, 12, 7), np.uint8), folder, tmp_path / "s.dcm")
    shifted = affine.copy()
    shifted[0, 3] += 2.0
    with pytest.raises(DataError, match="affine differs from the grid"):
        _write(asymmetric_labels(), folder, tmp_path / "s.dcm", affine=shifted)
    with pytest.raises(DataError, match=r"value\(s\) \[7\] that the model does not declare"):
        _write(np.full(SHAPE, 7, np.uint8), folder, tmp_path / "s.dcm")
    with pytest.raises(ConfigurationError, match="must be 1..N"):
        write_segmentation(
            asymmetric_labels(),
            read_source_series(folder),
            {0: "bg", 2: "x"},
            tmp_path / "s.dcm",
            algorithm_name="a",
            algorithm_version="1",
        )
    assert not (tmp_path / "s.dcm").exists()


def test_reading_onto_another_series_is_refused(series: tuple[Path, np.ndarray], tmp_path: Path):
    folder, _ = series
    path = _write(asymmetric_labels(), folder, tmp_path / "s.dcm")
    write_mr_series(tmp_path / "other", np.zeros(SHAPE, np.float32), oblique_affine(), seed=1)
    with pytest.raises(DataError, match="frame of reference .* differs"):
        read_segmentation(path, read_source_series(tmp_path / "other"))
    with pytest.raises(DataError, match="not a readable DICOM SEG"):
        read_segmentation(next(folder.iterdir()), read_source_series(folder))
