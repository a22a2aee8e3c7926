"""The gate charges training with differential privacy to the site's budget; `laulima site privacy` shows it.

Real policy files, a real catalog, approvals store, ledger and audit trail in a site home;
built-in algorithms, so no bundle is fetched (the hub client is never called).
"""

from __future__ import annotations

import sqlite3
import tomllib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import pytest
from typer.testing import CliRunner

from laulima.cli import app
from laulima.core.privacy.accountant import GaussianRelease, epsilon
from laulima.core.privacy.messages import TaskPrivacy
from laulima.core.protocol import FailureKind, TaskKind, TaskPublic
from laulima.errors import DataError
from laulima.site.approvals import ApprovalStore
from laulima.site.audit import AuditEvent, AuditLog
from laulima.site.catalog import Catalog
from laulima.site.client import HubClient
from laulima.site.gate import Admitted, Gate, Held, Refused
from laulima.site.policy import PrivacyPolicy, load_policy, parse_policy
from laulima.site.privacy_ledger import PRIVACY_FILE, PrivacyLedger

IDENTITY = "laulima.algorithms.identity:Identity"
DELTA = 1e-5
MakeTask = Callable[..., TaskPublic]


def dp(noise_multiplier: float = 0.8, clip: float = 1.0, delta: float = DELTA) -> TaskPrivacy:
    return TaskPrivacy(mode="local", clip=clip, noise_multiplier=noise_multiplier, delta=delta)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    home = tmp_path / "site"
    data = tmp_path / "brain"
    data.mkdir()
    (data / "train.csv").write_text("x0,label\n0.1,0\n0.2,1\n0.3,0\n")
    Catalog(home).add("brain", data)
    return home


def write_policy(home: Path, text: str) -> None:
    path = home / "policy.toml"
    path.write_text(text)
    path.chmod(0o600)


def gate(home: Path, **kw: Any) -> Gate:
    return Gate(home, Catalog(home), cast(HubClient, object()), ApprovalStore(home), **kw)


@pytest.fixture
def task(make_task: MakeTask) -> MakeTask:
    """A training task of a built-in on dataset 'brain', 10 rounds, with DP unless told otherwise."""

    def make(**overrides: Any) -> TaskPublic:
        fields: dict[str, Any] = {"algorithm": IDENTITY, "dataset": "brain", "rounds": 10, "round": 1, "privacy": dp()}
        fields.update(overrides)
        return make_task(**fields)

    return make


def ledger_rows(home: Path) -> list[tuple[Any, ...]]:
    if not (home / PRIVACY_FILE).exists():
        return []
    with sqlite3.connect(home / PRIVACY_FILE) as db:
        return [
            *db.execute("SELECT * FROM reservations ORDER BY dataset, experiment_id").fetchall(),
            *db.execute("SELECT * FROM releases ORDER BY dataset, task_id").fetchall(),
        ]


def reserved_events(home: Path) -> list[dict[str, Any]]:
    return [dict(e.fields) for e in AuditLog(home).entries() if e.event == AuditEvent.PRIVACY_RESERVED]


# -- the gate ------------------------------------------------------------------------------------


def test_an_experiment_over_budget_is_refused_with_the_reason_and_the_ledger_is_unchanged(home, task) -> None:
    write_policy(home, "[privacy]\nmax_epsilon = 8.0\n")
    earlier = gate(home).admit(task(id="e-1", experiment_id=1, experiment_name="first", privacy=dp(2.0), rounds=5))
    assert isinstance(earlier, Admitted), earlier
    before = ledger_rows(home)
    spent = epsilon([GaussianRelease(2.0, 5)], DELTA)
    would = epsilon([GaussianRelease(2.0, 5), GaussianRelease(0.8, 10)], DELTA)

    refused = gate(home).admit(task(id="g-1", experiment_id=2, experiment_name="greedy"))
    assert isinstance(refused, Refused), refused
    assert refused.kind is FailureKind.REJECTED and refused.names_only_job_facts
    assert refused.public == (
        f"privacy budget: this experiment would bring dataset 'brain' to ε = {would:.2f} (10 rounds, noise "
        f"multiplier 0.8, δ = 1e-05); the site allows ε = 8.00 and has spent {spent:.2f} (ask for more noise or "
        "fewer rounds)"
    )
    assert str(home) not in refused.public
    assert ledger_rows(home) == before
    assert [e["experiment_name"] for e in reserved_events(home)] == ["first"]


