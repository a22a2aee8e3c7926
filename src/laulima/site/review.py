"""What a site administrator reviews and decides, for every way of deciding.

``laulima site jobs|approve|reject`` (:mod:`laulima.cli_site_admin`) and the site dashboard
(:mod:`laulima.site.ui`) both go through here, so a job approved from a browser is recorded
exactly as one approved in a terminal: the same store call, the same audit entry.

- :func:`approvals_store`: the site's approvals store, without creating one where no job
  ever waited;
- :func:`job_facts`: a held job as (label, text) pairs, what ``laulima site jobs show`` prints;
- :func:`bundle_sources`: the bundle's source files, verified against the digest under review;
- :func:`decide_job`: approve or reject, with the audit entry — refused, with nothing decided,
  when the site's audit trail cannot be written.

Error messages are for the site's administrator and may name local files.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from laulima.errors import ConfigurationError, DataError
from laulima.site.approvals import APPROVALS_FILE, ApprovalStore, PendingJob, UnknownJob
from laulima.site.audit import AuditEntry, AuditEvent, AuditLog, reference
from laulima.site.gate import bundle_archive

__all__ = ["Decided", "Verb", "approvals_store", "bundle_sources", "decide_job", "job_facts", "when"]

Verb = Literal["approve", "reject"]


@dataclass(frozen=True)
class Decided:
    """A decision as recorded: the job with its verdict, and its audit entry."""

    job: PendingJob
    entry: AuditEntry

    def summary(self) -> str:
        """One sentence saying what was decided and where it is recorded."""
        job = self.job
        what = f"bundle {job.digest[:12]}" if job.digest else f"built-in {job.entry_point}"
        scope = "the whole experiment" if job.scope == "experiment" else f"round {job.round}"
        outcome = "may run" if job.status == "approved" else "is refused"
        return (
            f"job {job.id} {job.status} by {job.decided_by}: experiment {job.experiment_id} {job.experiment_name!r} "
            f"{outcome} with {what} on dataset {job.dataset} ({scope}); recorded as {reference(self.entry)}"
        )


def approvals_store(home: Path, job_id: str | int | None = None) -> ApprovalStore | None:
    """The site's approvals store; None when no job ever waited (nothing is created then).

    Given ``job_id``, a missing store is that job being unknown (:class:`UnknownJob`).
    """
    if not home.is_dir():
        raise ConfigurationError(
            f"--home {home}: no such folder; give the site's home (`laulima site init --home`)", field="home"
        )
    if not (home / APPROVALS_FILE).exists():
        if job_id is not None:
            raise UnknownJob(
                f"no job {job_id!r:.40} at this site: no job has waited for approval yet ({home / APPROVALS_FILE} "
                "does not exist)",
                field="job",
            )
        return None
    return ApprovalStore(home)


def when(timestamp: float | None) -> str:
    """A time as the site's commands and dashboard print it: UTC, to the minute."""
    if timestamp is None:
        return "?"
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def job_facts(job: PendingJob) -> list[tuple[str, str]]:
    """What an administrator decides on, as (label, text) pairs; the decision once there is one."""
    facts = [
        ("experiment", f"{job.experiment_id} {job.experiment_name!r}, requested by {job.requester}"),
        ("algorithm", f"{job.algorithm_name} (entry point {job.entry_point})"),
        ("bundle", job.digest or "none: a built-in algorithm"),
        ("signed by", job.signer or "no signer this site lists"),
        ("dataset", job.dataset),
        ("rounds", f"{job.rounds} (first asked at round {job.round}, a {job.kind} task, task id {job.task_id})"),
        ("approval for", "the whole experiment" if job.scope == "experiment" else f"round {job.round} only"),
        ("received", when(job.received_at)),
    ]
    if job.status != "pending":
        reason = f": {job.reason}" if job.reason else ""
        facts.append(("decision", f"{job.status} by {job.decided_by} at {when(job.decided_at)}{reason}"))
    return facts


def bundle_sources(home: Path, job: PendingJob) -> dict[str, str] | None:
    """The job's bundle's source files (path -> text), verified against the digest under review;
    None for a built-in algorithm. ``DataError`` when the archive is missing or is another bundle."""
    if job.digest is None:
        return None
    from laulima.algorithms.bundle import read_sources

    archive = bundle_archive(home, job.digest)
    if not archive.is_file():
        raise DataError(
            f"job {job.id}: the bundle's archive {archive} is missing, so its source cannot be shown; the agent "
            "keeps it when it receives the job — ask the scientist for the bundle file and check it with "
            "`laulima algorithm show FILE --source` (its name must be the digest above)",
            file=str(archive),
        )
    return read_sources(archive, job.digest)


def decide_job(home: Path, job_id: str | int, verb: Verb, reason: str, by: str | None) -> Decided:
    """Approve or reject job ``job_id`` as ``by`` (default: the OS user), and audit it.

    The site's audit trail is checked first: when it cannot be written nothing is decided
    (``DataError``). The entry (who, why, scope, job, experiment, bundle digest, dataset) is
    appended right after the decision, which the agent reads back from the approvals store at
    its next poll. Raises :class:`~laulima.site.approvals.UnknownJob`,
    :class:`~laulima.site.approvals.AlreadyDecided`, or ``ConfigurationError`` for a reason
    that cannot be recorded (a rejection without one).
    """
    store = approvals_store(home, job_id)
    assert store is not None
    store.get(job_id)  # an unknown job is named before anything else
    audit = AuditLog(home)
    try:
        audit.check_writable()
    except (DataError, OSError) as exc:
        raise DataError(
            f"cannot {verb} job {job_id}: the site's audit log cannot be written ({exc}); nothing was decided. "
            "Run `laulima site audit verify --home HOME`",
            file=str(audit.path),
        ) from exc
    job = store.approve(job_id, by=by, reason=reason) if verb == "approve" else store.reject(job_id, by, reason)
    try:
        entry = audit.append(
            AuditEvent.APPROVED if job.status == "approved" else AuditEvent.REJECTED,
            task=job.task_id,
            experiment=job.experiment_id,
            by=job.decided_by,
            reason=job.reason,
            scope=job.scope,
            round=job.round if job.scope == "round" else None,
            job=job.id,
            experiment_name=job.experiment_name,
            requester=job.requester,
            entry_point=job.entry_point,
            digest=job.digest,
            signer=job.signer,
            dataset=job.dataset,
        )
    except (DataError, OSError) as exc:
        raise DataError(
            f"job {job.id} was {job.status}, but its audit entry could not be written ({exc}); record the decision "
            "by hand and run `laulima site audit verify --home HOME`",
            file=str(audit.path),
        ) from exc
    return Decided(job, entry)
