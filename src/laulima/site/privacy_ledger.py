"""What each of the site's datasets has spent of its privacy budget, and on which experiment.

A training task with DP parameters (``TaskPublic.privacy``) releases, each round, the site's
update clipped to ``clip`` with Gaussian noise of std ``noise_multiplier x clip``: one
:class:`~laulima.core.privacy.accountant.GaussianRelease` per round. An experiment of R
rounds on a dataset costs ``GaussianRelease(noise_multiplier, count=R)``, and the dataset's
spending is the RDP composition of all its experiments' releases at the policy's δ
(:func:`~laulima.core.privacy.accountant.epsilon`; never a sum of ε's, never computed here).

The site, not the hub, accounts. The whole experiment is *reserved* at its first admitted
training task — so experiments running side by side cannot overdraw a dataset, and none is
cut off halfway — as one row per (dataset, experiment) with the parameters it was reserved
at. Later tasks of the experiment must ask for the same parameters; each admitted task is
recorded once (by task id, so an agent restarted mid-task does not count it twice). A task
beyond the rounds reserved (a round opened again, a local-only model) is one release more,
reserved on its own if the budget still pays for it. Check and reserve are one
``BEGIN IMMEDIATE`` transaction.

Stored in ``home/privacy.db`` (SQLite, mode 0600), shared by the agent and
``laulima site privacy``. Nothing in it is ever removed: a reservation is spent whether or not
its rounds all ran.
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from laulima.core.privacy.accountant import GaussianRelease, epsilon
from laulima.core.protocol import TaskPublic
from laulima.errors import PrivacyError
from laulima.site.policy import PrivacyPolicy
from laulima.site.sqlite_store import SiteStore

__all__ = [
    "PRIVACY_FILE",
    "Charge",
    "PrivacyAsk",
    "PrivacyLedger",
    "Reservation",
    "experiment_epsilon",
    "format_epsilon",
]

PRIVACY_FILE = "privacy.db"
_SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS reservations (
    dataset TEXT NOT NULL,
    experiment_id INTEGER NOT NULL,
    experiment_name TEXT NOT NULL,
    noise_multiplier REAL NOT NULL,
    delta REAL NOT NULL,
    clip REAL NOT NULL,
    rounds INTEGER NOT NULL,
    reserved INTEGER NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (dataset, experiment_id)
);
CREATE TABLE IF NOT EXISTS releases (
    dataset TEXT NOT NULL,
    experiment_id INTEGER NOT NULL,
    task_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    admitted_at REAL NOT NULL,
    PRIMARY KEY (dataset, task_id),
    FOREIGN KEY (dataset, experiment_id) REFERENCES reservations (dataset, experiment_id)
);
"""


def experiment_epsilon(noise_multiplier: float, rounds_done: int, delta: float) -> float:
    """ε so far of an experiment that released ``rounds_done`` rounds with this noise (0.0 for none,
    ``math.inf`` without noise): what the agent reports after each round."""
    return epsilon([GaussianRelease(noise_multiplier, count=rounds_done)], delta)


def format_epsilon(value: float) -> str:
    """ε as reasons and tables print it: two decimals, ``∞`` for no privacy at all."""
    return "∞" if math.isinf(value) else f"{value:.2f}"


@dataclass(frozen=True)
class PrivacyAsk:
    """What one training task asks to release: its experiment's DP parameters and rounds."""

    experiment_id: int
    experiment_name: str
    task_id: str
    round: int
    rounds: int
    noise_multiplier: float
    clip: float
    delta: float

    @classmethod
    def from_task(cls, task: TaskPublic) -> PrivacyAsk | None:
        """The task's ask; None when it carries no DP parameters (nothing to account)."""
        if task.privacy is None:
            return None
        return cls(
            experiment_id=task.experiment_id,
            experiment_name=task.experiment_name,
            task_id=task.id,
            round=task.round,
            rounds=task.rounds,
            noise_multiplier=task.privacy.noise_multiplier,
            clip=task.privacy.clip,
            delta=task.privacy.delta,
        )


@dataclass(frozen=True)
class Reservation:
    """One experiment's reservation at one dataset."""

    dataset: str
    experiment_id: int
    experiment_name: str
    noise_multiplier: float
    delta: float
    """The experiment's own δ (the site's ε are at the policy's δ)."""
    clip: float
    rounds: int
    """The experiment's rounds, as its first task here said."""
    reserved: int
    """Releases paid for: ``rounds``, plus any task beyond them (a round opened again, a local-only model)."""
    rounds_run: int
    """Training tasks admitted so far."""
    created_at: float

    def release(self) -> GaussianRelease:
        """What the reservation pays for, as the accountant takes it."""
        return GaussianRelease(self.noise_multiplier, count=self.reserved)

    def epsilon(self, delta: float) -> float:
        """ε of the whole reservation at ``delta``."""
        return epsilon([self.release()], delta)

    def epsilon_so_far(self, delta: float) -> float:
        """ε of the rounds admitted so far at ``delta``."""
        return experiment_epsilon(self.noise_multiplier, self.rounds_run, delta)


