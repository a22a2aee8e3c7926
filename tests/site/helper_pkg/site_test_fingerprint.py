"""Algorithms for the fingerprint tests at the site.

``Fingerprints`` summarises its dataset (one case per file: its size in bytes is the
"intensity") without ``setup``, counts its runs in the experiment's cache folder, and marks
``finalize`` in its task folder. ``NoFingerprint`` keeps the base class's refusal;
``Wrong`` returns something else; ``WritesTo`` writes ``params["target"]`` first.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from laulima.algorithms.base import Algorithm, Evaluation, SiteContext, TrainConfig, Update
from laulima.core.fingerprint import SiteFingerprint, channel_summary, geometry_table, size_histogram
from laulima.core.weights import Weights


class Fingerprints(Algorithm):
    def initial_weights(self, params: Mapping[str, Any], seed: int) -> Weights:
        raise AssertionError("a fingerprint experiment builds no model")

    def setup(self, ctx: SiteContext) -> None:
        raise AssertionError("setup must not run for a fingerprint task")

    def train(self, weights: Weights, config: TrainConfig) -> Update:
        raise AssertionError("not a training algorithm")

    def evaluate(self, weights: Weights) -> Evaluation:
        raise AssertionError("not an evaluating algorithm")

    def fingerprint(self, ctx: SiteContext) -> SiteFingerprint:
        root = ctx.dataset_path
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        if ctx.cache_dir is not None:
            runs = ctx.cache_dir / "runs.txt"
            count = int(runs.read_text()) + 1 if runs.exists() else 1
            runs.write_text(str(count))
        sizes = np.array([len(p.read_bytes()) for p in files], dtype=np.float64)
        return SiteFingerprint(
            n_cases=len(files),
            channel_names=["bytes"],
            labels={"background": 0, "thing": 1},
            geometry=geometry_table(((1.0, 1.0, 1.0), (8, 8, 8)) for _ in files),
            channels=[channel_summary(sizes)],
            relative_size=size_histogram([1.0] * len(files)),
        )

    def finalize(self) -> None:
        Path("finalized.txt").write_text("yes")  # the task folder is the working directory


class NoFingerprint(Fingerprints):
    fingerprint = Algorithm.fingerprint  # type: ignore[assignment]


class Wrong(Fingerprints):
    def fingerprint(self, ctx: SiteContext) -> SiteFingerprint:
        return {"n_cases": 3}  # type: ignore[return-value]


class WritesTo(Fingerprints):
    def fingerprint(self, ctx: SiteContext) -> SiteFingerprint:
        Path(ctx.params["target"]).write_text("written")
        return super().fingerprint(ctx)
