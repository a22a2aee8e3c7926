"""The algorithm API and the built-in algorithms."""

from __future__ import annotations

from laulima.algorithms.base import (
    Algorithm,
    Evaluation,
    SiteContext,
    TrainConfig,
    Update,
    load_algorithm,
)

__all__ = ["Algorithm", "Evaluation", "SiteContext", "TrainConfig", "Update", "load_algorithm"]
