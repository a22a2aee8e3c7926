"""The experiment spec: a valid TOML file loads; every malformed one names its file and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from laulima.core.spec import ExperimentSpec, StrategySpec, load_spec, parse_spec
from laulima.errors import ConfigurationError, SpecError

VALID = """\
name = "brats-fedadam"
algorithm = "laulima.algorithms.monai_seg:SegmentationAlgorithm"
dataset = "brats"
sites = ["hospital-a", "hospital-b", "hospital-c"]
rounds = 20
local_epochs = 2
min_sites = 2
round_timeout_s = 900
seed = 7

[strategy]
name = "fedadam"
server_lr = 0.05
tau = 0.01

[evaluation]
every = 5

[config]
learning_rate = 1e-4
batch_size = 2
"""


def write(tmp_path: Path, text: str, name: str = "experiment.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def replace_line(text: str, start: str, new: str | None) -> str:
    """``text`` with the line starting with ``start`` replaced by ``new`` (or removed)."""
    lines = (
        [line for line in text.splitlines() if not line.startswith(start)]
        if new is None
        else [new if line.startswith(start) else line for line in text.splitlines()]
    )
    assert lines != text.splitlines(), f"no line starts with {start!r}"
    return "\n".join(lines) + "\n"


def test_valid_spec_loads(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, VALID))
    assert isinstance(spec, ExperimentSpec)
    assert spec.name == "brats-fedadam"
    assert spec.sites == ["hospital-a", "hospital-b", "hospital-c"]
    assert (spec.rounds, spec.local_epochs, spec.min_sites, spec.seed) == (20, 2, 2, 7)
    assert spec.round_timeout_s == 900.0
    assert spec.effective_task_timeout_s == 900.0
    assert spec.strategy == StrategySpec(name="fedadam", server_lr=0.05, tau=0.01)
    assert spec.strategy.beta_1 == 0.9  # defaults fill what the file leaves out
    assert spec.evaluation.every == 5 and spec.evaluation.final is True
    assert spec.config == {"learning_rate": 1e-4, "batch_size": 2}


def test_minimal_spec_takes_defaults(tmp_path: Path) -> None:
    text = 'name = "x"\nalgorithm = "pkg.mod:Alg"\ndataset = "d"\nrounds = 1\n'
    spec = load_spec(write(tmp_path, text))
    assert spec.sites == [] and spec.min_sites == 1
    assert spec.strategy.name == "fedavg"
    assert spec.task_timeout_s is None


def test_load_spec_accepts_str_path(tmp_path: Path) -> None:
    assert load_spec(str(write(tmp_path, VALID))).rounds == 20


@pytest.mark.parametrize(
    ("start", "new", "field", "reason"),
    [
        ("rounds", None, "rounds", "Field required"),
        ("algorithm", None, "algorithm", "Field required"),
        ("rounds", 'rounds = "twenty"', "rounds", "valid integer"),
        ("rounds", "rounds = 0", "rounds", "greater than or equal to 1"),
        ("sites", 'sites = "hospital-a"', "sites", "valid list"),
        ("local_epochs", "local_epochs = 1.5", "local_epochs", "valid integer"),
        ("algorithm", 'algorithm = "not an entry point"', "algorithm", "should match pattern"),
        ("seed", "seeds = 7", "seeds", "unknown field"),
        ("server_lr", "server_lr = -1", "strategy.server_lr", "greater than 0"),
        ("server_lr", "learning_rate_server = 1", "strategy.learning_rate_server", "unknown field"),
        ('name = "fedadam"', 'name = "fedsgd"', "strategy.name", "'fedavg', 'fedprox'"),
        ("every", "every = -1", "evaluation.every", "greater than or equal to 0"),
        ("sites", 'sites = ["hospital-a", "hospital-b", "hospital-a"]', "sites", "listed twice: hospital-a"),
    ],
)
def test_malformed_field_names_file_and_field(
    tmp_path: Path, start: str, new: str | None, field: str, reason: str
) -> None:
    path = write(tmp_path, replace_line(VALID, start, new))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    message = str(info.value)
    assert message.startswith(f"{path}: field '{field}': ")
    assert reason in message
    assert info.value.context == {"file": str(path), "field": field}
    assert isinstance(info.value, ConfigurationError)


def test_min_sites_above_listed_sites(tmp_path: Path) -> None:
    path = write(tmp_path, replace_line(VALID, "min_sites", "min_sites = 4"))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert "min_sites = 4 but only 3 sites are listed; lower min_sites or list more sites" in message
    assert info.value.context["file"] == str(path)


def test_min_sites_is_not_checked_when_sites_are_open(tmp_path: Path) -> None:
    text = replace_line(replace_line(VALID, "sites", None), "min_sites", "min_sites = 4")
    assert load_spec(write(tmp_path, text)).min_sites == 4


def test_several_errors_are_counted(tmp_path: Path) -> None:
    text = replace_line(replace_line(VALID, "rounds", None), "dataset", None)
    with pytest.raises(SpecError, match=r"field '(dataset|rounds)': Field required \(and 1 more\)"):
        load_spec(write(tmp_path, text))


def test_bad_toml_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'name = "unterminated\nrounds = 3\n')
    with pytest.raises(SpecError, match=r"not valid TOML") as info:
        load_spec(path)
    assert str(info.value).startswith(f"{path}: not valid TOML: ")
    assert "line 1" in str(info.value)
    assert info.value.context == {"file": str(path)}


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.toml"
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(info.value) == f"{path}: no such spec file"
    assert info.value.context == {"file": str(path)}


@pytest.mark.parametrize("kind", ["directory", "not utf-8"])
def test_unreadable_file_is_a_spec_error(tmp_path: Path, kind: str) -> None:
    if kind == "directory":
        path = tmp_path / "spec.toml"
        path.mkdir()
    else:
        path = tmp_path / "latin1.toml"
        path.write_bytes('name = "Zürich"\n'.encode("latin-1"))
    with pytest.raises(SpecError, match="cannot read the spec file") as info:
        load_spec(path)
    assert info.value.context == {"file": str(path)}


def test_parse_spec_names_its_source() -> None:
    with pytest.raises(SpecError, match=r"^<api request>: field 'name': Field required"):
        parse_spec({"algorithm": "a:B", "dataset": "d", "rounds": 1}, source="<api request>")


def test_spec_is_frozen(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, VALID))
    with pytest.raises(ValueError, match="frozen"):
        spec.rounds = 3  # type: ignore[misc]
