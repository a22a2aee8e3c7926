"""Shared fixtures: make tests/ importable in child processes (site workers load test algorithms)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.orthanc import OrthancServer, OrthancUnavailable, orthanc_server

TESTS_ROOT = Path(__file__).resolve().parent


def pytest_configure(config: object) -> None:
    # Agents and their task workers are separate processes; they find tests.helpers via PYTHONPATH.
    parts = [str(TESTS_ROOT.parent)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))


@pytest.fixture(scope="session")
def orthanc() -> Iterator[OrthancServer]:
    """A real Orthanc PACS with DICOMweb on a free loopback port, for the session; tests use distinct studies."""
    problem = ""
    try:
        with orthanc_server() as server:
            yield server
    except OrthancUnavailable as exc:
        problem = str(exc)
    if problem:  # fail, never skip: a PACS test that does not run proves nothing
        pytest.fail(problem, pytrace=False)