def test_within_budget_the_first_task_reserves_once_and_later_tasks_reserve_nothing_new(home, task) -> None:
    write_policy(home, "[privacy]\nmax_epsilon = 30.0\n")
    first = gate(home).admit(task(id="t-1", round=1))
    assert isinstance(first, Admitted), first
    whole = epsilon([GaussianRelease(0.8, 10)], DELTA)
    [charge] = first.privacy
    assert charge.first and charge.new_releases == 10 and charge.spent == pytest.approx(whole)
    [event] = reserved_events(home)
    assert event["dataset"] == "brain" and event["experiment_name"] == "exp" and event["rounds"] == 10
    assert event["epsilon"] == pytest.approx(whole) and event["spent"] == pytest.approx(whole)
    assert event["budget"] == 30.0 and event["budget_delta"] == DELTA and event["noise_multiplier"] == 0.8
    [entry] = [e for e in AuditLog(home).entries() if e.event == AuditEvent.PRIVACY_RESERVED]
    assert (entry.task, entry.experiment) == ("t-1", 1)
    assert AuditLog(home).verify().ok

    reserved = PrivacyLedger(home).reservations()
    second = gate(home).admit(task(id="t-2", round=2))
    assert isinstance(second, Admitted), second
    assert second.privacy[0].new_releases == 0 and not second.privacy[0].first
    assert len(reserved_events(home)) == 1  # nothing new reserved, nothing new audited
    [after] = PrivacyLedger(home).reservations()
    assert after == replace(reserved[0], rounds_run=2)
    assert PrivacyLedger(home).spent("brain", PrivacyPolicy(delta=DELTA)) == pytest.approx(whole)


def test_a_restarted_site_keeps_what_was_spent(home, task) -> None:
    write_policy(home, "[privacy]\nmax_epsilon = 12.0\n")
    assert isinstance(gate(home).admit(task(id="t-1", privacy=dp(1.5))), Admitted)
    one = epsilon([GaussianRelease(1.5, 10)], DELTA)
    two = epsilon([GaussianRelease(1.5, 10), GaussianRelease(1.5, 10)], DELTA)
    assert one < 12.0 < two
    fresh = gate(home)  # a new agent process: new gate, new ledger object, same home
    refused = fresh.admit(task(id="u-1", experiment_id=2, privacy=dp(1.5)))
    assert isinstance(refused, Refused) and f"has spent {one:.2f}" in refused.public, refused


@pytest.mark.parametrize(
    ("policy", "privacy", "words"),
    [
        ("require = true", None, "[privacy] require = true"),
        ("min_noise_multiplier = 1.0", dp(0.8), "noise multiplier 0.8 is below the site's"),
        ("max_clip = 0.5", dp(clip=1.0), "clip bound 1 is above the site's [privacy] max_clip 0.5"),
        ("max_epsilon = 50.0\ndelta = 1e-6", dp(delta=1e-5), "δ = 1e-05 is above the δ = 1e-06"),
    ],
)
def test_the_privacy_rules_refuse_training_before_anything_is_reserved(
    home: Path, task: MakeTask, policy: str, privacy: TaskPrivacy | None, words: str
) -> None:
    write_policy(home, f"[privacy]\n{policy}\n")
    refused = gate(home).admit(task(privacy=privacy))
    assert isinstance(refused, Refused) and refused.kind is FailureKind.REJECTED, refused
    assert words in refused.public and refused.names_only_job_facts
    assert not (home / PRIVACY_FILE).exists() and reserved_events(home) == []


def test_evaluations_and_fingerprints_are_not_charged(home, task) -> None:
    write_policy(home, "[privacy]\nmax_epsilon = 0.001\nrequire = true\n")
    for kind in (TaskKind.EVALUATE, TaskKind.FINGERPRINT):
        admitted = gate(home).admit(task(id=f"t-{kind.value}", kind=kind, privacy=dp()))
        assert isinstance(admitted, Admitted) and admitted.privacy == (), admitted
    assert not (home / PRIVACY_FILE).exists()


def test_training_without_dp_is_not_charged_unless_required(home, task) -> None:
    write_policy(home, "[privacy]\nmax_epsilon = 0.001\n")
    admitted = gate(home).admit(task(privacy=None))
    assert isinstance(admitted, Admitted) and admitted.privacy == ()
    assert not (home / PRIVACY_FILE).exists()


def test_a_held_task_reserves_only_once_approved_and_one_that_cannot_be_paid_is_not_held(home, task) -> None:
    write_policy(home, 'approval = "manual"\n[privacy]\nmax_epsilon = 30.0\n')
    held = gate(home).admit(task(id="t-1"))
    assert isinstance(held, Held), held
    assert PrivacyLedger(home).reservations() == [] and reserved_events(home) == []

    ApprovalStore(home).approve(held.job_id, by="carol", reason="ok")
    admitted = gate(home).admit(task(id="t-1"))
    assert isinstance(admitted, Admitted), admitted
    [reservation] = PrivacyLedger(home).reservations()
    assert reservation.rounds_run == 1 and len(reserved_events(home)) == 1

    hopeless = gate(home).admit(task(id="u-1", experiment_id=2, privacy=dp(0.3)))
    assert isinstance(hopeless, Refused) and "privacy budget" in hopeless.public, hopeless
    assert [job.experiment_id for job in ApprovalStore(home).jobs()] == [1]  # no administrator asked for it


def test_a_reservation_the_audit_trail_cannot_record_is_not_made(home, task) -> None:
    class BrokenAudit(AuditLog):
        def append(self, *args: Any, **kw: Any) -> Any:
            raise DataError("the audit log's end disagrees with its head")

    refused = gate(home, audit=BrokenAudit(home)).admit(task())
    assert isinstance(refused, Refused) and refused.kind is FailureKind.ERROR, refused
    assert "disagrees with its head" in refused.reason and "privacy ledger or audit trail" in refused.public
    assert PrivacyLedger(home).reservations() == []


