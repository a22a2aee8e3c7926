"""Jobs waiting for a site administrator, and what the administrator decided.

When :func:`laulima.site.policy.decide` answers ASK, the agent records the job here
(:meth:`ApprovalStore.request`, once per experiment — or per round, under
``approval_scope = "round"``); ``laulima site jobs`` lists it, ``laulima site approve`` /
``reject`` decide it, and the agent reads the decision back with
:meth:`ApprovalStore.decision_for` and hands it to ``decide``.

Stored in ``home/approvals.db`` (SQLite, mode 0600), so the agent and the administrator's
commands — separate processes — share it safely. A decision is final: deciding a job twice
is an error, and an approval never covers a different algorithm or dataset than the one
reviewed. Error messages here are for the site's administrator and may name local files;
the ``why`` of a :class:`~laulima.site.policy.Decision` never does.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import os
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from laulima.errors import ConfigurationError
from laulima.site.policy import Decision, JobFacts
from laulima.site.sqlite_store import SiteStore

__all__ = [
    "APPROVALS_FILE",
    "MAX_MANIFEST_BYTES",
    "AlreadyDecided",
    "ApprovalStore",
    "PendingJob",
    "UnknownJob",
]

APPROVALS_FILE = "approvals.db"
MAX_MANIFEST_BYTES = 1024 * 1024
"""Largest manifest kept for review: a bundle's manifest lists files and requirements."""
_MAX_REASON = 1000
_MAX_NAME = 64
_SCHEMA_VERSION = 1
_EXPERIMENT_WIDE = -1
"""``round_key`` of a job whose approval covers the whole experiment."""

