"""Segment one image with an exported model: ``model_dir`` + NIfTI or DICOM series in, label NIfTI out.

Reads the card and ``model.safetensors`` only (the TorchScript file is for other tools;
nothing here unpickles), rebuilds the U-Net, normalises the image as training did and
runs sliding-window inference with the card's window and overlap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from monai.inferers import sliding_window_inference
from safetensors.numpy import load_file

from laulima.algorithms.segmentation.data import normalize
from laulima.algorithms.segmentation.model import build_unet, load_numpy_weights, parse_params
from laulima.errors import DataError
from laulima.export import WEIGHTS_FILE, read_card
from laulima.imaging import read_image, write_label_nifti

__all__ = ["load_exported", "predict"]


def load_exported(model_dir: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The U-Net (eval mode, CPU) and the card of the model exported to ``model_dir``."""
    model_dir = Path(model_dir)
    card = read_card(model_dir)
    model = build_unet(parse_params(card["params"]))
    try:
        weights = load_file(str(model_dir / WEIGHTS_FILE))
    except Exception as exc:  # safetensors raises its own error types
        raise DataError(f"{model_dir / WEIGHTS_FILE}: cannot read the weights ({exc})", file=str(model_dir)) from exc
    load_numpy_weights(model, weights)
    return model.eval(), card


def predict(model_dir: Path, input_path: Path, output: Path) -> Path:
    """Write the label map of ``input_path`` to ``output`` (a folder gets ``<input>_seg.nii.gz``); return its path."""
    model, card = load_exported(model_dir)
    params = parse_params(card["params"])
    image, affine = read_image(Path(input_path))
    if image.ndim != 4:
        raise DataError(
            f"{input_path}: read as an array of shape {list(image.shape)}, expected [channels, x, y, z]",
            file=str(input_path),
        )
    if image.shape[0] != params.in_channels:
        raise DataError(
            f"{input_path}: has {image.shape[0]} channel(s); the model in {model_dir} expects "
            f"{params.in_channels} ({', '.join(card.get('channels', []))}); give an image with those "
            "channels, in that order",
            file=str(input_path),
        )
    with torch.no_grad():
        logits = sliding_window_inference(normalize(image)[None], params.roi_size, 1, model, overlap=params.sw_overlap)
        label = torch.as_tensor(logits).argmax(dim=1)[0].to(torch.uint8).numpy()
    output = Path(output)
    if output.is_dir():
        output = output / f"{_stem(Path(input_path))}_seg.nii.gz"
    output.parent.mkdir(parents=True, exist_ok=True)
    write_label_nifti(output, label, affine)
    return output


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name
