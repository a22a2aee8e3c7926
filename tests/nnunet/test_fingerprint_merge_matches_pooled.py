"""The merged federated fingerprint against nnU-Net's own fingerprint of all sites' cases pooled in one dataset."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from laulima.core.fingerprint import SAMPLES_PER_CASE, SIZE_BINS, MergedFingerprint, SiteFingerprint, merge_fingerprints
from laulima.imaging.tumour import CHANNELS, LABELS
from tests.nnunet.conftest import N_CASES, SITES, Pooled

# Both sides draw the same voxels (nnU-Net's sampler, its fixed seed per case, SAMPLES_PER_CASE
# each: see the ``pooled`` fixture), so only the aggregation differs:
MOMENT_TOLERANCE = 0.01
"""Mean and std, as a fraction of the pooled std: merged exactly (pairwise moments), so any
slack is float rounding; 1 % is far below what weighting sites instead of cases would shift."""
PERCENTILE_TOLERANCE = 0.01
"""0.5 / 50 / 99.5 percentiles, as a fraction of the pooled (max - min): the mixture of the
sites' 1001-point quantile sketches is within one sketch step (0.1 % of the mass) of the
pooled percentile; 1 % of the range leaves room for sparse tails."""
RELATIVE_SIZE_TOLERANCE = 1.0 / SIZE_BINS
"""The median relative size comes from a histogram of SIZE_BINS bins: within one bin."""
# Minimum and maximum: exact. The pooled run samples the very same voxels, and min/max merge exactly.


@pytest.fixture(scope="module")
def merged(site_fingerprints: list[SiteFingerprint]) -> MergedFingerprint:
    return merge_fingerprints({f"site{i}": fp for i, fp in enumerate(site_fingerprints)})


def _cases(fingerprint: dict[str, Any]) -> Counter[tuple[tuple[float, ...], tuple[int, ...]]]:
    """Each case's (spacing, shape after cropping) pair, as a multiset: nnU-Net pairs them by position."""
    pairs = zip(fingerprint["spacings"], fingerprint["shapes_after_crop"], strict=True)
    return Counter((tuple(float(s) for s in sp), tuple(int(n) for n in sh)) for sp, sh in pairs)


def test_geometry_is_exactly_the_pooled_cases(merged: MergedFingerprint, pooled: Pooled) -> None:
    assert merged.n_cases == N_CASES == len(pooled.fingerprint["spacings"])
    assert _cases(merged.fingerprint) == _cases(pooled.fingerprint)
    assert sorted(map(tuple, merged.fingerprint["spacings"])) == sorted(map(tuple, pooled.fingerprint["spacings"]))
    assert sorted(map(tuple, merged.fingerprint["shapes_after_crop"])) == sorted(
        map(tuple, pooled.fingerprint["shapes_after_crop"])
    )
    # The phantoms must make the comparison meaningful: several spacings, cropped shapes that differ.
    assert len({sp for sp, _ in _cases(pooled.fingerprint)}) == len(SITES)
    assert len(_cases(pooled.fingerprint)) == N_CASES


def test_dataset_json_describes_the_pooled_dataset(merged: MergedFingerprint) -> None:
    assert merged.dataset_json["numTraining"] == N_CASES
    assert merged.dataset_json["channel_names"] == {str(i): name for i, name in enumerate(CHANNELS)}
    assert merged.dataset_json["labels"] == {"background": 0} | {name: k for k, name in LABELS.items() if k}
    assert merged.dataset_json["file_ending"] == ".nii.gz"


def test_median_relative_size_within_one_bin(merged: MergedFingerprint, pooled: Pooled) -> None:
    ours = merged.fingerprint["median_relative_size_after_cropping"]
    theirs = float(pooled.fingerprint["median_relative_size_after_cropping"])
    assert theirs < 0.75, "the skull-stripped phantoms should crop (nnU-Net then normalises within the mask)"
    assert abs(ours - theirs) <= RELATIVE_SIZE_TOLERANCE


@pytest.mark.parametrize("channel", range(len(CHANNELS)))
def test_intensity_statistics_match_pooled(merged: MergedFingerprint, pooled: Pooled, channel: int) -> None:
    ours = merged.fingerprint["foreground_intensity_properties_per_channel"][str(channel)]
    theirs = pooled.fingerprint["foreground_intensity_properties_per_channel"][str(channel)]
    assert ours["min"] == theirs["min"]
    assert ours["max"] == theirs["max"]
    scale = theirs["std"]
    assert abs(ours["mean"] - theirs["mean"]) <= MOMENT_TOLERANCE * scale
    assert abs(ours["std"] - theirs["std"]) <= MOMENT_TOLERANCE * scale
    spread = theirs["max"] - theirs["min"]
    for key in ("percentile_00_5", "median", "percentile_99_5"):
        assert abs(ours[key] - theirs[key]) <= PERCENTILE_TOLERANCE * spread, key


def test_tolerances_would_catch_weighting_by_site(site_fingerprints: list[SiteFingerprint], pooled: Pooled) -> None:
    """Guard on the test data: sites differ enough that averaging site means (every site alike,
    whatever its cohort) instead of pooling cases misses the pooled mean by more than the tolerance."""
    for channel in range(len(CHANNELS)):
        theirs = pooled.fingerprint["foreground_intensity_properties_per_channel"][str(channel)]
        by_site = sum(fp.channels[channel].mean for fp in site_fingerprints) / len(site_fingerprints)
        assert abs(by_site - theirs["mean"]) > MOMENT_TOLERANCE * theirs["std"], channel


def test_cases_without_foreground_add_no_samples(site_fingerprints: list[SiteFingerprint]) -> None:
    assert [fp.n_cases for fp in site_fingerprints] == [site.n_train for site in SITES]
    expected = [(site.n_train - (site.empty_label is not None)) * SAMPLES_PER_CASE for site in SITES]
    assert [fp.channels[0].n for fp in site_fingerprints] == expected
