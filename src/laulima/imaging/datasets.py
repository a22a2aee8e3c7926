"""Loading a dataset folder only after every case in it has been checked: nothing trains on half a dataset.

Layouts: Decathlon, nnU-Net v2, and laulima-v1 (a registered DICOM source, whose images
are series references: their recorded geometry stands in for a NIfTI header).

Headers are read for every image (cheap); label maps are read in full to check their values.
All problems are collected and raised as one DataError, each line naming the file relative
to the dataset folder, what is wrong and what to do, so one run shows everything to fix.
Voxel data of images is not read here: a damaged image body surfaces in ``read_case``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from laulima.errors import DataError
from laulima.imaging.layouts import DECATHLON, LAULIMA_V1, Case, Listing, Problems, SegmentationDataset, parse_listing
from laulima.imaging.nifti import NiftiHeader, read_header, read_label_array
from laulima.imaging.series_ref import is_series_ref_name, load_series_ref

__all__ = ["AFFINE_TOLERANCE_MM", "Case", "SegmentationDataset", "load_dataset"]

AFFINE_TOLERANCE_MM = 1e-3


def _fmt(affine: np.ndarray) -> str:
    return np.array2string(np.asarray(affine)[:3], precision=4, suppress_small=True).replace("\n", "")


def _same_geometry(a: NiftiHeader, b: NiftiHeader) -> bool:
    return a.shape == b.shape and bool(np.allclose(a.affine, b.affine, rtol=0.0, atol=AFFINE_TOLERANCE_MM))


def _header(path: Path, name: str) -> NiftiHeader:
    """A NIfTI header, or the geometry a series reference recorded (after checking its files are all there)."""
    if not is_series_ref_name(path):
        return read_header(path, name=name)
    ref = load_series_ref(path)
    missing = ref.missing()
    if missing:
        raise DataError(
            f"{name}: {len(missing)} of the series' {len(ref.files)} DICOM files are gone (first: {missing[0]}); "
            "restore them or re-register the dataset (`laulima site dataset verify` lists what changed)",
            file=str(missing[0]),
        )
    if ref.shape is None or ref.affine is None:
        from laulima.imaging.series_ref import read_series_ref

        volume, affine = read_series_ref(path)
        return NiftiHeader((volume.shape[1], volume.shape[2], volume.shape[3]), 1, affine)
    return NiftiHeader(ref.shape, 1, ref.affine)


def _image_header(listing: Listing, case: Case, problems: Problems) -> NiftiHeader | None:
    headers = []
    for path in case.images:
        try:
            headers.append(_header(path, problems.rel(path)))
        except DataError as exc:
            problems.add_error(exc)
            return None
    n_expected = len(listing.channels)
    if listing.layout == DECATHLON:
        if headers[0].n_channels != n_expected:
            problems.add(
                case.images[0],
                f"{headers[0].n_channels} channel(s), dataset.json's modality lists {n_expected} {listing.channels}",
                "store the channels as one 4D file (X,Y,Z,C) or fix modality",
            )
            return None
        return headers[0]
    for path, header in zip(case.images, headers, strict=True):
        if header.n_channels != 1:
            problems.add(path, f"{header.n_channels} channels in one file", "nnU-Net stores one channel per file")
            return None
        if not _same_geometry(header, headers[0]):
            problems.add(
                path,
                f"geometry differs from {problems.rel(case.images[0])}: shape {header.shape} vs {headers[0].shape}, "
                f"affine {_fmt(header.affine)} vs {_fmt(headers[0].affine)}",
                "resample all channels of a case onto one grid",
            )
            return None
    return NiftiHeader(headers[0].shape, len(headers), headers[0].affine)


def _check_label(listing: Listing, case: Case, label: Path, image: NiftiHeader, problems: Problems) -> None:
    name = problems.rel(label)
    try:
        label_header = read_header(label, name=name)
        if label_header.n_channels != 1:
            problems.add(label, f"label map has {label_header.n_channels} channels", "store one 3D label volume")
            return
        if not _same_geometry(label_header, image):
            problems.add(
                label,
                f"geometry differs from its image {problems.rel(case.images[0])}: shape {label_header.shape} vs "
                f"{image.shape}; affine {_fmt(label_header.affine)} vs {_fmt(image.affine)} "
                f"(tolerance {AFFINE_TOLERANCE_MM} mm)",
                "resample the label onto the image grid (nearest neighbour) or fix its header",
            )
            return
        values, _ = read_label_array(label, name=name)
    except DataError as exc:
        problems.add_error(exc)
        return
    present = np.unique(values)
    fractional = present[present != np.round(present)]
    if fractional.size:
        problems.add(label, f"non-integer label values {fractional[:8].tolist()}", "store integer labels")
        return
    unknown = sorted({int(v) for v in present} - listing.allowed_values)
    if unknown:
        problems.add(
            label,
            f"label values {unknown} are not among dataset.json's labels {sorted(listing.allowed_values)}",
            "relabel the map or declare the values in dataset.json",
        )


def load_dataset(root: Path) -> SegmentationDataset:
    """The dataset at ``root`` (Decathlon, nnU-Net v2 or laulima-v1 layout), after every case passed every check."""
    root = Path(os.path.abspath(root))
    problems = Problems(root)
    listing = parse_listing(root, problems)
    if listing.declared_training != listing.listed_training:
        problems.add(
            root / "dataset.json",
            f"numTraining is {listing.declared_training} but {listing.listed_training} training case(s) are listed",
            "correct numTraining",
        )
    seen: dict[str, Case] = {}
    for case in listing.training + listing.test:
        if case.id in seen:
            problems.add(case.images[0], f"case id {case.id} appears twice", "give every case a unique file name")
        seen[case.id] = case
        header = _image_header(listing, case, problems)
        if header is not None and case.label is not None:
            _check_label(listing, case, case.label, header, problems)
    # A laulima-v1 dataset (a DICOM source registered in place) may hold only unlabelled
    # cases: a model is run on them; training on it then fails naming that.
    empty = not listing.training and not (listing.layout == LAULIMA_V1 and listing.test)
    if empty and not problems.lines:
        problems.add(root / "dataset.json", "no training cases", "add training cases with images and labels")
    problems.raise_if_any()
    return SegmentationDataset(
        root, listing.layout, listing.name, listing.channels, dict(listing.labels), listing.training, listing.test
    )
