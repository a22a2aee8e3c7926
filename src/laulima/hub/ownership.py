"""Who may see and act on an experiment, who may read a blob, and what one person may hold.

An experiment belongs to the person who submitted it (the name of their API token).
Operators see and may act on every experiment. The owner (or an operator) may share it
with another person by name; that person may then *read* it — status, rounds, metrics,
refusals, its models — but not cancel it or change its sharing. To anyone else it does
not exist: the same 404 as an unknown id, so ids cannot be probed.

A person may download a blob they uploaded, or the initial or a global model or the
algorithm bundle of an experiment they may read (sites keep their own rule: the weights and
bundles of their tasks), and may start an experiment only from such a blob. Uploads are
recorded per person; the bytes and number of uploads that no experiment uses yet are bounded,
and so are running experiments.

These helpers work inside the caller's session; :class:`~laulima.hub.service.HubService`
owns the transactions.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import ColumnElement, delete, func, or_, select, true

from laulima.core.protocol import ExperimentStatus
from laulima.errors import Forbidden, NotFound, PayloadTooLarge, ProtocolError, TooManyRequests
from laulima.hub.db import ApiToken, Experiment, ExperimentShare, Round, Session, Upload
from laulima.hub.housekeeping import referenced, unreferenced

__all__ = [
    "LEGACY_OWNER",
    "InvalidShare",
    "Person",
    "RunningLimitReached",
    "UploadQuota",
    "UploadQuotaExceeded",
    "add_share",
    "check_upload_room",
    "check_running_limit",
    "managed_experiment",
    "may_read_blob",
    "owner_of",
    "pending_uploads",
    "readable_experiment",
    "record_upload",
    "remove_share",
    "shares_of",
    "visible_to",
]

LEGACY_OWNER = "admin"
"""Owner of experiments submitted before the hub recorded owners: the bootstrap operator."""


@dataclass(frozen=True)
class Person:
    """A person calling the API: the name of their token, and whether they are an operator."""

    name: str
    operator: bool = False


class UploadQuotaExceeded(PayloadTooLarge):
    code = "upload_quota_exceeded"


class RunningLimitReached(TooManyRequests):
    code = "running_experiments_limit"


class InvalidShare(ProtocolError):
    status = 422
    code = "invalid_share"


@dataclass(frozen=True)
class UploadQuota:
    """What one person's uploads that no experiment uses may add up to (HubSettings)."""

    max_bytes: int
    max_count: int
    ttl_s: float


# -- experiments ----------------------------------------------------------------------
def owner_of(exp: Experiment) -> str:
    return exp.owner or LEGACY_OWNER


def _owner_column() -> ColumnElement[str]:
    return func.coalesce(Experiment.owner, LEGACY_OWNER)


def visible_to(person: Person) -> ColumnElement[bool]:
    """SQL condition on :class:`Experiment`: ``person`` may read it."""
    if person.operator:
        return true()
    shared = select(ExperimentShare.experiment_id).where(ExperimentShare.name == person.name)
    return or_(_owner_column() == person.name, Experiment.id.in_(shared))


def readable_experiment(s: Session, experiment_id: int, person: Person) -> Experiment:
    """The experiment, if ``person`` may read it; otherwise the very 404 of an unknown id."""
    exp = s.scalar(select(Experiment).where(Experiment.id == experiment_id, visible_to(person)))
    if exp is None:
        raise NotFound(f"no experiment with id {experiment_id}", experiment=experiment_id)
    return exp


def managed_experiment(s: Session, experiment_id: int, person: Person, action: str) -> Experiment:
    """The experiment, if ``person`` owns it or is an operator (404 if they may not even read it)."""
    exp = readable_experiment(s, experiment_id, person)
    owner = owner_of(exp)
    if not person.operator and owner != person.name:
        raise Forbidden(
            f"experiment {exp.id} ('{exp.name}') belongs to {owner!r}, who shared it with you to read; only "
            f"its owner or an operator may {action} it",
            experiment=exp.id,
            owner=owner,
        )
    return exp


def shares_of(s: Session, experiment_ids: list[int]) -> dict[int, list[str]]:
    """Names each experiment is shared with, sorted."""
    out: dict[int, list[str]] = {i: [] for i in experiment_ids}
    if not experiment_ids:
        return out
    rows = s.execute(
        select(ExperimentShare.experiment_id, ExperimentShare.name)
        .where(ExperimentShare.experiment_id.in_(experiment_ids))
        .order_by(ExperimentShare.name)
    )
    for experiment_id, name in rows:
        out[experiment_id].append(name)
    return out


