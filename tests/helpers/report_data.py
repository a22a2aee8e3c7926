"""Report inputs for the report and terminal tests: a tumour run and a brain-tissue run with
distinct, known numbers, shaped like the demo's (three sites, federated + centralized + one
local-only model per site)."""

from __future__ import annotations

from typing import Any

import numpy as np

from laulima.core.protocol import MetricRecord, TaskKind
from laulima.report import ArmEvaluation, Overlay, ReportData

SITES = ["site-a", "site-b", "site-c"]
TUMOUR_LABELS = {0: "background", 1: "edema", 2: "non_enhancing_tumor", 3: "enhancing_tumour"}
TISSUE_LABELS = {0: "background", 1: "csf", 2: "grey_matter", 3: "white_matter"}
ARM_NAMES = ["centralized", "local:site-a", "federated", "local:site-b", "local:site-c"]
"""Not in display order on purpose: the comparison puts federated first."""


def tumour_metrics(seed: float) -> dict[str, float]:
    """A full BraTS-style metric set whose values all differ and derive from ``seed``."""
    wt, tc, et = 0.70 + seed, 0.60 + seed / 2, 0.50 + seed / 3
    hd = {"hd95_wt": 9.0 - 10 * seed, "hd95_tc": 11.0 - 10 * seed, "hd95_et": 13.5 - 10 * seed}
    return {
        "dice_wt": wt,
        "dice_tc": tc,
        "dice_et": et,
        "dice_mean": (wt + tc + et) / 3,
        **hd,
        "hd95_mean": sum(hd.values()) / 3,
        "dice_edema": 0.55 + seed,
        "dice_non_enhancing_tumor": 0.45 + seed,
        "dice_enhancing_tumour": et,
        "loss": 0.9 - seed,
    }


def tissue_metrics(seed: float) -> dict[str, float]:
    csf, gm, wm = 0.60 + seed, 0.70 + seed, 0.80 + seed
    return {"dice_csf": csf, "dice_grey_matter": gm, "dice_white_matter": wm, "dice_mean": (csf + gm + wm) / 3}


ARM_SEEDS = {"federated": 0.08, "centralized": 0.1, "local:site-a": 0.01, "local:site-b": 0.03, "local:site-c": 0.05}


def site_seed(arm: str, site: str) -> float:
    """The federated model beats site-a's and site-b's own models on their data, not site-c's."""
    own = arm == f"local:{site}"
    bonus = {"site-a": 0.0, "site-b": 0.01, "site-c": 0.1}[site] if own else 0.0
    return ARM_SEEDS[arm] + SITES.index(site) * 0.001 + bonus


def arms(metrics=tumour_metrics, names: list[str] | None = None) -> list[ArmEvaluation]:
    out = []
    for name in names or ARM_NAMES:
        per_site = {s: metrics(site_seed(name, s)) for s in SITES}
        steps = 80 if name.startswith("local:") else 240
        out.append(ArmEvaluation(name, per_site, metrics(ARM_SEEDS[name] + 0.002), steps, 12.5))
    return out


def rounds(metrics=tumour_metrics, n_rounds: int = 4) -> list[MetricRecord]:
    records = []
    for r in range(1, n_rounds + 1):
        for i, site in enumerate(SITES):
            m = metrics(0.02 * r + 0.001 * i)
            records.append(MetricRecord(round=r, site=site, kind=TaskKind.EVALUATE, n_samples=2 + i, metrics=m))
            records.append(MetricRecord(round=r, site=site, kind=TaskKind.TRAIN, n_samples=6, metrics={"loss": 0.5}))
    return records


def site_info(i: int) -> dict[str, Any]:
    """A scanner profile as wide as the demo's: many fields, long names."""
    return {
        "train_subjects": 6 * (i + 1),
        "test_subjects": 4,
        "scanner_name": f"simulated 3T scanner number {i} (vendor-neutral profile)",
        "scanner_bias_field_strength": 0.1 + i / 10,
        "scanner_noise_sigma": 0.02 * (i + 1),
        "scanner_contrast_gamma": 0.9 + i / 20,
        "scanner_resolution_mm": [1.0, 1.0, 1.5 + i],
        "scanner_intensity_scale": 1.0 + i / 3,
        "scanner_intensity_offset": 0.05 * i,
        "scanner_ghosting_fraction": 0.0,
        "cohort_tumour_volume_ml": 30.0 + 5 * i,
    }


def overlay(models: list[str] | None = None, size: int = 48) -> Overlay:
    rng = np.random.default_rng(0)
    image = rng.random((size, size))
    truth = np.zeros((size, size), dtype=np.int16)
    truth[10:30, 10:30] = 1
    truth[15:25, 15:25] = 2
    truth[18:22, 18:22] = 3
    preds = {m: np.roll(truth, i, axis=0) for i, m in enumerate(models or ["federated", "centralized", "local:site-a"])}
    return Overlay(image, truth, preds, TUMOUR_LABELS, "site-b, test subject 3, axial slice 24")


def report_data(*, tumour: bool = True, **extra: Any) -> ReportData:
    metrics = tumour_metrics if tumour else tissue_metrics
    return ReportData(
        title="Laulima demo: federated brain tumour segmentation",
        description="Synthetic phantoms, not patients.",
        labels=TUMOUR_LABELS if tumour else TISSUE_LABELS,
        sites={s: site_info(i) for i, s in enumerate(SITES)},
        budget={
            "rounds": 8,
            "local_steps": 10,
            "sites": 3,
            "optimizer_steps_federated_and_centralized": 240,
            "optimizer_steps_per_local_model": 80,
            "batch_size": 2,
        },
        rounds=rounds(metrics),
        arms=arms(metrics),
        wall_time_s={"federated": 100.0, "total": 200.0},
        notes=["The centralized model was trained for 240 optimizer steps."],
        **extra,
    )
