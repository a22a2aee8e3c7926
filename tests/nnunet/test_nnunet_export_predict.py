"""An exported federated nnU-Net model is an nnU-Net results folder: nnU-Net's predictor and ``laulima predict``
give the same label map for the same case."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from laulima.algorithms.base import SiteContext, TrainConfig
from laulima.imaging.nifti import read_label_array, read_nifti
from laulima.nnunet.algorithm import NnUNet
from laulima.nnunet.export import export_nnunet
from laulima.nnunet.predict import is_nnunet_model, predict_nnunet
from laulima.nnunet.rawview import build_raw_view
from laulima.predict import predict
from tests.nnunet.test_nnunet_algorithm import tiny_site


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, Any], dict[str, np.ndarray]]:
    """(site dataset, trainer folder, config, weights) of a model trained 4 steps and exported."""
    base = tmp_path_factory.mktemp("nnunet-export")
    root, config = tiny_site(base)
    algo = NnUNet()
    work = base / "task"
    work.mkdir()
    algo.setup(SiteContext(site="site0", dataset="brain", dataset_path=root, work_dir=work, params=config))
    weights = algo.train(algo.initial_weights(config, 0), TrainConfig(round=1, local_steps=4, seed=0)).weights
    folder = export_nnunet(weights, config, base / "model", fingerprint={"spacings": [[6.0, 6.0, 6.0]]})
    return root, folder, config, weights


def test_export_writes_nnunets_results_layout(exported: tuple[Path, Path, dict[str, Any], dict[str, Any]]) -> None:
    _, folder, config, weights = exported
    plans = config["plans"]
    assert folder == folder.parents[1] / plans["dataset_name"] / f"nnUNetTrainer__{plans['plans_name']}__3d_fullres"
    names = {p.relative_to(folder).as_posix() for p in folder.rglob("*")}
    assert names == {
        "plans.json", "dataset.json", "dataset_fingerprint.json", "fold_all",
        "fold_all/checkpoint_final.pth", "fold_all/model.safetensors",
    }  # fmt: skip
    checkpoint = torch.load(folder / "fold_all" / "checkpoint_final.pth", map_location="cpu", weights_only=True)
    assert checkpoint["trainer_name"] == "nnUNetTrainer"
    assert checkpoint["init_args"]["configuration"] == "3d_fullres"
    assert checkpoint["inference_allowed_mirroring_axes"] == (0, 1, 2)
    stored = load_file(str(folder / "fold_all" / "model.safetensors"))
    assert stored.keys() == weights.keys() == checkpoint["network_weights"].keys()
    assert all(np.array_equal(stored[k], weights[k]) for k in weights)
    assert all(np.array_equal(checkpoint["network_weights"][k].numpy(), weights[k]) for k in weights)
    assert is_nnunet_model(folder) and is_nnunet_model(folder.parents[1]) and not is_nnunet_model(folder / "fold_all")


@pytest.mark.slow
def test_nnunets_predictor_and_laulima_predict_agree(
    exported: tuple[Path, Path, dict[str, Any], dict[str, Any]], tmp_path: Path
) -> None:
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from typer.testing import CliRunner

    from laulima.cli import app

    root, folder, _, _ = exported
    case_4d = sorted((root / "imagesTs").glob("*.nii.gz"))[0]
    view = build_raw_view(root, tmp_path / "view", split="test")  # the same case, one file per channel
    assert len(view.cases) == 1 and len(view.cases[0].images) == 4

    predictor = nnUNetPredictor(device=torch.device("cpu"), perform_everything_on_device=False, allow_tqdm=False)
    with contextlib.redirect_stdout(io.StringIO()):
        predictor.initialize_from_trained_model_folder(str(folder), use_folds=("all",))
        predictor.predict_from_files(
            str(view.root / "imagesTs"), str(tmp_path / "nnunet"), num_processes_preprocessing=1,
            num_processes_segmentation_export=1,
        )  # fmt: skip
    theirs, their_affine = read_label_array(tmp_path / "nnunet" / "case_0000.nii.gz")

    (tmp_path / "ours").mkdir()
    ours_path = predict(folder.parents[1], case_4d, tmp_path / "ours")
    assert ours_path == tmp_path / "ours" / f"{case_4d.name[:-7]}_seg.nii.gz"
    ours, our_affine = read_label_array(ours_path)
    image, image_affine = read_nifti(case_4d)
    assert ours.shape == image.shape[1:] and np.allclose(our_affine, image_affine)
    assert np.allclose(their_affine, image_affine, atol=1e-4)
    np.testing.assert_array_equal(ours, theirs)
    assert set(np.unique(ours)) <= {0, 1, 2, 3} and len(np.unique(ours)) > 1  # not two empty maps

    result = CliRunner().invoke(
        app, ["predict", "--model", str(folder), "--input", str(case_4d), "--output", str(tmp_path / "cli.nii.gz")]
    )
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(read_label_array(tmp_path / "cli.nii.gz")[0], theirs)


def test_predict_refuses_what_it_cannot_segment(
    exported: tuple[Path, Path, dict[str, Any], dict[str, Any]], tmp_path: Path
) -> None:
    from laulima.errors import DataError
    from laulima.imaging import write_nifti

    root, folder, _, _ = exported
    one_channel = tmp_path / "t1.nii.gz"
    image, affine = read_nifti(sorted((root / "imagesTs").glob("*.nii.gz"))[0])
    write_nifti(one_channel, image[0], affine)
    with pytest.raises(DataError, match="expects 4"):
        predict_nnunet(folder, one_channel, tmp_path / "out.nii.gz")
    with pytest.raises(DataError, match="NIfTI"):
        predict_nnunet(folder, tmp_path, tmp_path / "out.nii.gz")
