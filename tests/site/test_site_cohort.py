"""Case counts of registered datasets, from what each layout declares or lists, never its images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from laulima import __version__
from laulima.algorithms.tabular_data import write_tabular_site
from laulima.site.catalog import Catalog
from laulima.site.cohort import count_cases, site_report


@pytest.fixture(scope="module")
def imaging_datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A Decathlon phantom site (3 training, 1 test) and an nnU-Net v2 one (2 training, 1 test)."""
    from laulima.imaging.phantoms import write_site_dataset
    from tests.imaging.helpers import SHAPE, SPACING_MM, write_nnunet_dataset

    root = tmp_path_factory.mktemp("imaging")
    decathlon = write_site_dataset(
        root / "decathlon", site_index=0, n_sites=3, seed=1, n_train=3, n_test=1, spacing_mm=SPACING_MM, shape=SHAPE
    )
    return {"decathlon": decathlon, "nnunet": write_nnunet_dataset(root / "nnunet", n_cases=2, test_cases=1)}


def _copy(src: Path, dest: Path) -> Path:
    return Path(shutil.copytree(src, dest))


def _edit_json(root: Path, **changes: object) -> None:
    path = root / "dataset.json"
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def test_decathlon_counts_its_training_cases_without_opening_an_image(imaging_datasets, tmp_path):
    assert count_cases(imaging_datasets["decathlon"]) == 3
    broken = _copy(imaging_datasets["decathlon"], tmp_path / "dec")
    for image in (broken / "imagesTr").iterdir():
        image.write_bytes(b"not a NIfTI file")  # an image reader would fail here
    assert count_cases(broken) == 3
    _edit_json(broken, numTraining=None)  # no declared number: the training entries are counted
    assert count_cases(broken) == 3


def test_nnunet_counts_cases_not_channel_files(imaging_datasets, tmp_path):
    assert count_cases(imaging_datasets["nnunet"]) == 2
    undeclared = _copy(imaging_datasets["nnunet"], tmp_path / "nn")
    _edit_json(undeclared, numTraining=None)
    (undeclared / "imagesTr" / "._brain_000_0000.nii.gz").write_bytes(b"AppleDouble")  # hidden: ignored
    assert len(list((undeclared / "imagesTr").iterdir())) == 5  # 2 cases x 2 channels + the hidden file
    assert count_cases(undeclared) == 2


def test_tabular_counts_the_training_rows(tmp_path):
    root = write_tabular_site(tmp_path / "tab", 0, 3, n_train=37, n_val=5)
    assert count_cases(root) == 37
    assert count_cases(root / "train.csv") == 37
    csv = tmp_path / "odd.csv"
    csv.write_bytes(b"x0,label\r\n1,0\r\n\r\n  \n2,1\n3,0")  # CRLF, blank lines, no final newline
    assert count_cases(csv) == 3
    (tmp_path / "header-only.csv").write_text("x0,label\n")
    assert count_cases(tmp_path / "header-only.csv") == 0


UNKNOWN = {
    "empty folder": ("", ""),
    "no layout": ("README.txt", "notes"),
    "damaged dataset.json": ("dataset.json", "{not json"),
    "dataset.json not an object": ("dataset.json", '["a list"]'),
    "nnU-Net without numTraining or imagesTr": (
        "dataset.json",
        '{"channel_names": {"0": "T1"}, "file_ending": ".nii.gz"}',
    ),
}


@pytest.mark.parametrize("case", sorted(UNKNOWN))
def test_unknown_or_unreadable_layouts_count_as_none(tmp_path, case):
    name, text = UNKNOWN[case]
    if name:
        (tmp_path / name).write_text(text)
    assert count_cases(tmp_path) is None


def test_a_missing_path_or_an_image_file_counts_as_none(tmp_path):
    (tmp_path / "scan.nii.gz").write_bytes(b"x")
    assert count_cases(tmp_path / "scan.nii.gz") is None
    assert count_cases(tmp_path / "does-not-exist") is None


def test_the_report_carries_names_and_counts_never_paths(tmp_path):
    catalog = Catalog(tmp_path / "home", site="site-a")
    catalog.add("tab", write_tabular_site(tmp_path / "tab", 1, 3, n_train=12, n_val=3))
    (tmp_path / "misc").mkdir()
    catalog.add("misc", tmp_path / "misc")
    report = site_report(catalog)
    assert report.version == __version__
    assert report.datasets == {"misc": None, "tab": 12}
    assert str(tmp_path) not in report.model_dump_json()
