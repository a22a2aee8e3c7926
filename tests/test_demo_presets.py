"""The demo's presets and inputs: what `laulima demo` accepts before anything trains."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from laulima.core.spec import with_calibrated_noise
from laulima.demo import (
    DEFAULT_EPSILON,
    PRESETS,
    TASKS,
    TISSUE_PRESETS,
    UPDATE_CLIP,
    _notes,
    presets,
    read_privacy_utility,
    read_strategy_comparison,
)
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


# -- differential privacy and secure aggregation ---------------------------------------------
@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize(
    ("dp", "secure", "mode"), [(True, True, "distributed"), (True, False, "local"), (False, True, None)]
)
def test_private_presets_parse_with_local_models_off(task, dp, secure, mode):
    for name, base in presets(task).items():
        preset = dataclasses.replace(base, target_epsilon=DEFAULT_EPSILON if dp else None, secure_aggregation=secure)
        assert preset.private
        spec = preset.spec(cross_site=True)
        assert spec.evaluation.cross_site and not spec.evaluation.local_models, name
        assert spec.update_clip == UPDATE_CLIP
        if dp:
            assert spec.privacy is not None and spec.privacy.mode == mode
            assert spec.privacy.target_epsilon == 8.0 and spec.privacy.delta == 1e-5
            assert spec.privacy.clip == UPDATE_CLIP and spec.privacy.noise_multiplier is None  # the hub calibrates
        else:
            assert spec.privacy is None
        assert (spec.secure_aggregation is not None) == secure
        if secure:
            assert spec.secure_aggregation.clip == UPDATE_CLIP


def test_a_plain_preset_keeps_its_local_models_and_has_no_privacy():
    spec = PRESETS["quick"].spec(cross_site=True)
    assert not PRESETS["quick"].private
    assert spec.evaluation.local_models and spec.privacy is None and spec.secure_aggregation is None


def test_the_hub_calibrates_the_demo_target_into_a_noise_multiplier():
    preset = dataclasses.replace(PRESETS["quick"], target_epsilon=3.0, secure_aggregation=True)
    calibrated = with_calibrated_noise(preset.spec(cross_site=True))
    assert calibrated.privacy is not None and calibrated.privacy.noise_multiplier is not None
    from laulima.core.privacy.accountant import GaussianRelease, epsilon

    spent = epsilon([GaussianRelease(calibrated.privacy.noise_multiplier, count=preset.rounds)], 1e-5)
    assert 2.9 < spent <= 3.0


def test_a_given_noise_multiplier_and_mode_are_kept():
    preset = dataclasses.replace(PRESETS["test"], noise_multiplier=0.0, clip=1e6, dp_mode="local")
    spec = preset.spec()
    assert spec.privacy is not None and spec.privacy.noise_multiplier == 0.0 and spec.privacy.target_epsilon is None
    assert spec.privacy.clip == 1e6 and spec.privacy.mode == "local"


@pytest.mark.parametrize(
    ("flags", "epsilon", "secure"),
    [
        (["--dp"], 8.0, False),
        (["--dp", "--secure-aggregation"], 8.0, True),
        (["--dp", "--epsilon", "3"], 3.0, False),
        (["--epsilon", "1.5", "--secure-aggregation"], 1.5, True),
        (["--secure-aggregation"], None, True),
        ([], None, False),
    ],
)
def test_the_demo_flags_set_the_presets_privacy(monkeypatch, tmp_path, flags, epsilon, secure):
    from typer.testing import CliRunner

    import laulima.demo
    from laulima.cli import app

    seen: dict[str, object] = {}

    def fake_run_demo(preset, workdir, console, **kwargs):
        seen.update(preset=preset, **kwargs)

    monkeypatch.setattr(laulima.demo, "run_demo", fake_run_demo)
    line = tmp_path / "utility.json"
    line.write_text(json.dumps(UTILITY_LINE) + "\n")
    args = ["demo", "--preset", "test", "--workdir", str(tmp_path / "w"), *flags, "--privacy-utility", str(line)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    preset = seen["preset"]
    assert preset.target_epsilon == epsilon and preset.secure_aggregation is secure
    assert preset.delta == 1e-5 and preset.clip == UPDATE_CLIP
    assert seen["privacy_utility"] == UTILITY_LINE
    spec = preset.spec(cross_site=True)
    assert spec.evaluation.local_models is not preset.private


UTILITY_LINE = {
    "benchmark": "privacy_utility",
    "runs": [{"target_epsilon": None, "dice_mean": 0.7}, {"target_epsilon": 8.0, "dice_mean": 0.3}],
}


def test_the_privacy_utility_line_is_read_and_a_bad_file_is_named(tmp_path):
    path = tmp_path / "line.json"
    path.write_text("some log\n" + json.dumps(UTILITY_LINE) + "\n\n")
    assert read_privacy_utility(path) == UTILITY_LINE
    path.write_text(json.dumps(UTILITY_LINE) + "\n{oops\n")
    with pytest.raises(ConfigurationError, match="line 2: not JSON"):
        read_privacy_utility(path)
    path.write_text(json.dumps({"runs": [{"target_epsilon": 1.0}]}))
    with pytest.raises(ConfigurationError, match="'dice_mean'"):
        read_privacy_utility(path)
    path.write_text("")
    with pytest.raises(ConfigurationError, match="empty"):
        read_privacy_utility(path)
    with pytest.raises(ConfigurationError, match="cannot read"):
        read_privacy_utility(tmp_path / "missing.json")


def test_the_notes_of_a_private_run_say_why_there_are_no_local_models_and_how_large_the_noise_is():
    preset = dataclasses.replace(PRESETS["quick"], target_epsilon=8.0, secure_aggregation=True)
    settings = {
        "differential_privacy": True, "mode": "distributed", "clip": UPDATE_CLIP, "noise_multiplier": 2.0,
        "target_epsilon": 8.0, "delta": 1e-5, "secure_aggregation": True,
    }  # fmt: skip
    notes = " ".join(_notes(preset, True, settings, n_parameters=10_000))
    assert "No local-only models" in notes and "local_models = false" in notes
    assert "Each site trained a local-only model" not in notes and "Each local-only model was trained" not in notes
    assert "Secure aggregation" in notes and "noise multiplier 2" in notes and "ε = 8" in notes
    # distributed over 3 sites, threshold 2: the mean's noise is 2 x 1.35 x sqrt(3 / 2) / 3 per coordinate
    per_coordinate = 2.0 * UPDATE_CLIP * math.sqrt(3 / 2) / 3
    assert f"std {per_coordinate:.3g} on each of the model's 10,000 parameters" in notes
    plain = " ".join(_notes(PRESETS["quick"], True))
    assert "Each local-only model was trained" in plain and "No local-only models" not in plain
