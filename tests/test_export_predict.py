"""Export (safetensors + TorchScript + card) and prediction from the exported folder."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from laulima.algorithms.base import SiteContext, TrainConfig
from laulima.algorithms.segmentation import UNetSegmentation, build_unet, load_numpy_weights
from laulima.errors import DataError
from laulima.export import CARD_FILE, TORCHSCRIPT_FILE, WEIGHTS_FILE, export_model, read_card, sha256_file
from laulima.predict import predict
from tests.algorithms.test_segmentation_data import AFFINE, sphere_case, write_sphere_site

PARAMS = {"in_channels": 1, "out_channels": 2, "channels": [8, 16], "num_res_units": 1, "roi_size": [16, 16, 16]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    root = write_sphere_site(tmp_path_factory.mktemp("export-site"), n_train=6, n_test=1, size=16, seed=3)
    algo = UNetSegmentation()
    algo.setup(SiteContext(site="a", dataset="spheres", dataset_path=root, work_dir=root, params=PARAMS))
    return algo.train(algo.initial_weights(PARAMS, 0), TrainConfig(round=0, local_steps=60, seed=0)).weights


@pytest.fixture(scope="module")
def exported(trained: dict[str, np.ndarray], tmp_path_factory: pytest.TempPathFactory) -> Path:
    card = {"rounds": 3, "sites": ["a"], "strategy": "fedavg", "metrics": {"dice_mean": 0.9}}
    return export_model(trained, PARAMS, tmp_path_factory.mktemp("models") / "model", card=card)


def test_export_writes_three_files_and_a_card(exported: Path):
    assert sorted(p.name for p in exported.iterdir()) == sorted([CARD_FILE, TORCHSCRIPT_FILE, WEIGHTS_FILE])
    card = json.loads((exported / CARD_FILE).read_text())
    assert card["architecture"]["channels"] == [8, 16] and card["architecture"]["in_channels"] == 1
    assert card["architecture"]["roi_size"] == [16, 16, 16] and card["architecture"]["num_res_units"] == 1
    assert card["labels"] == {"0": "background", "1": "label 1"} and card["channels"] == ["channel 0"]
    assert card["training"]["rounds"] == 3 and card["training"]["strategy"] == "fedavg"
    assert card["files"]["weights"]["sha256"] == sha256_file(exported / WEIGHTS_FILE)
    assert read_card(exported) == card
    assert not [p for p in exported.parent.iterdir() if p.name.startswith(".")], "no temporary folder left"


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
def test_torchscript_gives_the_eager_output(exported: Path, trained: dict[str, np.ndarray]):
    model = build_unet(PARAMS).eval()
    load_numpy_weights(model, trained)
    scripted = torch.jit.load(str(exported / TORCHSCRIPT_FILE))
    x = torch.randn(1, 1, 32, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(model(x), scripted(x), rtol=1e-4, atol=1e-5)


def test_export_replaces_an_existing_model_and_takes_given_names(trained: dict[str, np.ndarray], tmp_path: Path):
    out = tmp_path / "model"
    export_model(trained, PARAMS, out, card={"rounds": 1})
    export_model(trained, PARAMS, out, card={"rounds": 2}, labels={0: "background", 1: "sphere"}, channels=["T1w"])
    card = read_card(out)
    assert card["training"] == {"rounds": 2} and card["labels"]["1"] == "sphere" and card["channels"] == ["T1w"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_predict_writes_a_label_map_with_the_input_geometry(exported: Path, tmp_path: Path):
    image, truth = sphere_case(20, np.random.default_rng(11))
    affine = AFFINE.copy()
    affine[0, 3] = 12.5
    nib.save(nib.Nifti1Image(image, affine), str(tmp_path / "subject.nii.gz"))
    out = predict(exported, tmp_path / "subject.nii.gz", tmp_path / "seg" / "subject.nii.gz")
    assert out == tmp_path / "seg" / "subject.nii.gz"
    written = nib.load(str(out))
    label = np.asarray(written.dataobj)
    assert label.shape == image.shape and np.allclose(written.affine, affine)
    assert set(np.unique(label)) <= {0, 1}
    dice = 2 * np.logical_and(label == 1, truth == 1).sum() / ((label == 1).sum() + (truth == 1).sum())
    assert dice > 0.5


def test_predict_into_a_folder_names_the_file_after_the_input(exported: Path, tmp_path: Path):
    image, _ = sphere_case(16, np.random.default_rng(2))
    nib.save(nib.Nifti1Image(image, AFFINE), str(tmp_path / "case_7.nii.gz"))
    (tmp_path / "out").mkdir()
    assert predict(exported, tmp_path / "case_7.nii.gz", tmp_path / "out") == tmp_path / "out" / "case_7_seg.nii.gz"


def test_predict_refuses_a_wrong_channel_count(exported: Path, tmp_path: Path):
    image, _ = sphere_case(16, np.random.default_rng(0), n_channels=2)
    nib.save(nib.Nifti1Image(image, AFFINE), str(tmp_path / "two.nii.gz"))
    with pytest.raises(DataError, match=r"two\.nii\.gz: has 2 channel\(s\); the model .* expects 1"):
        predict(exported, tmp_path / "two.nii.gz", tmp_path / "out.nii.gz")


def test_predict_refuses_weights_that_do_not_match_the_card(exported: Path, tmp_path: Path):
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(exported, copy)
    data = bytearray((copy / WEIGHTS_FILE).read_bytes())
    data[-1] ^= 0xFF
    (copy / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(DataError, match="sha256"):
        predict(copy, tmp_path / "any.nii.gz", tmp_path / "out.nii.gz")


def test_a_phantom_task_names_its_labels_and_channels(tmp_path: Path):
    params = {"task": "brain-tissue", "channels": [4, 8], "roi_size": [16, 16, 16]}
    out = export_model(UNetSegmentation().initial_weights(params, 0), params, tmp_path / "m", card={})
    card = read_card(out)
    assert card["labels"]["2"] == "grey matter" and card["channels"] == ["T1w"]
    assert card["architecture"]["in_channels"] == 1 and card["architecture"]["out_channels"] == 4
