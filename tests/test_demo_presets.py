"""The demo's presets and inputs: what `laulima demo` accepts before anything trains."""

from __future__ import annotations

import json

import pytest

from laulima.demo import PRESETS, TISSUE_PRESETS, presets, read_strategy_comparison
from laulima.errors import ConfigurationError


def test_the_headline_presets_are_the_tumour_demo_with_cross_site_evaluation():
    for name in ("quick", "default"):
        preset = PRESETS[name]
        spec = preset.spec(cross_site=True)
        assert spec.dataset == "brain-tumour" and spec.config["task"] == "brain-tumour"
        assert sorted(preset.cohorts or ()) == [4, 10, 30]  # a small, a middle and a large hospital
        assert spec.evaluation.cross_site and spec.evaluation.local_models
        assert spec.rounds * spec.local_steps == preset.steps_per_site
    assert presets("brain-tissue") is TISSUE_PRESETS
    assert TISSUE_PRESETS["default"].spec().dataset == "brain-tissue"


def test_the_centralized_model_is_scored_by_an_evaluation_only_spec_with_the_same_model():
    preset = PRESETS["quick"]
    spec = preset.evaluation_spec("centralized")
    assert spec.mode == "evaluate" and spec.rounds == 0
    assert spec.config == preset.spec().config and spec.min_sites == preset.n_sites


def test_an_unknown_task_is_refused_naming_the_choices():
    with pytest.raises(ConfigurationError, match="brain-tumour, brain-tissue"):
        presets("lung")


def test_strategy_comparison_lines_are_read_and_a_bad_line_is_named(tmp_path):
    good = {"benchmark": "strategies", "strategy": "feddc", "dice_mean_pooled": 0.8}
    path = tmp_path / "lines.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps({**good, "strategy": "fedavg"}) + "\n")
    assert [row["strategy"] for row in read_strategy_comparison(path)] == ["feddc", "fedavg"]
    path.write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(ConfigurationError, match="line 2: not JSON"):
        read_strategy_comparison(path)
    path.write_text("[1, 2]\n")
    with pytest.raises(ConfigurationError, match="line 1: expected an object with a 'strategy'"):
        read_strategy_comparison(path)
    with pytest.raises(ConfigurationError, match="cannot read"):
        read_strategy_comparison(tmp_path / "missing.jsonl")
