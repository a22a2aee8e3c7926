"""``laulima predict`` for an exported nnU-Net model: the label map nnU-Net's own prediction gives.

The model folder is the one :func:`laulima.nnunet.export.export_nnunet` writes (nnU-Net's
results layout). Its plan and dataset.json are read as JSON and checked like an experiment's
``[config]``; the weights come from ``model.safetensors`` (nothing is unpickled; a folder with
only nnU-Net's ``checkpoint_final.pth`` is read with ``torch.load(weights_only=True)``).

The input NIfTI (4D: channels last, or 3D for one channel) is written as one 3D NIfTI per
channel, as the site's raw view writes its cases, and segmented by ``nnUNetPredictor`` from
those files with nnU-Net's defaults (step 0.5, Gaussian weighting, mirroring): its own reader,
preprocessing, sliding window and export. So the result is what ``nnUNetv2_predict`` gives
for the same per-channel files. The label map is then stored on the input's grid and affine.
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from laulima.errors import DataError
from laulima.nnunet.export import CHECKPOINT_FILE, FOLD, WEIGHTS_FILE
from laulima.nnunet.network import TRAINER_NAME, build_network, load_weights, managers
from laulima.nnunet.params import NnUNetParams, parse_params

__all__ = ["find_nnunet_model", "is_nnunet_model", "load_nnunet_model", "predict_nnunet", "segment_nnunet"]


def _is_model_folder(path: Path) -> bool:
    fold = path / FOLD
    return (
        (path / "plans.json").is_file()
        and (path / "dataset.json").is_file()
        and ((fold / WEIGHTS_FILE).is_file() or (fold / CHECKPOINT_FILE).is_file())
    )


def find_nnunet_model(path: Path) -> Path | None:
    """The nnU-Net trainer folder at ``path``: ``path`` itself, or the one trainer folder below it
    (``<trainer folder>``, ``<dataset>/<trainer folder>``); None when there is none."""
    path = Path(path)
    if not path.is_dir():
        return None
    if _is_model_folder(path):
        return path
    found = [p for p in (*path.glob(f"{TRAINER_NAME}__*"), *path.glob(f"*/{TRAINER_NAME}__*")) if _is_model_folder(p)]
    if len(found) > 1:
        names = ", ".join(str(p.relative_to(path)) for p in sorted(found))
        raise DataError(f"{path} holds several nnU-Net models ({names}); pass the one to use", file=str(path))
    return found[0] if found else None


def is_nnunet_model(path: Path) -> bool:
    """Whether ``path`` is (or holds exactly one) exported nnU-Net model folder."""
    try:
        return find_nnunet_model(path) is not None
    except DataError:
        return True  # several: predict_nnunet says which


def load_nnunet_model(model_dir: Path) -> tuple[Path, NnUNetParams, dict[str, Any]]:
    """(trainer folder, checked params, weights by name) of the model at ``model_dir``."""
    folder = find_nnunet_model(model_dir)
    if folder is None:
        raise DataError(
            f"{model_dir}: no nnU-Net model folder (plans.json, dataset.json, {FOLD}/{WEIGHTS_FILE}); pass the "
            "folder `laulima experiment export` wrote",
            file=str(model_dir),
        )
    documents = {name: _read_json(folder / name) for name in ("plans.json", "dataset.json")}
    weights_file = folder / FOLD / WEIGHTS_FILE
    if weights_file.is_file():
        configuration, weights = _read_safetensors(weights_file, folder)
    else:
        configuration, weights = _read_checkpoint(folder / FOLD / CHECKPOINT_FILE, folder)
    params = parse_params(
        {"plans": documents["plans.json"], "dataset_json": documents["dataset.json"], "configuration": configuration}
    )
    return folder, params, weights


def predict_nnunet(model_dir: Path, input_path: Path, output: Path) -> Path:
    """Write the label map of ``input_path`` to ``output`` (a folder gets ``<input>_seg.nii.gz``); return its path."""
    from laulima.predict import write_labels

    label, affine = segment_nnunet(model_dir, input_path)
    return write_labels(output, Path(input_path), label, affine)


def segment_nnunet(model_dir: Path, input_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The label map of ``input_path`` (on its own grid) and the input's affine."""
    import torch

    from laulima.imaging import read_image, write_nifti
    from laulima.imaging.nifti import is_nifti_name, read_label_array

    folder, params, weights = load_nnunet_model(model_dir)  # a bad model folder is reported before the image is read
    input_path = Path(input_path)
    if not is_nifti_name(input_path) or input_path.is_dir():
        raise DataError(
            f"{input_path}: nnU-Net models take a NIfTI file (4D with channels last, or 3D for one channel); "
            "convert DICOM series to NIfTI first",
            file=str(input_path),
        )
    image, affine = read_image(input_path)
    channels = list(params.dataset_json["channel_names"].values())
    if image.shape[0] != params.n_channels:
        raise DataError(
            f"{input_path}: has {image.shape[0]} channel(s); the nnU-Net model in {folder} expects "
            f"{params.n_channels} ({', '.join(channels)}); give an image with those channels, in that order",
            file=str(input_path),
        )
    if not np.all(np.isfinite(image)):
        raise DataError(
            f"{input_path}: holds NaN or infinite intensities; fix or re-export the image", file=str(input_path)
        )
    network = build_network(params, deep_supervision=False)
    load_weights(network, weights)
    ending = params.dataset_json["file_ending"]
    with tempfile.TemporaryDirectory(prefix="laulima-nnunet-predict-") as tmp:
        inputs, outputs = Path(tmp) / "input", Path(tmp) / "output"
        inputs.mkdir()
        outputs.mkdir()
        files = [inputs / f"case_{c:04d}{ending}" for c in range(params.n_channels)]
        for channel, path in enumerate(files):
            write_nifti(path, image[channel], affine)
        with contextlib.redirect_stdout(io.StringIO()):  # (nnU-Net narrates each case)
            predictor = _predictor(params, network, torch.device("cpu"))
            predictor.predict_from_files_sequential([[str(f) for f in files]], [str(outputs / "case")])
        label, _ = read_label_array(outputs / f"case{ending}")
    if label.shape != image.shape[1:]:
        raise DataError(
            f"{input_path}: nnU-Net's label map has shape {label.shape}, the image {image.shape[1:]}",
            file=str(input_path),
        )
    return label, affine


