"""Fixtures for end-to-end tests: a real hub and real agents as separate processes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from laulima.sim import LocalFederation


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[Callable[..., LocalFederation]]:
    """Factory: ``federation(n_sites, dataset)`` starts a hub and agents; all stop at teardown."""
    started: list[LocalFederation] = []

    def start(n_sites: int = 3, dataset: str = "none", seed: int = 0) -> LocalFederation:
        fed = LocalFederation(tmp_path / f"fed{len(started)}", n_sites, dataset, seed=seed).__enter__()
        started.append(fed)
        return fed

    yield start
    for fed in started:
        fed.close()
