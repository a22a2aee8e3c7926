"""Phantoms: deterministic from their seed, anatomically plausible, and marked by their site's scanner."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy import ndimage

from laulima.errors import ConfigurationError
from laulima.imaging import SCANNER_PROFILES, make_phantom
from laulima.imaging.scanner import ScannerProfile, apply_scanner, default_cohort, site_profile
from laulima.imaging.tumour import CORE, ENHANCING, OEDEMA
from tests.imaging.helpers import SHAPE, SPACING_MM

SITE_A, SITE_B, SITE_C = SCANNER_PROFILES


def phantom(task: str = "brain-tissue", profile: ScannerProfile = SITE_A, *, seed: int = 5, index: int = 0, site=0):
    return make_phantom(
        task, profile, seed=seed, site_index=site, split=0, index=index, spacing_mm=SPACING_MM, shape=SHAPE
    )


@pytest.mark.parametrize("task", ["brain-tissue", "brain-tumour"])
def test_same_seed_gives_identical_phantoms(task):
    first, second = phantom(task, SITE_B), phantom(task, SITE_B)
    np.testing.assert_array_equal(first.image, second.image)
    np.testing.assert_array_equal(first.label, second.label)
    assert not np.array_equal(first.label, phantom(task, SITE_B, index=1).label)
    assert not np.array_equal(first.label, phantom(task, SITE_B, seed=6).label)


def test_same_subject_under_another_scanner_keeps_its_anatomy_but_not_its_image():
    a, b, c = (phantom(profile=p) for p in SCANNER_PROFILES)
    np.testing.assert_array_equal(a.label, b.label)
    np.testing.assert_array_equal(a.label, c.label)
    assert not np.allclose(a.image, b.image, atol=0.02)
    assert not np.allclose(a.image, c.image, atol=0.02)


def test_site_profiles_leave_their_marks():
    a, b, c = (phantom(profile=p) for p in SCANNER_PROFILES)
    outside = a.label == 0
    # Rician noise: site B's background is far noisier than site A's.
    assert b.image[0][outside].mean() > 4 * a.image[0][outside].mean()
    # Thick slices: site C's scanner smooths along z, much less in-plane.
    thick = dataclasses.replace(SITE_C, noise_sigma=0.0)
    thick_image, thin_image = (phantom(profile=p).image[0] for p in (thick, dataclasses.replace(thick, slice_factor=1)))
    brain = a.label > 0

    def step(image, axis):
        return np.abs(np.diff(image, axis=axis))[np.take(brain, range(1, brain.shape[axis]), axis=axis)].mean()

    through_plane, in_plane = (step(thick_image, axis) / step(thin_image, axis) for axis in (2, 0))
    assert through_plane < 0.75 and through_plane < 0.9 * in_plane
    # Strong gamma darkens the mid-grey tissue relative to white matter.
    ratio = [p.image[0][p.label == 2].mean() / p.image[0][p.label == 3].mean() for p in (a, c)]
    assert ratio[1] < ratio[0] - 0.05


def test_tissue_labels_are_plausible():
    """Fractions are of the brain (labels 1..3); the ranges follow from the MNI152 priors, not from physiology.

    The MNI152 mask (template > 0.2, nilearn's definition) holds about 1.85 L: MNI space is
    larger than an average head and the mask includes intracranial CSF. Per-axis scaling of
    +-10 % gives 0.73-1.33 times that. The GM prior is broad, so argmax labelling yields about
    two thirds grey matter, a third white matter, and CSF only where it dominates (ventricles).
    """
    voxel_ml = SPACING_MM**3 / 1000
    for index in range(4):
        p = phantom(index=index)
        counts = np.bincount(p.label.ravel(), minlength=4)
        assert set(np.unique(p.label)) == {0, 1, 2, 3}
        brain = counts[1:].sum()
        assert 1200 < brain * voxel_ml < 2600
        csf, grey, white = counts[1:] / brain
        assert 0.004 < csf < 0.08 and 0.55 < grey < 0.75 and 0.25 < white < 0.42
        # Background is the largest connected component outside, and the brain is one piece.
        _, n_parts = ndimage.label(p.label > 0)
        assert n_parts <= 2


def test_phantom_geometry_matches_the_atlas_grid():
    p = phantom()
    assert p.image.shape == (1, *SHAPE) and p.image.dtype == np.float32
    assert p.label.shape == SHAPE and p.label.dtype == np.uint8
    np.testing.assert_allclose(np.linalg.norm(p.affine[:3, :3], axis=0), [SPACING_MM] * 3)
    assert np.isfinite(p.image).all() and p.image.min() >= 0


def test_image_intensities_follow_the_labels():
    p = phantom()
    means = [p.image[0][p.label == k].mean() for k in range(4)]
    assert means[0] < means[1] < means[2] < means[3]  # T1: background < CSF < GM < WM


def test_tumour_labels_use_the_decathlon_classes_and_the_rim_encloses_the_core():
    for index in range(3):
        p = phantom("brain-tumour", index=index)
        assert p.image.shape == (4, *SHAPE)
        assert set(np.unique(p.label)) == {0, OEDEMA, CORE, ENHANCING}
        core = p.label == CORE
        neighbours = ndimage.binary_dilation(core) & ~core
        assert set(np.unique(p.label[neighbours])) == {ENHANCING}, "the core touches something other than the rim"
        lesion = p.label > 0
        _, n_parts = ndimage.label(lesion)
        assert n_parts == 1


def test_tumour_contrasts_are_plausible():
    p = phantom("brain-tumour", SITE_A, index=2)
    flair, t1, t1gd, t2 = p.image
    healthy = (p.label == 0) & (t1 > 0.3)  # brain outside the lesion
    assert t1gd[p.label == ENHANCING].mean() > t1gd[healthy].mean() + 0.1  # the rim enhances
    assert t1gd[p.label == ENHANCING].mean() > t1[p.label == ENHANCING].mean() + 0.2
    assert flair[p.label == OEDEMA].mean() > flair[healthy].mean() + 0.2  # oedema bright on FLAIR
    assert t2[p.label == OEDEMA].mean() > t2[healthy].mean() + 0.1  # and on T2
    assert t1[p.label == CORE].mean() < t1[healthy].mean() - 0.2  # the core dark on T1


def test_apply_scanner_pieces():
    rng = np.random.default_rng(0)
    image = rng.uniform(0.2, 0.8, (1, 16, 16, 16)).astype(np.float32)
    gamma = apply_scanner(image, ScannerProfile("g", gamma=2.0), 4.0, rng)
    np.testing.assert_allclose(gamma, image**2, rtol=1e-6)
    biased = apply_scanner(image, ScannerProfile("b", bias_strength=0.3), 4.0, rng) / image
    assert np.exp(-0.3) - 1e-4 <= biased.min() and biased.max() <= np.exp(0.3) + 1e-4 and biased.std() > 0.02
    zeros = np.zeros((1, 32, 32, 32), np.float32)
    noise = apply_scanner(zeros, ScannerProfile("n", noise_sigma=0.1), 4.0, rng)
    assert noise.mean() == pytest.approx(0.1 * np.sqrt(np.pi / 2), rel=0.05)  # Rayleigh in the background
    thick = apply_scanner(image, ScannerProfile("t", slice_factor=3.0), 4.0, rng)
    assert thick.shape == image.shape
    assert np.abs(np.diff(thick, axis=3)).mean() < 0.3 * np.abs(np.diff(image, axis=3)).mean()
    assert thick.mean() == pytest.approx(image.mean(), abs=0.01)


def test_scanner_profiles_validate_their_parameters():
    with pytest.raises(ValueError, match="slice_factor"):
        ScannerProfile("bad", slice_factor=0.5)
    with pytest.raises(ValueError, match="gamma, noise_sigma"):
        ScannerProfile("bad", gamma=0, noise_sigma=-1)


def test_more_sites_than_profiles_cycle_with_seeded_variations():
    assert [site_profile(i, seed=1) for i in range(3)] == list(SCANNER_PROFILES)
    fourth = site_profile(3, seed=1)
    assert fourth.name == "A2" and fourth == site_profile(3, seed=1)
    assert fourth != site_profile(3, seed=2)
    assert dataclasses.replace(fourth, name="A") != SITE_A
    assert site_profile(5, seed=1).slice_factor >= 1.0
    assert [default_cohort(i) for i in range(5)] == [6, 12, 24, 6, 12]


def test_unknown_task_is_refused():
    with pytest.raises(ConfigurationError, match="brain-tissue"):
        phantom("brain-teaser")
