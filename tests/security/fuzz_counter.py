"""How many generated requests the fuzz tests sent (reported in the terminal summary)."""

from __future__ import annotations

from collections import Counter

CASES: Counter[str] = Counter()

STEPS: Counter[str] = Counter()
"""How many steps of each rule the stateful fuzzing ran against the TLS hub."""

OUTCOMES: Counter[str] = Counter()
"""Answers to the sites' results in the stateful fuzzing, e.g. ``update accepted``, ``evaluation 422``."""
