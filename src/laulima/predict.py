"""Segment one image with an exported model: ``model_dir`` + NIfTI or DICOM series in, label NIfTI out.

Reads the card and ``model.safetensors`` only (the TorchScript file is for other tools;
nothing here unpickles) and rebuilds the U-Net. A scan comes at its own voxel size and
orientation; the model answers sensibly only on the grid it was trained on, so the scan
is resampled to the card's preprocessing plan (spacing, orientation), normalised as
training did, segmented by sliding-window inference with the card's window and overlap,
and the class probabilities are resampled back onto the scan's own grid (linearly, then
the argmax: smoother borders than nearest-neighbour labels), so the label map overlays
the scan voxel for voxel.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from safetensors.numpy import load_file

from laulima.algorithms.segmentation.model import build_unet, load_numpy_weights, parse_params
from laulima.algorithms.segmentation.preprocessing import normalize
from laulima.errors import DataError
from laulima.export import CARD_FILE, WEIGHTS_FILE, read_card
from laulima.imaging import read_image, write_label_nifti
from laulima.imaging.resample import Grid, check_affine, resample_image

__all__ = ["load_exported", "predict", "predict_volume", "write_labels"]

_EXPORT_HINT = (
    "`laulima predict --model` needs a model folder (model.json card, model.safetensors, TorchScript), "
    "not bare weights: run `laulima experiment export N --output DIR` (N: the experiment's id) and pass "
    "--model DIR"
)


def load_exported(model_dir: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The U-Net (eval mode, CPU) and the card of the model exported to ``model_dir``."""
    model_dir = Path(model_dir)
    if model_dir.is_file():
        raise DataError(f"{model_dir}: a file; {_EXPORT_HINT}", file=str(model_dir))
    if model_dir.is_dir() and not (model_dir / CARD_FILE).exists() and any(model_dir.glob("*.safetensors")):
        raise DataError(f"{model_dir}: safetensors without a {CARD_FILE} card; {_EXPORT_HINT}", file=str(model_dir))
    card = read_card(model_dir)
    model = build_unet(parse_params(card["params"]))
    try:
        weights = load_file(str(model_dir / WEIGHTS_FILE))
    except Exception as exc:  # safetensors raises its own error types
        raise DataError(f"{model_dir / WEIGHTS_FILE}: cannot read the weights ({exc})", file=str(model_dir)) from exc
    load_numpy_weights(model, weights)
    return model.eval(), card


def predict_volume(model_dir: Path, image: np.ndarray, affine: np.ndarray, *, where: str = "image") -> np.ndarray:
    """Labels uint8 [X,Y,Z] of ``image`` (float [C,X,Y,Z] or [X,Y,Z]) on its own grid (``affine``: voxel -> RAS mm).

    The image is resampled to the model card's preprocessing plan, normalised, segmented,
    and the class probabilities resampled back to ``affine``'s grid before the argmax.
    ``where`` names the image in errors (a file name, a series folder).
    """
    model, card = load_exported(model_dir)
    return _segment(model, card, image, affine, where=where, model_dir=Path(model_dir))


def _segment(
    model: torch.nn.Module, card: dict[str, Any], image: np.ndarray, affine: np.ndarray, *, where: str, model_dir: Path
) -> np.ndarray:
    params = parse_params(card["params"])
    array = np.asarray(image)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or min(array.shape) < 1:
        raise DataError(f"{where}: an array of shape {list(np.shape(image))}, expected [channels, x, y, z]", file=where)
    if array.shape[0] != params.in_channels:
        raise DataError(
            f"{where}: has {array.shape[0]} channel(s); the model in {model_dir} expects "
            f"{params.in_channels} ({', '.join(card.get('channels', []))}); give an image with those "
            "channels, in that order",
            file=where,
        )
    if not np.all(np.isfinite(array)):
        raise DataError(f"{where}: holds NaN or infinite intensities; fix or re-export the image", file=where)
    affine = check_affine(affine, where=where)
    plan = params.preprocessing
    grid = plan.grid(affine, array.shape)
    resampled = resample_image(array.astype(np.float32, copy=False), affine, grid)
    with torch.no_grad():
        x = normalize(resampled, plan)[None]
        logits = sliding_window_inference(x, params.roi_size, 1, model, overlap=params.sw_overlap)
        probabilities = torch.softmax(torch.as_tensor(logits), dim=1)[0].numpy()
    own = Grid(affine, (int(array.shape[1]), int(array.shape[2]), int(array.shape[3])))
    back = resample_image(probabilities, grid.affine, own, antialias=False)
    return back.argmax(axis=0).astype(np.uint8)


def predict(model_dir: Path, input_path: Path, output: Path) -> Path:
    """Write the label map of ``input_path`` to ``output`` (a folder gets ``<input>_seg.nii.gz``); return its path.

    The label map has the input's own grid and affine (see :func:`predict_volume`). An exported
    nnU-Net model (:mod:`laulima.nnunet.export`) is run by nnU-Net's own predictor instead.
    """
    from laulima.nnunet.predict import is_nnunet_model, segment_nnunet  # (light: nnunetv2 loads only to predict)

    if is_nnunet_model(Path(model_dir)):
        label, affine = segment_nnunet(Path(model_dir), Path(input_path))
    else:
        model, card = load_exported(model_dir)  # a bad model folder is reported before the image is read
        image, affine = read_image(Path(input_path))
        label = _segment(model, card, image, affine, where=str(input_path), model_dir=Path(model_dir))
    return write_labels(output, Path(input_path), label, affine)


def write_labels(output: Path, input_path: Path, label: np.ndarray, affine: np.ndarray) -> Path:
    """Write ``label`` to ``output`` (a folder gets ``<input>_seg.nii.gz``); return the file's path."""
    output = Path(output)
    if output.is_dir():
        output = output / f"{_stem(input_path)}_seg.nii.gz"
    output.parent.mkdir(parents=True, exist_ok=True)
    write_label_nifti(output, label, affine)
    return output


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name
