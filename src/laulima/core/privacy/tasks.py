"""What the hub tells each site of a round about privacy: derived from the spec, pure.

The threshold of secure aggregation is a strict majority of the round's sites (so no two
disjoint groups of answers could both unmask), lowered by nothing but ``max_dropouts``. Under
differential privacy every site weighs 1 (DP-FedAvg's fixed weights: a site's sensitivity is
then ``clip`` whatever its size); otherwise a site weighs its sample count, capped at
``max_weight`` so the quantised sum cannot wrap.

The communication graph's degree (SecAgg+, :mod:`laulima.core.privacy.graph`) is the spec's
``neighbours``, or by default 0 — the complete graph, Bonawitz et al. as before — up to
:data:`~laulima.core.privacy.graph.COMPLETE_UP_TO` sites and ``2 * ceil(log2 n)`` beyond; a
degree that reaches every other site is sent as 0.
"""

from __future__ import annotations

import math

from laulima.core.privacy.graph import COMPLETE_UP_TO, default_neighbours, is_complete
from laulima.core.privacy.messages import TaskDpSgd, TaskPrivacy, TaskSecureAggregation
from laulima.core.spec import ExperimentSpec
from laulima.errors import ConfigurationError

__all__ = [
    "NOISE_TAIL",
    "noise_std",
    "secure_neighbours",
    "secure_threshold",
    "task_privacy",
    "task_secure_aggregation",
]

NOISE_TAIL = 8.0
"""Gaussian noise is clamped at this many standard deviations when it is quantised: a
coordinate of N(0, 1) exceeds 8 with probability 1.2e-15, so the clamp changes nothing in
practice while keeping the integer sum from wrapping."""


def task_privacy(spec: ExperimentSpec) -> TaskPrivacy | None:
    privacy = spec.privacy
    if privacy is None:
        return None
    if privacy.noise_multiplier is None:
        raise ConfigurationError(
            "privacy.noise_multiplier is not calibrated; the hub calibrates target_epsilon when it accepts the spec",
            field="privacy.noise_multiplier",
        )
    dp_sgd = privacy.dp_sgd
    return TaskPrivacy(
        mode=privacy.mode,
        clip=privacy.clip,
        noise_multiplier=privacy.noise_multiplier,
        delta=privacy.delta,
        dp_sgd=TaskDpSgd(noise_multiplier=dp_sgd.noise_multiplier, max_grad_norm=dp_sgd.max_grad_norm)
        if dp_sgd is not None
        else None,
    )


def secure_threshold(n_sites: int, max_dropouts: int | None) -> int:
    """Shares needed to unmask: ``n - t`` with ``t`` at most just under half of ``n``."""
    ceiling = (n_sites - 1) // 2
    dropouts = ceiling if max_dropouts is None else min(max_dropouts, ceiling)
    return max(2, n_sites - dropouts)


def secure_neighbours(n_sites: int, neighbours: int | None) -> int:
    """The graph's degree for a round of ``n_sites``: 0 (complete) or an even k < n - 1."""
    if neighbours is None:
        if n_sites <= COMPLETE_UP_TO:
            return 0
        neighbours = default_neighbours(n_sites)
    return 0 if is_complete(n_sites, neighbours) else neighbours


def noise_std(privacy: TaskPrivacy, threshold: int | None) -> float:
    """Std of the noise one site adds: all of it (local), or its share of the sum (distributed)."""
    std = privacy.noise_multiplier * privacy.clip
    if privacy.mode == "distributed":
        if not threshold:
            raise ConfigurationError("distributed noise needs secure aggregation", field="privacy.mode")
        std /= math.sqrt(threshold)
    return std


def task_secure_aggregation(spec: ExperimentSpec, n_sites: int, max_weight: int) -> TaskSecureAggregation | None:
    secagg = spec.secure_aggregation
    if secagg is None:
        return None
    clip = spec.update_clip
    assert clip is not None  # the spec's validation requires one
    threshold = secure_threshold(n_sites, secagg.max_dropouts)
    privacy = task_privacy(spec)
    weight = 1 if privacy is not None else max(1, max_weight)
    bound = weight * clip
    if privacy is not None:
        clip = min(clip, privacy.clip)
        bound = clip + NOISE_TAIL * noise_std(privacy, threshold)
    return TaskSecureAggregation(
        clip=clip,
        sites=n_sites,
        threshold=threshold,
        max_weight=weight,
        bound=bound,
        phase_timeout_s=secagg.phase_timeout_s,
        neighbours=secure_neighbours(n_sites, secagg.neighbours),
    )