@dataclass(frozen=True)
class Charge:
    """What admitting one task does at one dataset."""

    reservation: Reservation
    """The reservation as it stands with this task counted."""
    first: bool
    """This task makes the experiment's reservation at the dataset."""
    new_releases: int
    """Releases reserved by this task: the experiment's rounds for its first task, 1 for a task
    beyond them, 0 when its reservation already paid for it."""
    experiment_epsilon: float
    """ε of the experiment's whole reservation, at the policy's δ."""
    spent: float
    """ε of the dataset with this task counted, at the policy's δ."""


class PrivacyLedger(SiteStore):
    """``home/privacy.db``: the site's privacy reservations."""

    file_name = PRIVACY_FILE
    what = "the privacy ledger"
    schema = _SCHEMA
    schema_version = _SCHEMA_VERSION
    when_damaged = (
        "restore it from a backup — until then no training task with differential privacy runs here (moving it "
        "aside would forget what was spent)"
    )

    # -- admitting ---------------------------------------------------------------------------

    def check(self, datasets: Sequence[str], ask: PrivacyAsk, policy: PrivacyPolicy) -> list[Charge]:
        """What :meth:`reserve` would do, writing nothing; ``PrivacyError`` (a reason the hub may
        be told) when it would refuse. For a task about to wait for an administrator."""
        with self._read() as db:
            return self._plan(db, datasets, ask, policy, self._clock())

    def reserve(
        self,
        datasets: Sequence[str],
        ask: PrivacyAsk,
        policy: PrivacyPolicy,
        *,
        record: Callable[[Sequence[Charge]], None] | None = None,
    ) -> list[Charge]:
        """Admit ``ask`` at every dataset of ``datasets``, or at none.

        Raises ``PrivacyError`` — whose message may go to the hub: dataset names and ε, no
        paths or counts — when the task's parameters differ from its experiment's reservation
        or a reservation would bring a dataset above ``policy.max_epsilon``; nothing is written
        then. ``record`` is called with the charges that reserve something new, inside the
        transaction: if it raises (the audit trail cannot be written), nothing is reserved.
        """
        with self._transaction() as db:
            now = self._clock()
            charges = self._plan(db, datasets, ask, policy, now)
            for charge in charges:
                r = charge.reservation
                if charge.first:
                    db.execute(
                        "INSERT INTO reservations (dataset, experiment_id, experiment_name, noise_multiplier, delta,"
                        " clip, rounds, reserved, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            r.dataset,
                            r.experiment_id,
                            r.experiment_name,
                            r.noise_multiplier,
                            r.delta,
                            r.clip,
                            r.rounds,
                            r.reserved,
                            r.created_at,
                        ),
                    )
                elif charge.new_releases:
                    db.execute(
                        "UPDATE reservations SET reserved = ? WHERE dataset = ? AND experiment_id = ?",
                        (r.reserved, r.dataset, r.experiment_id),
                    )
                db.execute(
                    "INSERT OR IGNORE INTO releases (dataset, experiment_id, task_id, round, admitted_at)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (r.dataset, r.experiment_id, ask.task_id, ask.round, now),
                )
            new = [charge for charge in charges if charge.new_releases]
            if new and record is not None:
                record(new)
        return charges

    def _plan(
        self, db: sqlite3.Connection, datasets: Sequence[str], ask: PrivacyAsk, policy: PrivacyPolicy, now: float
    ) -> list[Charge]:
        """The charges of ``ask`` at each dataset, or ``PrivacyError``. A task its reservation
        already pays for is never refused for the budget (the policy's budget may have been
        lowered since): an experiment is not cut off halfway."""
        charges = []
        for dataset in dict.fromkeys(datasets):  # each once, in order
            rows = self._rows(db, dataset)
            mine = next((r for r in rows if r.experiment_id == ask.experiment_id), None)
            others = [r.release() for r in rows if r is not mine]
            if mine is None:
                new = ask.rounds
                planned = _reservation(dataset, ask, now)
            else:
                _same_parameters(mine, ask)
                counted = _counted(db, dataset, ask.task_id)
                run = mine.rounds_run + (0 if counted else 1)
                new = 1 if run > mine.reserved else 0
                planned = replace(mine, reserved=mine.reserved + new, rounds_run=run)
            spent = epsilon([*others, planned.release()], policy.delta)
            if new and policy.max_epsilon is not None and spent > policy.max_epsilon:
                before = epsilon(others if mine is None else [*others, mine.release()], policy.delta)
                raise PrivacyError(
                    f"privacy budget: this experiment would bring dataset {dataset!r} to ε = {format_epsilon(spent)} "
                    f"({planned.reserved} rounds, noise multiplier {ask.noise_multiplier:g}, δ = {policy.delta:g}); "
                    f"the site allows ε = {policy.max_epsilon:.2f} and has spent {format_epsilon(before)} "
                    "(ask for more noise or fewer rounds)",
                    dataset=dataset,
                    field="privacy",
                )
            charges.append(Charge(planned, mine is None, new, planned.epsilon(policy.delta), spent))
        return charges

    # -- reading -----------------------------------------------------------------------------

    def reservations(self, dataset: str | None = None) -> list[Reservation]:
        """Every reservation (of ``dataset``), by dataset then in the order they were made."""
        with self._read() as db:
            if dataset is not None:
                return self._rows(db, dataset)
            names = [row[0] for row in db.execute("SELECT DISTINCT dataset FROM reservations ORDER BY dataset")]
            return [r for name in names for r in self._rows(db, name)]

    def datasets(self) -> list[str]:
        """The datasets that have spent anything, by name."""
        with self._read() as db:
            return [row[0] for row in db.execute("SELECT DISTINCT dataset FROM reservations ORDER BY dataset")]

    def spent(self, dataset: str, policy: PrivacyPolicy) -> float:
        """ε ``dataset`` has spent (reserved) over every experiment, at the policy's δ."""
        return epsilon([r.release() for r in self.reservations(dataset)], policy.delta)

    def left(self, dataset: str, policy: PrivacyPolicy) -> float:
        """What is left of the budget at ``dataset`` (never below 0); ``math.inf`` without a budget."""
        if policy.max_epsilon is None:
            return math.inf
        return max(0.0, policy.max_epsilon - self.spent(dataset, policy))

    def _rows(self, db: sqlite3.Connection, dataset: str) -> list[Reservation]:
        rows = db.execute(
            "SELECT r.*, (SELECT COUNT(*) FROM releases x WHERE x.dataset = r.dataset"
            " AND x.experiment_id = r.experiment_id) AS rounds_run"
            " FROM reservations r WHERE r.dataset = ? ORDER BY r.created_at, r.experiment_id",
            (dataset,),
        ).fetchall()
        return [
            Reservation(
                dataset=row["dataset"],
                experiment_id=row["experiment_id"],
                experiment_name=row["experiment_name"],
                noise_multiplier=row["noise_multiplier"],
                delta=row["delta"],
                clip=row["clip"],
                rounds=row["rounds"],
                reserved=row["reserved"],
                rounds_run=row["rounds_run"],
                created_at=row["created_at"],
            )
            for row in rows
        ]


