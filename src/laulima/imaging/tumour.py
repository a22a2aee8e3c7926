"""A synthetic brain tumour per phantom, in the Decathlon Task01 label convention and channel order.

A tumour grows around a random white-matter point far enough from the brain's edge: an
irregular distance field (radial distance scaled by smoothed noise) gives a necrotic /
non-enhancing core, an enhancing rim (grown by at least one voxel around the core, so it
always encloses it) and surrounding oedema confined to grey and white matter. Each of the
four contrasts (FLAIR, T1w, T1gd, T2w) maps tissues and tumour compartments to typical
relative intensities: oedema bright on FLAIR and T2w, the rim bright on T1gd, the core dark
on T1 and bright on T2. Tumour compartments enter the image as slightly blurred fractions
(partial volume) with a little smooth heterogeneity.

Hospitals differ in whom they see and how their protocols show lesions, not only in their
scanners: a :class:`TumourProfile` per site sets the case mix (the share of small tumours;
a referral centre sees larger ones than a screening programme) and how strongly FLAIR shows
the lesion (an older or differently tuned FLAIR sequence pulls lesion intensities toward
the tissue underneath). It acts on the lesion compartments, before the scanner, so it is
part of the tumour synthesis and not of :mod:`laulima.imaging.scanner`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from laulima.imaging.anatomy import Anatomy, synthesise

__all__ = ["CHANNELS", "LABELS", "TUMOUR_PROFILES", "TYPICAL", "TumourProfile", "site_tumour_profile", "tumour_image"]

CHANNELS: tuple[str, ...] = ("FLAIR", "T1w", "t1gd", "T2w")  # Decathlon Task01 spelling
LABELS: dict[int, str] = {0: "background", 1: "edema", 2: "non-enhancing tumor", 3: "enhancing tumour"}
OEDEMA, CORE, ENHANCING = 1, 2, 3

# Relative intensities per channel: background, CSF, GM, WM | oedema, core, enhancing rim.
_TISSUE = np.array(
    [
        [0.0, 0.08, 0.55, 0.42],  # FLAIR: CSF suppressed, GM brighter than WM
        [0.0, 0.25, 0.55, 0.80],  # T1w
        [0.0, 0.25, 0.57, 0.80],  # T1gd
        [0.0, 1.00, 0.60, 0.40],  # T2w: CSF bright
    ],
    dtype=np.float32,
)
_LESION = np.array(
    [
        [0.95, 0.55, 0.70],  # FLAIR: oedema brightest
        [0.45, 0.28, 0.45],  # T1w: lesion hypointense
        [0.45, 0.25, 1.00],  # T1gd: the rim enhances
        [0.85, 0.75, 0.55],  # T2w
    ],
    dtype=np.float32,
)


@dataclass(frozen=True)
class TumourProfile:
    """One site's case mix and lesion appearance; the defaults are a typical mixed population."""

    name: str
    small_fraction: float = 0.5
    """Share of tumours drawn from ``small_radius_mm``; the rest come from ``large_radius_mm``."""
    small_radius_mm: tuple[float, float] = (10.0, 16.0)
    """Uniform range of a small tumour's radius (the core and rim; oedema reaches 1.3-1.9 times further)."""
    large_radius_mm: tuple[float, float] = (16.0, 24.0)
    flair_contrast: float = 1.0
    """1: lesions as bright on FLAIR as typical; c < 1: lesion intensity = tissue + c * (lesion - tissue)."""

    def __post_init__(self) -> None:
        checks = {
            "small_fraction": 0.0 <= self.small_fraction <= 1.0,
            "small_radius_mm": 0.0 < self.small_radius_mm[0] <= self.small_radius_mm[1],
            "large_radius_mm": 0.0 < self.large_radius_mm[0] <= self.large_radius_mm[1],
            "flair_contrast": 0.0 < self.flair_contrast <= 1.0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"tumour profile {self.name!r}: invalid {', '.join(bad)} ({self})")

    def draw_radius_mm(self, rng: np.random.Generator) -> float:
        """A tumour radius from this site's case mix (two draws from ``rng``, whatever the profile)."""
        small = rng.random() < self.small_fraction
        low, high = self.small_radius_mm if small else self.large_radius_mm
        return float(rng.uniform(low, high))


TYPICAL = TumourProfile("typical")
TUMOUR_PROFILES: tuple[TumourProfile, ...] = (
    TumourProfile("small", small_fraction=0.85),  # mostly small tumours: a screening-heavy hospital
    TumourProfile("large", small_fraction=0.15),  # mostly large tumours: a referral centre
    TumourProfile("mixed-weak-flair", flair_contrast=0.5),  # a general hospital with an older FLAIR protocol
)
"""Per site, in site order (cycling); sites 0-2 meet the demo's scanner profiles A, B, C."""


