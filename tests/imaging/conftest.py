"""Fixtures for the imaging tests: small phantom datasets written once per session, copied per test."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from laulima.imaging import write_site_dataset
from tests.imaging.helpers import SHAPE, SPACING_MM


@pytest.fixture(scope="session")
def tissue_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A written brain-tissue site: 3 training + 2 test phantoms. Read-only: copy it to break it."""
    root = tmp_path_factory.mktemp("tissue") / "site0"
    return write_site_dataset(
        root, site_index=0, n_sites=3, seed=11, n_train=3, n_test=2, spacing_mm=SPACING_MM, shape=SHAPE
    )


@pytest.fixture(scope="session")
def tumour_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tumour") / "site1"
    return write_site_dataset(
        root, task="brain-tumour", site_index=1, n_sites=3, seed=11, n_train=2, n_test=1,
        spacing_mm=SPACING_MM, shape=SHAPE,
    )  # fmt: skip


@pytest.fixture
def copy_of(tmp_path: Path) -> Callable[[Path], Path]:
    """A writable copy of a session dataset, to damage in one test."""

    def copy(root: Path) -> Path:
        return Path(shutil.copytree(root, tmp_path / root.name))

    return copy