@pytest.fixture(scope="module")
def tagged_phantoms(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from laulima.imaging.phantoms import write_site_dataset
    from tests.imaging.helpers import SHAPE, SPACING_MM

    root = tmp_path_factory.mktemp("phantoms")
    common: dict[str, Any] = {"n_sites": 2, "seed": 1, "n_train": 2, "n_test": 0, "spacing_mm": SPACING_MM}
    return (
        write_site_dataset(root / "a", site_index=0, shape=SHAPE, **common),
        write_site_dataset(root / "b", site_index=1, shape=SHAPE, **common),
    )


def test_a_tag_charges_every_dataset_it_reads(tmp_path: Path, task: MakeTask, tagged_phantoms) -> None:
    home = tmp_path / "tagged"
    catalog = Catalog(home)
    catalog.add("t1-a", tagged_phantoms[0], tags=["t1"])
    catalog.add("t1-b", tagged_phantoms[1], tags=["t1"])
    write_policy(home, "[privacy]\nmax_epsilon = 30.0\n")
    admitted = gate(home).admit(task(dataset="tag:t1"))
    assert isinstance(admitted, Admitted), admitted
    assert [c.reservation.dataset for c in admitted.privacy] == ["t1-a", "t1-b"]
    assert PrivacyLedger(home).datasets() == ["t1-a", "t1-b"]
    assert [e["dataset"] for e in reserved_events(home)] == ["t1-a", "t1-b"]


# -- laulima site privacy ------------------------------------------------------------------------


def table_rows(out: str) -> list[list[str]]:
    """The body rows of the rich tables in ``out``, as their cells' text."""
    return [[cell.strip() for cell in line.split("│")[1:-1]] for line in out.splitlines() if line.startswith("│")]


def test_site_privacy_prints_budget_spent_left_and_each_reservation(home, task) -> None:
    write_policy(home, "[privacy]\nmax_epsilon = 40.0\n")
    assert isinstance(gate(home).admit(task(id="t-1", experiment_id=3, experiment_name="brats")), Admitted)
    assert isinstance(gate(home).admit(task(id="t-2", experiment_id=3, experiment_name="brats", round=2)), Admitted)
    other = task(id="u-1", experiment_id=4, experiment_name="lung", privacy=dp(2.0, clip=0.5), rounds=3)
    assert isinstance(gate(home).admit(other), Admitted)
    brats = epsilon([GaussianRelease(0.8, 10)], DELTA)
    so_far = epsilon([GaussianRelease(0.8, 2)], DELTA)
    lung = epsilon([GaussianRelease(2.0, 3)], DELTA)
    lung_so_far = epsilon([GaussianRelease(2.0, 1)], DELTA)
    spent = epsilon([GaussianRelease(0.8, 10), GaussianRelease(2.0, 3)], DELTA)

    result = CliRunner().invoke(app, ["site", "privacy", "--home", str(home)], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    out = result.output
    assert "privacy budget: ε = 40.00 per dataset at δ = 1e-05" in out
    rows = table_rows(out)
    assert spent < brats + lung
    assert ["brain", "40.00", f"{spent:.2f}", f"{40.0 - spent:.2f}", "2"] in rows, out
    assert ["brain", "3 brats", "0.8", "1", "1e-05", "2 / 10", f"{so_far:.2f}", f"{brats:.2f}"] in rows, out
    assert ["brain", "4 lung", "2", "0.5", "1e-05", "1 / 3", f"{lung_so_far:.2f}", f"{lung:.2f}"] in rows, out


def test_site_privacy_without_a_ledger_says_nothing_was_spent_and_creates_nothing(home) -> None:
    result = CliRunner().invoke(app, ["site", "privacy", "--home", str(home)], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "no privacy budget ([privacy] max_epsilon is unset)" in result.output
    assert "no privacy spent" in result.output
    assert not (home / PRIVACY_FILE).exists()


def test_policy_show_and_check_include_the_privacy_table(home) -> None:
    write_policy(home, "[privacy]\nmax_epsilon = 8.5\ndelta = 1e-6\nmin_noise_multiplier = 0.7\nmax_clip = 3.0\n")
    runner = CliRunner()
    shown = runner.invoke(app, ["site", "policy", "show", "--home", str(home)], env={"COLUMNS": "250"})
    assert shown.exit_code == 0, shown.output
    assert (
        "[privacy]\nmax_epsilon = 8.5\ndelta = 1e-06\nmin_noise_multiplier = 0.7\nrequire = false\nmax_clip = 3.0"
        in (shown.output)
    )
    assert parse_policy(tomllib.loads(shown.output)) == load_policy(home)
    checked = runner.invoke(app, ["site", "policy", "check", "--home", str(home)], env={"COLUMNS": "250"})
    assert checked.exit_code == 0, checked.output
    assert "privacy: max_epsilon=8.5 at delta=1e-06 min_noise_multiplier=0.7 require=false max_clip=3" in (
        checked.output
    )
