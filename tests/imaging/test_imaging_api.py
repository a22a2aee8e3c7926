"""The imaging package exports the intended names, and importing it loads no heavy library."""

from __future__ import annotations

import subprocess
import sys

import pytest

import laulima.imaging as imaging

INTENDED = {
    "DEFAULT_COHORTS", "SCANNER_PROFILES", "TASKS", "Atlas", "Case", "Phantom", "ScannerProfile",
    "SegmentationDataset", "default_cohort", "load_atlas", "load_dataset", "make_phantom", "read_case",
    "read_image", "site_profile", "write_label_nifti", "write_nifti", "write_site_dataset",
    "TUMOUR_PROFILES", "TumourProfile", "site_tumour_profile",
}  # fmt: skip


def test_exports_are_the_intended_ones():
    assert set(imaging.__all__) == INTENDED
    for name in INTENDED:
        assert getattr(imaging, name) is not None
    assert imaging.DEFAULT_COHORTS == (6, 12, 24)
    assert [p.name for p in imaging.SCANNER_PROFILES] == ["A", "B", "C"]
    with pytest.raises(AttributeError):
        imaging.no_such_name  # noqa: B018


def test_module_paths_other_code_uses():
    from laulima.imaging.datasets import load_dataset
    from laulima.imaging.phantoms import SCANNER_PROFILES, write_site_dataset

    assert load_dataset is imaging.load_dataset and write_site_dataset is imaging.write_site_dataset
    assert SCANNER_PROFILES is imaging.SCANNER_PROFILES


def test_importing_the_package_is_cheap():
    code = (
        "import sys, laulima.imaging; "
        "heavy = {'nibabel', 'pydicom', 'scipy', 'nilearn', 'torch'} & set(sys.modules); "
        "print(sorted(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
