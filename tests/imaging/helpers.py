"""Small grids and writers the imaging tests share."""

from __future__ import annotations

import json
from pathlib import Path

from laulima.imaging import SCANNER_PROFILES, make_phantom, write_label_nifti, write_nifti

# 6 mm on 32^3 covers the whole brain (192 mm) at an eighth of the default's voxels.
SPACING_MM = 6.0
SHAPE = (32, 32, 32)


def write_nnunet_dataset(root: Path, *, n_cases: int = 2, test_cases: int = 1) -> Path:
    """An nnU-Net v2 dataset with two channels per case (T1 and a squared copy), from tissue phantoms."""
    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        (root / folder).mkdir(parents=True)
    for i in range(n_cases + test_cases):
        p = make_phantom(
            "brain-tissue",
            SCANNER_PROFILES[0],
            seed=2,
            site_index=0,
            split=0,
            index=i,
            spacing_mm=SPACING_MM,
            shape=SHAPE,
        )
        images = "imagesTr" if i < n_cases else "imagesTs"
        for channel, data in enumerate((p.image[0], p.image[0] ** 2)):
            write_nifti(root / images / f"brain_{i:03d}_{channel:04d}.nii.gz", data, p.affine)
        if i < n_cases:
            write_label_nifti(root / "labelsTr" / f"brain_{i:03d}.nii.gz", p.label, p.affine)
    description = {
        "channel_names": {"0": "T1", "1": "T1squared"},
        "labels": {"background": 0, "CSF": 1, "grey matter": 2, "white matter": 3},
        "numTraining": n_cases,
        "file_ending": ".nii.gz",
        "name": "Dataset001_Phantoms",
    }
    (root / "dataset.json").write_text(json.dumps(description))
    return root
