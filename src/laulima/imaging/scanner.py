"""Per-site scanner effects, so that sites differ the way real hospitals' scanners do.

Applied in acquisition order to an ideal image [C,X,Y,Z] (intensities about 0..1):
contrast gamma (sequence and windowing), a smooth multiplicative bias field (coil
sensitivity, one field for all channels of a phantom), blur (a Gaussian point-spread
function), thick slices (a Gaussian slice profile along z, every ``slice_factor``-th plane
kept, then linear upsampling back to the grid, as a reformatted 2D acquisition looks), and
last Rician noise (the magnitude of complex Gaussian noise, so the background is Rayleigh).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = ["DEFAULT_COHORTS", "SCANNER_PROFILES", "ScannerProfile", "apply_scanner", "default_cohort", "site_profile"]

_FWHM_TO_SIGMA = 1.0 / (2.0 * np.sqrt(2.0 * np.log(2.0)))


@dataclass(frozen=True)
class ScannerProfile:
    """What one site's scanner does to an image; the defaults are an ideal scanner."""

    name: str
    gamma: float = 1.0  # intensity -> intensity ** gamma
    bias_strength: float = 0.0  # field = exp(strength * smooth field in [-1, 1])
    noise_sigma: float = 0.0  # Rician noise, in units of the 0..1 intensity scale
    blur_sigma_mm: float = 0.0  # Gaussian point-spread function
    slice_factor: float = 1.0  # slice thickness / voxel spacing along z (>= 1)

    def __post_init__(self) -> None:
        checks = {
            "gamma": self.gamma > 0,
            "bias_strength": self.bias_strength >= 0,
            "noise_sigma": self.noise_sigma >= 0,
            "blur_sigma_mm": self.blur_sigma_mm >= 0,
            "slice_factor": self.slice_factor >= 1,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"scanner profile {self.name!r}: invalid {', '.join(bad)} ({self})")


SCANNER_PROFILES: tuple[ScannerProfile, ...] = (
    ScannerProfile("A", gamma=0.9, noise_sigma=0.005),
    ScannerProfile("B", bias_strength=0.3, noise_sigma=0.04),
    ScannerProfile("C", gamma=1.6, blur_sigma_mm=2.0, slice_factor=2.5, noise_sigma=0.01),
)
DEFAULT_COHORTS: tuple[int, ...] = (6, 12, 24)


def default_cohort(site_index: int) -> int:
    """Training subjects of a site when none is given: imbalanced on purpose, cycling 6 / 12 / 24."""
    return DEFAULT_COHORTS[site_index % len(DEFAULT_COHORTS)]


def site_profile(site_index: int, seed: int) -> ScannerProfile:
    """The profile of a site: the defaults for the first sites, then seeded variations of them."""
    base = SCANNER_PROFILES[site_index % len(SCANNER_PROFILES)]
    cycle = site_index // len(SCANNER_PROFILES)
    if cycle == 0:
        return base
    rng = np.random.default_rng([seed, site_index, 0x5CA])
    return dataclasses.replace(
        base,
        name=f"{base.name}{cycle + 1}",
        gamma=base.gamma * float(np.exp(rng.uniform(-0.2, 0.2))),
        bias_strength=max(0.0, base.bias_strength + float(rng.uniform(-0.1, 0.15))),
        noise_sigma=base.noise_sigma * float(rng.uniform(0.6, 1.5)),
        blur_sigma_mm=base.blur_sigma_mm + float(rng.uniform(0.0, 1.0)),
        slice_factor=max(1.0, base.slice_factor + float(rng.uniform(-0.5, 0.5))),
    )


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], control_points: int = 4) -> np.ndarray:
    coarse = rng.uniform(-1.0, 1.0, (control_points,) * 3)
    field = ndimage.zoom(coarse, [s / control_points for s in shape], order=3, mode="nearest")
    return np.clip(field, -1.0, 1.0).astype(np.float32)


def _thick_slices(image: np.ndarray, factor: float) -> np.ndarray:
    """Acquire slices ``factor`` voxels thick along the last axis, then interpolate back to the grid."""
    n = image.shape[-1]
    profile = ndimage.gaussian_filter1d(image, factor * _FWHM_TO_SIGMA, axis=-1, mode="nearest")
    centres = np.arange(0.0, n - 1 + 1e-6, factor)
    lower = np.floor(centres).astype(int)
    upper = np.minimum(lower + 1, n - 1)
    frac = (centres - lower).astype(np.float32)
    acquired = profile[..., lower] * (1 - frac) + profile[..., upper] * frac
    position = np.arange(n) / factor  # where each grid plane falls between acquired slices
    below = np.minimum(np.floor(position).astype(int), len(centres) - 1)
    above = np.minimum(below + 1, len(centres) - 1)
    weight = np.clip(position - below, 0.0, 1.0).astype(np.float32)
    return acquired[..., below] * (1 - weight) + acquired[..., above] * weight


def apply_scanner(
    image: np.ndarray, profile: ScannerProfile, spacing_mm: float, rng: np.random.Generator
) -> np.ndarray:
    """``image`` [C,X,Y,Z] as ``profile``'s scanner would record it (float32, non-negative)."""
    out = np.clip(image, 0.0, None).astype(np.float32)
    if profile.gamma != 1.0:
        out = out**profile.gamma
    if profile.bias_strength > 0:
        out = out * np.exp(profile.bias_strength * _smooth_field(rng, out.shape[1:]))[None]
    if profile.blur_sigma_mm > 0:
        sigma = profile.blur_sigma_mm / spacing_mm
        out = np.stack([ndimage.gaussian_filter(channel, sigma) for channel in out])
    if profile.slice_factor > 1:
        out = _thick_slices(out, profile.slice_factor)
    if profile.noise_sigma > 0:
        real = out + rng.normal(0.0, profile.noise_sigma, out.shape).astype(np.float32)
        imaginary = rng.normal(0.0, profile.noise_sigma, out.shape).astype(np.float32)
        out = np.sqrt(real * real + imaginary * imaginary)
    return out.astype(np.float32)
