"""What the demo shows of one test subject: every model's segmentation on one axial slice.

Only a simulation can do this — it reads a site's test phantom in the demo's own process —
so it is a picture for the report, never a score: every number in the comparison comes
from the sites. The subject is the first test phantom of the site with the fewest training
subjects, where a local-only model has the least to learn from; the slice is the one that
shows the most tumour (or foreground) in the ground truth.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from laulima.core.weights import Weights
from laulima.report import Overlay

__all__ = ["prediction_overlay"]


def prediction_overlay(
    datasets: Mapping[str, Path], models: Mapping[str, Weights], params: Mapping[str, Any]
) -> Overlay | None:
    """Each of ``models`` (name -> weights) on one test subject; None if no site has a labelled one."""
    from laulima.algorithms.segmentation import data
    from laulima.algorithms.segmentation.model import initial_model, load_numpy_weights, parse_params
    from laulima.imaging import load_dataset

    p = parse_params(params)
    loaded = {site: load_dataset(path) for site, path in datasets.items()}
    for site in sorted(loaded, key=lambda s: (len(loaded[s].training), s)):
        held_out = data.split_cases(loaded[site], p.val_fraction).held_out
        if held_out:
            break
    else:
        return None
    sample = data.load_samples(held_out[:1], p.in_channels, p.preprocessing)[0]
    truth = sample.label[0].numpy()
    z = int(np.argmax((truth > 0).sum(axis=(0, 1))))
    network = initial_model(p, 0).eval()
    predictions = {}
    with torch.no_grad():
        for name, weights in models.items():
            load_numpy_weights(network, weights)
            logits = torch.as_tensor(sliding_window_inference(sample.image[None], p.roi_size, 1, network))
            predictions[name] = _axial(logits.argmax(dim=1)[0].numpy(), z)
    channel = loaded[site].channels[0] if loaded[site].channels else "image"
    return Overlay(
        image=_axial(sample.image[0].numpy(), z),
        truth=_axial(truth, z),
        predictions=predictions,
        labels=dict(loaded[site].labels),
        caption=f"{site} (fewest training subjects), test subject {held_out[0].id}, axial slice {z}",
        image_name=str(channel),
    )


def _axial(volume: np.ndarray, z: int) -> np.ndarray:
    """Slice ``z`` of a RAS volume, turned so anterior is up and the patient's right is on the left."""
    return np.ascontiguousarray(np.rot90(volume[:, :, z]))
