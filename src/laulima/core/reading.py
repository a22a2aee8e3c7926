"""How the hub's records read to people: metric names and their order, sample-weighted
means, the privacy settings of a spec and the ε the sites reported.

Shared by every place that shows results (the terminal, the report, the hub's dashboard),
so a metric is called and ordered the same everywhere. Pure functions of plain records.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from laulima.core.crosssite import round_records
from laulima.core.privacy.messages import EPSILON_METRIC, INFINITE_EPSILON
from laulima.core.protocol import MetricRecord, TaskKind

__all__ = [
    "HEADLINE_METRIC",
    "HIDDEN_METRICS",
    "REGIONS",
    "REGION_KEYS",
    "brief",
    "epsilon_by_site",
    "final_epsilon",
    "format_epsilon",
    "headline_metrics",
    "lower_is_better",
    "metric_label",
    "ordered_metrics",
    "privacy_settings",
    "privacy_settings_line",
    "weighted_mean",
]

#: Bookkeeping values algorithms report that do not belong in a results table.
HIDDEN_METRICS = frozenset({"held_out_test", "steps"})


def weighted_mean(records: list[MetricRecord]) -> dict[str, float]:
    """Sample-weighted mean of each metric over ``records``."""
    sums: dict[str, float] = defaultdict(float)
    weights: dict[str, float] = defaultdict(float)
    for r in records:
        for key, value in r.metrics.items():
            sums[key] += value * max(r.n_samples, 0)
            weights[key] += max(r.n_samples, 0)
    return {k: sums[k] / weights[k] for k in sums if weights[k] > 0}


def epsilon_by_site(metrics: Iterable[MetricRecord]) -> dict[str, dict[int, float]]:
    """Per site, per round, the ε the site reported with its update (:data:`EPSILON_METRIC` of
    its train records); empty when no site ran under differential privacy."""
    out: dict[str, dict[int, float]] = defaultdict(dict)
    for m in round_records(metrics):
        if m.kind == TaskKind.TRAIN and EPSILON_METRIC in m.metrics:
            out[m.site][m.round] = float(m.metrics[EPSILON_METRIC])
    return {site: dict(sorted(out[site].items())) for site in sorted(out)}


def final_epsilon(metrics: Iterable[MetricRecord]) -> dict[str, tuple[int, float]]:
    """Per site, its last reported round and the ε the experiment had cost it then."""
    return {site: max(by_round.items()) for site, by_round in epsilon_by_site(metrics).items() if by_round}


def format_epsilon(value: float | None) -> str:
    """ε to two decimals (two significant digits below 0.1); "∞" for updates without noise."""
    if value is None or math.isnan(value):
        return "n/a"
    if math.isinf(value) or value >= INFINITE_EPSILON:
        return "∞"
    return f"{value:.2g}" if value < 0.095 else f"{value:.2f}"


def privacy_settings(spec: Mapping[str, Any]) -> dict[str, Any] | None:
    """The privacy settings of a spec (as the hub stores it: ``noise_multiplier`` calibrated):
    ``differential_privacy``, ``mode``, ``clip``, ``noise_multiplier``, ``target_epsilon``,
    ``delta`` and ``secure_aggregation`` (on/off); None when it has neither table."""
    privacy, secagg = spec.get("privacy"), spec.get("secure_aggregation")
    if not privacy and not secagg:
        return None
    privacy, secagg = privacy or {}, secagg or {}
    clip = secagg.get("clip") or privacy.get("clip")
    if privacy.get("clip") is not None and clip is not None:
        clip = min(clip, privacy["clip"])  # the site clips to the tighter bound
    return {
        "differential_privacy": bool(privacy),
        "mode": privacy.get("mode", "local") if privacy else None,
        "clip": clip,
        "noise_multiplier": privacy.get("noise_multiplier"),
        "target_epsilon": privacy.get("target_epsilon"),
        "delta": privacy.get("delta") if privacy else None,
        "secure_aggregation": bool(secagg),
    }


def privacy_settings_line(settings: Mapping[str, Any] | None) -> str:
    """E.g. "differential privacy: distributed, clip 1.5, noise multiplier 3.1 (calibrated for ε 8),
    δ 1e-05; secure aggregation on"."""
    if not settings:
        return "no differential privacy, no secure aggregation"
    if settings.get("differential_privacy"):
        parts = [f"differential privacy: {settings.get('mode')}", f"clip {brief(settings.get('clip'))}"]
        target, sigma = settings.get("target_epsilon"), settings.get("noise_multiplier")
        if sigma is None and target is not None:
            noise = f"noise multiplier to be calibrated by the hub for ε {brief(target)}"
        else:
            calibrated = f" (calibrated for ε {brief(target)})" if target is not None else ""
            noise = f"noise multiplier {brief(sigma)}{calibrated}"
        parts += [noise, f"δ {brief(settings.get('delta'))}"]
        dp = ", ".join(parts)
    else:
        dp = f"no differential privacy (updates clipped to {brief(settings.get('clip'))})"
    return f"{dp}; secure aggregation {'on' if settings.get('secure_aggregation') else 'off'}"


