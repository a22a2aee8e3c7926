"""The nnU-Net v2 layout: one file per channel, cases found by name, checked like the Decathlon's."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from laulima.errors import DataError
from laulima.imaging import load_dataset, read_case
from laulima.imaging.nifti import write_nifti
from tests.imaging.helpers import write_nnunet_dataset


@pytest.fixture(scope="module")
def nnunet_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_nnunet_dataset(tmp_path_factory.mktemp("nnunet") / "Dataset001_Phantoms")


@pytest.fixture
def broken(nnunet_dataset: Path, copy_of: Callable[[Path], Path]) -> Path:
    return copy_of(nnunet_dataset)


def refused(root: Path) -> str:
    with pytest.raises(DataError) as info:
        load_dataset(root)
    return str(info.value)


def edit_json(root: Path, change: Callable[[dict[str, Any]], None]) -> None:
    data = json.loads((root / "dataset.json").read_text())
    change(data)
    (root / "dataset.json").write_text(json.dumps(data))


def test_nnunet_dataset_loads_and_reads_channels_in_order(nnunet_dataset: Path):
    dataset = load_dataset(nnunet_dataset)
    assert dataset.layout == "nnunet-v2" and dataset.name == "Dataset001_Phantoms"
    assert dataset.channels == ("T1", "T1squared")
    assert dataset.labels == {0: "background", 1: "CSF", 2: "grey matter", 3: "white matter"}
    assert [c.id for c in dataset.training] == ["brain_000", "brain_001"]
    assert [c.id for c in dataset.test] == ["brain_002"] and dataset.test[0].label is None
    case = dataset.training[1]
    assert [p.name for p in case.images] == ["brain_001_0000.nii.gz", "brain_001_0001.nii.gz"]
    image, label, affine = read_case(case, 2)
    assert image.shape == (2, 32, 32, 32) and label is not None and label.shape == (32, 32, 32)
    np.testing.assert_allclose(image[1], image[0] ** 2, rtol=1e-6)
    np.testing.assert_allclose(affine, nib.load(case.images[0]).affine)


def test_missing_channel_file(broken: Path):
    (broken / "imagesTr" / "brain_001_0001.nii.gz").unlink()
    message = refused(broken)
    assert "imagesTr: case brain_001 lacks channel file(s) imagesTr/brain_001_0001.nii.gz; add them" in message


def test_extra_channel_file(broken: Path):
    source = broken / "imagesTr" / "brain_000_0001.nii.gz"
    (broken / "imagesTr" / "brain_000_0002.nii.gz").write_bytes(source.read_bytes())
    assert "case brain_000 has 3 channels, dataset.json names 2" in refused(broken)


def test_missing_label(broken: Path):
    (broken / "labelsTr" / "brain_000.nii.gz").unlink()
    message = refused(broken)
    assert "labelsTr: no label labelsTr/brain_000.nii.gz for case brain_000" in message
    assert "numTraining is 2 but 2" not in message


def test_file_ending_that_is_not_nifti(broken: Path):
    edit_json(broken, lambda d: d.update(file_ending=".png"))
    assert "file_ending '.png' is not NIfTI" in refused(broken)


def test_stray_files_are_reported_not_skipped(broken: Path):
    (broken / "imagesTr" / "brain_003.nii.gz").write_bytes(b"")  # no channel suffix
    (broken / "labelsTr" / "notes.txt").write_text("x")
    message = refused(broken)
    assert "imagesTr/brain_003.nii.gz: not a case file (expected CASE_XXXX.nii.gz)" in message
    assert "labelsTr/notes.txt: not a label file" in message


def test_channels_of_a_case_must_share_a_grid(broken: Path):
    path = broken / "imagesTr" / "brain_000_0001.nii.gz"
    img = nib.load(path)
    write_nifti(path, np.asarray(img.dataobj)[:, :, :30], img.affine)
    message = refused(broken)
    assert "imagesTr/brain_000_0001.nii.gz: geometry differs from imagesTr/brain_000_0000.nii.gz" in message


def test_missing_keys_and_background(broken: Path):
    edit_json(broken, lambda d: d.pop("numTraining"))
    assert "missing key(s) numTraining for the nnU-Net v2 layout" in refused(broken)
    edit_json(broken, lambda d: d.update(numTraining=2, labels={"CSF": 1}))
    assert 'labels have no background (value 0); add "background": 0' in refused(broken)


def test_region_labels_are_accepted(broken: Path):
    edit_json(broken, lambda d: d["labels"].update({"brain": [1, 2, 3]}))
    assert load_dataset(broken).labels == {0: "background", 1: "CSF", 2: "grey matter", 3: "white matter"}


def test_label_values_outside_the_labels(broken: Path):
    edit_json(broken, lambda d: d["labels"].pop("white matter"))
    message = refused(broken)
    assert "labelsTr/brain_000.nii.gz: label values [3] are not among dataset.json's labels [0, 1, 2]" in message
