"""Every way a Decathlon dataset can be unusable is refused before anything trains, with a message to act on."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from laulima.errors import DataError
from laulima.imaging import load_dataset, read_case, write_label_nifti
from laulima.imaging.nifti import write_nifti

CASE = "tissue_s0_001"


def edit_json(root: Path, change: Callable[[dict[str, Any]], None]) -> None:
    data = json.loads((root / "dataset.json").read_text())
    change(data)
    (root / "dataset.json").write_text(json.dumps(data))


def refused(root: Path) -> str:
    with pytest.raises(DataError) as info:
        load_dataset(root)
    return str(info.value)


@pytest.fixture
def broken(tissue_dataset: Path, copy_of: Callable[[Path], Path]) -> Path:
    return copy_of(tissue_dataset)


def test_missing_dataset_json(broken: Path):
    (broken / "dataset.json").unlink()
    assert "no dataset.json; a dataset folder needs one (Decathlon: name, modality" in refused(broken)
    assert "no such dataset folder" in refused(broken / "absent")


def test_dataset_json_that_is_not_json(broken: Path):
    (broken / "dataset.json").write_text('{"name": "x",\n  "labels": }')
    message = refused(broken)
    assert "dataset.json: not valid JSON (line 2, column" in message and "fix the file" in message


def test_dataset_json_with_missing_keys(broken: Path):
    edit_json(broken, lambda d: (d.pop("labels"), d.pop("numTraining")))
    message = refused(broken)
    assert "missing key(s) labels, numTraining for the Decathlon layout" in message


def test_dataset_json_of_no_known_layout(broken: Path):
    (broken / "dataset.json").write_text('{"name": "x"}')
    assert "neither Decathlon nor nnU-Net v2 (keys: name)" in refused(broken)


def test_listed_file_missing(broken: Path):
    (broken / "labelsTr" / f"{CASE}.nii.gz").unlink()
    message = refused(broken)
    assert f"labelsTr/{CASE}.nii.gz: listed in dataset.json but missing; add the file or remove its entry" in message


def test_label_shape_differs_from_image(broken: Path):
    label = broken / "labelsTr" / f"{CASE}.nii.gz"
    write_label_nifti(label, np.zeros((32, 32, 30), np.uint8), nib.load(label).affine)
    message = refused(broken)
    assert f"labelsTr/{CASE}.nii.gz: geometry differs from its image imagesTr/{CASE}.nii.gz" in message
    assert "shape (32, 32, 30) vs (32, 32, 32)" in message and "resample the label" in message


def test_label_affine_differs_from_image(broken: Path):
    label = broken / "labelsTr" / f"{CASE}.nii.gz"
    img = nib.load(label)
    shifted = img.affine.copy()
    shifted[0, 3] += 1.5
    write_label_nifti(label, np.asarray(img.dataobj), shifted)
    message = refused(broken)
    assert "geometry differs" in message and "affine" in message
    assert f"{img.affine[0, 3]:g}." in message and f"{shifted[0, 3]:g}" in message  # both affines printed


def test_affine_differences_within_tolerance_are_accepted(broken: Path):
    label = broken / "labelsTr" / f"{CASE}.nii.gz"
    img = nib.load(label)
    nudged = img.affine.copy()
    nudged[:3, 3] += 1e-5
    write_label_nifti(label, np.asarray(img.dataobj), nudged)
    assert len(load_dataset(broken).training) == 3


def test_label_values_not_in_dataset_json(broken: Path):
    label = broken / "labelsTr" / f"{CASE}.nii.gz"
    img = nib.load(label)
    values = np.asarray(img.dataobj).copy()
    values[0, 0, 0], values[0, 0, 1] = 7, 9
    write_label_nifti(label, values, img.affine)
    message = refused(broken)
    assert f"labelsTr/{CASE}.nii.gz: label values [7, 9] are not among dataset.json's labels [0, 1, 2, 3]" in message


def test_non_integer_label_values(broken: Path):
    label = broken / "labelsTr" / f"{CASE}.nii.gz"
    img = nib.load(label)
    write_nifti(label, np.asarray(img.dataobj).astype(np.float32) + 0.5, img.affine)
    assert "non-integer label values" in refused(broken)


def test_channel_count_differs_from_modality(broken: Path):
    edit_json(broken, lambda d: d.update(modality={"0": "T1w", "1": "T2w"}))
    message = refused(broken)
    assert f"imagesTr/{CASE}.nii.gz: 1 channel(s), dataset.json's modality lists 2" in message


def test_one_case_with_another_channel_count(broken: Path):
    image = broken / "imagesTr" / f"{CASE}.nii.gz"
    img = nib.load(image)
    data = np.asarray(img.dataobj)
    write_nifti(image, np.stack([data, data]), img.affine)  # 4D, two channels
    assert f"imagesTr/{CASE}.nii.gz: 2 channel(s), dataset.json's modality lists 1" in refused(broken)


def test_non_nifti_files(broken: Path):
    (broken / "imagesTr" / "extra.mha").write_bytes(b"ObjectType = Image\n")
    (broken / "imagesTr" / f"{CASE}.nii.gz").write_bytes(b"not a nifti at all")

    def add(d: dict[str, Any]) -> None:
        d["training"].append({"image": "./imagesTr/extra.mha", "label": "./labelsTr/tissue_s0_000.nii.gz"})
        d["numTraining"] = 4

    edit_json(broken, add)
    message = refused(broken)
    assert "imagesTr/extra.mha: not a NIfTI file (listed in dataset.json); convert it to .nii.gz" in message
    assert f"imagesTr/{CASE}.nii.gz: not a readable NIfTI file" in message
    assert "2 problem(s)" in message  # every problem is reported at once


def test_no_training_cases(broken: Path):
    edit_json(broken, lambda d: d.update(training=[], numTraining=0))
    assert "no training cases; add training cases" in refused(broken)


def test_counts_disagree_with_the_lists(broken: Path):
    edit_json(broken, lambda d: d.update(numTraining=5, numTest=1))
    message = refused(broken)
    assert "numTraining is 5 but 3 training case(s) are listed; correct numTraining" in message
    assert "numTest is 1 but 2 test case(s) are listed" in message


def test_paths_outside_the_dataset_are_refused(broken: Path):
    edit_json(broken, lambda d: d["training"][0].update(image="../../etc/passwd.nii.gz"))
    assert "training[0].image '../../etc/passwd.nii.gz' points outside the dataset folder" in refused(broken)


def test_malformed_entries_and_labels(broken: Path):
    edit_json(broken, lambda d: d["training"].__setitem__(0, "imagesTr/x.nii.gz"))
    assert "training[0] is 'imagesTr/x.nii.gz'" in refused(broken)
    edit_json(broken, lambda d: d.update(labels={"zero": "background"}))
    assert "labels keys must be integers" in refused(broken)
    edit_json(broken, lambda d: d.update(modality={"1": "T1w"}))
    assert 'modality keys must be "0".."0"' in refused(broken)


def test_decathlon_style_test_list_of_plain_paths(broken: Path):
    def plain(d: dict[str, Any]) -> None:
        d["test"] = [entry["image"] for entry in d["test"]]

    edit_json(broken, plain)
    dataset = load_dataset(broken)
    assert [c.label is not None for c in dataset.test] == [True, True]  # found in labelsTs by name
    for file in (broken / "labelsTs").iterdir():
        file.unlink()
    dataset = load_dataset(broken)
    assert [c.label for c in dataset.test] == [None, None]  # the real Decathlon withholds test labels
    image, label, _ = read_case(dataset.test[0], 1)
    assert label is None and image.shape[0] == 1


def test_hidden_files_are_ignored(broken: Path):
    (broken / "imagesTr" / f"._{CASE}.nii.gz").write_bytes(b"AppleDouble")
    assert len(load_dataset(broken).training) == 3


def test_read_case_checks_the_channel_count(tissue_dataset: Path):
    case = load_dataset(tissue_dataset).training[0]
    with pytest.raises(DataError, match="1 channel\\(s\\) in tissue_s0_000.nii.gz, expected 4"):
        read_case(case, 4)
