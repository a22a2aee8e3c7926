"""The nnU-Net path keeps no pickle in the site's cache and unpickles nothing: a tampered cache cannot run code."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from laulima.algorithms.base import SiteContext, TrainConfig
from laulima.errors import DataError
from laulima.nnunet.algorithm import NnUNet
from laulima.nnunet.cache_io import (
    decode_properties,
    encode_properties,
    properties_path,
    read_properties,
    write_properties,
)
from tests.nnunet.test_nnunet_algorithm import tiny_site


def _same(a: Any, b: Any) -> bool:
    """Equal values of the same types all the way down (arrays: dtype, shape and values)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    if isinstance(a, dict):
        keys = list(zip(a, b, strict=False))
        return len(a) == len(b) and all(_same(ka, kb) and _same(a[ka], b[kb]) for ka, kb in keys)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _round_trip(properties: dict[str, Any], tmp_path: Path) -> Any:
    path = tmp_path / "case.json"
    write_properties(path, properties)
    return read_properties(path)


def test_properties_round_trip_keeps_types_dtypes_shapes_and_values(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    properties = {  # what nnU-Net's run_case gives (SimpleITK and nibabel readers), and a few more of the types
        "sitk_stuff": {"spacing": (6.0, 6.0, 6.0), "origin": (93.0, 110.5, -88.0), "direction": (-1.0, 0.0, 0.1) * 3},
        "nibabel_stuff": {"original_affine": rng.random((4, 4)), "reoriented_affine": np.eye(4, dtype=np.float32)},
        "spacing": [np.float64(6.0), np.float64(0.1), np.float64(1 / 3)],
        "shape_before_cropping": (32, 32, 31),
        "bbox_used_for_cropping": [[0, 32], [np.int64(1), np.int64(31)], [2, 30]],
        "shape_after_cropping_and_before_resampling": (32, 30, 28),
        "class_locations": {
            1: rng.integers(0, 32, size=(61, 4)),
            2: np.zeros((0, 4), dtype=np.int64),
            (1, 2): rng.integers(0, 32, size=(3, 4)).astype(np.int32),
            np.int64(3): np.array([[0, 1, 2, 3]], dtype=np.uint16),
        },
        "others": [None, True, np.bool_(False), "text", 2**63, -1.5e-300, np.float32(0.1), np.uint8(255), []],
        "arrays": [np.array(7, dtype=np.int8), np.array([True, False]), np.array([0.1, 2.5], dtype=np.float16)],
    }
    back = _round_trip(properties, tmp_path)
    assert _same(back, properties)
    assert back["class_locations"][2].shape == (0, 4) and back["class_locations"][2].dtype == np.int64
    assert json.loads((tmp_path / "case.json").read_text("utf-8"))  # plain JSON


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ({1, 2}, TypeError),
        (object(), TypeError),
        (np.array([object()]), TypeError),
        (np.array([1 + 2j]), TypeError),
        (np.array(["a"]), TypeError),
        (float("nan"), ValueError),
        (np.array([1.0, np.inf]), ValueError),
        (np.float32("nan"), ValueError),
        ({frozenset([1]): 3}, TypeError),
    ],
)
def test_other_values_are_refused_naming_where(value: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match=r"properties\['x'\]"):
        encode_properties({"x": value})


@pytest.mark.parametrize(
    "document",
    [
        {"a": 1},  # an untagged object
        {"__pickle__": "gASV"},
        {"__ndarray__": {"dtype": "object", "shape": [1], "data": [1]}},
        {"__ndarray__": {"dtype": "int64", "shape": [2, 2], "data": [1, 2, 3]}},
        {"__ndarray__": {"dtype": "int64", "shape": [1], "data": ["1"]}},
        {"__ndarray__": {"dtype": "int64", "shape": [1], "data": [1.5]}},
        {"__ndarray__": {"dtype": ["int64"], "shape": [1], "data": [1]}},
        {"__scalar__": {"dtype": "bool", "value": 3}},
        {"__dict__": [[[1], 2]]},
        {"__dict__": [[{"__tuple__": [1, [2]]}, 2]]},
        {"__scalar__": {"dtype": "int8", "value": 300}},
        {"__ndarray__": {"dtype": "int64", "shape": [1], "data": [2**64]}},
        {"__dict__": [[1]]},
        {"__tuple__": {"a": 1}},
    ],
)
def test_a_tampered_properties_file_is_refused(document: Any, tmp_path: Path) -> None:
    with pytest.raises((ValueError, OverflowError)):
        decode_properties(document)
    path = tmp_path / "case.json"
    path.write_text(json.dumps({"__dict__": [["x", document]]}), "utf-8")
    with pytest.raises(DataError, match="delete the cache folder"):
        read_properties(path)


