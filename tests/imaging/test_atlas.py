"""The MNI152 atlas: grid geometry, probability maps, labels, and the per-process cache."""

from __future__ import annotations

import numpy as np
import pytest

from laulima.imaging.atlas import CSF, GREY_MATTER, WHITE_MATTER, load_atlas
from tests.imaging.helpers import SHAPE, SPACING_MM


def test_grid_has_the_requested_spacing_and_shape_and_is_centred_on_the_brain():
    atlas = load_atlas(SPACING_MM, SHAPE)
    assert atlas.shape == SHAPE
    np.testing.assert_allclose(np.diag(atlas.affine)[:3], [SPACING_MM] * 3)
    brain = np.argwhere(atlas.labels > 0)
    centre_vox = (brain.min(0) + brain.max(0)) / 2
    assert np.all(np.abs(centre_vox - (np.asarray(SHAPE) - 1) / 2) <= 1.5)  # centred within a voxel or so
    # The grid is MNI space: the anterior commissure (0, 0, 0) mm lies inside the brain.
    ac = np.round(np.linalg.solve(atlas.affine, [0, 0, 0, 1])[:3]).astype(int)
    assert atlas.labels[tuple(ac)] > 0


def test_probabilities_sum_to_one_and_labels_are_their_argmax():
    atlas = load_atlas(SPACING_MM, SHAPE)
    np.testing.assert_allclose(atlas.probabilities.sum(axis=0), 1.0, atol=1e-5)
    np.testing.assert_array_equal(atlas.labels, atlas.probabilities.argmax(axis=0))
    assert set(np.unique(atlas.labels)) == {0, 1, 2, 3}


def test_template_tissue_means_have_t1_contrast():
    means = load_atlas(SPACING_MM, SHAPE).tissue_means
    assert abs(means[0]) < 0.02
    assert means[CSF] < means[GREY_MATTER] < means[WHITE_MATTER]


def test_atlas_is_cached_and_read_only():
    atlas = load_atlas(SPACING_MM, SHAPE)
    assert load_atlas(SPACING_MM, SHAPE) is atlas
    with pytest.raises(ValueError):
        atlas.labels[0, 0, 0] = 1


def test_three_millimetre_grid_is_supported():
    atlas = load_atlas(3.0, (64, 64, 64))
    assert atlas.shape == (64, 64, 64) and atlas.spacing_mm == 3.0
    assert set(np.unique(atlas.labels)) == {0, 1, 2, 3}


@pytest.mark.parametrize("spacing, shape", [(1.0, (48, 48, 48)), (4.0, (48, 48)), (4.0, (4, 48, 48))])
def test_invalid_grids_are_refused(spacing, shape):
    with pytest.raises(ValueError):
        load_atlas(spacing, shape)
