"""The site's privacy ledger: reservations per (dataset, experiment), composed by the accountant."""

from __future__ import annotations

import math
import os
import sqlite3
import stat
import threading
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from laulima.core.privacy.accountant import GaussianRelease, epsilon
from laulima.errors import DataError, PrivacyError
from laulima.site.policy import PrivacyPolicy
from laulima.site.privacy_ledger import (
    PRIVACY_FILE,
    Charge,
    PrivacyAsk,
    PrivacyLedger,
    experiment_epsilon,
    format_epsilon,
)

DELTA = 1e-5


def ask(**overrides: Any) -> PrivacyAsk:
    fields: dict[str, Any] = {
        "experiment_id": 1,
        "experiment_name": "brats",
        "task_id": "t-1",
        "round": 1,
        "rounds": 5,
        "noise_multiplier": 1.0,
        "clip": 1.0,
        "delta": DELTA,
    }
    fields.update(overrides)
    return PrivacyAsk(**fields)


def budget(max_epsilon: float | None = 100.0, delta: float = DELTA) -> PrivacyPolicy:
    return PrivacyPolicy(max_epsilon=max_epsilon, delta=delta)


def rows(home: Path) -> list[tuple[Any, ...]]:
    """Everything the ledger holds, straight from the file."""
    with sqlite3.connect(home / PRIVACY_FILE) as db:
        reservations = db.execute("SELECT * FROM reservations ORDER BY dataset, experiment_id").fetchall()
        releases = db.execute("SELECT * FROM releases ORDER BY dataset, task_id").fetchall()
    return [*reservations, ("--",), *releases]


def test_the_first_task_reserves_the_whole_experiment_and_later_ones_only_count(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path, clock=lambda: 1000.0)
    [first] = ledger.reserve(["brain"], ask(), budget())
    whole = epsilon([GaussianRelease(1.0, count=5)], DELTA)
    assert (first.first, first.new_releases) == (True, 5)
    assert first.experiment_epsilon == pytest.approx(whole, rel=1e-12) and first.spent == pytest.approx(whole)
    assert (first.reservation.reserved, first.reservation.rounds_run) == (5, 1)

    [second] = ledger.reserve(["brain"], ask(task_id="t-2", round=2), budget())
    assert (second.first, second.new_releases, second.reservation.rounds_run) == (False, 0, 2)
    assert second.spent == pytest.approx(whole)  # nothing new was spent
    [again] = ledger.reserve(["brain"], ask(task_id="t-2", round=2), budget())  # the agent restarted mid-task
    assert again.reservation.rounds_run == 2

    [reservation] = ledger.reservations()
    assert reservation.dataset == "brain" and reservation.experiment_id == 1 and reservation.experiment_name == "brats"
    assert (reservation.noise_multiplier, reservation.clip, reservation.delta) == (1.0, 1.0, DELTA)
    assert (reservation.rounds, reservation.reserved, reservation.rounds_run) == (5, 5, 2)
    assert reservation.created_at == 1000.0
    assert ledger.spent("brain", budget()) == pytest.approx(whole)
    assert ledger.left("brain", budget(20.0)) == pytest.approx(20.0 - whole)
    assert ledger.left("brain", budget(1.0)) == 0.0  # never below 0 (the budget was lowered since)
    assert reservation.epsilon_so_far(DELTA) == pytest.approx(epsilon([GaussianRelease(1.0, count=2)], DELTA))


def test_experiments_on_one_dataset_compose_rather_than_add(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path)
    ledger.reserve(["brain"], ask(experiment_id=1, noise_multiplier=1.0, rounds=5), budget())
    [charge] = ledger.reserve(["brain"], ask(experiment_id=2, task_id="u-1", noise_multiplier=2.0, rounds=10), budget())
    a = epsilon([GaussianRelease(1.0, count=5)], DELTA)
    b = epsilon([GaussianRelease(2.0, count=10)], DELTA)
    both = epsilon([GaussianRelease(1.0, count=5), GaussianRelease(2.0, count=10)], DELTA)
    assert charge.experiment_epsilon == pytest.approx(b)
    assert charge.spent == pytest.approx(both) and ledger.spent("brain", budget()) == pytest.approx(both)
    assert both < a + b
    assert both > max(a, b)
    assert ledger.spent("chest", budget()) == 0.0  # datasets are budgeted apart
    assert ledger.left("chest", budget(3.0)) == 3.0 and ledger.left("brain", budget(None)) == math.inf
    assert [r.experiment_id for r in ledger.reservations("brain")] == [1, 2]


def test_spent_is_at_the_policys_delta(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path)
    ledger.reserve(["brain"], ask(delta=1e-6), budget(delta=1e-5))
    assert ledger.spent("brain", budget(delta=1e-5)) == pytest.approx(epsilon([GaussianRelease(1.0, 5)], 1e-5))
    assert ledger.spent("brain", budget(delta=1e-3)) == pytest.approx(epsilon([GaussianRelease(1.0, 5)], 1e-3))


