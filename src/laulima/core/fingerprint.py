"""nnU-Net's dataset fingerprint, federated: what a site sends, and how the hub merges it.

nnU-Net plans its network from a *fingerprint* of the whole training set
(``dataset_fingerprint.json``): every case's voxel spacing and shape after cropping to the
non-zero region, foreground intensity statistics per channel from a sample of foreground
voxels, and the median fraction of the image that cropping keeps. In a federation no party
holds the whole set, so each site summarises its cohort (:class:`SiteFingerprint`) and the
hub merges the summaries into the file nnU-Net's own planner reads.

What travels, and why it is enough:

* **Geometry** — a table of distinct (spacing, shape after cropping) rows with how many cases
  have each. nnU-Net's planner pairs each case's spacing with its shape (the median shape
  after resampling to the target spacing), so exact planning needs the pairs; the table
  carries no image content, no case identifiers and no order. Merged: the rows of every
  site, expanded into nnU-Net's ``spacings`` / ``shapes_after_crop`` lists — exact.
* **Foreground intensities** — per channel, over ``SAMPLES_PER_CASE`` voxels drawn per case
  by nnU-Net's own sampler (so every case weighs the same, as in nnU-Net): the count, mean,
  sum of squared deviations, minimum, maximum and a sketch of ``QUANTILE_POINTS`` quantiles.
  Merged: mean and standard deviation exactly (pairwise combination of moments), minimum and
  maximum exactly, and the 0.5 / 50 / 99.5 percentiles from the mixture of the sites'
  piecewise-linear quantile functions — within one sketch step (0.1 % of the distribution)
  of the percentile of the pooled samples.
* **Relative size after cropping** — a histogram of ``SIZE_BINS`` bins over [0, 1]. Merged:
  the median, interpolated within its bin (within 1 / ``SIZE_BINS`` of nnU-Net's median;
  the planner only compares it with 3/4).

Pure (numpy and pydantic, no I/O): the hub imports it and never imports nnU-Net.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "MAX_AXIS",
    "MAX_CASES",
    "MAX_CHANNELS",
    "MAX_FINGERPRINT_BYTES",
    "QUANTILE_POINTS",
    "SAMPLES_PER_CASE",
    "SIZE_BINS",
    "SPACING_RANGE_MM",
    "CaseGeometry",
    "ChannelSummary",
    "FingerprintMismatch",
    "MergedFingerprint",
    "SiteFingerprint",
    "channel_summary",
    "geometry_table",
    "merge_fingerprints",
    "size_histogram",
]

SAMPLES_PER_CASE = 10_000
"""Foreground voxels sampled per case and channel (with replacement, nnU-Net's sampler and
seed). nnU-Net samples 10⁸ / N per case over a pooled set of N cases; a site cannot know N,
so every site samples this fixed number — the equal weight per case is what matters."""

QUANTILE_POINTS = 1001
"""Points of a channel's quantile sketch: the quantiles at p = 0, 0.001, ..., 1."""

SIZE_BINS = 100
"""Bins of the relative-size histogram over [0, 1]."""

MAX_FINGERPRINT_BYTES = 1024 * 1024
"""Largest fingerprint as JSON, what a site may send and the hub reads: 32 channels with their
quantile sketches take about 150 KB; the geometry table grows with its distinct rows."""

MAX_CHANNELS = 32
MAX_LABELS = 256
MAX_GEOMETRY_ROWS = 100_000
MAX_CASES = 10**9
MAX_AXIS = 100_000
"""Longest image axis in voxels accepted in a fingerprint."""
SPACING_RANGE_MM = (1e-4, 1e4)
INTENSITY_MAX = 1e15
"""Largest magnitude of an intensity statistic; beyond it the image is corrupt, not bright."""

