"""A task's cohort at a site: a dataset name or tag and a [cohort] filter, resolved against the
site's own catalog; the algorithm then reads exactly those cases, and the hub learns a count."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from laulima.core.cohort import CohortFilter, case_matches
from laulima.core.spec import parse_spec
from laulima.errors import DataError, SpecError
from laulima.imaging.datasets import load_dataset
from laulima.imaging.dicom_write import write_dicom_series
from laulima.imaging.images import read_case
from laulima.site.catalog import Catalog
from laulima.site.selection import materialize, resolve
from tests.helpers.dicom_study import write_study


def _affine(spacing: float) -> np.ndarray:
    return np.diag([spacing, spacing, spacing, 1.0])


def _volume(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 400, size=(12, 10, 8)).astype(np.int16)


@pytest.fixture
def site(tmp_path: Path) -> Catalog:
    """Two DICOM datasets tagged 't1' (1 mm and 3 mm studies, one labelled) and an untagged one."""
    catalog = Catalog(tmp_path / "home", site="site-a")
    label = np.zeros((12, 10, 8), dtype=np.uint8)
    label[3:7, 2:6, 2:5] = 1
    write_study(tmp_path / "a" / "s1", _volume(1), _affine(1.0), label=label, names={1: "brain"})
    write_study(tmp_path / "a" / "s2", _volume(2), _affine(3.0))
    write_study(tmp_path / "b" / "s3", _volume(3), _affine(1.0))
    write_dicom_series(_volume(4), _affine(1.0), tmp_path / "c" / "ct", modality="CT", series_description="head CT")
    catalog.add("hospital-a", tmp_path / "a", tags=["t1"])
    catalog.add("hospital-b", tmp_path / "b", tags=["t1"])
    catalog.add("ct", tmp_path / "c")
    return catalog


def test_a_filter_keeps_exactly_the_cases_that_match_and_unknown_properties_never_match():
    cohort = CohortFilter(modality="MR", spacing_max=1.5, has_label=True, series_description="*mprage*")
    assert case_matches(cohort, modality="MR", spacing=(1.0, 1.0, 1.2), has_label=True, series_description="T1w MPRAGE")
    assert not case_matches(cohort, modality="CT", spacing=(1.0,) * 3, has_label=True, series_description="MPRAGE")
    assert not case_matches(cohort, modality="MR", spacing=(1.0, 1.0, 3.0), has_label=True, series_description="MPRAGE")
    assert not case_matches(cohort, modality="MR", spacing=None, has_label=True, series_description="MPRAGE")
    assert not case_matches(cohort, modality="MR", spacing=(1.0,) * 3, has_label=False, series_description="MPRAGE")
    assert not case_matches(cohort, modality="MR", spacing=(1.0,) * 3, has_label=True, series_description=None)


def test_a_spec_names_a_tag_and_a_filter_and_a_bad_filter_names_its_field():
    spec = parse_spec(
        {"name": "x", "algorithm": "laulima.algorithms.identity:Identity", "dataset": "tag:t1", "rounds": 1,
         "cohort": {"modality": "MR", "spacing_max": 1.5, "min_cases": 2}}
    )  # fmt: skip
    assert spec.dataset == "tag:t1" and spec.cohort is not None and spec.cohort.min_cases == 2
    for cohort, field in (({"spacing_min": 2, "spacing_max": 1}, "cohort"), ({"modality": "mr"}, "cohort.modality")):
        with pytest.raises(SpecError, match=field):
            parse_spec({"name": "x", "algorithm": "laulima.algorithms.identity:Identity", "dataset": "d", "rounds": 1,
                        "cohort": cohort})  # fmt: skip


def test_a_whole_dataset_is_read_in_place(site: Catalog):
    res = resolve(site, "hospital-a", None)
    assert res.cases is None and res.n_cases == 2 and res.path == site.get("hospital-a")
    assert set(site.readable("hospital-a")) <= set(res.readable)


def test_a_tag_and_a_filter_resolve_to_the_matching_cases_of_every_tagged_dataset(site: Catalog, tmp_path: Path):
    res = resolve(site, "tag:t1", CohortFilter(spacing_max=1.5))
    assert res.datasets == ("hospital-a", "hospital-b") and res.n_cases == 2
    chosen = {c.series_description for c in res.cases or ()}
    assert chosen == {"T1w MPRAGE"} and all(max(c.spacing) <= 1.5 for c in res.cases or ())

    task_dir = tmp_path / "task"
    task_dir.mkdir()
    view = materialize(res, site, task_dir)
    assert view == task_dir / "cohort"
    dataset = load_dataset(view)  # what the algorithm reads: exactly these cases, images in place
    assert len(dataset.training) + len(dataset.test) == 2
    labelled = dataset.training[0]
    image, label, _ = read_case(labelled, n_channels=1)
    assert image.shape == (1, 12, 10, 8) and label is not None and int(label.sum()) == 4 * 4 * 3
    assert json.loads((view / "dataset.json").read_text())["layout"] == "laulima-v1"


def test_nothing_tagged_and_datasets_of_different_kinds_are_refused(site: Catalog, tmp_path: Path):
    with pytest.raises(DataError, match="no dataset at this site carries the tag 'flair'"):
        resolve(site, "tag:flair", None)
    (tmp_path / "tabular").mkdir()
    (tmp_path / "tabular" / "train.csv").write_text("x0,label\n1,0\n")
    site.add("tab", tmp_path / "tabular", tags=["mixed"])
    with pytest.raises(DataError, match="cannot be filtered or combined"):
        resolve(site, "tag:mixed", CohortFilter(modality="MR"))
