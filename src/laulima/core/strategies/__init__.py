"""Aggregation strategies: pure objects, one file per algorithm."""

from __future__ import annotations

from laulima.core.strategies.base import FitResult, Strategy

__all__ = ["FitResult", "Strategy"]
