"""Shared fixtures: make tests/ importable in child processes (site workers load test algorithms)."""

from __future__ import annotations

import os
from pathlib import Path

TESTS_ROOT = Path(__file__).resolve().parent


def pytest_configure(config: object) -> None:
    # Agents and their task workers are separate processes; they find tests.helpers via PYTHONPATH.
    parts = [str(TESTS_ROOT.parent)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
