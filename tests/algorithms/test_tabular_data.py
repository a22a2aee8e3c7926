"""The generated tabular data set: deterministic, non-IID, atomic, and strict when read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from laulima.algorithms.tabular_data import read_tabular, write_tabular_site
from laulima.errors import DataError


def test_deterministic_per_seed_and_site(tmp_path: Path):
    a = write_tabular_site(tmp_path / "a", 1, 3, seed=4)
    b = write_tabular_site(tmp_path / "b", 1, 3, seed=4)
    c = write_tabular_site(tmp_path / "c", 2, 3, seed=4)
    d = write_tabular_site(tmp_path / "d", 1, 3, seed=5)
    train = lambda p: (p / "train.csv").read_bytes()  # noqa: E731
    assert train(a) == train(b)
    assert train(a) != train(c) and train(a) != train(d)
    assert (a / "val.csv").read_bytes() != train(a)


def test_shape_header_and_label_range(tmp_path: Path):
    d = write_tabular_site(tmp_path / "s", 0, 2, seed=0, n_train=50, n_val=20, n_features=5, n_classes=4)
    assert (d / "train.csv").read_text().splitlines()[0] == "x0,x1,x2,x3,x4,label"
    x, y = read_tabular(d / "train.csv")
    assert x.shape == (50, 5) and x.dtype == np.float32 and y.dtype == np.int64
    assert set(np.unique(y)) <= {0, 1, 2, 3}
    assert read_tabular(d / "val.csv")[0].shape == (20, 5)


def test_sites_differ_in_features_and_label_balance(tmp_path: Path):
    stats = []
    for i in range(3):
        x, y = read_tabular(write_tabular_site(tmp_path / f"s{i}", i, 3, seed=0, n_train=2000) / "train.csv")
        stats.append((x.mean(axis=0), np.bincount(y, minlength=3) / len(y)))
    for i in range(3):
        for j in range(i + 1, 3):
            assert np.abs(stats[i][0] - stats[j][0]).max() > 0.5, "feature distributions should differ"
            assert np.abs(stats[i][1] - stats[j][1]).max() > 0.15, "label balance should differ"


def test_refuses_to_overwrite_and_leaves_no_temp_folder(tmp_path: Path):
    write_tabular_site(tmp_path / "s", 0, 1)
    with pytest.raises(DataError, match="already exists"):
        write_tabular_site(tmp_path / "s", 0, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]
    empty = tmp_path / "empty"
    empty.mkdir()
    write_tabular_site(empty, 0, 1)  # an empty folder is fine
    assert (empty / "train.csv").exists()


def _csv(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "train.csv"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "the file is empty"),
        ("x0,x1,y\n1,2,0\n", "line 1: the last column must be 'label'"),
        ("x0,label\n", "has a header but no data rows"),
        ("x0,x1,label\n1,2,0\n1,2\n", "line 3: expected 3 values"),
        ("x0,x1,label\n1,2,0\n1,abc,1\n", "line 3, column 'x1': 'abc' is not a finite number"),
        ("x0,x1,label\nnan,2,0\n", "line 2, column 'x0': 'nan' is not a finite number"),
        ("x0,x1,label\n1,2,0\n1,2,1.5\n", "line 3, column 'label': 1.5 is not a class index"),
        ("x0,x1,label\n1,2,-1\n", "line 2, column 'label': -1 is not a class index"),
    ],
)
def test_read_errors_name_file_line_and_column(tmp_path: Path, text: str, message: str):
    path = _csv(tmp_path, text)
    with pytest.raises(DataError) as info:
        read_tabular(path)
    assert str(info.value).startswith(f"{path}: ")
    assert message in str(info.value)


def test_missing_file_says_what_the_folder_needs(tmp_path: Path):
    with pytest.raises(DataError, match="must hold train.csv and val.csv"):
        read_tabular(tmp_path / "train.csv")


def test_blank_lines_are_ignored(tmp_path: Path):
    x, y = read_tabular(_csv(tmp_path, "x0,label\n1.5,1\n\n2.5,0\n"))
    assert x.tolist() == [[1.5], [2.5]] and y.tolist() == [1, 0]
