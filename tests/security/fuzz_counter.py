"""How many generated requests the OpenAPI fuzzing sent (reported in the terminal summary)."""

from __future__ import annotations

from collections import Counter

CASES: Counter[str] = Counter()
