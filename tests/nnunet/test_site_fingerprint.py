"""The site's fingerprint: what it holds, what it leaves behind, and a cohort without foreground."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from laulima.core.fingerprint import SiteFingerprint
from laulima.errors import DataError
from laulima.imaging.nifti import read_label_array, write_label_nifti
from laulima.nnunet.fingerprint import site_fingerprint
from tests.nnunet.conftest import SITES


def test_fingerprint_holds_aggregates_only(site_fingerprints: list[SiteFingerprint]) -> None:
    for fp, spec in zip(site_fingerprints, SITES, strict=True):
        text = fp.model_dump_json()
        assert "tumour_s" not in text and "case_" not in text  # no file names, original or anonymous
        assert sum(row.count for row in fp.geometry) == fp.n_cases == spec.n_train
        assert fp.channel_names == ["FLAIR", "T1w", "t1gd", "T2w"]


def test_work_dir_is_left_empty(site_datasets: list[Path], tmp_path: Path) -> None:
    site_fingerprint(site_datasets[2], tmp_path / "work")
    assert list((tmp_path / "work").iterdir()) == []


def test_cohort_without_foreground_is_a_data_error(site_datasets: list[Path], tmp_path: Path) -> None:
    root = Path(shutil.copytree(site_datasets[2], tmp_path / "site"))
    for entry in json.loads((root / "dataset.json").read_text("utf-8"))["training"]:
        label, affine = read_label_array(root / entry["label"])
        write_label_nifti(root / entry["label"], np.zeros_like(label), affine)
    with pytest.raises(DataError, match="no labelled foreground in the cohort"):
        site_fingerprint(root, tmp_path / "work")
    assert list((tmp_path / "work").iterdir()) == []
