"""BraTS regions: overlapping label sets scored by Dice and HD95 (mm), with finite empty-case conventions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from laulima.algorithms.segmentation import engine, parse_params
from laulima.algorithms.segmentation.data import Sample
from laulima.algorithms.segmentation.model import BRATS_REGIONS
from laulima.core.metrics import checked_metrics
from laulima.errors import ConfigurationError

LABELS = {0: "background", 1: "edema", 2: "non-enhancing tumor", 3: "enhancing tumour"}
SHAPE = (8, 6, 6)
SPACING = (3.0, 1.0, 1.0)  # anisotropic: distances along x count 3 mm per voxel


def slabs(values: dict[int, int]) -> torch.Tensor:
    """A label map of whole y-z planes: ``{x: label}``. Planes at most two thick are all surface."""
    volume = torch.zeros(SHAPE, dtype=torch.long)
    for x, label in values.items():
        volume[x] = label
    return volume


class Fixed(torch.nn.Module):
    """A 'model' that predicts one fixed label map, whatever it is shown."""

    def __init__(self, prediction: torch.Tensor) -> None:
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))
        self.logits = 10.0 * torch.nn.functional.one_hot(prediction, len(LABELS)).permute(3, 0, 1, 2).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits[None].expand(x.shape[0], -1, -1, -1, -1)


def score(truth: torch.Tensor, prediction: torch.Tensor, regions=BRATS_REGIONS) -> engine.Scores:
    case = Sample(id="case", image=torch.zeros((4, *SHAPE)), label=truth[None].to(torch.uint8))
    return engine.evaluate(Fixed(prediction), [case], SHAPE, LABELS, regions=regions, spacing_mm=SPACING)


def test_region_dice_and_hd95_match_the_hand_computation():
    # truth: oedema at x=2, enhancing at x=3; prediction: enhancing at x=3, non-enhancing at x=4.
    scores = score(slabs({2: 1, 3: 3}), slabs({3: 3, 4: 2}))
    m = scores.metrics()
    # wt: planes {2,3} vs {3,4}: Dice 2*1/(2+2); half the surface voxels lie one plane (3 mm) off.
    assert m["dice_wt"] == pytest.approx(0.5) and m["hd95_wt"] == pytest.approx(3.0)
    # tc: {3} vs {3,4}: Dice 2*1/(1+2); the predicted plane x=4 is 3 mm from the truth.
    assert m["dice_tc"] == pytest.approx(2 / 3) and m["hd95_tc"] == pytest.approx(3.0)
    assert m["dice_et"] == pytest.approx(1.0) and m["hd95_et"] == pytest.approx(0.0)
    assert m["dice_mean"] == pytest.approx((0.5 + 2 / 3 + 1.0) / 3)  # the BraTS mean: over regions
    assert m["hd95_mean"] == pytest.approx(2.0)
    # Per label, as without regions: oedema missed, non-enhancing hallucinated, enhancing right.
    assert (m["dice_edema"], m["dice_non_enhancing_tumor"], m["dice_enhancing_tumour"]) == pytest.approx((0, 0, 1))
    assert checked_metrics(m) == m


def test_hd95_is_in_millimetres_of_the_given_spacing():
    truth, prediction = slabs({1: 3}), slabs({5: 3})  # single planes 4 voxels apart along x
    assert engine.region_scores(prediction, truth, [3], SPACING) == pytest.approx((0.0, 12.0))
    assert engine.region_scores(prediction, truth, [3], (1.0, 1.0, 1.0)) == pytest.approx((0.0, 4.0))


def test_empty_regions_have_finite_documented_values():
    diagonal = float(np.linalg.norm(np.multiply(SHAPE, SPACING)))
    nothing, enhancing = slabs({}), slabs({3: 3})
    assert engine.region_scores(nothing, nothing, [1, 2, 3], SPACING) == (1.0, 0.0)  # absent in both: perfect
    assert engine.region_scores(enhancing, nothing, [3], SPACING) == (0.0, pytest.approx(diagonal))  # hallucinated
    assert engine.region_scores(nothing, enhancing, [3], SPACING) == (0.0, pytest.approx(diagonal))  # missed
    m = score(slabs({2: 1}), slabs({2: 1})).metrics()  # no core in truth nor prediction
    assert (m["dice_tc"], m["hd95_tc"], m["dice_et"], m["hd95_et"]) == (1.0, 0.0, 1.0, 0.0)
    m = score(slabs({2: 1}), slabs({2: 1, 5: 3})).metrics()  # enhancing tumour where there is none
    assert m["dice_et"] == 0.0 and m["hd95_et"] == pytest.approx(diagonal)
    assert checked_metrics(m) == m


def test_scores_pool_region_columns_across_sites():
    a = score(slabs({2: 1, 3: 3}), slabs({3: 3, 4: 2}))
    b = score(slabs({2: 1}), slabs({2: 1}))
    pooled = engine.Scores.concat([a, b])
    assert pooled.n == 2 and pooled.regions == ("wt", "tc", "et")
    m = pooled.metrics()
    assert m["dice_wt"] == pytest.approx((0.5 + 1.0) / 2) and m["hd95_tc"] == pytest.approx((3.0 + 0.0) / 2)
    with pytest.raises(ValueError, match="different classes"):
        engine.Scores.concat([a, score(slabs({2: 1}), slabs({2: 1}), regions=())])


def test_without_regions_the_metrics_are_per_label_as_before():
    m = score(slabs({2: 1, 3: 3}), slabs({3: 3, 4: 2}), regions=()).metrics()
    assert set(m) == {"dice_edema", "dice_non_enhancing_tumor", "dice_enhancing_tumour", "dice_mean", "loss"}
    assert m["dice_mean"] == pytest.approx(1 / 3)  # the mean over the three labels
    assert parse_params({"task": "brain-tissue"}).regions == ()


def test_regions_default_from_the_task_and_round_trip():
    tumour = parse_params({"task": "brain-tumour"})
    assert dict(tumour.regions) == {"wt": (1, 2, 3), "tc": (2, 3), "et": (3,)}
    assert parse_params(tumour.as_config()) == tumour
    custom = parse_params({"task": "brain-tumour", "regions": {"lesion": [3, 1, 2], "core": [2, 3]}})
    assert custom.regions == (("lesion", (1, 2, 3)), ("core", (2, 3)))
    assert parse_params(custom.as_config()) == custom
    off = parse_params({"task": "brain-tumour", "regions": {}})
    assert off.regions == () and parse_params(off.as_config()) == off


@pytest.mark.parametrize(
    "regions",
    [[1, 2], {"Whole Tumour": [1, 2, 3]}, {"wt": []}, {"wt": [0, 1]}, {"wt": [4]}, {"wt": "123"}, {"wt": [True]}],
)
def test_bad_regions_are_refused_by_name(regions: object):
    with pytest.raises(ConfigurationError, match="regions"):
        parse_params({"task": "brain-tumour", "regions": regions})


def test_a_region_named_like_a_label_is_refused():
    with pytest.raises(ValueError, match="collide"):
        score(slabs({2: 1}), slabs({2: 1}), regions=(("edema", (1,)),))