def _predictor(params: NnUNetParams, network: Any, device: Any) -> Any:
    """``nnUNetPredictor`` with nnU-Net's defaults, holding ``network`` and its weights."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    plans_manager, configuration = managers(params)
    predictor = nnUNetPredictor(
        tile_step_size=0.5,
        use_gaussian=True,
        use_mirroring=True,
        perform_everything_on_device=False,
        device=device,
        verbose=False,
        verbose_preprocessing=False,
        allow_tqdm=False,
    )
    predictor.manual_initialization(
        network,
        plans_manager,
        configuration,
        [network.state_dict()],
        params.dataset_json,
        TRAINER_NAME,
        params.mirror_axes,
    )
    return predictor


def _read_json(path: Path) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot read it as JSON ({exc}); re-export the model", file=str(path)) from exc
    if not isinstance(document, dict):
        raise DataError(f"{path}: must hold a JSON object; re-export the model", file=str(path))
    return document


def _configuration_from_name(folder: Path) -> str:
    """nnU-Net's folder name ``<trainer>__<plans>__<configuration>`` names the configuration."""
    parts = folder.name.split("__")
    if len(parts) != 3 or parts[0] != TRAINER_NAME:
        raise DataError(
            f"{folder}: not named {TRAINER_NAME}__<plans>__<configuration> and its weights name no configuration",
            file=str(folder),
        )
    return parts[2]


def _read_safetensors(path: Path, folder: Path) -> tuple[str, dict[str, Any]]:
    from safetensors import safe_open
    from safetensors.numpy import load_file

    try:
        with safe_open(str(path), framework="np") as fh:
            metadata = fh.metadata() or {}
        weights = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise DataError(f"{path}: cannot read the weights ({exc}); re-export the model", file=str(path)) from exc
    configuration = metadata.get("configuration") or _configuration_from_name(folder)
    return configuration, dict(weights)


def _read_checkpoint(path: Path, folder: Path) -> tuple[str, dict[str, Any]]:
    """nnU-Net's own checkpoint, read without unpickling arbitrary objects (``weights_only=True``)."""
    import torch

    try:
        checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
        weights = dict(checkpoint["network_weights"])
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, ... for files it refuses
        raise DataError(
            f"{path}: cannot read it as a plain nnU-Net checkpoint ({exc}); export the model with Laulima",
            file=str(path),
        ) from exc
    init_args = checkpoint.get("init_args") if isinstance(checkpoint, dict) else None
    configuration = init_args.get("configuration") if isinstance(init_args, dict) else None
    return configuration if isinstance(configuration, str) else _configuration_from_name(folder), weights