def brief(value: object) -> str:
    """A setting for a sentence: 4 significant figures for floats, "?" when unset."""
    return "?" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


# -- metric names --------------------------------------------------------------------------
#: BraTS evaluation regions, nested: whole tumour ⊃ tumour core ⊃ enhancing tumour.
REGIONS: dict[str, str] = {"wt": "whole tumour", "tc": "tumour core", "et": "enhancing tumour"}
REGION_KEYS: tuple[str, ...] = tuple(f"dice_{r}" for r in REGIONS)
HEADLINE_METRIC = "dice_mean"


def metric_label(key: str) -> str:
    """The name a reader sees for a metric field: "Dice whole tumour", "HD95 tumour core (mm)".

    Field names (``dice_wt``) are for machines; tables and plots show these instead.
    """
    if key == "dice_mean":
        return "mean Dice"
    if key == "hd95_mean":
        return "mean HD95 (mm)"
    prefix, _, rest = key.partition("_")
    name = REGIONS.get(rest, rest.replace("_", " "))
    if prefix == "dice" and rest:
        return f"Dice {name}"
    if prefix == "hd95" and rest:
        return f"HD95 {name} (mm)"
    return key.replace("_", " ")


def lower_is_better(key: str) -> bool:
    """Distances and losses improve downwards; Dice (and anything else) upwards."""
    return key.startswith("hd95") or key == "loss" or key.endswith("_loss")


def _metric_rank(key: str) -> tuple[int, str]:
    fixed = ["dice_mean", *REGION_KEYS, "hd95_mean", *(f"hd95_{r}" for r in REGIONS)]
    if key in fixed:
        return fixed.index(key), ""
    if key.startswith("dice_"):
        return len(fixed), key
    if key.startswith("hd95_"):
        return len(fixed) + 1, key
    return (len(fixed) + 2, "") if key == "loss" else (len(fixed) + 3, key)


def ordered_metrics(keys: Iterable[str]) -> list[str]:
    """Metrics in reading order: mean Dice, the BraTS regions, HD95, per-label Dice, loss, the rest.

    Bookkeeping values (:data:`HIDDEN_METRICS`) are dropped.
    """
    return sorted(set(keys) - HIDDEN_METRICS, key=_metric_rank)


def headline_metrics(keys: Iterable[str]) -> list[str]:
    """The pooled columns of the comparison: mean Dice, Dice per BraTS region and mean HD95 where
    reported; a run without tumour regions (brain tissue) shows its per-label Dice instead."""
    available = set(keys)
    regions = [k for k in REGION_KEYS if k in available]
    if not regions:
        regions = [k for k in ordered_metrics(available) if k.startswith("dice_") and k != "dice_mean"]
    head = ["dice_mean"] if "dice_mean" in available else []
    tail = ["hd95_mean"] if "hd95_mean" in available else []
    return [*head, *regions, *tail]
