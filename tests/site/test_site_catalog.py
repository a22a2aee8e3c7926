"""The dataset catalog: registration, lookup with actionable errors, atomic persistence."""

from __future__ import annotations

from pathlib import Path

import pytest

from laulima.errors import ConfigurationError, DataError
from laulima.site.catalog import Catalog


def test_add_get_list_persist(tmp_path: Path):
    data = tmp_path / "brains"
    data.mkdir()
    Catalog(tmp_path / "home").add("brats", data)
    catalog = Catalog(tmp_path / "home", site="site-a")
    assert catalog.get("brats") == data.resolve()
    assert catalog.list() == {"brats": data.resolve()}
    assert "brats" in catalog and "other" not in catalog
    assert [p.name for p in (tmp_path / "home").iterdir()] == ["catalog.json"]  # no temp files left


def test_unknown_dataset_message_says_how_to_register(tmp_path: Path):
    with pytest.raises(DataError) as info:
        Catalog(tmp_path, site="site-a").get("brats")
    assert str(info.value) == (
        "dataset 'brats' is not registered at site 'site-a'; register it with `laulima site dataset add brats PATH`"
    )


def test_path_must_exist(tmp_path: Path):
    with pytest.raises(DataError, match="does not exist"):
        Catalog(tmp_path).add("x", tmp_path / "missing")


def test_vanished_folder_is_reported(tmp_path: Path):
    data = tmp_path / "d"
    data.mkdir()
    catalog = Catalog(tmp_path / "home")
    catalog.add("x", data)
    data.rmdir()
    with pytest.raises(DataError, match="no longer exists"):
        catalog.get("x")


def test_bad_name_and_damaged_file(tmp_path: Path):
    catalog = Catalog(tmp_path)
    with pytest.raises(ConfigurationError, match="not valid"):
        catalog.add("../x", tmp_path)
    (tmp_path / "catalog.json").write_text("{not json")
    with pytest.raises(ConfigurationError, match="damaged"):
        catalog.list()


def test_remove(tmp_path: Path):
    catalog = Catalog(tmp_path / "home")
    catalog.add("x", tmp_path)
    catalog.remove("x")
    assert catalog.list() == {}