def add_share(s: Session, exp: Experiment, name: str, now: float) -> None:
    """Give ``name`` read access; sharing twice is no error."""
    if name == owner_of(exp):
        raise InvalidShare(f"{name!r} owns experiment {exp.id} already; share it with someone else", name=name)
    known = name == LEGACY_OWNER or s.scalar(
        select(ApiToken.id).where(ApiToken.name == name, ApiToken.revoked_at.is_(None)).limit(1)
    )
    if not known:
        raise InvalidShare(
            f"no person named {name!r} has a live API token on this hub; check the spelling (an operator "
            "lists the names with `laulima token list`)",
            name=name,
        )
    exists = s.scalar(
        select(ExperimentShare.id).where(ExperimentShare.experiment_id == exp.id, ExperimentShare.name == name)
    )
    if exists is None:
        s.add(ExperimentShare(experiment_id=exp.id, name=name, created_at=now))


def remove_share(s: Session, exp: Experiment, name: str) -> None:
    gone = s.execute(
        delete(ExperimentShare).where(ExperimentShare.experiment_id == exp.id, ExperimentShare.name == name)
    )
    if not gone.rowcount:  # type: ignore[attr-defined]
        raise NotFound(f"experiment {exp.id} is not shared with {name!r}", experiment=exp.id, name=name)


def check_running_limit(s: Session, name: str, limit: int) -> None:
    running = s.scalar(
        select(func.count(Experiment.id)).where(
            _owner_column() == name, Experiment.status == ExperimentStatus.RUNNING
        )
    )
    if (running or 0) >= limit:
        raise RunningLimitReached(
            f"{name!r} already has {running} running experiments, the most one person may run "
            f"(person_max_running_experiments = {limit}); wait for one to finish, or cancel one with "
            "`laulima experiment cancel ID`",
            running=running,
            limit=limit,
        )


# -- blobs ------------------------------------------------------------------------------
def may_read_blob(s: Session, person: Person, digest: str) -> bool:
    """``person`` uploaded ``digest``, or it is the initial or a global model, or the algorithm
    bundle, of an experiment they may read (a reader of the results may review the code)."""
    if person.operator:
        return True
    uploaded = s.scalar(select(Upload.id).where(Upload.digest == digest, Upload.owner == person.name).limit(1))
    if uploaded is not None:
        return True
    produced = select(Round.experiment_id).where(Round.global_out_digest == digest)
    model = or_(
        Experiment.initial_digest == digest,
        Experiment.global_digest == digest,
        Experiment.bundle_digest == digest,
        Experiment.id.in_(produced),
    )
    return s.scalar(select(Experiment.id).where(model, visible_to(person)).limit(1)) is not None


def pending_uploads(s: Session, name: str, *, besides: str | None = None) -> tuple[int, int]:
    """(count, bytes) of ``name``'s uploads that nothing but upload records refers to, not
    counting ``besides`` (the digest an upload announces: sending it again adds nothing)."""
    conditions = [Upload.owner == name, unreferenced(Upload.digest, spent_updates=True, uploads=False)]
    if besides is not None:
        conditions.append(Upload.digest != besides)
    count, size = s.execute(
        select(func.count(Upload.id), func.coalesce(func.sum(Upload.size), 0)).where(*conditions)
    ).one()
    return int(count), int(size)


def record_upload(s: Session, name: str, digest: str, size: int, now: float, quota: UploadQuota) -> None:
    """Record that ``name`` uploaded ``digest`` (again: the clock of its TTL restarts),
    within their quota of uploads no experiment uses."""
    row = s.scalar(select(Upload).where(Upload.digest == digest, Upload.owner == name))
    if row is not None:
        row.created_at = now
        return
    if not referenced(s, [digest], uploads=False):
        count, pending = pending_uploads(s, name)
        check_upload_room(name, count, pending, size, quota)
    s.add(Upload(digest=digest, owner=name, size=size, created_at=now))


def check_upload_room(name: str, count: int, pending: int, size: int, quota: UploadQuota) -> None:
    """Refuse (413) an upload of ``size`` bytes that would take ``name`` past their quota."""
    hours = quota.ttl_s / 3600
    what_to_do = (
        "submit an experiment that starts from one of your uploads, or wait until unused uploads are "
        f"deleted ({hours:g} h after they were uploaded)"
    )
    if count + 1 > quota.max_count:
        raise UploadQuotaExceeded(
            f"upload quota of {name!r}: {count} uploads that no experiment uses yet is the limit "
            f"(person_pending_uploads = {quota.max_count}); {what_to_do}",
            limit=quota.max_count,
            pending=count,
        )
    if pending + size > quota.max_bytes:
        raise UploadQuotaExceeded(
            f"upload quota of {name!r}: {pending} bytes of uploads that no experiment uses yet, plus this "
            f"upload's {size} bytes, exceed the limit of {quota.max_bytes} bytes "
            f"(person_pending_upload_bytes); {what_to_do}",
            limit=quota.max_bytes,
            pending=pending,
            size=size,
        )
