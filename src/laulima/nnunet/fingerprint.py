"""The site's side of federated fingerprinting: nnU-Net's own per-case analysis, summarised over the cohort.

nnU-Net's ``DatasetFingerprintExtractor.analyze_case`` does the per-case work (reading with
the reader nnU-Net picks, cropping to the non-zero region, sampling foreground voxels with its
fixed seed), so a federated fingerprint differs from a pooled one only in how cases are
combined (``laulima.core.fingerprint``), never in what is measured. It runs in-process, one
case at a time: the site calls this in a forked task worker, which must not fork or spawn a
pool of its own.

Only aggregates leave: the geometry table (distinct spacing/shape rows with counts, which
nnU-Net's planner needs as pairs), per-channel summaries of the pooled samples and a
histogram of relative sizes. The raw view written to get there is deleted before returning.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from laulima.core.fingerprint import (
    SAMPLES_PER_CASE,
    SiteFingerprint,
    channel_summary,
    geometry_table,
    size_histogram,
)
from laulima.errors import DataError
from laulima.nnunet.rawview import RawCase, RawView, build_raw_view
from laulima.private_files import private_dir

__all__ = ["site_fingerprint"]

# What nnU-Net's per-case analysis raises on a case it cannot use (NaN voxels are an AssertionError there).
_CASE_ERRORS = (AssertionError, RuntimeError, ValueError, OSError, MemoryError)


def site_fingerprint(dataset_path: Path, work_dir: Path) -> SiteFingerprint:
    """The fingerprint of the labelled training cases of the dataset at ``dataset_path``.

    ``work_dir`` receives a temporary raw view (private, removed before returning).
    """
    scratch = Path(tempfile.mkdtemp(dir=private_dir(Path(work_dir)), prefix=".fingerprint.", suffix=".tmp"))
    try:
        view = build_raw_view(Path(dataset_path), scratch, split="training")
        return _summarise(view, Path(dataset_path))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _summarise(view: RawView, dataset_path: Path) -> SiteFingerprint:
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    reader = determine_reader_writer_from_dataset_json(view.dataset_json, str(view.cases[0].images[0]), verbose=False)
    n_channels = len(view.dataset_json["channel_names"])
    geometry: list[tuple[list[float], list[int]]] = []
    samples: list[list[np.ndarray]] = [[] for _ in range(n_channels)]
    ratios: list[float] = []
    for number, case in enumerate(view.cases):
        shape, spacing, intensities, ratio = _analyze(case, reader, number, dataset_path)
        geometry.append((spacing, shape))
        ratios.append(ratio)
        for channel, values in enumerate(intensities):
            if len(values):  # a case without foreground contributes no samples, as in nnU-Net
                samples[channel].append(np.asarray(values, dtype=np.float64))
    if not samples[0]:
        raise DataError(
            f"{dataset_path}: no labelled foreground in the cohort; all {len(view.cases)} training label maps are "
            "background only, and nnU-Net normalises intensities from foreground voxels. Check that the label maps "
            "are the right files (and not empty exports) before fingerprinting",
            file=str(dataset_path),
        )
    labels = {str(name): int(value) for name, value in view.dataset_json["labels"].items()}
    return SiteFingerprint(
        n_cases=len(view.cases),
        channel_names=[view.dataset_json["channel_names"][str(i)] for i in range(n_channels)],
        labels=labels,
        geometry=geometry_table(geometry),
        channels=[channel_summary(np.concatenate(parts)) for parts in samples],
        relative_size=size_histogram(ratios),
    )


def _analyze(
    case: RawCase, reader: Any, number: int, dataset_path: Path
) -> tuple[list[int], list[float], list[Any], float]:
    """nnU-Net's analysis of one case: shape after cropping, spacing, sampled foreground voxels, relative size."""
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor

    try:
        shape, spacing, intensities, _, ratio = DatasetFingerprintExtractor.analyze_case(
            [str(p) for p in case.images], str(case.label), reader, num_samples=SAMPLES_PER_CASE
        )
    except _CASE_ERRORS as exc:
        raise DataError(
            f"{dataset_path}: labelled training case number {number + 1} (in the dataset's listing order) could not "
            f"be analysed by nnU-Net ({type(exc).__name__}: {exc}); check its images for NaN or damaged voxels and "
            "that its label map matches the image grid",
            file=str(dataset_path),
        ) from exc
    return [int(n) for n in shape], [float(s) for s in spacing], list(intensities), float(ratio)