_NAME = r"^[A-Za-z0-9][A-Za-z0-9 _.+()-]{0,63}$"
_Finite = Annotated[float, Field(allow_inf_nan=False, ge=-INTENSITY_MAX, le=INTENSITY_MAX)]
_P = np.linspace(0.0, 1.0, QUANTILE_POINTS)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class CaseGeometry(_Strict):
    """Cases of one voxel spacing (mm, nnU-Net's axis order) and shape after cropping to non-zero.

    Always three axes: nnU-Net reads a 2D image as a volume one voxel thick."""

    spacing: Annotated[
        list[Annotated[float, Field(ge=SPACING_RANGE_MM[0], le=SPACING_RANGE_MM[1])]], Field(min_length=3, max_length=3)
    ]
    shape: Annotated[list[Annotated[int, Field(ge=1, le=MAX_AXIS)]], Field(min_length=3, max_length=3)]
    count: Annotated[int, Field(ge=1, le=MAX_CASES)]

    @model_validator(mode="after")
    def _same_dimensions(self) -> CaseGeometry:
        if len(self.spacing) != len(self.shape):
            raise ValueError(f"spacing has {len(self.spacing)} axes but shape has {len(self.shape)}")
        return self


class ChannelSummary(_Strict):
    """One channel's sampled foreground intensities, summarised."""

    n: Annotated[int, Field(ge=1, le=MAX_CASES * SAMPLES_PER_CASE)]
    mean: _Finite
    m2: Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
    """Sum of squared deviations from ``mean`` (the variance is ``m2 / n``)."""
    min: _Finite
    max: _Finite
    quantiles: Annotated[list[_Finite], Field(min_length=QUANTILE_POINTS, max_length=QUANTILE_POINTS)]

    @model_validator(mode="after")
    def _ordered(self) -> ChannelSummary:
        q = np.asarray(self.quantiles)
        if np.any(np.diff(q) < 0):
            raise ValueError("quantiles must be non-decreasing")
        if not (self.min <= q[0] and q[-1] <= self.max and self.min <= self.mean <= self.max):
            raise ValueError("min <= quantiles[0], quantiles[-1] <= max and min <= mean <= max must hold")
        if not math.isfinite(self.m2 / self.n):
            raise ValueError("m2 / n must be finite")
        return self


class SiteFingerprint(_Strict):
    """What a site sends for a FINGERPRINT task: aggregates over its cohort, no per-case rows
    beyond the geometry table (see the module doc)."""

    n_cases: Annotated[int, Field(ge=1, le=MAX_CASES)]
    channel_names: Annotated[list[Annotated[str, Field(pattern=_NAME)]], Field(min_length=1, max_length=MAX_CHANNELS)]
    labels: Annotated[
        dict[Annotated[str, Field(pattern=_NAME)], Annotated[int, Field(ge=0, le=255)]],
        Field(min_length=2, max_length=MAX_LABELS),
    ]
    """nnU-Net v2's form: name -> value, with ``background`` 0."""
    geometry: Annotated[list[CaseGeometry], Field(min_length=1, max_length=MAX_GEOMETRY_ROWS)]
    channels: Annotated[list[ChannelSummary], Field(min_length=1, max_length=MAX_CHANNELS)]
    relative_size: Annotated[
        list[Annotated[int, Field(ge=0, le=MAX_CASES)]], Field(min_length=SIZE_BINS, max_length=SIZE_BINS)
    ]
    """Cases per bin of the fraction of voxels kept by cropping: bin k holds [k, k+1) / SIZE_BINS
    (the last bin includes 1)."""

    @model_validator(mode="after")
    def _consistent(self) -> SiteFingerprint:
        if len(self.channels) != len(self.channel_names):
            raise ValueError(f"{len(self.channels)} channel summaries for {len(self.channel_names)} channel names")
        if self.labels.get("background") != 0:
            raise ValueError("labels must map 'background' to 0")
        if sorted(self.labels.values()) != list(range(len(self.labels))):
            raise ValueError(
                f"label values must be 0, 1, ..., {len(self.labels) - 1} without gaps (nnU-Net trains one output per "
                "label); renumber the dataset's labels"
            )
        if sum(row.count for row in self.geometry) != self.n_cases:
            raise ValueError("the geometry rows' counts must add up to n_cases")
        if sum(self.relative_size) != self.n_cases:
            raise ValueError("the relative-size histogram must add up to n_cases")
        keys = [(tuple(r.spacing), tuple(r.shape)) for r in self.geometry]
        if len(set(keys)) != len(keys):
            raise ValueError("geometry rows must be distinct (merge equal rows into one count)")
        cap = self.n_cases * SAMPLES_PER_CASE
        if any(c.n > cap for c in self.channels):
            raise ValueError(f"a channel reports more than n_cases x {SAMPLES_PER_CASE} sampled voxels")
        return self


