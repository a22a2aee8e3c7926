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


# -- geometry: the preprocessing plan on the card, and predict on other grids ------------------
def test_the_card_records_the_preprocessing_plan(exported: Path):
    card = read_card(exported)
    plan = card["preprocessing"]
    assert plan["spacing_mm"] == [4.0, 4.0, 4.0] and plan["orientation"] == "RAS"
    assert plan["normalization"] == "zscore-foreground" and "4 x 4 x 4 mm" in plan["summary"]
    assert card["params"]["preprocessing"]["spacing_mm"] == [4.0, 4.0, 4.0]


def test_predict_resamples_a_finer_scan_and_answers_on_its_grid(exported: Path):
    from laulima.imaging.resample import Grid, resample_image, resample_labels
    from laulima.predict import predict_volume

    image, truth = sphere_case(20, np.random.default_rng(11))
    fine = np.diag([2.0, 2.0, 2.0, 1.0])
    fine[:3, 3] = AFFINE[:3, 3] - 1.0  # the same field of view in 2 mm voxels
    grid = Grid(fine, (40, 40, 40))
    label = predict_volume(exported, resample_image(image, AFFINE, grid, antialias=False), fine)
    assert label.shape == (40, 40, 40) and label.dtype == np.uint8
    reference = resample_labels(truth, AFFINE, grid)
    dice = 2 * np.logical_and(label == 1, reference == 1).sum() / ((label == 1).sum() + (reference == 1).sum())
    assert dice > 0.5


def test_a_flipped_scan_gets_the_flipped_labels(exported: Path):
    from laulima.predict import predict_volume

    image, _ = sphere_case(20, np.random.default_rng(4))
    ras = predict_volume(exported, image, AFFINE)
    flipped = AFFINE.copy()
    flipped[:3, 0], flipped[:3, 1] = -AFFINE[:3, 0], -AFFINE[:3, 1]  # LPS axes, same voxels in the world
    flipped[:3, 3] = AFFINE[:3, :3] @ [19, 19, 0] + AFFINE[:3, 3]
    lps = predict_volume(exported, image[::-1, ::-1].copy(), flipped)
    assert np.array_equal(lps, ras[::-1, ::-1])


def test_predict_on_bare_weights_says_to_export_the_experiment(exported: Path, tmp_path: Path):
    import shutil

    bare = tmp_path / "model.safetensors"
    shutil.copy(exported / WEIGHTS_FILE, bare)
    with pytest.raises(DataError, match=r"laulima experiment export N --output DIR"):
        predict(bare, tmp_path / "any.nii.gz", tmp_path / "out.nii.gz")
    with pytest.raises(DataError, match=r"without a model\.json card; .*laulima experiment export"):
        predict(tmp_path, tmp_path / "any.nii.gz", tmp_path / "out.nii.gz")


def test_a_card_without_a_plan_is_refused_with_what_to_do(exported: Path, tmp_path: Path):
    import shutil

    copy = tmp_path / "old"
    shutil.copytree(exported, copy)
    card = json.loads((copy / CARD_FILE).read_text())
    card["format_version"] = 1
    (copy / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(DataError, match=r"version 1 does not record the grid.*laulima experiment export"):
        read_card(copy)


def test_a_bad_plan_names_its_key():
    from laulima.algorithms.segmentation import parse_params
    from laulima.errors import ConfigurationError

    assert parse_params({**PARAMS, "preprocessing": {"spacing_mm": 1}}).preprocessing.spacing_mm == (1.0, 1.0, 1.0)
    for bad, key in (
        ({"spacing_mm": [1, 1]}, "spacing_mm"),
        ({"spacing_mm": -2}, "spacing_mm"),
        ({"orientation": "RAR"}, "orientation"),
        ({"normalization": "nonzero"}, "normalization"),
        ({"spacing": 4}, "spacing"),
    ):
        with pytest.raises(ConfigurationError, match=rf"preprocessing\.{key} = ") as info:
            parse_params({**PARAMS, "preprocessing": bad})
        assert info.value.context["field"] == f"config.preprocessing.{key}"


class _Hub:
    """A stand-in for laulima.client.Client: one experiment and its global model."""

    def __init__(self, weights: dict[str, np.ndarray], *, status: str = "completed", algorithm: str = "") -> None:
        from laulima.core.protocol import ExperimentPublic

        spec = {
            "name": "spheres-fedavg",
            "algorithm": algorithm or "laulima.algorithms.segmentation:UNetSegmentation",
            "strategy": {"name": "fedavg"},
            "config": PARAMS,
        }
        self.weights = weights
        self.exp = ExperimentPublic(
            id=7, name="spheres-fedavg", status=status, rounds_done=3, rounds=3, created_at=0.0, finished_at=1.0,
            global_digest="ab" * 32, error=None, spec=spec, owner="ana",
        )  # fmt: skip

    def experiment(self, experiment_id: int):
        assert experiment_id == 7
        return self.exp

    def download_model(self, experiment_id: int, dest: Path) -> Path:
        from laulima.core.weights import to_safetensors

        dest.write_bytes(to_safetensors(self.weights))
        return dest


def test_experiment_export_writes_the_folder_predict_runs(trained: dict[str, np.ndarray], tmp_path: Path):
    from laulima.export import export_experiment

    out = export_experiment(_Hub(trained), 7, tmp_path / "exported")  # type: ignore[arg-type]
    card = read_card(out)
    assert card["training"]["experiment_id"] == 7 and card["training"]["rounds"] == 3
    assert card["preprocessing"]["spacing_mm"] == [4.0, 4.0, 4.0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"], "no download left behind"
    image, _ = sphere_case(16, np.random.default_rng(2))
    nib.save(nib.Nifti1Image(image, AFFINE), str(tmp_path / "s.nii.gz"))
    assert predict(out, tmp_path / "s.nii.gz", tmp_path / "s_seg.nii.gz").is_file()


def test_experiment_export_refuses_what_it_cannot_export(trained: dict[str, np.ndarray], tmp_path: Path):
    from laulima.errors import ConfigurationError
    from laulima.export import export_experiment

    with pytest.raises(ConfigurationError, match="still running"):
        export_experiment(_Hub(trained, status="running"), 7, tmp_path / "m")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="only laulima.algorithms.segmentation:UNetSegmentation"):
        export_experiment(_Hub(trained, algorithm="mylab.algo:Other"), 7, tmp_path / "m")  # type: ignore[arg-type]
