"""One phantom's anatomy: the atlas deformed, and intensities synthesised so they determine its labels.

The MNI tissue maps are population priors: a coarse voxel's template intensity is the
prior-weighted mix of tissue intensities, so across GM/WM/CSF mixtures the label (argmax of
the priors) is only loosely determined by the intensity. Phantom intensities are therefore
synthesised from the labels, keeping the template's texture:

    image = sum_k mean_k * f_k  +  gain * (template - sum_k template_mean_k * p_k)

``p`` are the warped tissue probabilities, ``f`` the same maps sharpened with a softmax
temperature of 0.4 (the argmax — the label — is unchanged; ``f`` is nearly one-hot inside
a tissue and mixed within about a voxel of a boundary, which is the partial-volume blur of
a real acquisition), and the second term is the part of the warped template that the
tissue priors do not explain (its own texture), amplified 1.5 times and scaled by the
channel's GM/WM contrast relative to the T1 template's. So a T1 phantom is the warped
template with its prior blur replaced by label-driven partial volume and its texture kept.
Temperature and gain were chosen by eye and with a voxel classifier (3x3x3 neighbourhood,
five training phantoms, 4 mm): GM/WM Dice 0.985/0.980 noise-free and 0.957/0.931 with
Rician noise 0.04, against 0.966/0.950 and 0.930/0.890 for the bare warped template;
a temperature of 0.25 reads slightly higher but looks like a cartoon.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from laulima.imaging.atlas import GREY_MATTER, WHITE_MATTER, Atlas
from laulima.imaging.deform import random_deformation, warp

__all__ = ["SHARPEN_TEMPERATURE", "TEXTURE_GAIN", "Anatomy", "deformed_anatomy", "synthesise", "texture_gain"]

SHARPEN_TEMPERATURE = 0.4
TEXTURE_GAIN = 1.5


@dataclass(frozen=True, eq=False)
class Anatomy:
    probabilities: np.ndarray  # float32 [4,X,Y,Z] warped tissue probabilities
    fractions: np.ndarray  # float32 [4,X,Y,Z] sharpened: partial-volume fractions per tissue
    texture: np.ndarray  # float32 [X,Y,Z] template intensity the priors do not explain
    labels: np.ndarray  # uint8 [X,Y,Z] tissue labels (argmax of probabilities)
    template_means: np.ndarray  # float32 [4] the atlas's pure-tissue template intensities


def _sharpen(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    logits = np.log(np.clip(probabilities, 1e-6, 1.0)) / temperature
    logits -= logits.max(axis=0, keepdims=True)
    weights = np.exp(logits)
    return (weights / weights.sum(axis=0, keepdims=True)).astype(np.float32)


def deformed_anatomy(atlas: Atlas, rng: np.random.Generator) -> Anatomy:
    """A new anatomy: one random deformation applied to the tissue maps and the template."""
    coords = random_deformation(rng, atlas.shape, atlas.spacing_mm)
    probabilities = np.stack([warp(atlas.probabilities[k], coords, cval=1.0 if k == 0 else 0.0) for k in range(4)])
    template = warp(atlas.template, coords)
    means = np.asarray(atlas.tissue_means, dtype=np.float32)
    texture = template - np.tensordot(means, probabilities, axes=1)
    labels = probabilities.argmax(axis=0).astype(np.uint8)
    fractions = _sharpen(probabilities, SHARPEN_TEMPERATURE)
    return Anatomy(probabilities, fractions, texture.astype(np.float32), labels, means)


def texture_gain(anatomy: Anatomy, tissue_means: np.ndarray) -> float:
    """How strongly a contrast shows the template's texture: its WM-GM difference relative to the template's."""
    template = anatomy.template_means
    contrast = (tissue_means[WHITE_MATTER] - tissue_means[GREY_MATTER]) / (
        template[WHITE_MATTER] - template[GREY_MATTER]
    )
    return TEXTURE_GAIN * float(contrast)


def synthesise(anatomy: Anatomy, tissue_means: np.ndarray, *, weight: np.ndarray | None = None) -> np.ndarray:
    """The ideal (scanner-free) intensity of one contrast; ``weight`` scales the tissue part (room for lesions)."""
    means = np.asarray(tissue_means, dtype=np.float32)
    image = np.tensordot(means, anatomy.fractions, axes=1) + texture_gain(anatomy, means) * anatomy.texture
    if weight is not None:
        image = image * weight
    return image.astype(np.float32)
