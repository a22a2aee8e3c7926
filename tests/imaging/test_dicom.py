"""DICOM series in: slices ordered by position, rescaled, with a RAS affine that matches NIfTI's meaning."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from laulima.errors import DataError
from laulima.imaging import SCANNER_PROFILES, make_phantom, read_image
from tests.imaging.helpers import SHAPE, SPACING_MM

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def write_series(
    folder: Path, volume: np.ndarray, affine: np.ndarray, *, slope: float, intercept: float, series: str | None = None
) -> np.ndarray:
    """Write ``volume`` [X,Y,Z] as one slice file per z, in shuffled file order; returns the stored values."""
    folder.mkdir(parents=True, exist_ok=True)
    lps = RAS_TO_LPS @ affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    row_dir, col_dir = lps[:3, 0] / spacing[0], lps[:3, 1] / spacing[1]
    stored = np.round((volume - intercept) / slope).astype(np.int16)
    series = series or generate_uid()
    order = np.random.default_rng(0).permutation(volume.shape[2])
    for k in range(volume.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.SeriesInstanceUID, ds.InstanceNumber = "MR", series, int(order[k]) + 1  # misleading on purpose
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]  # between rows, between columns
        ds.ImageOrientationPatient = [float(v) for v in (*row_dir, *col_dir)]
        ds.ImagePositionPatient = [float(v) for v in (lps @ [0, 0, k, 1])[:3]]
        ds.SliceThickness = float(spacing[2])
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()  # rows = y, columns = x
        ds.save_as(folder / f"slice_{order[k]:03d}.dcm", enforce_file_format=True)
    return stored.astype(np.float32) * np.float32(slope) + np.float32(intercept)


def oblique_affine() -> np.ndarray:
    angle = np.deg2rad(20)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([SPACING_MM, SPACING_MM * 0.5, SPACING_MM * 1.5])
    affine[:3, 3] = [-90.0, 40.0, -60.0]
    return affine


def test_series_round_trips_values_and_geometry(tmp_path: Path):
    p = make_phantom(
        "brain-tissue", SCANNER_PROFILES[1], seed=4, site_index=1, split=0, index=0, spacing_mm=SPACING_MM, shape=SHAPE
    )
    volume = p.image[0] * 1000.0
    affine = oblique_affine()
    expected = write_series(tmp_path / "series", volume, affine, slope=0.5, intercept=-20.0)
    image, read_affine = read_image(tmp_path / "series")
    assert image.shape == (1, *SHAPE) and image.dtype == np.float32
    np.testing.assert_allclose(image[0], expected, atol=1e-4)
    np.testing.assert_allclose(image[0], volume, atol=0.26)  # quantisation by the slope only
    np.testing.assert_allclose(read_affine, affine, atol=1e-4)


def test_single_real_dicom_file():
    path = Path(get_testdata_file("MR_small.dcm"))
    ds = pydicom.dcmread(path)
    image, affine = read_image(path)
    assert image.shape == (1, ds.Columns, ds.Rows, 1)
    np.testing.assert_array_equal(image[0, :, :, 0], ds.pixel_array.T.astype(np.float32))
    position = np.array([float(v) for v in ds.ImagePositionPatient])
    np.testing.assert_allclose(affine[:3, 3], position * [-1, -1, 1])  # LPS -> RAS
    np.testing.assert_allclose(np.abs(np.diag(affine))[:2], [float(v) for v in ds.PixelSpacing])


def test_dicom_without_an_image_is_refused_clearly():
    with pytest.raises(DataError, match="no ImageOrientationPatient.*only cross-sectional images"):
        read_image(Path(get_testdata_file("rtplan.dcm")))


def test_folder_with_a_foreign_file(tmp_path: Path):
    write_series(tmp_path / "s", np.ones((4, 4, 3)), np.eye(4), slope=1.0, intercept=0.0)
    (tmp_path / "s" / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="notes.txt: not a readable DICOM file"):
        read_image(tmp_path / "s")


def test_folder_with_two_series(tmp_path: Path):
    write_series(tmp_path / "s", np.ones((4, 4, 2)), np.eye(4), slope=1.0, intercept=0.0, series="1.2.3.1")
    write_series(tmp_path / "t", np.ones((4, 4, 2)), np.eye(4), slope=1.0, intercept=0.0, series="1.2.3.2")
    for file in (tmp_path / "t").iterdir():
        file.rename(tmp_path / "s" / f"other_{file.name}")
    with pytest.raises(DataError, match="2 series \\(1.2.3.1, 1.2.3.2\\); put each series in a folder of its own"):
        read_image(tmp_path / "s")


def test_missing_slice_is_detected(tmp_path: Path):
    write_series(tmp_path / "s", np.ones((4, 4, 5)), np.eye(4), slope=1.0, intercept=0.0)
    middle = [p for p in (tmp_path / "s").iterdir() if float(pydicom.dcmread(p).ImagePositionPatient[2]) == 2.0]
    middle[0].unlink()
    with pytest.raises(DataError, match="not evenly spaced"):
        read_image(tmp_path / "s")


def test_unknown_file_types_and_empty_folders(tmp_path: Path):
    (tmp_path / "scan.png").write_bytes(b"\x89PNG")
    with pytest.raises(DataError, match="neither NIfTI .* nor DICOM"):
        read_image(tmp_path / "scan.png")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no files in this folder"):
        read_image(tmp_path / "empty")
    with pytest.raises(DataError, match="file not found"):
        read_image(tmp_path / "absent.nii.gz")
