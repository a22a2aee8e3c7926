"""NIfTI primitives: channel layout on disk, label maps refused when they cannot be uint8, atomic writes."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from laulima.errors import DataError
from laulima.imaging import read_image, write_label_nifti, write_nifti

AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])


def test_multichannel_images_are_4d_on_disk_and_channel_first_in_memory(tmp_path: Path):
    data = np.random.default_rng(0).random((3, 4, 5, 6)).astype(np.float32)
    write_nifti(tmp_path / "x.nii.gz", data, AFFINE)
    assert nib.load(tmp_path / "x.nii.gz").shape == (4, 5, 6, 3)
    image, affine = read_image(tmp_path / "x.nii.gz")
    np.testing.assert_array_equal(image, data)
    np.testing.assert_array_equal(affine, AFFINE)
    assert [p.name for p in tmp_path.iterdir()] == ["x.nii.gz"]  # no temporary file left


def test_itk_style_5d_vector_images_read_as_channels(tmp_path: Path):
    data = np.arange(4 * 5 * 6 * 2, dtype=np.float32).reshape(4, 5, 6, 1, 2)
    nib.save(nib.Nifti1Image(data, AFFINE), tmp_path / "v.nii")
    image, _ = read_image(tmp_path / "v.nii")
    np.testing.assert_array_equal(image, np.moveaxis(data[:, :, :, 0], -1, 0))


@pytest.mark.parametrize(
    "label, message",
    [
        (np.zeros((4, 4)), "must be 3D"),
        (np.full((2, 2, 2), 300), "integers 0..255"),
        (np.full((2, 2, 2), 0.5), "0..255"),
    ],
)
def test_label_maps_that_cannot_be_uint8_are_refused(tmp_path: Path, label, message):
    with pytest.raises(DataError, match=message):
        write_label_nifti(tmp_path / "l.nii.gz", label, AFFINE)
    assert list(tmp_path.iterdir()) == []


def test_label_map_round_trip(tmp_path: Path):
    label = np.random.default_rng(1).integers(0, 4, (5, 6, 7))
    write_label_nifti(tmp_path / "l.nii.gz", label, AFFINE)
    stored = nib.load(tmp_path / "l.nii.gz")
    assert stored.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(stored.dataobj), label)


def test_write_refuses_names_that_are_not_nifti(tmp_path: Path):
    with pytest.raises(DataError, match="must end in .nii.gz or .nii"):
        write_nifti(tmp_path / "x.png", np.zeros((2, 2, 2), np.float32), AFFINE)


def test_damaged_nifti_is_a_data_error(tmp_path: Path):
    write_nifti(tmp_path / "x.nii.gz", np.zeros((8, 8, 8), np.float32), AFFINE)
    payload = (tmp_path / "x.nii.gz").read_bytes()
    (tmp_path / "x.nii.gz").write_bytes(payload[: len(payload) // 2])
    with pytest.raises(DataError, match="x.nii.gz: (voxel data unreadable|not a readable NIfTI)"):
        read_image(tmp_path / "x.nii.gz")
