"""Brain-tumour sites differ like hospitals: case mix (tumour sizes) and FLAIR lesion contrast, per site."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from laulima.imaging import TUMOUR_PROFILES, ScannerProfile, make_phantom, site_profile, site_tumour_profile
from laulima.imaging.tumour import OEDEMA, TYPICAL, TumourProfile
from tests.imaging.helpers import SHAPE, SPACING_MM

IDEAL = ScannerProfile("ideal")
# Site indices, found from the profiles rather than assumed.
SMALL = max(range(3), key=lambda i: TUMOUR_PROFILES[i].small_fraction)
LARGE = min(range(3), key=lambda i: TUMOUR_PROFILES[i].small_fraction)
WEAK_FLAIR = min(range(3), key=lambda i: TUMOUR_PROFILES[i].flair_contrast)


def tumour(site: int, index: int, *, split: int = 0, scanner: ScannerProfile | None = None, **kwargs):
    return make_phantom(
        "brain-tumour", scanner or site_profile(site, 3), seed=3, site_index=site, split=split, index=index,
        spacing_mm=SPACING_MM, shape=SHAPE, **kwargs,
    )  # fmt: skip


def flair_contrast(phantom) -> float:
    """Mean FLAIR in the oedema over the mean in the brain just around the lesion (scanner gain cancels)."""
    flair, lesion = phantom.image[0], phantom.label > 0
    around = ndimage.binary_dilation(lesion, iterations=2) & ~lesion & (phantom.image[1] > 0.3)
    return float(flair[phantom.label == OEDEMA].mean() / flair[around].mean())


def test_the_first_sites_have_distinct_case_mixes_and_one_weak_flair():
    assert TUMOUR_PROFILES[SMALL].small_fraction >= 0.75 and TUMOUR_PROFILES[LARGE].small_fraction <= 0.25
    mixed = ({0, 1, 2} - {SMALL, LARGE}).pop()
    assert 0.25 < TUMOUR_PROFILES[mixed].small_fraction < 0.75
    assert sorted(p.flair_contrast for p in TUMOUR_PROFILES)[:2] == [TUMOUR_PROFILES[WEAK_FLAIR].flair_contrast, 1.0]
    assert TUMOUR_PROFILES[WEAK_FLAIR].flair_contrast <= 0.6


def test_the_small_tumour_site_has_smaller_tumours_than_the_large_tumour_site_in_both_splits():
    def volumes(site: int) -> list[int]:
        return [int((tumour(site, i, split=s, scanner=IDEAL).label > 0).sum()) for s in (0, 1) for i in range(4)]

    small, large = volumes(SMALL), volumes(LARGE)
    assert np.mean(small) < 0.6 * np.mean(large), (small, large)


def test_the_same_subject_with_weaker_flair_keeps_its_labels_and_other_contrasts():
    typical = tumour(0, 1, scanner=IDEAL, tumour_profile=TYPICAL)
    weak = tumour(0, 1, scanner=IDEAL, tumour_profile=dataclasses.replace(TYPICAL, flair_contrast=0.5))
    np.testing.assert_array_equal(typical.label, weak.label)
    np.testing.assert_array_equal(typical.image[1:], weak.image[1:])
    assert flair_contrast(weak) - 1 == pytest.approx(0.5 * (flair_contrast(typical) - 1), rel=0.2)
    outside = ndimage.binary_dilation(typical.label > 0, iterations=4) == 0  # (lesions are blurred by 0.5 voxel)
    np.testing.assert_allclose(typical.image[0][outside], weak.image[0][outside], atol=1e-6)


def test_the_weak_flair_site_shows_less_flair_lesion_contrast_through_its_own_scanner():
    contrast = {site: np.mean([flair_contrast(tumour(site, i)) for i in range(3)]) for site in range(3)}
    others = [c for site, c in contrast.items() if site != WEAK_FLAIR]
    assert contrast[WEAK_FLAIR] < min(others) - 0.15, contrast


def test_tumour_phantoms_and_profiles_are_deterministic():
    first, second = tumour(SMALL, 2, split=1), tumour(SMALL, 2, split=1)
    np.testing.assert_array_equal(first.image, second.image)
    np.testing.assert_array_equal(first.label, second.label)
    assert [site_tumour_profile(i, seed=1) for i in range(3)] == list(TUMOUR_PROFILES)
    fourth = site_tumour_profile(3, seed=1)
    assert fourth == site_tumour_profile(3, seed=1) and fourth != site_tumour_profile(3, seed=2)
    assert fourth.name == f"{TUMOUR_PROFILES[0].name}2"
    for i in range(3, 12):
        p = site_tumour_profile(i, seed=1)
        assert 0 <= p.small_fraction <= 1 and 0 < p.flair_contrast <= 1


def test_tumour_profiles_validate_their_parameters():
    with pytest.raises(ValueError, match="small_fraction, flair_contrast"):
        TumourProfile("bad", small_fraction=1.5, flair_contrast=0.0)
    with pytest.raises(ValueError, match="large_radius_mm"):
        TumourProfile("bad", large_radius_mm=(20.0, 10.0))


def test_dataset_json_records_the_case_mix(tumour_dataset: Path, tissue_dataset: Path):
    block = json.loads((tumour_dataset / "dataset.json").read_text())["laulima"]
    assert block["tumour_profile"] == json.loads(json.dumps(dataclasses.asdict(site_tumour_profile(1, 11))))
    assert TumourProfile(**{k: tuple(v) if isinstance(v, list) else v for k, v in block["tumour_profile"].items()})
    assert "tumour_profile" not in json.loads((tissue_dataset / "dataset.json").read_text())["laulima"]