def test_an_experiment_over_budget_is_refused_saying_by_how_much_and_nothing_is_written(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path)
    ledger.reserve(["brain"], ask(experiment_id=1, noise_multiplier=2.0, rounds=5), budget(8.0))
    before = rows(tmp_path)
    spent = epsilon([GaussianRelease(2.0, 5)], DELTA)
    would = epsilon([GaussianRelease(2.0, 5), GaussianRelease(0.8, 10)], DELTA)
    assert spent < 8.0 < would
    too_much = ask(experiment_id=2, experiment_name="greedy", task_id="u-1", noise_multiplier=0.8, rounds=10)
    with pytest.raises(PrivacyError) as info:
        ledger.reserve(["brain"], too_much, budget(8.0))
    assert str(info.value) == (
        f"privacy budget: this experiment would bring dataset 'brain' to ε = {would:.2f} (10 rounds, noise "
        f"multiplier 0.8, δ = 1e-05); the site allows ε = 8.00 and has spent {spent:.2f} (ask for more noise or "
        "fewer rounds)"
    )
    with pytest.raises(PrivacyError, match="privacy budget"):
        ledger.check(["brain"], too_much, budget(8.0))
    assert rows(tmp_path) == before
    assert [r.experiment_id for r in ledger.reservations()] == [1]


def test_no_noise_is_infinite_epsilon_refused_under_a_budget_and_recorded_without(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path)
    with pytest.raises(PrivacyError, match="to ε = ∞"):
        ledger.reserve(["brain"], ask(noise_multiplier=0.0), budget(1000.0))
    [charge] = ledger.reserve(["brain"], ask(noise_multiplier=0.0), budget(None))
    assert charge.spent == math.inf and format_epsilon(charge.spent) == "∞"


def test_a_check_writes_nothing(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path)
    before = rows(tmp_path)
    [charge] = ledger.check(["brain"], ask(), budget())
    assert charge.first and charge.new_releases == 5
    assert rows(tmp_path) == before and ledger.reservations() == []


def test_a_restarted_ledger_keeps_every_reservation(tmp_path: Path) -> None:
    first = PrivacyLedger(tmp_path)
    first.reserve(["brain"], ask(experiment_id=1), budget())
    first.reserve(["brain"], ask(experiment_id=1, task_id="t-2", round=2), budget())
    first.reserve(["brain", "chest"], ask(experiment_id=2, task_id="u-1", noise_multiplier=3.0, rounds=2), budget())
    again = PrivacyLedger(tmp_path)
    assert again.reservations() == first.reservations()
    assert again.datasets() == ["brain", "chest"]
    assert [(r.experiment_id, r.rounds_run) for r in again.reservations("brain")] == [(1, 2), (2, 1)]
    expected = epsilon([GaussianRelease(1.0, 5), GaussianRelease(3.0, 2)], DELTA)
    assert again.spent("brain", budget()) == pytest.approx(expected)
    [charge] = again.reserve(["brain"], ask(experiment_id=1, task_id="t-3", round=3), budget())
    assert (charge.new_releases, charge.reservation.rounds_run) == (0, 3)


@pytest.mark.parametrize(
    "changed",
    [{"noise_multiplier": 0.9}, {"clip": 2.0}, {"delta": 1e-6}, {"rounds": 6}],
)
def test_a_task_whose_parameters_differ_from_its_reservation_is_refused(tmp_path: Path, changed: dict[str, Any]):
    ledger = PrivacyLedger(tmp_path)
    ledger.reserve(["brain"], ask(), budget())
    before = rows(tmp_path)
    with pytest.raises(PrivacyError, match="keeps the parameters of its first task") as info:
        ledger.reserve(["brain"], ask(task_id="t-2", round=2, **changed), budget())
    assert "reserved noise multiplier 1, clip 1, δ = 1e-05 over 5 rounds at dataset 'brain'" in str(info.value)
    assert rows(tmp_path) == before


def test_a_task_beyond_the_reserved_rounds_reserves_one_release_more_if_the_budget_pays(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path)
    two = ask(rounds=2, noise_multiplier=2.0)
    ledger.reserve(["brain"], two, budget())
    ledger.reserve(["brain"], replace(two, task_id="t-2", round=2), budget())
    [extra] = ledger.reserve(["brain"], replace(two, task_id="t-3", round=3), budget())  # e.g. a local-only model
    assert (extra.first, extra.new_releases, extra.reservation.reserved, extra.reservation.rounds_run) == (
        False,
        1,
        3,
        3,
    )
    assert extra.spent == pytest.approx(epsilon([GaussianRelease(2.0, 3)], DELTA))
    tight = budget(extra.spent + 1e-9)
    before = rows(tmp_path)
    with pytest.raises(PrivacyError, match=r"\(4 rounds, noise multiplier 2"):
        ledger.reserve(["brain"], replace(two, task_id="t-4", round=4), tight)
    assert rows(tmp_path) == before