Scope = Literal["experiment", "round"]
Status = Literal["pending", "approved", "rejected"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    experiment_id INTEGER NOT NULL,
    round_key INTEGER NOT NULL,
    scope TEXT NOT NULL CHECK (scope IN ('experiment', 'round')),
    experiment_name TEXT NOT NULL,
    requester TEXT NOT NULL,
    algorithm_name TEXT NOT NULL,
    entry_point TEXT NOT NULL,
    digest TEXT,
    signer TEXT,
    dataset TEXT NOT NULL,
    rounds INTEGER NOT NULL,
    round INTEGER NOT NULL,
    kind TEXT NOT NULL,
    task_id TEXT NOT NULL,
    received_at REAL NOT NULL,
    manifest TEXT NOT NULL,
    UNIQUE (experiment_id, round_key)
);
CREATE TABLE IF NOT EXISTS decisions (
    job_id INTEGER PRIMARY KEY REFERENCES jobs (id),
    verdict TEXT NOT NULL CHECK (verdict IN ('approved', 'rejected')),
    decided_by TEXT NOT NULL,
    reason TEXT NOT NULL,
    decided_at REAL NOT NULL
);
"""


class UnknownJob(ConfigurationError):
    """No job with that id is recorded at this site."""


class AlreadyDecided(ConfigurationError):
    """The job was approved or rejected before; decisions are final."""


@dataclass(frozen=True)
class PendingJob:
    """A job recorded for review, with its decision once there is one."""

    id: int
    experiment_id: int
    experiment_name: str
    requester: str
    algorithm_name: str
    entry_point: str
    digest: str | None
    """Bundle digest; None for a built-in algorithm."""
    signer: str | None
    dataset: str
    rounds: int
    round: int
    """The round whose task first asked."""
    kind: str
    scope: Scope
    """What a decision covers: the whole experiment, or only ``round``."""
    task_id: str
    """The first task that asked; later tasks of the same scope share this job."""
    received_at: float
    manifest: dict[str, Any]
    status: Status = "pending"
    decided_by: str | None = None
    reason: str | None = None
    decided_at: float | None = None

    @property
    def decision(self) -> Decision | None:
        """RUN for an approval, REFUSE for a rejection (its ``why`` may go to the hub), None while pending."""
        if self.status == "approved":
            return Decision.run(f"approved by {self.decided_by} at {_iso(self.decided_at)}")
        if self.status == "rejected":
            return Decision.refuse(f"rejected by the site's administrator: {self.reason}")
        return None

    def covers(self, job: JobFacts) -> bool:
        """Whether a decision on this record speaks for ``job``: same algorithm, same dataset."""
        return (
            job.entry_point == self.entry_point
            and job.bundle_digest == self.digest
            and job.dataset == self.dataset
            and (self.scope == "experiment" or job.round == self.round)
        )


class ApprovalStore(SiteStore):
    """``home/approvals.db``: pending jobs and the administrator's decisions (the agent and
    ``laulima site approve`` may work on the file at the same time)."""

    file_name = APPROVALS_FILE
    what = "the approvals store"
    schema = _SCHEMA
    schema_version = _SCHEMA_VERSION
    when_damaged = "move it aside and restart the agent (pending jobs will be asked for again)"

    # -- recording -------------------------------------------------------------------------

    def request(
        self,
        job: JobFacts,
        *,
        task_id: str,
        scope: Scope = "experiment",
        algorithm_name: str | None = None,
        manifest: Mapping[str, Any] | None = None,
    ) -> PendingJob:
        """Record that ``job`` waits for approval; the existing record if one already does.

        One record per experiment under ``scope = "experiment"``, per experiment and round
        under ``"round"``: the first task's details are kept and later calls return them
        (with any decision made since). ``manifest`` is the bundle's manifest, kept for review.
        """
        if scope not in ("experiment", "round"):
            raise ConfigurationError(f"approval scope {scope!r} is not 'experiment' or 'round'", field="scope")
        _check_text(task_id, "task id", 128)
        name = algorithm_name or job.entry_point
        _check_text(name, "algorithm name", 256)
        manifest_json = _manifest_json(manifest, job)
        round_key = job.round if scope == "round" else _EXPERIMENT_WIDE
        with self._transaction() as db:
            db.execute(
                "INSERT OR IGNORE INTO jobs (experiment_id, round_key, scope, experiment_name, requester,"
                " algorithm_name, entry_point, digest, signer, dataset, rounds, round, kind, task_id,"
                " received_at, manifest) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    job.experiment_id,
                    round_key,
                    scope,
                    job.experiment_name,
                    job.requester,
                    name,
                    job.entry_point,
                    job.bundle_digest,
                    job.bundle_signer,
                    job.dataset,
                    job.rounds,
                    job.round,
                    job.kind,
                    task_id,
                    self._clock(),
                    manifest_json,
                ),
            )
            row = db.execute(
                f"{_SELECT} WHERE j.experiment_id = ? AND j.round_key = ?", (job.experiment_id, round_key)
            ).fetchone()
        return _job(row)

    # -- reading ---------------------------------------------------------------------------

    def pending(self) -> list[PendingJob]:
        """Jobs still waiting for a decision, oldest first."""
        with self._read() as db:
            rows = db.execute(f"{_SELECT} WHERE d.job_id IS NULL ORDER BY j.received_at, j.id").fetchall()
        return [_job(row) for row in rows]

    def jobs(self, *, limit: int = 100) -> list[PendingJob]:
        """The ``limit`` most recently received jobs, decided or not, newest first."""
        with self._read() as db:
            rows = db.execute(f"{_SELECT} ORDER BY j.received_at DESC, j.id DESC LIMIT ?", (limit,)).fetchall()
        return [_job(row) for row in rows]

    def get(self, job_id: int | str) -> PendingJob:
        """The job ``job_id`` (as ``laulima site jobs`` lists it), pending or decided."""
        number = _job_number(job_id)
        with self._read() as db:
            row = db.execute(f"{_SELECT} WHERE j.id = ?", (number,)).fetchone()
        if row is None:
            raise UnknownJob(
                f"no job {number} at this site ({self.path}); `laulima site jobs` lists the jobs waiting",
                job=number,
            )
        return _job(row)

    def decision_for(
        self, experiment_id: int, round: int | None = None, *, job: JobFacts | None = None
    ) -> Decision | None:
        """The administrator's decision that covers ``experiment_id`` (and ``round``), or None.

        ``round=None`` looks for an experiment-wide decision only; with a round, that round's
        decision counts, or else the experiment's — but a rejection of the whole experiment
        always wins. Given ``job``, an approval made for another algorithm or dataset
        (a bundle with another digest, say) does not count: the job is refused instead, as
        the hub changed what the administrator reviewed.
        """
        if round is not None and (isinstance(round, bool) or not isinstance(round, int) or round < 0):
            raise ConfigurationError(f"round {round!r} is not a round number (0 or more)", field="round")
        with self._read() as db:
            rows = db.execute(
                f"{_SELECT} WHERE j.experiment_id = ? AND j.round_key IN (?, ?) AND d.job_id IS NOT NULL",
                (experiment_id, _EXPERIMENT_WIDE, _EXPERIMENT_WIDE if round is None else round),
            ).fetchall()
        decided = {row["round_key"]: _job(row) for row in rows}
        wide = decided.get(_EXPERIMENT_WIDE)
        this_round = decided.get(round) if round is not None else None
        if wide is not None and wide.status == "rejected":
            chosen: PendingJob | None = wide
        else:
            chosen = this_round or wide
        if chosen is None:
            return None
        if job is not None and chosen.status == "approved" and not chosen.covers(job):
            return Decision.refuse(
                "the experiment now names another algorithm or dataset than the one the site approved"
            )
        return chosen.decision

    # -- deciding --------------------------------------------------------------------------

    def approve(self, job_id: int | str, by: str | None = None, reason: str = "") -> PendingJob:
        """Approve job ``job_id``; ``by`` defaults to the OS user running the command."""
        return self._decide(job_id, "approved", by, reason)

    def reject(self, job_id: int | str, by: str | None = None, reason: str = "") -> PendingJob:
        """Reject job ``job_id``; ``reason`` is required (the data scientist is shown it)."""
        if not reason or not reason.strip():
            raise ConfigurationError(
                f"rejecting job {job_id} needs a reason (--reason TEXT): the data scientist is shown it",
                field="reason",
            )
        return self._decide(job_id, "rejected", by, reason)

    def _decide(self, job_id: int | str, verdict: Status, by: str | None, reason: str) -> PendingJob:
        number = _job_number(job_id)
        who = (by if by is not None else _os_user()).strip()
        _check_text(who, "the name of who decides", _MAX_NAME)
        reason = " ".join(reason.split())
        if len(reason) > _MAX_REASON or not reason.isprintable():
            raise ConfigurationError(
                f"the reason for job {number} must be printable text of at most {_MAX_REASON} characters",
                field="reason",
            )
        verb = "approve" if verdict == "approved" else "reject"
        with self._transaction() as db:
            row = db.execute(f"{_SELECT} WHERE j.id = ?", (number,)).fetchone()
            if row is None:
                raise UnknownJob(
                    f"cannot {verb} job {number}: no such job at this site; `laulima site jobs` lists the jobs waiting",
                    job=number,
                )
            current = _job(row)
            if current.status != "pending":
                raise AlreadyDecided(
                    f"cannot {verb} job {number} (experiment {current.experiment_name!r}): it was already "
                    f"{current.status} by {current.decided_by} at {_iso(current.decided_at)}; decisions are final "
                    "(`laulima site jobs show` shows it)",
                    job=number,
                )
            db.execute(
                "INSERT INTO decisions (job_id, verdict, decided_by, reason, decided_at) VALUES (?, ?, ?, ?, ?)",
                (number, verdict, who, reason, self._clock()),
            )
            row = db.execute(f"{_SELECT} WHERE j.id = ?", (number,)).fetchone()
        return _job(row)


_SELECT = (
    "SELECT j.*, d.verdict, d.decided_by, d.reason, d.decided_at FROM jobs j LEFT JOIN decisions d ON d.job_id = j.id"
)


def _job(row: sqlite3.Row) -> PendingJob:
    return PendingJob(
        id=row["id"],
        experiment_id=row["experiment_id"],
        experiment_name=row["experiment_name"],
        requester=row["requester"],
        algorithm_name=row["algorithm_name"],
        entry_point=row["entry_point"],
        digest=row["digest"],
        signer=row["signer"],
        dataset=row["dataset"],
        rounds=row["rounds"],
        round=row["round"],
        kind=row["kind"],
        scope=row["scope"],
        task_id=row["task_id"],
        received_at=row["received_at"],
        manifest=json.loads(row["manifest"]),
        status=row["verdict"] or "pending",
        decided_by=row["decided_by"],
        reason=row["reason"],
        decided_at=row["decided_at"],
    )


def _manifest_json(manifest: Mapping[str, Any] | None, job: JobFacts) -> str:
    try:
        text = json.dumps(dict(manifest or {}), allow_nan=False, sort_keys=True, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise ConfigurationError(
            f"the manifest of experiment {job.experiment_id}'s algorithm is not plain JSON ({exc})", field="manifest"
        ) from exc
    if len(text.encode("utf-8")) > MAX_MANIFEST_BYTES:
        raise ConfigurationError(
            f"the manifest of experiment {job.experiment_id}'s algorithm is larger than "
            f"{MAX_MANIFEST_BYTES // 1024} KiB; it is not kept for review",
            field="manifest",
        )
    return text


def _job_number(job_id: int | str) -> int:
    if isinstance(job_id, int) and not isinstance(job_id, bool):
        number = job_id
    elif (
        isinstance(job_id, str) and job_id.strip().isascii() and job_id.strip().isdigit() and len(job_id.strip()) <= 18
    ):
        number = int(job_id.strip())
    else:
        raise UnknownJob(f"{job_id!r:.40} is not a job id: use the number `laulima site jobs` shows", field="job")
    if not 0 < number < 2**63:
        raise UnknownJob(f"no job {number} at this site; `laulima site jobs` lists the jobs waiting", job=number)
    return number


def _check_text(value: str, what: str, limit: int) -> None:
    if not isinstance(value, str) or not value or len(value) > limit or not value.isprintable():
        raise ConfigurationError(f"{what} must be printable text of 1 to {limit} characters, got {value!r:.80}")


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no login name and no passwd entry (some containers)
        return f"uid {os.getuid()}" if hasattr(os, "getuid") else "unknown"


def _iso(timestamp: float | None) -> str:
    if timestamp is None:
        return "?"
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