class FingerprintMismatch(ValueError):
    """The sites' fingerprints describe different kinds of data (channels, labels)."""


@dataclass(frozen=True)
class MergedFingerprint:
    """The federation's fingerprint in nnU-Net v2's own format, and the dataset.json it goes with."""

    fingerprint: dict[str, Any]
    """``dataset_fingerprint.json``: spacings, shapes_after_crop,
    foreground_intensity_properties_per_channel, median_relative_size_after_cropping."""
    dataset_json: dict[str, Any]
    """channel_names, labels, numTraining, file_ending — what nnU-Net's planner reads."""
    n_cases: int


# --------------------------------------------------------------------------- the site's side


def channel_summary(samples: np.ndarray) -> ChannelSummary:
    """Summarise one channel's sampled foreground intensities (a 1-D array, at least one value)."""
    x = np.asarray(samples, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError("no foreground intensities to summarise")
    if not np.all(np.isfinite(x)):
        raise ValueError("foreground intensities must be finite")
    mean = float(x.mean())
    quantiles = np.percentile(x, _P * 100.0)
    lo, hi = float(x.min()), float(x.max())
    return ChannelSummary(
        n=int(x.size),
        mean=min(max(mean, lo), hi),
        m2=float(np.sum((x - mean) ** 2)),
        min=lo,
        max=hi,
        quantiles=[float(min(max(v, lo), hi)) for v in np.maximum.accumulate(quantiles)],
    )


def size_histogram(ratios: Sequence[float]) -> list[int]:
    """Cases per bin of their relative size after cropping (each ratio in (0, 1])."""
    values = np.asarray(ratios, dtype=np.float64)
    if values.size and (not np.all(np.isfinite(values)) or values.min() < 0 or values.max() > 1):
        raise ValueError("relative sizes after cropping must lie in [0, 1]")
    bins = np.minimum((values * SIZE_BINS).astype(np.int64), SIZE_BINS - 1)
    return [int(c) for c in np.bincount(bins, minlength=SIZE_BINS)]


def geometry_table(pairs: Iterable[tuple[Sequence[float], Sequence[int]]]) -> list[CaseGeometry]:
    """(spacing, shape after cropping) per case -> distinct rows with counts, sorted."""
    counts = Counter((tuple(float(s) for s in spacing), tuple(int(n) for n in shape)) for spacing, shape in pairs)
    return [CaseGeometry(spacing=list(sp), shape=list(sh), count=n) for (sp, sh), n in sorted(counts.items())]


# --------------------------------------------------------------------------- the hub's side


def merge_fingerprints(parts: Mapping[str, SiteFingerprint] | Sequence[SiteFingerprint]) -> MergedFingerprint:
    """Merge the sites' fingerprints into nnU-Net's ``dataset_fingerprint.json`` (see the module doc).

    ``parts``: by site name (named in a mismatch's message), or a plain sequence.
    """
    named = dict(parts) if isinstance(parts, Mapping) else {f"part {i + 1}": p for i, p in enumerate(parts)}
    if not named:
        raise ValueError("no fingerprints to merge")
    _check_alike(named)
    fps = list(named.values())
    first = fps[0]
    rows = sorted(((tuple(r.spacing), tuple(r.shape)), r.count) for fp in fps for r in fp.geometry)
    spacings = [list(sp) for (sp, _), count in rows for _ in range(count)]
    shapes = [list(sh) for (_, sh), count in rows for _ in range(count)]
    n_cases = sum(fp.n_cases for fp in fps)
    intensities = {str(c): _merged_channel([fp.channels[c] for fp in fps]) for c in range(len(first.channel_names))}
    histogram = np.sum([fp.relative_size for fp in fps], axis=0)
    fingerprint = {
        "spacings": spacings,
        "shapes_after_crop": shapes,
        "foreground_intensity_properties_per_channel": intensities,
        "median_relative_size_after_cropping": _histogram_median(histogram),
    }
    dataset_json = {
        "channel_names": {str(i): name for i, name in enumerate(first.channel_names)},
        "labels": dict(sorted(first.labels.items(), key=lambda kv: kv[1])),
        "numTraining": n_cases,
        "file_ending": ".nii.gz",
    }
    return MergedFingerprint(fingerprint=fingerprint, dataset_json=dataset_json, n_cases=n_cases)


def _check_alike(named: Mapping[str, SiteFingerprint]) -> None:
    (ref_name, ref), *rest = named.items()
    for name, fp in rest:
        for what, mine, theirs in (
            ("channels", fp.channel_names, ref.channel_names),
            ("labels", fp.labels, ref.labels),
        ):
            if mine != theirs:
                raise FingerprintMismatch(
                    f"{name}'s dataset has {what} {mine!r} but {ref_name}'s has {theirs!r}; the sites of one "
                    "nnU-Net experiment must register datasets of the same channels and labels"
                )


def _merged_channel(parts: Sequence[ChannelSummary]) -> dict[str, float]:
    n = np.array([p.n for p in parts], dtype=np.float64)
    means = np.array([p.mean for p in parts])
    total = n.sum()
    mean = float(np.sum(n * means) / total)
    m2 = float(sum(p.m2 for p in parts) + np.sum(n * (means - mean) ** 2))
    p005, p50, p995 = _mixture_quantiles(parts, (0.005, 0.5, 0.995))
    return {
        "mean": mean,
        "median": p50,
        "std": math.sqrt(max(m2, 0.0) / total),
        "min": float(min(p.min for p in parts)),
        "max": float(max(p.max for p in parts)),
        "percentile_99_5": p995,
        "percentile_00_5": p005,
    }


def _mixture_quantiles(parts: Sequence[ChannelSummary], probs: Sequence[float]) -> list[float]:
    """Quantiles of the mixture of the sites' distributions, each weighted by its sample count.

    Each site's distribution is the piecewise-linear one through its sketch (quantile p_k at
    value q_k), with jumps where values repeat; the mixture's CDF is evaluated at every
    sketch value and inverted linearly. One site alone gets its own quantiles back.
    """
    weights = np.array([p.n for p in parts], dtype=np.float64)
    weights /= weights.sum()
    sketches = [np.asarray(p.quantiles, dtype=np.float64) for p in parts]
    grid = np.unique(np.concatenate(sketches))
    right = sum(w * _cdf(q, grid, "right") for w, q in zip(weights, sketches, strict=True))
    left = sum(w * _cdf(q, grid, "left") for w, q in zip(weights, sketches, strict=True))
    out = []
    for p in probs:
        j = int(np.searchsorted(right, p - 1e-12, side="left"))
        if j >= grid.size:
            out.append(float(grid[-1]))
        elif j == 0 or p >= left[j]:  # at or inside a jump at grid[j]
            out.append(float(grid[j]))
        else:  # linear between grid[j-1] (CDF right[j-1]) and grid[j] (CDF left[j])
            frac = (p - right[j - 1]) / (left[j] - right[j - 1])
            out.append(float(grid[j - 1] + frac * (grid[j] - grid[j - 1])))
    return out


def _cdf(q: np.ndarray, x: np.ndarray, side: str) -> np.ndarray:
    """The sketch's CDF at ``x``: right-continuous values (``right``) or left limits (``left``).

    ``k`` sketch points lie at or below ``x`` (below, for ``left``); between points k-1 and k
    the CDF rises linearly by one sketch step."""
    k = np.searchsorted(q, x, side=side)  # type: ignore[call-overload]
    inside = (k > 0) & (k < q.size)
    lo = np.clip(k - 1, 0, q.size - 1)
    hi = np.clip(k, 0, q.size - 1)
    step = 1.0 / (q.size - 1)
    span = q[hi] - q[lo]
    frac = np.divide(x - q[lo], span, out=np.zeros_like(x), where=span > 0)
    return np.where(inside, _P[lo] + frac * step, np.where(k >= q.size, 1.0, 0.0))


def _histogram_median(counts: np.ndarray) -> float:
    """Median of values binned into ``SIZE_BINS`` equal bins over [0, 1], interpolated within its bin."""
    total = float(counts.sum())
    cumulative = np.cumsum(counts)
    half = total / 2.0
    k = int(np.searchsorted(cumulative, half, side="left"))
    before = float(cumulative[k - 1]) if k > 0 else 0.0
    inside = float(counts[k])
    frac = (half - before) / inside if inside > 0 else 0.5
    return (k + frac) / SIZE_BINS
