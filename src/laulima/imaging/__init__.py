"""Imaging at a site: brain MRI phantoms, NIfTI and DICOM input, Decathlon, nnU-Net v2 and DICOM-tree datasets.

DICOM trees: ``laulima.imaging.dicom_study`` (``inspect_dicom_tree``), series written with
``laulima.imaging.dicom_write`` (``write_dicom_series``), and series references
(``laulima.imaging.series_ref``), imported from their modules.

Names are exported lazily, so importing ``laulima.imaging`` costs nothing until one is used:
nibabel, pydicom, scipy and nilearn load with the submodule that needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "DEFAULT_COHORTS",
    "SCANNER_PROFILES",
    "TASKS",
    "Atlas",
    "Case",
    "Phantom",
    "ScannerProfile",
    "SegmentationDataset",
    "TUMOUR_PROFILES",
    "TumourProfile",
    "default_cohort",
    "load_atlas",
    "load_dataset",
    "make_phantom",
    "read_case",
    "read_image",
    "site_profile",
    "site_tumour_profile",
    "write_label_nifti",
    "write_nifti",
    "write_site_dataset",
]

_WHERE = {
    "DEFAULT_COHORTS": "scanner",
    "SCANNER_PROFILES": "scanner",
    "ScannerProfile": "scanner",
    "default_cohort": "scanner",
    "site_profile": "scanner",
    "TUMOUR_PROFILES": "tumour",
    "TumourProfile": "tumour",
    "site_tumour_profile": "tumour",
    "TASKS": "phantoms",
    "Phantom": "phantoms",
    "make_phantom": "phantoms",
    "Atlas": "atlas",
    "load_atlas": "atlas",
    "Case": "layouts",
    "SegmentationDataset": "layouts",
    "load_dataset": "datasets",
    "read_case": "images",
    "read_image": "images",
    "write_label_nifti": "nifti",
    "write_nifti": "nifti",
    "write_site_dataset": "phantoms",
}

if TYPE_CHECKING:
    from laulima.imaging.atlas import Atlas, load_atlas
    from laulima.imaging.datasets import load_dataset
    from laulima.imaging.images import read_case, read_image
    from laulima.imaging.layouts import Case, SegmentationDataset
    from laulima.imaging.nifti import write_label_nifti, write_nifti
    from laulima.imaging.phantoms import TASKS, Phantom, make_phantom, write_site_dataset
    from laulima.imaging.scanner import DEFAULT_COHORTS, SCANNER_PROFILES, ScannerProfile, default_cohort, site_profile
    from laulima.imaging.tumour import TUMOUR_PROFILES, TumourProfile, site_tumour_profile


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'laulima.imaging' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"laulima.imaging.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
