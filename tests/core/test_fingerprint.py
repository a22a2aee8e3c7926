"""Merging sites' fingerprints reproduces the statistics of the pooled samples."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pydantic import ValidationError

from laulima.core.fingerprint import (
    QUANTILE_POINTS,
    SIZE_BINS,
    FingerprintMismatch,
    SiteFingerprint,
    channel_summary,
    geometry_table,
    merge_fingerprints,
    size_histogram,
)

LABELS = {"background": 0, "edema": 1, "tumour": 2}


def _site(rng: np.random.Generator, n_cases: int, loc: float, *, channels: int = 2, discrete: bool = False) -> tuple:
    """A site's fingerprint and the raw material nnU-Net would pool: samples, geometry, sizes."""
    samples = [rng.normal(loc + 10 * c, 3.0 + c, size=n_cases * 500) for c in range(channels)]
    if discrete:
        samples = [np.round(s) for s in samples]
    geometry = [((1.0, 1.0, 1.0 + (i % 2)), (40 + i % 3, 44, 38)) for i in range(n_cases)]
    sizes = list(rng.uniform(0.3, 0.9, size=n_cases))
    fp = SiteFingerprint(
        n_cases=n_cases,
        channel_names=[f"ch{c}" for c in range(channels)],
        labels=LABELS,
        geometry=geometry_table(geometry),
        channels=[channel_summary(s) for s in samples],
        relative_size=size_histogram(sizes),
    )
    return fp, samples, geometry, sizes


@pytest.mark.parametrize("discrete", [False, True])
def test_merge_equals_pooled_statistics(discrete: bool) -> None:
    rng = np.random.default_rng(7)
    sites = [_site(rng, n, loc, discrete=discrete) for n, loc in ((4, 0.0), (9, 5.0), (2, -20.0))]
    merged = merge_fingerprints({f"site-{i}": s[0] for i, s in enumerate(sites)})
    fp = merged.fingerprint

    geometry = sorted(g for s in sites for g in s[2])
    assert sorted(map(tuple, map(tuple, fp["spacings"]))) == sorted(g[0] for g in geometry)
    assert sorted(zip(map(tuple, fp["spacings"]), map(tuple, fp["shapes_after_crop"]), strict=True)) == geometry
    assert merged.n_cases == 15 == merged.dataset_json["numTraining"] == len(fp["spacings"])

    for c in range(2):
        pooled = np.concatenate([s[1][c] for s in sites])
        got = fp["foreground_intensity_properties_per_channel"][str(c)]
        assert got["mean"] == pytest.approx(pooled.mean(), rel=1e-12, abs=1e-9)
        assert got["std"] == pytest.approx(pooled.std(), rel=1e-9)
        assert got["min"] == pooled.min() and got["max"] == pooled.max()
        step = (pooled.max() - pooled.min()) / (QUANTILE_POINTS - 1)  # one sketch step of the range
        for key, q in (("percentile_00_5", 0.5), ("median", 50.0), ("percentile_99_5", 99.5)):
            assert abs(got[key] - np.percentile(pooled, q)) <= 2 * step, key

    sizes = np.concatenate([s[3] for s in sites])
    assert abs(fp["median_relative_size_after_cropping"] - np.median(sizes)) <= 1.0 / SIZE_BINS
    json.dumps(fp)  # nnU-Net reads it as JSON: plain types only


def test_one_site_gets_its_own_percentiles_back() -> None:
    rng = np.random.default_rng(1)
    fp, samples, _, _ = _site(rng, 3, 0.0, channels=1)
    got = merge_fingerprints([fp]).fingerprint["foreground_intensity_properties_per_channel"]["0"]
    for key, q in (("percentile_00_5", 0.5), ("median", 50.0), ("percentile_99_5", 99.5)):
        assert got[key] == pytest.approx(np.percentile(samples[0], q), abs=1e-9)


def test_sites_with_other_channels_are_named() -> None:
    rng = np.random.default_rng(2)
    a = _site(rng, 3, 0.0)[0]
    b = _site(rng, 3, 0.0, channels=1)[0]
    with pytest.raises(FingerprintMismatch, match="site-b.*channels.*site-a"):
        merge_fingerprints({"site-a": a, "site-b": b})


def _payload() -> dict:
    return _site(np.random.default_rng(3), 3, 0.0)[0].model_dump(mode="json")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["channels"][0].update(mean=float("nan")), "finite"),
        (lambda d: d.update(n_cases=4), "add up to n_cases"),
        (lambda d: d["channels"][0]["quantiles"].reverse(), "non-decreasing"),
        (lambda d: d["channels"][0]["quantiles"].pop(), "1001"),
        (lambda d: d["geometry"][0].update(spacing=[0.0, 1.0, 1.0]), "greater than or equal"),
        (lambda d: d["labels"].update(background=3), "background"),
        (lambda d: d["labels"].update(tumour=4), "without gaps"),
        (lambda d: d["geometry"][0].update(spacing=[1.0, 1.0], shape=[4, 4]), "at least 3"),
        (lambda d: d.update(case_ids=["a"]), "Extra inputs"),
        (lambda d: d["channels"][0].update(n=10**12), "sampled voxels"),
    ],
)
def test_malformed_fingerprints_are_refused(edit, message: str) -> None:  # type: ignore[no-untyped-def]
    data = _payload()
    edit(data)
    with pytest.raises(ValidationError, match=message):
        SiteFingerprint.model_validate(data)
