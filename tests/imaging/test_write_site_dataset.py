"""A site's phantom dataset: the Decathlon layout, loadable, value-exact, and written all or nothing."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from laulima.errors import ConfigurationError
from laulima.imaging import load_dataset, make_phantom, read_case, read_image, site_profile, write_site_dataset
from laulima.imaging import phantoms as phantoms_module
from tests.imaging.helpers import SHAPE, SPACING_MM


def test_layout_and_dataset_json(tissue_dataset: Path):
    data = json.loads((tissue_dataset / "dataset.json").read_text())
    assert data["reference"] == "synthetic phantoms from the MNI152 template — not patients"
    assert "MNI152" in data["licence"] and data["tensorImageSize"] == "3D"
    assert data["modality"] == {"0": "T1w"}
    assert data["labels"] == {"0": "background", "1": "CSF", "2": "grey matter", "3": "white matter"}
    assert (data["numTraining"], data["numTest"]) == (3, 2)
    assert data["training"][0] == {
        "image": "./imagesTr/tissue_s0_000.nii.gz",
        "label": "./labelsTr/tissue_s0_000.nii.gz",
    }
    assert data["test"][0]["image"] == "./imagesTs/tissue_s0_003.nii.gz"
    assert data["laulima"]["scanner"]["name"] == "A"
    assert sorted(p.name for p in tissue_dataset.iterdir()) == [
        "dataset.json", "imagesTr", "imagesTs", "labelsTr", "labelsTs",
    ]  # fmt: skip
    assert not list(tissue_dataset.parent.glob(".*")), "temporary folders were left behind"


def test_written_dataset_loads_and_round_trips_values(tissue_dataset: Path):
    dataset = load_dataset(tissue_dataset)
    assert dataset.layout == "decathlon" and dataset.name == "laulima-brain-tissue-site0"
    assert dataset.channels == ("T1w",) and dataset.labels[2] == "grey matter"
    assert [c.id for c in dataset.training] == ["tissue_s0_000", "tissue_s0_001", "tissue_s0_002"]
    assert all(c.label is not None for c in dataset.test)
    image, label, affine = read_case(dataset.training[1], 1)
    expected = make_phantom(
        "brain-tissue", site_profile(0, 11), seed=11, site_index=0, split=0, index=1, spacing_mm=SPACING_MM, shape=SHAPE
    )
    np.testing.assert_array_equal(image, expected.image)
    np.testing.assert_array_equal(label, expected.label)
    np.testing.assert_allclose(affine, expected.affine)
    assert image.dtype == np.float32 and label is not None and label.dtype == np.uint8


def test_nifti_headers_carry_the_grid(tissue_dataset: Path):
    image = nib.load(tissue_dataset / "imagesTr" / "tissue_s0_000.nii.gz")
    label = nib.load(tissue_dataset / "labelsTr" / "tissue_s0_000.nii.gz")
    assert image.header.get_zooms()[:3] == (SPACING_MM,) * 3
    assert int(image.header["qform_code"]) == 1 and int(image.header["sform_code"]) == 1
    np.testing.assert_allclose(image.affine, label.affine)
    assert label.get_data_dtype() == np.uint8
    assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
    assert (tissue_dataset / "imagesTr" / "tissue_s0_000.nii.gz").stat().st_mode & 0o777 == 0o644


def test_tumour_dataset_stores_one_4d_file_per_case(tumour_dataset: Path):
    data = json.loads((tumour_dataset / "dataset.json").read_text())
    assert data["tensorImageSize"] == "4D"
    assert data["modality"] == {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}
    assert data["labels"] == {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}
    assert nib.load(tumour_dataset / "imagesTr" / "tumour_s1_000.nii.gz").shape == (*SHAPE, 4)
    dataset = load_dataset(tumour_dataset)
    image, label, _ = read_case(dataset.training[0], 4)
    assert image.shape == (4, *SHAPE) and label is not None and set(np.unique(label)) == {0, 1, 2, 3}
    np.testing.assert_array_equal(read_image(dataset.training[0].images[0])[0], image)


def test_default_cohort_and_stable_test_set(tmp_path: Path):
    small = {"spacing_mm": SPACING_MM, "shape": SHAPE, "n_sites": 4, "seed": 3}
    default = load_dataset(write_site_dataset(tmp_path / "default", site_index=3, n_test=1, **small))
    assert len(default.training) == 6  # site 3 cycles back to the first cohort size
    fewer = load_dataset(write_site_dataset(tmp_path / "fewer", site_index=3, n_train=2, n_test=1, **small))
    first, second = (read_case(d.test[0], 1) for d in (default, fewer))
    np.testing.assert_array_equal(first[0], second[0])  # the test phantom does not depend on n_train


def test_a_failure_mid_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    calls = {"n": 0}
    real = phantoms_module.write_label_nifti

    def failing(path, label, affine):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full (simulated)")
        real(path, label, affine)

    monkeypatch.setattr(phantoms_module, "write_label_nifti", failing)
    dest = tmp_path / "site"
    with pytest.raises(OSError, match="simulated"):
        write_site_dataset(
            dest, site_index=0, n_sites=1, seed=1, n_train=3, n_test=1, spacing_mm=SPACING_MM, shape=SHAPE
        )
    assert calls["n"] == 3
    assert list(tmp_path.iterdir()) == []


def test_existing_destination_needs_overwrite(tmp_path: Path):
    dest = tmp_path / "site"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    kwargs = {
        "site_index": 0,
        "n_sites": 1,
        "seed": 1,
        "n_train": 1,
        "n_test": 0,
        "spacing_mm": SPACING_MM,
        "shape": SHAPE,
    }
    with pytest.raises(ConfigurationError, match="already exists"):
        write_site_dataset(dest, **kwargs)
    write_site_dataset(dest, overwrite=True, **kwargs)
    assert not (dest / "old.txt").exists() and len(load_dataset(dest).training) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["site"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"site_index": 3, "n_sites": 3}, "site_index 3 is outside 0..2"),
        ({"site_index": 0, "n_sites": 1, "n_train": 0}, "at least one training phantom"),
        ({"site_index": 0, "n_sites": 1, "task": "lung"}, "unknown phantom task 'lung'"),
        ({"site_index": 0, "n_sites": 1, "seed": -1}, "seed must be a non-negative integer"),
    ],
)
def test_invalid_arguments_are_refused(tmp_path: Path, kwargs, message):
    with pytest.raises(ConfigurationError, match=message):
        write_site_dataset(tmp_path / "x", **{"seed": 0, **kwargs})
    assert not (tmp_path / "x").exists()
