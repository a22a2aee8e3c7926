"""A site-private nnU-Net v2 *raw* view of a Laulima segmentation dataset.

nnU-Net reads only its own raw layout (``imagesTr/CASE_XXXX.nii.gz``, one 3D file per channel,
``labelsTr/CASE.nii.gz``, a v2 ``dataset.json``), while a site's dataset may be Decathlon (one
4D file per case), nnU-Net v2 or laulima-v1 (DICOM series references). This module writes
that layout from any of them with Laulima's own readers, so nnU-Net's fingerprinting,
preprocessing and prediction run unchanged on every site.

The view never leaves the site: folders are 0700, files 0600, and case ids are
``case_0000``, ``case_0001``, ... in the dataset's listing order, never the hospital's file
names (which may carry patient identifiers into nnU-Net's logs, plans or checkpoints). It is
built under a hidden temporary name beside its destination and renamed into place only when
complete, so a crash leaves no half-written view that could be mistaken for a whole one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from laulima.errors import ConfigurationError, DataError
from laulima.private_files import PRIVATE_DIR, PRIVATE_FILE, private_dir, replace_dir, write_atomic

if TYPE_CHECKING:
    from laulima.imaging.layouts import Case

__all__ = ["FILE_ENDING", "RawCase", "RawView", "build_raw_view", "case_id"]

FILE_ENDING = ".nii.gz"
_DATASET_NAME = re.compile(r"^Dataset\d{3}_[A-Za-z0-9_-]+$")
_FOLDERS = {"training": ("imagesTr", "labelsTr"), "test": ("imagesTs", "labelsTs")}


@dataclass(frozen=True)
class RawCase:
    id: str  # case_0000, ...
    images: tuple[Path, ...]  # one 3D file per channel: <id>_0000.nii.gz, <id>_0001.nii.gz, ...
    label: Path  # uint8 label map


@dataclass(frozen=True)
class RawView:
    root: Path  # the DatasetXXX_Name folder (holds dataset.json)
    dataset_json: dict[str, Any]
    cases: tuple[RawCase, ...]


def case_id(index: int) -> str:
    """The view's id of the ``index``-th labelled case of the split: anonymous and stable."""
    return f"case_{index:04d}"


def build_raw_view(
    dataset_path: Path,
    dest: Path,
    *,
    split: Literal["training", "test"] = "training",
    dataset_name: str = "Dataset500_Laulima",
) -> RawView:
    """Write ``dest/<dataset_name>``: the labelled cases of ``split`` in nnU-Net v2's raw layout.

    An existing view at that place is replaced only once the new one is complete.
    """
    from laulima.imaging import load_dataset  # lazy: nibabel and friends load only when a view is built

    if split not in _FOLDERS:
        raise ConfigurationError(f"split must be 'training' or 'test', got {split!r}", field="split")
    if not _DATASET_NAME.fullmatch(dataset_name):
        raise ConfigurationError(
            f"dataset_name {dataset_name!r} is not an nnU-Net dataset name; use DatasetXXX_Name "
            "(three digits, then letters, digits, '_' or '-'), e.g. Dataset500_BrainTumour",
            field="dataset_name",
        )
    dataset = load_dataset(Path(dataset_path))  # DataError listing every problem, each with its fix
    cases = [case for case in (dataset.training if split == "training" else dataset.test) if case.label is not None]
    if not cases:
        raise DataError(
            f"{dataset.root}: no {split} case has a label map, and nnU-Net plans and trains only on labelled "
            f"cases; add label maps for the {split} cases (or use the other split)",
            file=str(dataset.root),
        )
    labels = _nnunet_labels(dataset.labels, dataset.root)
    dest = private_dir(Path(dest))
    final = dest / dataset_name
    tmp = Path(tempfile.mkdtemp(dir=dest, prefix=f".{dataset_name}.", suffix=".partial"))  # 0700
    try:
        images_dir, labels_dir = (private_dir(tmp / name) for name in _FOLDERS[split])
        written = [
            _write_case(case, case_id(i), len(dataset.channels), images_dir, labels_dir) for i, case in enumerate(cases)
        ]
        if split == "test":
            private_dir(tmp / "imagesTr")  # nnU-Net lists imagesTr whatever it is asked to do
        dataset_json: dict[str, Any] = {
            "channel_names": {str(i): name for i, name in enumerate(dataset.channels)},
            "labels": labels,
            "numTraining": len(written) if split == "training" else 0,
            "file_ending": FILE_ENDING,
        }
        if split == "test":
            dataset_json["numTest"] = len(written)
        write_atomic(tmp / "dataset.json", json.dumps(dataset_json, indent=2, ensure_ascii=False) + "\n")
        os.chmod(tmp, PRIVATE_DIR)
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    relocated = tuple(_relocate(case, tmp, final) for case in written)
    return RawView(final, dataset_json, relocated)


def _nnunet_labels(labels: dict[int, str], root: Path) -> dict[str, int]:
    """Laulima's ``{value: name}`` as nnU-Net v2's ``{name: value}``; value 0 is always called "background"."""
    names: dict[str, int] = {"background": 0}
    for value, name in sorted(labels.items()):
        if value == 0:
            continue
        if name in names:
            raise DataError(
                f"{root / 'dataset.json'}: label name {name!r} is used for values {names[name]} and {value}; "
                "nnU-Net needs one name per label value, rename one of them",
                file=str(root / "dataset.json"),
            )
        names[name] = value
    return names


def _write_case(case: Case, new_id: str, n_channels: int, images_dir: Path, labels_dir: Path) -> RawCase:
    from laulima.imaging import read_case, write_label_nifti, write_nifti

    image, label, affine = read_case(case, n_channels)  # float32 [C,X,Y,Z], uint8 [X,Y,Z], voxel -> RAS mm
    assert label is not None  # only labelled cases reach here
    paths = tuple(images_dir / f"{new_id}_{channel:04d}{FILE_ENDING}" for channel in range(n_channels))
    for channel, path in enumerate(paths):
        write_nifti(path, image[channel], affine)
    label_path = labels_dir / f"{new_id}{FILE_ENDING}"
    write_label_nifti(label_path, label, affine)
    _make_private((*paths, label_path))
    return RawCase(new_id, paths, label_path)


def _make_private(paths: Sequence[Path]) -> None:
    for path in paths:
        os.chmod(path, PRIVATE_FILE)  # write_nifti leaves 0644, meant for shared datasets


def _relocate(case: RawCase, old: Path, new: Path) -> RawCase:
    def move(path: Path) -> Path:
        return new / path.relative_to(old)

    return RawCase(case.id, tuple(move(p) for p in case.images), move(case.label))
