"""mode = "fingerprint": no rounds, no training settings, one step of tasks; and the submitting
side, which sends the empty model and can fingerprint the very spec used for training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from laulima.core.spec import parse_spec
from laulima.core.weights import from_safetensors
from laulima.errors import SpecError
from laulima.submission import EMPTY_MODEL, prepare, prepare_fingerprint

IDENTITY = "laulima.algorithms.identity:Identity"


def fingerprint(**changes: Any) -> dict[str, Any]:
    return {"name": "fp", "algorithm": IDENTITY, "dataset": "brains", "mode": "fingerprint", **changes}


def test_a_fingerprint_spec_has_no_rounds_and_one_step_of_tasks():
    spec = parse_spec(fingerprint())
    assert spec.mode == "fingerprint" and spec.rounds == 0
    assert spec.has_finale and spec.final_index == 1
    assert parse_spec(fingerprint(rounds=0)).rounds == 0


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"rounds": 3}, "rounds"),
        ({"rounds": True}, "rounds"),
        ({"local_steps": 5}, "local_steps"),
        ({"local_epochs": 4}, "local_epochs"),
        ({"strategy": {"name": "fedprox"}}, "strategy"),
        ({"evaluation": {"cross_site": True}}, "evaluation"),
        ({"max_update_norm": 1.0}, "max_update_norm"),
        ({"max_samples_per_site": 10}, "max_samples_per_site"),
    ],
)
def test_training_settings_are_refused_naming_the_field_and_the_mode(changes: dict[str, Any], field: str):
    with pytest.raises(SpecError) as info:
        parse_spec(fingerprint(**changes), source="fp.toml")
    message = str(info.value)
    assert message.startswith(f"fp.toml: field '{field}': ") and "mode = 'fingerprint' trains nothing" in message
    assert info.value.context["field"] == field


def test_an_unknown_mode_is_refused():
    with pytest.raises(SpecError, match="field 'mode'"):
        parse_spec(fingerprint(mode="plan"))


def test_evaluate_mode_keeps_its_own_wording():
    with pytest.raises(SpecError, match="mode = 'evaluate' trains nothing"):
        parse_spec({**fingerprint(), "mode": "evaluate", "local_steps": 3})


def test_a_fingerprint_submission_carries_the_empty_model_and_never_builds_one(monkeypatch: pytest.MonkeyPatch):
    def no_model(*args: Any, **kwargs: Any) -> bytes:
        raise AssertionError("initial_weights must not be called for a fingerprint")

    monkeypatch.setattr("laulima.submission.initial_weights_bytes", no_model)
    ready = prepare(parse_spec(fingerprint()))
    assert ready.initial_weights == EMPTY_MODEL and from_safetensors(EMPTY_MODEL) == {}
    assert ready.spec["mode"] == "fingerprint" and ready.spec["rounds"] == 0


TRAINING_SPEC = """\
name = "brain-nnunet"
algorithm = "laulima.algorithms.identity:Identity"
dataset = "brain-tumour"
sites = ["site-a", "site-b"]
rounds = 20
local_steps = 250
min_sites = 2
round_timeout_s = 900
seed = 7

[strategy]
name = "fedavg"

[evaluation]
every = 5
cross_site = true

[config]
lr = 0.01
"""


def test_the_training_spec_itself_can_be_fingerprinted(tmp_path: Path):
    path = tmp_path / "train.toml"
    path.write_text(TRAINING_SPEC)
    ready, dropped = prepare_fingerprint(path)
    assert dropped == ["local_steps", "strategy", "evaluation", "rounds"]
    spec = parse_spec(ready.spec)
    assert spec.mode == "fingerprint" and spec.name == "brain-nnunet-fingerprint" and spec.rounds == 0
    assert (spec.dataset, spec.sites, spec.seed, spec.min_sites) == ("brain-tumour", ["site-a", "site-b"], 7, 2)
    assert spec.config == {"lr": 0.01} and spec.round_timeout_s == 900
    assert ready.initial_weights == EMPTY_MODEL
    overridden, _ = prepare_fingerprint(path, sites=["site-b"], name="probe")
    assert overridden.spec["sites"] == ["site-b"] and overridden.spec["name"] == "probe"
    assert overridden.spec["min_sites"] == 1


def test_a_long_name_stays_a_valid_name(tmp_path: Path):
    path = tmp_path / "train.toml"
    path.write_text(TRAINING_SPEC.replace('"brain-nnunet"', '"' + "n" * 64 + '"'))
    ready, _ = prepare_fingerprint(path)
    assert len(ready.spec["name"]) == 64 and ready.spec["name"].endswith("-fingerprint")


def test_a_training_spec_object_becomes_its_fingerprint_spec(tmp_path: Path):
    from laulima.core.spec import as_fingerprint_spec, load_spec

    path = tmp_path / "train.toml"
    path.write_text(TRAINING_SPEC)
    spec = as_fingerprint_spec(load_spec(path))
    assert spec.mode == "fingerprint" and spec.rounds == 0 and spec.name == "brain-nnunet-fingerprint"
    assert spec.local_steps == 0 and not spec.evaluation.cross_site and spec.config == {"lr": 0.01}
    assert (spec.sites, spec.min_sites, spec.seed) == (["site-a", "site-b"], 2, 7)
    assert as_fingerprint_spec(spec, name="again").name == "again"