def test_json_constants_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "case.json"
    path.write_text('{"__dict__": [["spacing", NaN]]}', "utf-8")
    with pytest.raises(DataError, match="NaN"):
        read_properties(path)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    return tiny_site(tmp_path_factory.mktemp("nnunet-no-pickle"))


@pytest.fixture
def no_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    """``pickle.load``/``loads`` (what nnU-Net's ``load_pickle`` calls) and ``pickle.Unpickler`` (``torch.load``'s)
    raise for the rest of the test."""

    import nnunetv2.inference.predict_from_raw_data  # noqa: F401  (imported first: their modules subclass Unpickler)
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer  # noqa: F401

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("something unpickled")

    class Refusing(pickle.Unpickler):
        def load(self) -> Any:
            refuse()

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", Refusing)


def test_training_and_evaluation_keep_and_read_no_pickle(
    site: tuple[Path, dict[str, Any]], tmp_path: Path, no_unpickling: None
) -> None:
    from batchgenerators.utilities.file_and_folder_operations import load_pickle, write_pickle

    probe = tmp_path / "probe.pkl"  # the patch does catch nnU-Net's reader and torch.load
    write_pickle({"a": 1}, str(probe))
    with pytest.raises(AssertionError, match="unpickled"):
        load_pickle(str(probe))
    torch.save({"a": 1}, probe)
    with pytest.raises(AssertionError, match="unpickled"):
        torch.load(probe, weights_only=False)
    probe.unlink()

    root, config = site
    cache, work = tmp_path / "cache", tmp_path / "work"
    work.mkdir()
    algo = NnUNet()
    algo.setup(
        SiteContext(site="site0", dataset="brain", dataset_path=root, work_dir=work, params=config, cache_dir=cache)
    )
    update = algo.train(algo.initial_weights(config, 0), TrainConfig(round=1, local_steps=2, seed=0))
    evaluation = algo.evaluate(update.weights)
    assert update.n_samples == 3 and evaluation.n_samples == 1

    assert not [p for base in (cache, work) for p in base.rglob("*") if p.suffix == ".pkl"]
    (folder,) = {p.parent for p in cache.rglob("*.b2nd")}
    assert {p.name for p in folder.iterdir() if p.is_file()} == {
        f"case_{i:04d}{end}" for i in range(3) for end in (".b2nd", "_seg.b2nd")
    }
    properties = read_properties(properties_path(folder, "case_0000"))
    assert properties["class_locations"] and all(
        v.dtype == np.int64 and v.ndim == 2 and v.shape[1] == 4 for v in properties["class_locations"].values()
    )


def test_stored_properties_are_nnunets_own(site: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    """What the cache holds is what nnU-Net's ``run_case`` gave, types included."""
    import contextlib
    import io

    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor

    from laulima.imaging import load_dataset
    from laulima.nnunet.network import managers
    from laulima.nnunet.params import parse_params
    from laulima.nnunet.preprocess import cached_raw_view, preprocess_cases

    root, config = site
    params = parse_params(config)
    view = cached_raw_view(load_dataset(root), tmp_path, split="training", dataset_name="Dataset500_Site")
    data = preprocess_cases(params, view.cases, tmp_path)
    plans_manager, configuration = managers(params)
    case = view.cases[1]
    with contextlib.redirect_stdout(io.StringIO()):
        _, _, expected = DefaultPreprocessor(verbose=False).run_case(
            [str(p) for p in case.images], str(case.label), plans_manager, configuration, params.dataset_json
        )
    assert _same(read_properties(properties_path(data.folder, case.id)), expected)
