"""The hub's service layer: the only code that writes to the database.

Routes and the orchestrator call :class:`HubService`; each method runs in its own short
transaction (SQLite: BEGIN IMMEDIATE), so a request never holds the database while it
streams a body or waits. Rows never leave this module: callers get protocol schemas, or
detached rows they only read.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import case, func, select, update
from sqlalchemy.exc import IntegrityError

from laulima.core.protocol import (
    EvaluationResult,
    ExperimentCreate,
    ExperimentPublic,
    ExperimentStatus,
    MetricRecord,
    RefusalRecord,
    Role,
    RoundPublic,
    RoundStatus,
    SiteCreated,
    SitePublic,
    TaskFailure,
    TaskKind,
    TaskPublic,
    TaskStatus,
    TokenCreate,
    TokenCreated,
    TokenPublic,
    UploadAccepted,
)
from laulima.core.spec import ExperimentSpec, parse_spec
from laulima.core.strategies import build_strategy
from laulima.errors import Conflict, LaulimaError, NotFound, SpecError
from laulima.hub.blobstore import BlobStore
from laulima.hub.db import ApiToken, Experiment, Metric, Refusal, Round, Session, SessionFactory, Site, Task, Update
from laulima.hub.validation import check_result_allowed, check_weights_file

__all__ = ["HubService", "NewTask", "hash_token", "spec_of"]

OPEN_TASK = (TaskStatus.PENDING, TaskStatus.DELIVERED)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class NewTask:
    """A task the orchestrator wants created (the service fills ids and nonces)."""

    site: str
    kind: TaskKind
    weights_digest: str
    config: dict[str, Any]
    deadline: float
    time_limit_s: float


class HubService:
    """Database writes and the queries behind the API."""

    def __init__(self, sessions: SessionFactory, blobs: BlobStore, clock: Callable[[], float] = time.time):
        self.sessions = sessions
        self.blobs = blobs
        self.clock = clock

    # -- sites ------------------------------------------------------------------------
    def register_site(self, name: str, *, with_token: bool = True) -> SiteCreated:
        """Create site ``name``; in token mode it gets a bearer token (shown once)."""
        token = secrets.token_urlsafe(32) if with_token else None
        try:
            with self.sessions.begin() as s:
                if s.scalar(select(Site.id).where(Site.name == name)) is not None:
                    raise Conflict(f"site {name!r} is already registered; pick another name", site=name)
                digest = hash_token(token) if token else None
                s.add(Site(name=name, token_hash=digest, created_at=self.clock(), last_seen=None))
        except IntegrityError as exc:
            raise Conflict(f"site {name!r} is already registered; pick another name", site=name) from exc
        return SiteCreated(name=name, token=token)

    def site_by_certificate(self, name: str) -> Site:
        """The site a verified certificate names; created at its first request (the CA's
        signature is the enrolment, so an operator need not also register the name)."""
        with self.sessions() as s:
            site = s.scalar(select(Site).where(Site.name == name))
        if site is not None:
            return site
        try:
            with self.sessions.begin() as s:
                s.add(Site(name=name, token_hash=None, created_at=self.clock(), last_seen=None))
        except IntegrityError:
            pass  # a concurrent first request created it
        with self.sessions() as s:
            found = s.scalar(select(Site).where(Site.name == name))
        assert found is not None
        return found

    # -- people's tokens --------------------------------------------------------------
    def create_token(self, body: TokenCreate) -> TokenCreated:
        token = "lt_" + secrets.token_urlsafe(32)
        with self.sessions.begin() as s:
            row = ApiToken(
                name=body.name,
                role=body.role.value,
                token_hash=hash_token(token),
                created_at=self.clock(),
                revoked_at=None,
            )
            s.add(row)
            s.flush()
            return TokenCreated(**_token_public(row).model_dump(), token=token)

    def list_tokens(self) -> list[TokenPublic]:
        with self.sessions() as s:
            return [_token_public(t) for t in s.scalars(select(ApiToken).order_by(ApiToken.id))]

    def revoke_token(self, token_id: int) -> TokenPublic:
        with self.sessions.begin() as s:
            row = s.get(ApiToken, token_id)
            if row is None:
                raise NotFound(f"no API token with id {token_id}; list them with GET /api/v1/tokens", token=token_id)
            if row.revoked_at is None:
                row.revoked_at = self.clock()
            return _token_public(row)

    def authenticate_person(self, token: str) -> tuple[str, Role] | None:
        """(name, role) of a live API token, or None."""
        digest = hash_token(token)
        with self.sessions() as s:
            row = s.scalar(select(ApiToken).where(ApiToken.token_hash == digest))
        if row is None or row.revoked_at is not None or not hmac.compare_digest(row.token_hash, digest):
            return None
        return row.name, Role(row.role)

    def authenticate_site(self, token: str) -> Site | None:
        digest = hash_token(token)
        with self.sessions() as s:
            site = s.scalar(select(Site).where(Site.token_hash == digest))
        if site is None or site.token_hash is None or not hmac.compare_digest(site.token_hash, digest):
            return None
        return site

    def list_sites(self) -> list[SitePublic]:
        with self.sessions() as s:
            rows = s.scalars(select(Site).order_by(Site.name)).all()
        return [SitePublic(name=r.name, created_at=r.created_at, last_seen=r.last_seen) for r in rows]

    def site_names(self) -> list[str]:
        with self.sessions() as s:
            return list(s.scalars(select(Site.name).order_by(Site.name)))

    # -- experiments ------------------------------------------------------------------
    def create_experiment(self, body: ExperimentCreate) -> ExperimentPublic:
        spec = parse_spec(body.spec, source="experiment spec")
        if not self.blobs.exists(body.initial_weights):
            raise SpecError(
                f"field 'initial_weights': no blob {body.initial_weights} on this hub; upload the "
                "weights first (PUT /api/v1/blobs) and submit the digest it returns",
                field="initial_weights",
            )
        check_weights_file(lambda: self.blobs.open(body.initial_weights), where="initial_weights")
        try:
            build_strategy(spec.strategy)
        except LaulimaError:
            raise
        except Exception as exc:
            raise SpecError(f"field 'strategy': cannot be built ({exc})", field="strategy") from exc
        with self.sessions.begin() as s:
            if spec.sites:
                known = set(s.scalars(select(Site.name).where(Site.name.in_(spec.sites))))
                unknown = [x for x in spec.sites if x not in known]
                if unknown:
                    raise SpecError(
                        f"field 'sites': unknown site(s) {', '.join(map(repr, unknown))}; register "
                        "them first (laulima site add / POST /api/v1/sites) or remove them from the spec",
                        field="sites",
                        sites=unknown,
                    )
            exp = Experiment(
                name=spec.name,
                spec_json=json.dumps(spec.model_dump(mode="json")),
                status=ExperimentStatus.RUNNING,
                initial_digest=body.initial_weights,
                global_digest=body.initial_weights,
                strategy_state_digest=None,
                rounds_done=0,
                rounds=spec.rounds,
                created_at=self.clock(),
                finished_at=None,
                error=None,
            )
            s.add(exp)
            s.flush()
            return _experiment_public(exp)

    def list_experiments(self) -> list[ExperimentPublic]:
        with self.sessions() as s:
            return [_experiment_public(e) for e in s.scalars(select(Experiment).order_by(Experiment.id))]

    def get_experiment(self, experiment_id: int) -> ExperimentPublic:
        with self.sessions() as s:
            return _experiment_public(_experiment(s, experiment_id))

    def cancel_experiment(self, experiment_id: int) -> ExperimentPublic:
        """Stop it: the experiment, its open round and its open tasks become cancelled/failed."""
        with self.sessions.begin() as s:
            exp = _experiment(s, experiment_id)
            if exp.status != ExperimentStatus.RUNNING:
                raise Conflict(
                    f"experiment {exp.id} ('{exp.name}') is already {exp.status}; nothing to cancel",
                    experiment=exp.id,
                )
            self._stop(s, exp, ExperimentStatus.CANCELLED, "cancelled by request", self.clock())
            return _experiment_public(exp)

    def rounds(self, experiment_id: int) -> list[RoundPublic]:
        with self.sessions() as s:
            _experiment(s, experiment_id)
            counts: dict[int, int] = {
                index: n
                for index, n in s.execute(
                    select(Update.round, func.count(Update.id))
                    .where(Update.experiment_id == experiment_id)
                    .group_by(Update.round)
                )
            }
            rows = s.scalars(select(Round).where(Round.experiment_id == experiment_id).order_by(Round.index))
            return [
                RoundPublic(
                    index=r.index,
                    status=RoundStatus(r.status),
                    sites=json.loads(r.sites_json),
                    n_updates=counts.get(r.index, 0),
                    started_at=r.started_at,
                    closed_at=r.closed_at,
                    global_digest=r.global_out_digest,
                )
                for r in rows
            ]

    def metrics(self, experiment_id: int) -> list[MetricRecord]:
        with self.sessions() as s:
            _experiment(s, experiment_id)
            rows = s.scalars(
                select(Metric)
                .where(Metric.experiment_id == experiment_id)
                .order_by(Metric.round, Metric.kind, Metric.site)
            )
            return [
                MetricRecord(
                    round=m.round,
                    site=m.site,
                    kind=TaskKind(m.kind),
                    n_samples=m.n_samples,
                    metrics=json.loads(m.metrics_json),
                )
                for m in rows
            ]

    def refusals(self, experiment_id: int) -> list[RefusalRecord]:
        with self.sessions() as s:
            _experiment(s, experiment_id)
            task_ids = select(Task.id).where(Task.experiment_id == experiment_id)
            rows = s.scalars(select(Refusal).where(Refusal.task_id.in_(task_ids)).order_by(Refusal.id))
            return [
                RefusalRecord(at=r.at, site=r.site, task_id=r.task_id, status=r.status, reason=r.reason) for r in rows
            ]

    # -- tasks, as the sites see them -------------------------------------------------
    def next_task(self, site_id: int) -> TaskPublic | None:
        now = self.clock()
        with self.sessions.begin() as s:
            s.execute(update(Site).where(Site.id == site_id).values(last_seen=now))
            row = s.execute(
                select(Task, Experiment)
                .join(Experiment, Task.experiment_id == Experiment.id)
                .where(
                    Task.site_id == site_id,
                    Task.status.in_(OPEN_TASK),
                    Task.deadline > now,
                    Experiment.status == ExperimentStatus.RUNNING,
                )
                .order_by(case((Task.kind == TaskKind.EVALUATE, 0), else_=1), Task.created_at, Task.id)
                .limit(1)
            ).first()
            if row is None:
                return None
            task, exp = row
            if task.status == TaskStatus.PENDING:
                task.status, task.delivered_at = TaskStatus.DELIVERED, now
            spec = json.loads(exp.spec_json)
            return TaskPublic(
                id=task.id,
                experiment_id=exp.id,
                experiment_name=exp.name,
                round=task.round,
                kind=TaskKind(task.kind),
                algorithm=spec["algorithm"],
                dataset=spec["dataset"],
                config=json.loads(task.config_json),
                weights_digest=task.weights_digest,
                weights_size=self.blobs.size(task.weights_digest),
                deadline=task.deadline,
                time_limit_s=task.time_limit_s,
                upload_nonce=task.upload_nonce,
            )

    def site_may_read(self, site_id: int, digest: str) -> bool:
        with self.sessions() as s:
            hit = s.scalar(select(Task.id).where(Task.site_id == site_id, Task.weights_digest == digest).limit(1))
        return hit is not None

    def check_result(self, task_id: str, site: Site, *, kind: TaskKind, nonce: str | None) -> tuple[Task, Experiment]:
        """Refuse early (before a body is read) what :meth:`record_update` would refuse."""
        with self.sessions() as s:
            return check_result_allowed(s, task_id, site, kind=kind, nonce=nonce, now=self.clock())

    def record_update(
        self, task_id: str, site: Site, *, nonce: str | None, digest: str, n_samples: int, metrics: dict[str, float]
    ) -> UploadAccepted:
        now = self.clock()
        try:
            with self.sessions.begin() as s:
                task, _ = check_result_allowed(s, task_id, site, kind=TaskKind.TRAIN, nonce=nonce, now=now, lock=True)
                task.status, task.finished_at = TaskStatus.COMPLETED, now
                metrics_json = json.dumps(metrics)
                s.add(
                    Update(
                        task_id=task.id,
                        experiment_id=task.experiment_id,
                        round=task.round,
                        site=site.name,
                        digest=digest,
                        n_samples=n_samples,
                        metrics_json=metrics_json,
                        received_at=now,
                    )
                )
                s.add(
                    Metric(
                        experiment_id=task.experiment_id,
                        round=task.round,
                        site=site.name,
                        kind=TaskKind.TRAIN,
                        n_samples=n_samples,
                        metrics_json=metrics_json,
                    )
                )
        except IntegrityError as exc:  # a concurrent upload for the same task won the race
            with self.sessions() as s:
                accepted = s.scalar(select(Update.digest).where(Update.task_id == task_id))
            raise Conflict(
                f"task {task_id} already has an accepted update; a second result is not counted",
                task=task_id,
                accepted_digest=accepted,
            ) from exc
        return UploadAccepted(task_id=task_id, digest=digest, n_samples=n_samples)

    def record_evaluation(self, task_id: str, site: Site, result: EvaluationResult) -> None:
        now = self.clock()
        with self.sessions.begin() as s:
            task, _ = check_result_allowed(s, task_id, site, kind=TaskKind.EVALUATE, nonce=None, now=now, lock=True)
            task.status, task.finished_at = TaskStatus.COMPLETED, now
            s.add(
                Metric(
                    experiment_id=task.experiment_id,
                    round=task.round,
                    site=site.name,
                    kind=TaskKind.EVALUATE,
                    n_samples=result.n_samples,
                    metrics_json=json.dumps(result.metrics),
                )
            )

    def record_failure(self, task_id: str, site: Site, failure: TaskFailure) -> None:
        now = self.clock()
        with self.sessions.begin() as s:
            task, _ = check_result_allowed(s, task_id, site, kind=None, nonce=None, now=now, lock=True)
            task.status, task.finished_at = TaskStatus.FAILED, now
            task.failure_kind, task.failure_reason = failure.kind.value, failure.reason

    def record_refusal(self, *, site: str | None, task_id: str | None, status: int, reason: str) -> None:
        with self.sessions.begin() as s:
            s.add(Refusal(at=self.clock(), site=site, task_id=task_id, status=status, reason=reason))

    # -- rounds, as the orchestrator drives them ---------------------------------------
    def experiment_ids(self) -> list[int]:
        with self.sessions() as s:
            return list(s.scalars(select(Experiment.id)))

    def running_experiment_ids(self) -> list[int]:
        with self.sessions() as s:
            return list(s.scalars(select(Experiment.id).where(Experiment.status == ExperimentStatus.RUNNING)))

    def open_round_of(self, s: Session, experiment_id: int) -> Round | None:
        return s.scalar(select(Round).where(Round.experiment_id == experiment_id, Round.status == RoundStatus.OPEN))

    def train_tasks(self, s: Session, experiment_id: int, round_index: int) -> list[tuple[Task, str]]:
        rows = s.execute(
            select(Task, Site.name)
            .join(Site, Task.site_id == Site.id)
            .where(Task.experiment_id == experiment_id, Task.round == round_index, Task.kind == TaskKind.TRAIN)
        )
        return [(task, name) for task, name in rows]

    def round_updates(self, s: Session, experiment_id: int, round_index: int) -> list[Update]:
        return list(
            s.scalars(
                select(Update)
                .where(Update.experiment_id == experiment_id, Update.round == round_index)
                .order_by(Update.site)
            )
        )

    def open_round(
        self, experiment_id: int, index: int, sites: Sequence[str], tasks: Sequence[NewTask], deadline: float
    ) -> bool:
        """Create round ``index`` and its tasks in one transaction; False if it already exists."""
        now = self.clock()
        with self.sessions.begin() as s:
            exp = _experiment(s, experiment_id)
            if exp.status != ExperimentStatus.RUNNING or exp.rounds_done != index - 1:
                return False
            if s.scalar(select(Round.id).where(Round.experiment_id == exp.id, Round.index == index)) is not None:
                return False
            s.add(
                Round(
                    experiment_id=exp.id,
                    index=index,
                    status=RoundStatus.OPEN,
                    sites_json=json.dumps(list(sites)),
                    deadline=deadline,
                    started_at=now,
                    closed_at=None,
                    global_in_digest=exp.global_digest,
                    global_out_digest=None,
                    strategy_state_digest=exp.strategy_state_digest,
                )
            )
            self._add_tasks(s, exp.id, index, tasks, now)
        return True

    def checkpoint_round(
        self,
        round_id: int,
        *,
        update_ids: Sequence[int],
        global_digest: str,
        state_digest: str | None,
        evaluation: Sequence[NewTask],
    ) -> bool:
        """The checkpoint: round aggregated, experiment advanced, leftovers expired, evaluation
        tasks created, all in one transaction. False (nothing written) if the round changed
        since it was read: closed by someone else, or an update arrived meanwhile."""
        now = self.clock()
        with self.sessions.begin() as s:
            rnd = s.get(Round, round_id)
            if rnd is None or rnd.status != RoundStatus.OPEN:
                return False
            current = sorted(u.id for u in self.round_updates(s, rnd.experiment_id, rnd.index))
            if current != sorted(update_ids):
                return False
            exp = _experiment(s, rnd.experiment_id)
            if exp.status != ExperimentStatus.RUNNING:
                return False
            rnd.status, rnd.closed_at = RoundStatus.AGGREGATED, now
            rnd.global_out_digest, rnd.strategy_state_digest = global_digest, state_digest
            exp.global_digest, exp.strategy_state_digest = global_digest, state_digest
            exp.rounds_done = rnd.index
            self._close_open_tasks(s, exp.id, TaskStatus.EXPIRED, now, "round closed", round_index=rnd.index)
            self._add_tasks(s, exp.id, rnd.index, evaluation, now)
        return True

    def spent_update_digests(self, experiment_id: int) -> list[str]:
        """Blobs of updates whose round is closed and that nothing else points at.

        A closed round's updates are never read again (its checkpoint holds the result),
        so keeping them would only grow the hub's disk by model size x sites every round.
        Blobs are content-addressed and may be shared, hence the reference check.
        """
        with self.sessions() as s:
            closed = select(Round.index).where(Round.experiment_id == experiment_id, Round.status != RoundStatus.OPEN)
            candidates = set(
                s.scalars(select(Update.digest).where(Update.experiment_id == experiment_id, Update.round.in_(closed)))
            )
            if not candidates:
                return []
            in_use: set[str] = set()
            in_use.update(s.scalars(select(Task.weights_digest).where(Task.weights_digest.in_(candidates))))
            for col in (Experiment.initial_digest, Experiment.global_digest, Experiment.strategy_state_digest):
                in_use.update(d for d in s.scalars(select(col).where(col.in_(candidates))) if d)
            for col in (Round.global_in_digest, Round.global_out_digest, Round.strategy_state_digest):
                in_use.update(d for d in s.scalars(select(col).where(col.in_(candidates))) if d)
            open_rounds = (
                select(Update.digest)
                .join(Round, (Round.experiment_id == Update.experiment_id) & (Round.index == Update.round))
                .where(Round.status == RoundStatus.OPEN, Update.digest.in_(candidates))
            )
            in_use.update(s.scalars(open_rounds))
        return sorted(candidates - in_use)

    def fail_round(self, round_id: int, error: str) -> bool:
        now = self.clock()
        with self.sessions.begin() as s:
            rnd = s.get(Round, round_id)
            if rnd is None or rnd.status != RoundStatus.OPEN:
                return False
            rnd.status, rnd.closed_at = RoundStatus.FAILED, now
            self._close_open_tasks(s, rnd.experiment_id, TaskStatus.EXPIRED, now, "round failed", round_index=rnd.index)
            exp = _experiment(s, rnd.experiment_id)
            if exp.status == ExperimentStatus.RUNNING:
                exp.status, exp.finished_at, exp.error = ExperimentStatus.FAILED, now, error
        return True

    def expire_overdue(self, experiment_id: int) -> None:
        """Evaluation tasks whose deadline passed will not be answered any more."""
        now = self.clock()
        with self.sessions.begin() as s:
            s.execute(
                update(Task)
                .where(
                    Task.experiment_id == experiment_id,
                    Task.kind == TaskKind.EVALUATE,
                    Task.status.in_(OPEN_TASK),
                    Task.deadline <= now,
                )
                .values(status=TaskStatus.EXPIRED, finished_at=now, failure_reason="no result before the deadline")
            )

    def evaluations_pending(self, experiment_id: int) -> bool:
        with self.sessions() as s:
            hit = s.scalar(
                select(Task.id)
                .where(Task.experiment_id == experiment_id, Task.kind == TaskKind.EVALUATE, Task.status.in_(OPEN_TASK))
                .limit(1)
            )
        return hit is not None

    def finish_experiment(self, experiment_id: int, status: ExperimentStatus, error: str | None = None) -> bool:
        """Completed (nothing left to do) or failed (with ``error``); False if no longer running."""
        with self.sessions.begin() as s:
            exp = _experiment(s, experiment_id)
            if exp.status != ExperimentStatus.RUNNING:
                return False
            self._stop(s, exp, status, error, self.clock())
        return True

    # -- helpers ----------------------------------------------------------------------
    def _add_tasks(self, s: Session, experiment_id: int, index: int, tasks: Sequence[NewTask], now: float) -> None:
        if not tasks:
            return
        wanted = select(Site.name, Site.id).where(Site.name.in_([t.site for t in tasks]))
        ids = {name: site_id for name, site_id in s.execute(wanted)}
        for t in tasks:
            if t.site not in ids:
                raise NotFound(f"site {t.site!r} is no longer registered", site=t.site)
            s.add(
                Task(
                    id=secrets.token_hex(16),
                    experiment_id=experiment_id,
                    round=index,
                    site_id=ids[t.site],
                    kind=t.kind,
                    status=TaskStatus.PENDING,
                    weights_digest=t.weights_digest,
                    config_json=json.dumps(t.config),
                    upload_nonce=secrets.token_urlsafe(24),
                    deadline=t.deadline,
                    time_limit_s=t.time_limit_s,
                    created_at=now,
                    delivered_at=None,
                    finished_at=None,
                    failure_kind=None,
                    failure_reason=None,
                )
            )

    def _stop(self, s: Session, exp: Experiment, status: ExperimentStatus, error: str | None, now: float) -> None:
        exp.status, exp.finished_at, exp.error = status, now, error
        if status == ExperimentStatus.COMPLETED:
            return
        self._close_open_tasks(s, exp.id, TaskStatus.CANCELLED, now, f"experiment {status}")
        s.execute(
            update(Round)
            .where(Round.experiment_id == exp.id, Round.status == RoundStatus.OPEN)
            .values(status=RoundStatus.FAILED, closed_at=now)
        )

    def _close_open_tasks(
        self,
        s: Session,
        experiment_id: int,
        status: TaskStatus,
        now: float,
        reason: str,
        *,
        round_index: int | None = None,
    ) -> None:
        """Pending/delivered tasks (of one round's training, or of the whole experiment) end."""
        cond = [Task.experiment_id == experiment_id, Task.status.in_(OPEN_TASK)]
        if round_index is not None:
            cond += [Task.round == round_index, Task.kind == TaskKind.TRAIN]
        s.execute(update(Task).where(*cond).values(status=status, finished_at=now, failure_reason=reason))


def spec_of(exp: Experiment) -> ExperimentSpec:
    """The experiment's spec as validated when it was submitted."""
    return parse_spec(json.loads(exp.spec_json), source=f"experiment {exp.id}")


def _experiment(s: Session, experiment_id: int) -> Experiment:
    exp = s.get(Experiment, experiment_id)
    if exp is None:
        raise NotFound(f"no experiment with id {experiment_id}", experiment=experiment_id)
    return exp


def _token_public(t: ApiToken) -> TokenPublic:
    return TokenPublic(id=t.id, name=t.name, role=Role(t.role), created_at=t.created_at, revoked_at=t.revoked_at)


def _experiment_public(e: Experiment) -> ExperimentPublic:
    return ExperimentPublic(
        id=e.id,
        name=e.name,
        status=ExperimentStatus(e.status),
        rounds_done=e.rounds_done,
        rounds=e.rounds,
        created_at=e.created_at,
        finished_at=e.finished_at,
        global_digest=e.global_digest,
        error=e.error,
        spec=json.loads(e.spec_json),
    )