def test_a_lowered_budget_does_not_cut_off_an_experiment_it_reserved(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path)
    ledger.reserve(["brain"], ask(), budget(100.0))
    [charge] = ledger.reserve(["brain"], ask(task_id="t-2", round=2), budget(0.5))
    assert charge.new_releases == 0 and charge.spent > 0.5
    with pytest.raises(PrivacyError):
        ledger.reserve(["brain"], ask(experiment_id=2, task_id="u-1"), budget(0.5))


def test_several_datasets_are_reserved_all_or_none(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path)
    ledger.reserve(["chest"], ask(experiment_id=1, noise_multiplier=1.0, rounds=5), budget())
    chest = epsilon([GaussianRelease(1.0, 5)], DELTA)
    before = rows(tmp_path)
    with pytest.raises(PrivacyError, match="dataset 'chest'"):
        ledger.reserve(["brain", "chest"], ask(experiment_id=2, task_id="u-1"), budget(chest + 0.1))
    assert rows(tmp_path) == before and ledger.reservations("brain") == []
    charges = ledger.reserve(["brain", "chest", "brain"], ask(experiment_id=2, task_id="u-1"), budget())
    assert [c.reservation.dataset for c in charges] == ["brain", "chest"]


def test_when_the_reservation_cannot_be_recorded_nothing_is_reserved(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path)
    seen: list[Sequence[Charge]] = []

    def broken(charges: Sequence[Charge]) -> None:
        seen.append(charges)
        raise DataError("the audit trail cannot be written")

    with pytest.raises(DataError):
        ledger.reserve(["brain"], ask(), budget(), record=broken)
    assert [[c.reservation.dataset for c in charges] for charges in seen] == [["brain"]]
    assert ledger.reservations() == []
    recorded: list[Sequence[Charge]] = []
    ledger.reserve(["brain"], ask(), budget(), record=recorded.append)
    ledger.reserve(["brain"], ask(task_id="t-2", round=2), budget(), record=recorded.append)
    assert len(recorded) == 1  # only what reserves something new is recorded


def test_concurrent_experiments_cannot_overdraw_a_dataset(tmp_path: Path) -> None:
    one = epsilon([GaussianRelease(1.0, 5)], DELTA)
    rules = budget(one * 1.2)  # room for one experiment, not two
    start = threading.Barrier(4)
    outcomes: list[str] = []

    def reserve(experiment_id: int) -> None:
        ledger = PrivacyLedger(tmp_path)  # each its own connection, like the agent and another process
        start.wait()
        try:
            ledger.reserve(["brain"], ask(experiment_id=experiment_id, task_id=f"t-{experiment_id}"), rules)
            outcomes.append("reserved")
        except PrivacyError:
            outcomes.append("refused")

    PrivacyLedger(tmp_path)
    threads = [threading.Thread(target=reserve, args=(i,)) for i in range(1, 5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["refused", "refused", "refused", "reserved"]
    assert PrivacyLedger(tmp_path).spent("brain", rules) == pytest.approx(one)


@pytest.mark.skipif(os.name != "posix", reason="file modes")
def test_the_ledger_is_owner_only(tmp_path: Path) -> None:
    (tmp_path / PRIVACY_FILE).touch(mode=0o644)
    os.chmod(tmp_path / PRIVACY_FILE, 0o644)
    PrivacyLedger(tmp_path)
    assert stat.S_IMODE((tmp_path / PRIVACY_FILE).stat().st_mode) == 0o600


def test_a_damaged_ledger_names_the_file_and_what_to_do(tmp_path: Path) -> None:
    (tmp_path / PRIVACY_FILE).write_bytes(b"not a database " * 100)
    with pytest.raises(Exception, match="privacy ledger cannot be read.*restore it from a backup"):
        PrivacyLedger(tmp_path)


def test_experiment_epsilon_is_the_accountants() -> None:
    assert experiment_epsilon(0.8, 10, DELTA) == epsilon([GaussianRelease(0.8, count=10)], DELTA)
    assert experiment_epsilon(1.3, 3, 1e-6) == epsilon([GaussianRelease(1.3, count=3)], 1e-6)
    assert experiment_epsilon(1.0, 0, DELTA) == 0.0
    assert experiment_epsilon(0.0, 1, DELTA) == math.inf
    assert experiment_epsilon(1.0, 2, DELTA) < experiment_epsilon(1.0, 3, DELTA)
