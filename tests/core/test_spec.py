"""The experiment spec: a valid TOML file loads; every malformed one names its file and field."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from laulima.core.spec import (
    CONFIG_MAX_BYTES,
    CONFIG_MAX_DEPTH,
    MAX_SITES,
    ExperimentSpec,
    StrategySpec,
    load_spec,
    parse_spec,
)
from laulima.errors import ConfigurationError, SpecError

IDENTITY = "laulima.algorithms.identity:Identity"

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
    text = 'name = "x"\nalgorithm = "laulima.algorithms.tabular:LogisticRegression"\ndataset = "d"\nrounds = 1\n'
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
        parse_spec({"algorithm": IDENTITY, "dataset": "d", "rounds": 1}, source="<api request>")


def test_spec_is_frozen(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, VALID))
    with pytest.raises(ValueError, match="frozen"):
        spec.rounds = 3  # type: ignore[misc]


# --------------------------------------------------------------------------- numbers: finite and bounded

MINIMAL = {"name": "x", "algorithm": IDENTITY, "dataset": "d", "rounds": 1}


def with_field(path: str, value: object) -> dict[str, object]:
    """MINIMAL with ``value`` at the dotted ``path`` (``strategy.tau`` sets a nested table)."""
    data: dict[str, object] = {**MINIMAL}
    head, _, tail = path.partition(".")
    data[head] = {tail: value} if tail else value
    return data


NUMBER_FIELDS = [
    "rounds",
    "local_epochs",
    "local_steps",
    "min_sites",
    "round_timeout_s",
    "task_timeout_s",
    "max_update_norm",
    "max_samples_per_site",
    "seed",
    "approval_timeout_s",
    "strategy.proximal_mu",
    "strategy.server_lr",
    "strategy.beta_1",
    "strategy.beta_2",
    "strategy.tau",
    "strategy.trim_fraction",
    "evaluation.every",
]


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("field", NUMBER_FIELDS)
def test_every_number_must_be_finite(field: str, value: float) -> None:
    # What Python's JSON parser makes of Infinity / NaN in a request body.
    with pytest.raises(SpecError) as info:
        parse_spec(with_field(field, value), source="experiment spec")
    assert str(info.value).startswith(f"experiment spec: field '{field}': ")
    assert "finite number" in str(info.value) or "greater than" in str(info.value)
    assert info.value.context["field"] == field


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("round_timeout_s", 7 * 24 * 3600 + 1, "less than or equal to 604800"),
        ("task_timeout_s", 1e9, "less than or equal to 604800"),
        ("approval_timeout_s", 7 * 24 * 3600 + 1, "less than or equal to 604800"),
        ("approval_timeout_s", 0, "greater than 0"),
        ("local_epochs", 10**6, "less than or equal to 100000"),
        ("local_steps", 10**9, "less than or equal to 100000000"),
        ("min_sites", 1001, "less than or equal to 1000"),
        ("seed", 2**63, "less than or equal to 9223372036854775807"),
        ("seed", -1, "greater than or equal to 0"),
        ("max_update_norm", 1e300, "less than or equal to 1" + "0" * 30),
        ("max_samples_per_site", 0, "greater than or equal to 1"),
        ("max_samples_per_site", 10**9 + 1, "less than or equal to 1000000000"),
        ("strategy.server_lr", 1e6, "less than or equal to 1000"),
        ("strategy.proximal_mu", 1e9, "less than or equal to 10000"),
        ("strategy.tau", 1e-300, "greater than or equal to 0.000000000001"),
        ("evaluation.every", 10**6, "less than or equal to 100000"),
    ],
)
def test_numbers_are_bounded(field: str, value: float, reason: str) -> None:
    with pytest.raises(SpecError, match=rf"field '{re.escape(field)}': .*{re.escape(reason)}"):
        parse_spec(with_field(field, value))


def test_max_samples_per_site_is_optional_and_kept() -> None:
    assert parse_spec(MINIMAL).max_samples_per_site is None
    assert parse_spec({**MINIMAL, "max_samples_per_site": 250}).max_samples_per_site == 250


@pytest.mark.parametrize("literal", ["inf", "-inf", "nan", "+inf"])
def test_toml_inf_and_nan_name_file_and_field(tmp_path: Path, literal: str) -> None:
    path = write(tmp_path, replace_line(VALID, "round_timeout_s", f"round_timeout_s = {literal}"))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(info.value).startswith(f"{path}: field 'round_timeout_s': ")
    assert info.value.context == {"file": str(path), "field": "round_timeout_s"}


# --------------------------------------------------------------------------- sites


def test_at_most_max_sites_are_listed() -> None:
    names = [f"site-{i}" for i in range(MAX_SITES)]
    assert len(parse_spec({**MINIMAL, "sites": names}).sites) == MAX_SITES
    with pytest.raises(SpecError, match=r"field 'sites': List should have at most 1000 items"):
        parse_spec({**MINIMAL, "sites": [*names, "one-more"]})


def test_thirty_thousand_sites_are_refused_by_their_number() -> None:
    with pytest.raises(SpecError, match=r"field 'sites': List should have at most 1000 items .* not 30000"):
        parse_spec({**MINIMAL, "sites": [f"site-{i}" for i in range(30_000)]})


def test_duplicates_are_found_among_many_sites() -> None:
    names = [f"site-{i}" for i in range(MAX_SITES - 2)] + ["site-7", "site-500"]
    with pytest.raises(SpecError, match=r"listed twice: site-500, site-7$"):
        parse_spec({**MINIMAL, "sites": names})


# --------------------------------------------------------------------------- config


def nested(depth: int, leaf: object = 1) -> object:
    """``{"a": {"a": ... leaf}}`` with ``depth`` tables (built without recursion)."""
    value = leaf
    for _ in range(depth):
        value = {"a": value}
    return value


def test_config_nesting_limit_is_exact() -> None:
    # The config table itself is the first level.
    parse_spec({**MINIMAL, "config": nested(CONFIG_MAX_DEPTH)})
    with pytest.raises(SpecError, match=rf"nested deeper than {CONFIG_MAX_DEPTH} levels") as info:
        parse_spec({**MINIMAL, "config": nested(CONFIG_MAX_DEPTH + 1)})
    assert info.value.context["field"] == "config" + ".a" * CONFIG_MAX_DEPTH


@pytest.mark.parametrize("depth", [900, 3000, 100_000])
def test_deep_config_is_refused_without_recursion(depth: int) -> None:
    with pytest.raises(SpecError, match=r"field 'config(\.a)+': nested deeper than 32 levels"):
        parse_spec({**MINIMAL, "config": nested(depth)}, source="experiment spec")


def test_deep_lists_in_config_are_refused() -> None:
    value: object = 1
    for _ in range(5000):
        value = [value]
    with pytest.raises(SpecError, match=r"field 'config\.x(\[0\])+': nested deeper than 32"):
        parse_spec({**MINIMAL, "config": {"x": value}})


@pytest.mark.parametrize(
    ("config", "field", "reason"),
    [
        ({"lr": float("nan")}, "config.lr", "is nan; every number in a spec must be finite"),
        ({"opt": {"betas": [0.9, float("inf")]}}, "config.opt.betas[1]", "is inf"),
        ({"big": 2**63}, "config.big", "integer outside the 64-bit range"),
        ({"blob": "x" * (CONFIG_MAX_BYTES + 1)}, "config.blob", "a string longer than 64 KiB"),
        ({"text": "\u2603" * (CONFIG_MAX_BYTES // 2)}, "config", "larger than 64 KiB as JSON"),
        ({f"k{i}": "y" * 100 for i in range(1000)}, "config", "larger than 64 KiB as JSON"),
        ({"s": {1, 2}}, "config.s", "is a set"),
        ({"nested": {3: "x"}}, "config.nested", "key 3 that is not a string"),
    ],
)
def test_config_values_are_finite_bounded_and_plain(config: dict[str, object], field: str, reason: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec({**MINIMAL, "config": config}, source="experiment spec")
    assert str(info.value).startswith(f"experiment spec: field '{field}': ")
    assert reason in str(info.value)
    assert info.value.context["field"] == field


def test_config_keeps_plain_values_and_toml_dates(tmp_path: Path) -> None:
    text = VALID + 'schedule = [1, 2.5, "x", true]\nwhen = 2024-01-02\n[config.optimizer]\nname = "adam"\n'
    spec = load_spec(write(tmp_path, text))
    assert spec.config["schedule"] == [1, 2.5, "x", True]
    assert spec.config["optimizer"] == {"name": "adam"}
    assert str(spec.config["when"]) == "2024-01-02"


def test_toml_nested_too_deeply_for_the_parser_names_the_file(tmp_path: Path) -> None:
    text = (
        f'name = "x"\nalgorithm = "{IDENTITY}"\ndataset = "d"\nrounds = 1\nconfig = '
        + "{a = " * 3000
        + "1"
        + "}" * 3000
    )
    path = write(tmp_path, text + "\n")
    with pytest.raises(SpecError, match=r"nested too deeply") as info:
        load_spec(path)
    assert str(info.value).startswith(f"{path}: ")


def test_toml_dotted_keys_nested_too_deeply_name_the_field(tmp_path: Path) -> None:
    text = (
        f'name = "x"\nalgorithm = "{IDENTITY}"\ndataset = "d"\nrounds = 1\n[config]\n'
        + ".".join(["a"] * 3000)
        + " = 1\n"
    )
    path = write(tmp_path, text)
    with pytest.raises(SpecError, match=r"field 'config(\.a)+': nested deeper than 32 levels"):
        load_spec(path)


# --------------------------------------------------------------------------- the algorithm: built-in or packed

DIGEST = "ab" * 32
SIGNATURE = "cd" * 64


@pytest.mark.parametrize("algorithm", ["os:system", "antigravity:X", "laulima:Algorithm", "laulima.algorithmsx.y:Z"])
def test_an_algorithm_neither_built_in_nor_packed_is_refused_before_anything_imports_it(algorithm: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec({**MINIMAL, "algorithm": algorithm}, source="experiment spec")
    assert str(info.value) == (
        f"experiment spec: field 'algorithm': {algorithm!r} is neither a built-in (laulima.algorithms.*, "
        "laulima.nnunet) nor packed: name a `source` folder or file to pack, or a `bundle` digest"
    )
    assert info.value.context["field"] == "algorithm"


def test_load_spec_refuses_an_unpacked_foreign_algorithm(tmp_path: Path) -> None:
    path = write(tmp_path, replace_line(VALID, "algorithm", 'algorithm = "os:system"'))
    with pytest.raises(SpecError, match=r"field 'algorithm': 'os:system' is neither a built-in") as info:
        load_spec(path)
    assert info.value.context == {"file": str(path), "field": "algorithm"}


def test_a_foreign_algorithm_is_accepted_with_a_bundle_or_a_source_to_pack() -> None:
    bundled = parse_spec({**MINIMAL, "algorithm": "mypkg.model:Net", "bundle": DIGEST, "signatures": [SIGNATURE]})
    assert (bundled.bundle, bundled.signatures, bundled.source) == (DIGEST, [SIGNATURE], None)
    local = parse_spec({**MINIMAL, "algorithm": "mypkg.model:Net", "source": "src/mypkg", "requirements": ["numpy>=1"]})
    assert (local.source, local.requirements, local.bundle) == ("src/mypkg", ["numpy>=1"], None)


def test_a_spec_the_hub_accepted_earlier_is_re_read_without_the_newer_rule() -> None:
    assert parse_spec({**MINIMAL, "algorithm": "old.module:Algo"}, accepted=True).algorithm == "old.module:Algo"


def test_new_fields_default_to_a_built_in_without_signatures_and_a_day_to_approve() -> None:
    spec = parse_spec(MINIMAL)
    assert (spec.bundle, spec.signatures, spec.source, spec.requirements) == (None, [], None, [])
    assert spec.approval_timeout_s == 24 * 3600.0


@pytest.mark.parametrize(
    ("fields", "field", "reason"),
    [
        ({"signatures": [SIGNATURE]}, "signatures", "signatures sign a bundle's digest"),
        ({"bundle": DIGEST, "signatures": ["CD" * 64]}, "signatures.0", "should match pattern"),
        ({"bundle": DIGEST, "signatures": ["cd" * 63]}, "signatures.0", "should match pattern"),
        ({"bundle": DIGEST, "signatures": [SIGNATURE, SIGNATURE]}, "signatures", "listed twice"),
        (
            {"bundle": DIGEST, "signatures": [f"{i:0128x}" for i in range(17)]},
            "signatures",
            "at most 16 items",
        ),
        ({"bundle": "AB" * 32}, "bundle", "should match pattern"),
        ({"bundle": "ab" * 31}, "bundle", "should match pattern"),
        ({"source": "x.py", "requirements": ["numpy"] * 65}, "requirements", "at most 64 items"),
        ({"source": "x.py", "requirements": ["n" * 201]}, "requirements.0", "at most 200 characters"),
        ({"source": ""}, "source", "at least 1 character"),
        ({"source": "p" * 4097}, "source", "at most 4096 characters"),
    ],
)
def test_bundle_fields_are_bounded(fields: dict[str, object], field: str, reason: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec({**MINIMAL, "algorithm": "mypkg:Net", **fields}, source="experiment spec")
    assert str(info.value).startswith(f"experiment spec: field '{field}': ")
    assert reason in str(info.value)