def _reservation(dataset: str, ask: PrivacyAsk, now: float) -> Reservation:
    """The reservation the experiment's first task here makes: all its rounds, this one run."""
    return Reservation(
        dataset=dataset,
        experiment_id=ask.experiment_id,
        experiment_name=ask.experiment_name,
        noise_multiplier=ask.noise_multiplier,
        delta=ask.delta,
        clip=ask.clip,
        rounds=ask.rounds,
        reserved=ask.rounds,
        rounds_run=1,
        created_at=now,
    )


def _counted(db: sqlite3.Connection, dataset: str, task_id: str) -> bool:
    row = db.execute("SELECT 1 FROM releases WHERE dataset = ? AND task_id = ?", (dataset, task_id)).fetchone()
    return row is not None


def _same_parameters(mine: Reservation, ask: PrivacyAsk) -> None:
    """Refuse a task whose DP parameters differ from those its experiment reserved: the site
    accounts an experiment at the parameters of its first task."""
    asked = (ask.noise_multiplier, ask.clip, ask.delta, ask.rounds)
    reserved = (mine.noise_multiplier, mine.clip, mine.delta, mine.rounds)
    if asked != reserved:
        raise PrivacyError(
            f"privacy: this task of experiment {ask.experiment_name!r} asks for noise multiplier "
            f"{ask.noise_multiplier:g}, clip {ask.clip:g}, δ = {ask.delta:g} over {ask.rounds} rounds, but the "
            f"experiment reserved noise multiplier {mine.noise_multiplier:g}, clip {mine.clip:g}, "
            f"δ = {mine.delta:g} over {mine.rounds} rounds at dataset {mine.dataset!r}; an experiment keeps the "
            "parameters of its first task (submit a new experiment to change them)",
            dataset=mine.dataset,
            field="privacy",
        )
