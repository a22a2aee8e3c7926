"""The site-private nnU-Net raw view: layout, anonymous ids, geometry and voxels as read, privacy, failures."""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from laulima.errors import ConfigurationError, DataError
from laulima.imaging import load_dataset, read_case
from laulima.imaging.tumour import CHANNELS
from laulima.nnunet.rawview import build_raw_view


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_training_view_is_nnunet_raw_layout_with_the_cases_voxels(site_datasets: list[Path], tmp_path: Path) -> None:
    source = load_dataset(site_datasets[1])  # Decathlon: one 4D file per case
    view = build_raw_view(site_datasets[1], tmp_path / "views", dataset_name="Dataset123_Brain")

    assert view.root == tmp_path / "views" / "Dataset123_Brain"
    assert sorted(p.name for p in (tmp_path / "views").iterdir()) == ["Dataset123_Brain"]  # nothing half-built left
    assert view.dataset_json == json.loads((view.root / "dataset.json").read_text("utf-8"))
    assert view.dataset_json == {
        "channel_names": {str(i): name for i, name in enumerate(CHANNELS)},
        "labels": {"background": 0, "edema": 1, "non-enhancing tumor": 2, "enhancing tumour": 3},
        "numTraining": len(source.training),
        "file_ending": ".nii.gz",
    }
    assert [c.id for c in view.cases] == [f"case_{i:04d}" for i in range(len(source.training))]
    for case, original in zip(view.cases, source.training, strict=True):
        assert [p.name for p in case.images] == [f"{case.id}_{c:04d}.nii.gz" for c in range(len(CHANNELS))]
        assert case.label == view.root / "labelsTr" / f"{case.id}.nii.gz"
        image, label, affine = read_case(original, len(CHANNELS))
        for channel, path in enumerate(case.images):
            written = nib.load(str(path))
            assert written.shape == image.shape[1:]
            np.testing.assert_allclose(written.affine, affine, atol=1e-6)
            np.testing.assert_array_equal(np.asarray(written.dataobj), image[channel])
        stored = nib.load(str(case.label))
        assert stored.get_data_dtype() == np.uint8
        np.testing.assert_array_equal(np.asarray(stored.dataobj), label)
    # Site-private, and no original file name anywhere.
    files = sorted(view.root.rglob("*"))
    assert all(_mode(p) == 0o700 for p in [view.root, *files] if p.is_dir())
    assert all(_mode(p) == 0o600 for p in files if p.is_file())
    assert not any("tumour" in p.name for p in files)
    assert sorted(p.name for p in view.root.iterdir()) == ["dataset.json", "imagesTr", "labelsTr"]


def test_test_split_and_rebuild_replace_the_view(site_datasets: list[Path], tmp_path: Path) -> None:
    build_raw_view(site_datasets[0], tmp_path)
    view = build_raw_view(site_datasets[0], tmp_path, split="test")
    assert [c.id for c in view.cases] == ["case_0000"]
    assert view.cases[0].images[0] == view.root / "imagesTs" / "case_0000_0000.nii.gz"
    assert view.cases[0].label.parent == view.root / "labelsTs"
    assert view.dataset_json["numTest"] == 1 and view.dataset_json["numTraining"] == 0
    assert not list((view.root / "imagesTr").iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Dataset500_Laulima"]


def test_no_labelled_case_is_a_data_error(site_datasets: list[Path], tmp_path: Path) -> None:
    root = Path(shutil.copytree(site_datasets[2], tmp_path / "site"))
    meta = json.loads((root / "dataset.json").read_text("utf-8"))
    meta["test"] = [entry["image"] for entry in meta["test"]]  # the Decathlon's form: labels withheld
    (root / "dataset.json").write_text(json.dumps(meta), "utf-8")
    shutil.rmtree(root / "labelsTs")
    with pytest.raises(DataError, match="no test case has a label map"):
        build_raw_view(root, tmp_path / "views", split="test")
    assert not (tmp_path / "views").exists() or not list((tmp_path / "views").iterdir())


def test_unreadable_dataset_and_bad_name(site_datasets: list[Path], tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such dataset folder"):
        build_raw_view(tmp_path / "missing", tmp_path / "views")
    with pytest.raises(ConfigurationError, match="DatasetXXX_Name"):
        build_raw_view(site_datasets[0], tmp_path / "views", dataset_name="brain")