def site_tumour_profile(site_index: int, seed: int) -> TumourProfile:
    """The case mix of a site: the defaults for the first sites, then seeded variations (as ``site_profile``)."""
    base = TUMOUR_PROFILES[site_index % len(TUMOUR_PROFILES)]
    cycle = site_index // len(TUMOUR_PROFILES)
    if cycle == 0:
        return base
    rng = np.random.default_rng([seed, site_index, 0x7E0])
    return dataclasses.replace(
        base,
        name=f"{base.name}{cycle + 1}",
        small_fraction=float(np.clip(base.small_fraction + rng.uniform(-0.15, 0.15), 0.0, 1.0)),
        flair_contrast=float(np.clip(base.flair_contrast * rng.uniform(0.8, 1.1), 0.2, 1.0)),
    )


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return field / max(float(field.std()), 1e-6)


def _tumour_labels(anatomy: Anatomy, spacing_mm: float, rng: np.random.Generator, profile: TumourProfile) -> np.ndarray:
    shape = anatomy.labels.shape
    brain = anatomy.labels > 0
    depth_mm = ndimage.distance_transform_edt(brain) * spacing_mm
    radius_mm = profile.draw_radius_mm(rng)
    white = anatomy.labels == 3
    # The irregular field reaches at most 4/3 of the radius; one more voxel keeps the rim inside the brain.
    while True:
        candidates = np.argwhere(white & (depth_mm >= radius_mm * 4 / 3 + spacing_mm))
        if len(candidates) or radius_mm < 2 * spacing_mm:
            break
        radius_mm *= 0.8
    if not len(candidates):
        candidates = np.argwhere(depth_mm == depth_mm.max())
    centre = candidates[rng.integers(len(candidates))]

    offsets = (np.indices(shape, dtype=np.float32) - centre.reshape(3, 1, 1, 1)) * spacing_mm
    radial = np.sqrt((offsets**2).sum(axis=0))
    shape_noise = np.clip(1.0 + 0.25 * _smooth_noise(rng, shape, 2.0), 0.75, 1.25)
    tumour = radial * shape_noise / radius_mm
    core = tumour < rng.uniform(0.55, 0.8)
    core[tuple(centre)] = True
    rim = ((tumour < 1.0) | ndimage.binary_dilation(core)) & ~core & brain
    oedema_noise = np.clip(1.0 + 0.3 * _smooth_noise(rng, shape, 2.0), 0.7, 1.3)
    oedema_reach = radial * oedema_noise / (radius_mm * rng.uniform(1.3, 1.9))
    tissue = anatomy.labels >= 2
    lesion, _ = ndimage.label(((oedema_reach < 1.0) & tissue) | core | rim)
    oedema = (lesion == lesion[tuple(centre)]) & ~core & ~rim  # one connected lesion, no satellites

    labels = np.zeros(shape, dtype=np.uint8)
    labels[oedema] = OEDEMA
    labels[rim] = ENHANCING
    labels[core] = CORE
    return labels


def tumour_image(
    anatomy: Anatomy, spacing_mm: float, rng: np.random.Generator, profile: TumourProfile = TYPICAL
) -> tuple[np.ndarray, np.ndarray]:
    """The ideal four-channel image [4,X,Y,Z] and the tumour labels [X,Y,Z] of one phantom of ``profile``'s site."""
    labels = _tumour_labels(anatomy, spacing_mm, rng, profile)
    lesion = np.stack(
        [ndimage.gaussian_filter((labels == k).astype(np.float32), 0.5) for k in (OEDEMA, CORE, ENHANCING)]
    )
    healthy = np.clip(1.0 - lesion.sum(axis=0), 0.0, 1.0)
    heterogeneity = 1.0 + 0.08 * _smooth_noise(rng, labels.shape, 1.5)
    contrast = {name: 1.0 for name in CHANNELS} | {"FLAIR": profile.flair_contrast}
    channels = []
    for name, tissue_means, lesion_means in zip(CHANNELS, _TISSUE, _LESION, strict=True):
        tissue_part = synthesise(anatomy, tissue_means, weight=healthy)
        lesion_part = _lesion_intensity(anatomy, tissue_means, lesion_means, lesion, contrast[name]) * heterogeneity
        channels.append(tissue_part + lesion_part)
    return np.stack(channels).astype(np.float32), labels


def _lesion_intensity(
    anatomy: Anatomy, tissue_means: np.ndarray, lesion_means: np.ndarray, lesion: np.ndarray, contrast: float
) -> np.ndarray:
    """The lesion compartments' share of one contrast, each pulled toward the tissue beneath by ``1 - contrast``."""
    typical = np.tensordot(lesion_means, lesion, axes=1)
    if contrast == 1.0:
        return typical
    beneath = synthesise(anatomy, tissue_means)  # what the voxel would show without the lesion
    return contrast * typical + (1.0 - contrast) * beneath * lesion.sum(axis=0)
