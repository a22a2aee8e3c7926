"""The dataset catalog: registration, lookup with actionable errors, atomic persistence."""

from __future__ import annotations

import json
import stat
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
    assert [p.name for p in (tmp_path / "home").iterdir()] == ["catalog.db"]  # no temp files left
    assert stat.S_IMODE((tmp_path / "home" / "catalog.db").stat().st_mode) == 0o600
    info = catalog.info("brats")
    assert (info.kind, info.n_cases, info.source) == ("folder", None, str(data.resolve()))


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
    with pytest.raises(ConfigurationError, match="catalog.json: the dataset catalog is damaged"):
        catalog.list()
    (tmp_path / "catalog.json").unlink()
    (tmp_path / "catalog.db").write_bytes(b"not a database, just bytes" * 100)
    with pytest.raises(ConfigurationError, match="catalog.db: the dataset catalog is damaged"):
        catalog.list()


def test_remove(tmp_path: Path):
    catalog = Catalog(tmp_path / "home")
    catalog.add("x", tmp_path)
    catalog.remove("x")
    assert catalog.list() == {}


def test_catalog_json_is_migrated_on_first_open(tmp_path: Path):
    home, data = tmp_path / "home", tmp_path / "tab"
    home.mkdir()
    data.mkdir()
    (data / "train.csv").write_text("x,y\n1,0\n")
    legacy = {"datasets": {"tab": {"path": str(data), "added_at": 1700000000.0}}}
    (home / "catalog.json").write_text(json.dumps(legacy))
    catalog = Catalog(home)
    assert catalog.list() == {"tab": data}
    info = catalog.info("tab")
    assert (info.kind, info.n_cases, info.added_at, catalog.cases("tab")) == ("folder", None, 1700000000.0, [])
    assert sorted(p.name for p in home.iterdir()) == ["catalog.db", "catalog.json.migrated"]
    assert Catalog(home).get("tab") == data  # once: the migrated file is not read again


def test_a_decathlon_folder_is_validated_and_recorded_case_by_case(tmp_path: Path):
    from laulima.imaging import write_site_dataset

    data = write_site_dataset(tmp_path / "site0", site_index=0, n_sites=3, seed=1, n_train=2, n_test=1,
                              spacing_mm=12.0, shape=(16, 16, 16))  # fmt: skip
    catalog = Catalog(tmp_path / "home")
    assert catalog.add("phantoms", data, tags=["brain"]) == data.resolve()
    info = catalog.info("phantoms")
    assert (info.kind, info.n_cases, info.n_training, info.tags) == ("decathlon", 3, 2, ("brain",))
    cases = catalog.cases("phantoms")
    assert [c.split for c in cases] == ["training", "training", "test"]
    assert all(c.shape == (16, 16, 16) and c.orientation == "RAS" and c.spacing == (12.0, 12.0, 12.0) for c in cases)
    assert all(c.has_label and len(c.checksum) == 64 for c in cases)
    assert catalog.readable("phantoms") == [data.resolve()]
    assert catalog.verify("phantoms") == []
    label = cases[0].label
    assert label is not None
    stored = label.read_bytes()
    label.write_bytes(stored[:-1] + bytes([stored[-1] ^ 0xFF]))
    assert catalog.verify("phantoms") == [f"{label}: changed since registration (case {cases[0].case_id})"]

    (data / "dataset.json").write_text(
        json.dumps({**json.loads((data / "dataset.json").read_text()), "numTraining": 5})
    )
    with pytest.raises(DataError, match="numTraining is 5 but 2"):
        catalog.add("broken", data)
    assert "broken" not in catalog


def test_options_that_do_not_apply_and_bad_tags_are_refused(tmp_path: Path):
    catalog = Catalog(tmp_path / "home")
    with pytest.raises(ConfigurationError, match="--labels applies to DICOM sources"):
        catalog.add("x", tmp_path, labels=tmp_path)
    with pytest.raises(ConfigurationError, match="--skip-bad applies to DICOM sources"):
        catalog.add("x", tmp_path, skip_bad=True)
    with pytest.raises(ConfigurationError, match="tag 'a b' is not valid"):
        catalog.add("x", tmp_path, tags=["a b"])
    assert catalog.list() == {}


def test_the_signature_changes_with_every_write(tmp_path: Path):
    catalog = Catalog(tmp_path / "home")
    assert catalog.signature() is None
    catalog.add("x", tmp_path)
    first = catalog.signature()
    catalog.add("y", tmp_path)
    second = catalog.signature()
    catalog.remove("y")
    assert first is not None and len({first, second, catalog.signature()}) == 3
