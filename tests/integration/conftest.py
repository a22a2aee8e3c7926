"""Fixtures for end-to-end tests: a real hub and real agents as separate processes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from laulima.sim import LocalFederation
from tests.helpers.bundles import helper_bundle

TEST_ALGORITHMS = ("SlowCounter", "SiteLedger")


def admit_test_bundles(home: Path) -> None:
    """Write the site's policy.toml admitting the bundles of tests/helpers/algorithms.py."""
    digests = ", ".join(f'"{helper_bundle(name).digest}"' for name in TEST_ALGORITHMS)
    policy = home / "policy.toml"
    policy.write_text(f"[algorithms]\ndigests = [{digests}]\n")
    policy.chmod(0o600)


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[Callable[..., LocalFederation]]:
    """Factory: ``federation(n_sites, dataset)`` starts a hub and agents; all stop at teardown."""
    started: list[LocalFederation] = []

    def start(n_sites: int = 3, dataset: str = "none", seed: int = 0) -> LocalFederation:
        fed = LocalFederation(tmp_path / f"fed{len(started)}", n_sites, dataset, seed=seed).__enter__()
        started.append(fed)
        for name in fed.sites:  # the hospitals admit the test algorithms' bundles by digest
            admit_test_bundles(fed.workdir / "sites" / name)
        return fed

    yield start
    for fed in started:
        fed.close()
