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
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import case, func, select, update
from sqlalchemy.exc import IntegrityError

from laulima.core.bundle import MAX_ARCHIVE_BYTES, builtin_digest, is_builtin_name, verify_bytes
from laulima.core.crosssite import GLOBAL, MODEL, cross_site_matrix, site_of_local
from laulima.core.fingerprint import MergedFingerprint, SiteFingerprint
from laulima.core.protocol import (
    CrossSiteFailure,
    CrossSiteMatrix,
    EvaluationResult,
    ExperimentCreate,
    ExperimentPhase,
    ExperimentPublic,
    ExperimentStatus,
    FailureKind,
    FingerprintPublic,
    MetricRecord,
    RefusalRecord,
    Role,
    RoundPublic,
    RoundStatus,
    SiteCreated,
    SitePublic,
    SiteReport,
    SiteStatus,
    TaskFailure,
    TaskKind,
    TaskPublic,
    TaskStatus,
    TokenCreate,
    TokenCreated,
    TokenPublic,
    UploadAccepted,
)
from laulima.core.rounds import NO_APPROVAL, failure_note
from laulima.core.spec import UNTRAINED_MODES, ExperimentSpec, parse_spec, with_calibrated_noise
from laulima.core.strategies import build_strategy
from laulima.errors import ConfigurationError, Conflict, DataError, LaulimaError, NotFound, SpecError
from laulima.hub import ownership
from laulima.hub.blobstore import BlobStore
from laulima.hub.db import (
    ApiToken,
    Experiment,
    FingerprintResult,
    MergedFingerprintRow,
    Metric,
    Refusal,
    Round,
    RoundHandoff,
    Session,
    SessionFactory,
    Site,
    Task,
    Update,
)
from laulima.hub.housekeeping import referenced
from laulima.hub.ownership import Person, UploadQuota
from laulima.hub.secure_rounds import SECAGG_CONFIG_KEY
from laulima.hub.validation import approval_deadline, check_result_allowed, check_weights_file
from laulima.pki.ca import RevocationList

__all__ = [
    "FINGERPRINT_LABEL",
    "FinaleTask",
    "HubService",
    "NewTask",
    "algorithm_digest",
    "experiment_phase",
    "finale_started",
    "hash_token",
    "metric_record",
    "site_notes",
    "spec_of",
]

OPEN_TASK = (TaskStatus.PENDING, TaskStatus.DELIVERED)
RESULT_KINDS = (TaskKind.EVALUATE, TaskKind.FINGERPRINT)
"""Tasks answered with a JSON result (no upload), which no round closes: they expire at their
own deadline (:meth:`HubService.expire_overdue`) and the experiment waits for them."""
FINGERPRINT_LABEL = "fingerprint"
"""``Task.model`` of a fingerprint-mode experiment's tasks (round 1): what they compute."""

MAX_REFUSALS_PER_TASK = 50
"""Refusals stored per task; a site repeating itself cannot grow the database without bound."""
MAX_REASON_CHARS = 2000
_WHY_NOT_SELECTED = {
    SiteStatus.REVOKED: "its certificate has been revoked",
    SiteStatus.REMOVED: "removed from the federation by an operator",
}
"""Why a round leaves out (or stops waiting for) a site, by its status; offline says more."""
MAX_UNSERVABLE_SKIPPED = 20
"""Unservable tasks one poll fails and skips before answering; the next poll goes on."""


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


PRIVACY_KEY = "__privacy__"
"""Where a TRAIN task's ``config`` row keeps what becomes ``TaskPublic.privacy`` (and under
SECAGG_CONFIG_KEY ``.secure_aggregation``): set by the orchestrator, taken out before the
task is sent."""

MAX_ABORTED_ROUNDS = 3
"""Aborted rounds in a row after which an experiment fails (see ``Service.abort_round``)."""


@dataclass(frozen=True)
class NewTask:
    """A task the orchestrator wants created (the service fills ids and nonces)."""

    site: str
    kind: TaskKind
    weights_digest: str
    config: dict[str, Any]
    deadline: float
    time_limit_s: float
    model: str | None = None
    """Which model a task after training trains or evaluates (``Task.model``); hub-side only."""


@dataclass(frozen=True)
class FinaleTask:
    """A task after training (labelled with its model), as the orchestrator reads it."""

    id: str
    site: str
    kind: TaskKind
    model: str
    status: TaskStatus
    failure: str | None
    """Why it gave no result (failed, expired, cancelled); None while open or once completed."""
    update_digest: str | None
    """For a local model's training: the accepted model's blob."""

    @property
    def open(self) -> bool:
        return self.status in OPEN_TASK


class HubService:
    """Database writes and the queries behind the API."""

    def __init__(
        self,
        sessions: SessionFactory,
        blobs: BlobStore,
        clock: Callable[[], float] = time.time,
        *,
        revocations: RevocationList | None = None,
        site_offline_after_s: float = 120.0,
    ):
        self.sessions = sessions
        self.blobs = blobs
        self.clock = clock
        self.revocations = revocations
        """Revoked certificate serials (a hub with a CA): a revoked site is never selected."""
        self.site_offline_after_s = site_offline_after_s

    # -- sites ------------------------------------------------------------------------
    def register_site(self, name: str, *, with_token: bool = True) -> SiteCreated:
        """Create site ``name`` (or bring back one an operator removed); in token mode it gets
        a bearer token (shown once)."""
        token = secrets.token_urlsafe(32) if with_token else None
        digest = hash_token(token) if token else None
        try:
            with self.sessions.begin() as s:
                site = s.scalar(select(Site).where(Site.name == name))
                if site is not None and site.removed_at is None:
                    raise Conflict(f"site {name!r} is already registered; pick another name", site=name)
                if site is not None:  # re-registered after `laulima site remove`
                    site.removed_at, site.token_hash = None, digest
                else:
                    s.add(Site(name=name, token_hash=digest, created_at=self.clock(), last_seen=None))
        except IntegrityError as exc:
            raise Conflict(f"site {name!r} is already registered; pick another name", site=name) from exc
        return SiteCreated(name=name, token=token)

    def site_by_certificate(self, name: str, serial: int) -> Site:
        """The site a verified certificate names; created at its first request (the CA's
        signature is the enrolment, so an operator need not also register the name). The
        certificate's serial is kept, so a revocation in ``revoked.json`` finds the site."""
        serial_hex = f"{serial:x}"
        with self.sessions() as s:
            site = s.scalar(select(Site).where(Site.name == name))
        if site is not None and site.cert_serial == serial_hex:
            return site
        try:
            with self.sessions.begin() as s:
                row = s.scalar(select(Site).where(Site.name == name))
                if row is None:
                    row = Site(name=name, token_hash=None, created_at=self.clock(), last_seen=None)
                    s.add(row)
                row.cert_serial = serial_hex
        except IntegrityError:
            pass  # a concurrent first request created it
        with self.sessions() as s:
            found = s.scalar(select(Site).where(Site.name == name))
        assert found is not None
        return found

    def remove_site(self, name: str) -> SitePublic:
        """Deregister a site: refused from its next request, never selected again, its open
        tasks cancelled so no round waits for it. ``register_site`` brings it back."""
        now = self.clock()
        with self.sessions.begin() as s:
            site = s.scalar(select(Site).where(Site.name == name))
            if site is None:
                raise NotFound(f"no site named {name!r}; list them with `laulima site list`", site=name)
            if site.removed_at is None:
                site.removed_at = now
                s.execute(
                    update(Task)
                    .where(Task.site_id == site.id, Task.status.in_(OPEN_TASK))
                    .values(
                        status=TaskStatus.CANCELLED,
                        finished_at=now,
                        failure_kind=FailureKind.REJECTED.value,
                        failure_reason="the site was removed from the federation by an operator",
                    )
                )
            return self._site_public(s, site, now)

    def report_site(self, site_id: int, report: SiteReport) -> None:
        """Keep what the agent says about itself: its version and its datasets' sizes."""
        with self.sessions.begin() as s:
            s.execute(
                update(Site)
                .where(Site.id == site_id)
                .values(
                    version=report.version,
                    datasets_json=json.dumps(report.datasets, sort_keys=True),
                    last_seen=self.clock(),
                )
            )

    def reported_cases(self, site_name: str, dataset: str) -> int | None:
        """The number of cases ``site_name`` reported for ``dataset`` (None: never said)."""
        with self.sessions() as s:
            return _reported_cases(s, site_name, dataset)

    def heard_lately(self, site: Site, now: float) -> bool:
        """Whether ``site`` made a request within ``site_offline_after_s``."""
        return site.last_seen is not None and now - site.last_seen <= self.site_offline_after_s

    def site_status(self, s: Session, site: Site, now: float) -> SiteStatus:
        """Removed, revoked, online (seen lately, or working on a task of its own) or offline."""
        if site.removed_at is not None:
            return SiteStatus.REMOVED
        if site.cert_serial and self.revocations is not None and self.revocations.is_revoked(int(site.cert_serial, 16)):
            return SiteStatus.REVOKED
        if self.heard_lately(site, now):
            return SiteStatus.ONLINE
        busy = s.scalar(
            select(Task.id)
            .where(Task.site_id == site.id, Task.status == TaskStatus.DELIVERED, Task.deadline > now)
            .limit(1)
        )
        return SiteStatus.ONLINE if busy is not None else SiteStatus.OFFLINE

    def gone(self, names: Sequence[str]) -> dict[str, str]:
        """Of ``names``, the sites that can no longer answer (certificate revoked, or removed
        after their tasks were made), with why: a round stops waiting for them."""
        if not names or self.revocations is None:
            return {}
        now = self.clock()
        with self.sessions() as s:
            status = {r.name: self.site_status(s, r, now) for r in s.scalars(select(Site).where(Site.name.in_(names)))}
        return {name: _WHY_NOT_SELECTED[st] for name, st in status.items() if st in _WHY_NOT_SELECTED}

    def select_sites(self, wanted: Sequence[str]) -> tuple[list[str], dict[str, str]]:
        """Of ``wanted`` (empty: every site the hub knows), those a round may use now, and
        the others with why. A site never seen, gone quiet, revoked or removed is left out
        instead of holding every round until its deadline."""
        now = self.clock()
        with self.sessions() as s:
            q = select(Site).order_by(Site.name)
            rows = {r.name: r for r in s.scalars(q.where(Site.name.in_(wanted)) if wanted else q)}
            selected: list[str] = []
            left_out: dict[str, str] = {}
            for name in wanted or list(rows):
                site = rows.get(name)
                if site is None:
                    left_out[name] = "not registered at this hub"
                    continue
                status = self.site_status(s, site, now)
                if status == SiteStatus.ONLINE:
                    selected.append(name)
                elif status == SiteStatus.OFFLINE:
                    seen = f"last seen {now - site.last_seen:.0f} s ago" if site.last_seen else "never connected"
                    left_out[name] = f"offline: {seen}"
                elif wanted or status != SiteStatus.REMOVED:  # a removed site is no news to an open experiment
                    left_out[name] = _WHY_NOT_SELECTED[status]
        return selected, left_out

    # -- people's tokens --------------------------------------------------------------
    def create_token(self, body: TokenCreate) -> TokenCreated:
        if body.name == "admin":  # identity is the token's name: "admin" owns the bootstrap operator's work
            raise Conflict(
                "the name 'admin' belongs to the bootstrap operator (home/admin.token); pick another name",
                name=body.name,
            )
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
        now = self.clock()
        with self.sessions() as s:
            return [self._site_public(s, r, now) for r in s.scalars(select(Site).order_by(Site.name)).all()]

    def _site_public(self, s: Session, r: Site, now: float) -> SitePublic:
        return SitePublic(
            name=r.name,
            created_at=r.created_at,
            last_seen=r.last_seen,
            status=self.site_status(s, r, now),
            version=r.version,
            datasets=json.loads(r.datasets_json) if r.datasets_json else {},
        )

    # -- experiments: each belongs to its submitter; who may see what is hub/ownership.py --
    def create_experiment(self, body: ExperimentCreate, person: Person, *, max_running: int) -> ExperimentPublic:
        """Start ``body`` for ``person`` from initial weights (and an algorithm bundle) they
        uploaded or may read; at most ``max_running`` running experiments each. The blobs stay
        pinned until the new row refers to them, so no clean-up can delete them in between."""
        spec = parse_spec(body.spec, source="experiment spec")
        _refuse_local_fields(spec)
        try:
            spec = with_calibrated_noise(spec)
        except ConfigurationError as exc:
            raise SpecError(f"experiment spec: field 'privacy.target_epsilon': {exc}", field="privacy") from exc
        with ExitStack() as pins:
            pins.enter_context(self.blobs.pinned(body.initial_weights))
            if spec.bundle is not None:
                pins.enter_context(self.blobs.pinned(spec.bundle))
            with self.sessions() as s:
                readable = ownership.may_read_blob(s, person, body.initial_weights)
            if not readable or not self.blobs.exists(body.initial_weights):
                raise SpecError(
                    f"field 'initial_weights': no blob {body.initial_weights} on this hub that you uploaded or "
                    "may read; upload the weights first (PUT /api/v1/blobs) and submit the digest it returns",
                    field="initial_weights",
                )
            schema = check_weights_file(lambda: self.blobs.open(body.initial_weights), where="initial_weights")
            if spec.mode == "fingerprint" and schema:
                # Tasks point at a weights blob in this protocol, so a fingerprint experiment
                # carries the empty model (to_safetensors({})); anything else would only be
                # shipped to every site for nothing.
                raise SpecError(
                    f"field 'initial_weights': mode = 'fingerprint' uses no model, but blob "
                    f"{body.initial_weights[:12]} holds {len(schema)} tensors; submit the empty model "
                    "(laulima.core.weights.to_safetensors({}), as `laulima experiment fingerprint` does)",
                    field="initial_weights",
                )
            if spec.bundle is not None:
                self._check_bundle(spec, spec.bundle, person)
            try:
                build_strategy(spec.strategy, seed=spec.seed)
            except LaulimaError:
                raise
            except Exception as exc:
                raise SpecError(f"field 'strategy': cannot be built ({exc})", field="strategy") from exc
            return self._insert_experiment(body, spec, person, max_running)

    def _check_bundle(self, spec: ExperimentSpec, digest: str, person: Person) -> None:
        """The bundle is a blob ``person`` may read, a valid bundle of at most
        ``MAX_ARCHIVE_BYTES`` (digest, manifest and every file's sha256), and its entry point is
        the spec's ``algorithm``: a site must never be asked to run what the spec does not name."""
        with self.sessions() as s:
            readable = ownership.may_read_blob(s, person, digest)
        if not readable or not self.blobs.exists(digest):
            raise SpecError(
                f"field 'bundle': no blob {digest} on this hub that you uploaded or may read; upload the bundle "
                "first (PUT /api/v1/blobs; `laulima experiment submit` packs and uploads it) and name the digest "
                "it returns",
                field="bundle",
            )
        size = self.blobs.size(digest)
        if size > MAX_ARCHIVE_BYTES:
            raise SpecError(
                f"field 'bundle': blob {digest[:12]} holds {size} bytes, more than an algorithm bundle may "
                f"({MAX_ARCHIVE_BYTES}); a bundle holds the algorithm's Python source only",
                field="bundle",
            )
        data = self.blobs.read_bytes(digest)
        try:
            manifest = verify_bytes(data, digest)
        except DataError as exc:
            raise SpecError(
                f"field 'bundle': {exc.message}; pack the algorithm again (`laulima experiment submit` does) "
                "and upload the new bundle",
                field="bundle",
            ) from exc
        except Exception as exc:  # the parser met input it did not foresee: still the bytes' fault
            raise SpecError(
                f"field 'bundle': blob {digest[:12]} is not a readable algorithm bundle ({type(exc).__name__}); "
                "pack the algorithm again (`laulima experiment submit` does) and upload the new bundle",
                field="bundle",
            ) from exc
        if manifest.entry_point != spec.algorithm:
            raise SpecError(
                f"field 'algorithm': {spec.algorithm!r} is not the entry point of bundle {digest[:12]}, which is "
                f"{manifest.entry_point!r}; name that entry point, or pack a bundle for this one",
                field="algorithm",
                bundle_entry_point=manifest.entry_point,
            )

    def _insert_experiment(
        self, body: ExperimentCreate, spec: ExperimentSpec, person: Person, max_running: int
    ) -> ExperimentPublic:
        with self.sessions.begin() as s:
            ownership.check_running_limit(s, person.name, max_running)
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
                spec_json=json.dumps(spec.model_dump(mode="json", exclude=_CLIENT_ONLY)),
                status=ExperimentStatus.RUNNING,
                initial_digest=body.initial_weights,
                global_digest=body.initial_weights,
                strategy_state_digest=None,
                rounds_done=0,
                rounds=spec.rounds,
                created_at=self.clock(),
                finished_at=None,
                error=None,
                owner=person.name,
                bundle_digest=spec.bundle,
            )
            s.add(exp)
            s.flush()
            return _experiment_public(exp)

    def list_experiments(self, person: Person) -> list[ExperimentPublic]:
        """Operators: all; anyone else: their own and those shared with them."""
        with self.sessions() as s:
            rows = list(s.scalars(select(Experiment).where(ownership.visible_to(person)).order_by(Experiment.id)))
            shares = ownership.shares_of(s, [e.id for e in rows])
            notes = site_notes(s, rows)
            started = finale_started(s, rows)
            return [_experiment_public(e, shares[e.id], notes[e.id], finale=e.id in started) for e in rows]

    def get_experiment(self, experiment_id: int, person: Person) -> ExperimentPublic:
        with self.sessions() as s:
            exp = ownership.readable_experiment(s, experiment_id, person)
            return _experiment_public(
                exp,
                ownership.shares_of(s, [exp.id])[exp.id],
                site_notes(s, [exp])[exp.id],
                finale=bool(finale_started(s, [exp])),
            )

    def cancel_experiment(self, experiment_id: int, person: Person) -> ExperimentPublic:
        """Stop it: the experiment, its open round and its open tasks become cancelled/failed.
        Only its owner or an operator may."""
        with self.sessions.begin() as s:
            exp = ownership.managed_experiment(s, experiment_id, person, "cancel")
            if exp.status != ExperimentStatus.RUNNING:
                raise Conflict(
                    f"experiment {exp.id} ('{exp.name}') is already {exp.status}; nothing to cancel",
                    experiment=exp.id,
                )
            self._stop(s, exp, ExperimentStatus.CANCELLED, "cancelled by request", self.clock())
            return _experiment_public(exp, ownership.shares_of(s, [exp.id])[exp.id])

    def share_experiment(self, experiment_id: int, person: Person, name: str) -> ExperimentPublic:
        """Let ``name`` read the experiment (owner or operator only)."""
        with self.sessions.begin() as s:
            exp = ownership.managed_experiment(s, experiment_id, person, "share")
            ownership.add_share(s, exp, name, self.clock())
            s.flush()
            started = bool(finale_started(s, [exp]))
            return _experiment_public(exp, ownership.shares_of(s, [exp.id])[exp.id], finale=started)

    def unshare_experiment(self, experiment_id: int, person: Person, name: str) -> ExperimentPublic:
        with self.sessions.begin() as s:
            exp = ownership.managed_experiment(s, experiment_id, person, "change the sharing of")
            ownership.remove_share(s, exp, name)
            started = bool(finale_started(s, [exp]))
            return _experiment_public(exp, ownership.shares_of(s, [exp.id])[exp.id], finale=started)

    def rounds(self, experiment_id: int, person: Person) -> list[RoundPublic]:
        with self.sessions() as s:
            ownership.readable_experiment(s, experiment_id, person)
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
                    left_out=json.loads(r.left_out_json) if r.left_out_json else {},
                    note=r.note or "",
                )
                for r in rows
            ]

    def metrics(self, experiment_id: int, person: Person) -> list[MetricRecord]:
        with self.sessions() as s:
            ownership.readable_experiment(s, experiment_id, person)
            rows = s.execute(  # columns, not ORM objects: a long experiment has tens of thousands
                select(Metric.round, Metric.site, Metric.kind, Metric.n_samples, Metric.metrics_json, Metric.model)
                .where(Metric.experiment_id == experiment_id)
                .order_by(Metric.round, Metric.kind, Metric.site)
            )
            return [metric_record(row) for row in rows]

    def refusals(self, experiment_id: int, person: Person) -> list[RefusalRecord]:
        with self.sessions() as s:
            ownership.readable_experiment(s, experiment_id, person)
            task_ids = select(Task.id).where(Task.experiment_id == experiment_id)
            rows = s.scalars(select(Refusal).where(Refusal.task_id.in_(task_ids)).order_by(Refusal.id))
            return [
                RefusalRecord(at=r.at, site=r.site, task_id=r.task_id, status=r.status, reason=r.reason) for r in rows
            ]

    # -- people's uploads: read access and quota (hub/ownership.py) --------------------
    def person_may_read_blob(self, person: Person, digest: str) -> bool:
        with self.sessions() as s:
            return ownership.may_read_blob(s, person, digest)

    def pending_uploads(self, name: str, *, besides: str | None = None) -> tuple[int, int]:
        """(count, bytes) of ``name``'s uploads that no experiment uses yet (except ``besides``)."""
        with self.sessions() as s:
            return ownership.pending_uploads(s, name, besides=besides)

    def record_upload(self, name: str, digest: str, size: int, quota: UploadQuota) -> None:
        """Record ``name``'s upload, or refuse it (413) past their quota."""
        with self.sessions.begin() as s:
            ownership.record_upload(s, name, digest, size, self.clock(), quota)

    # -- tasks, as the sites see them -------------------------------------------------
    def next_task(self, site_id: int, *, version: str | None = None) -> TaskPublic | None:
        """The site's most urgent open task (evaluations first, then the oldest), now delivered.

        A task the hub cannot describe (a row written by an older, laxer version) is failed
        with the reason and skipped: one bad task must never block a site's queue."""
        now = self.clock()
        seen: dict[str, Any] = {"last_seen": now} if version is None else {"last_seen": now, "version": version}
        with self.sessions.begin() as s:
            s.execute(update(Site).where(Site.id == site_id).values(**seen))
            for _ in range(MAX_UNSERVABLE_SKIPPED):
                row = s.execute(
                    select(Task, Experiment)
                    .join(Experiment, Task.experiment_id == Experiment.id)
                    .where(
                        Task.site_id == site_id,
                        Task.status.in_(OPEN_TASK),
                        Task.deadline > now,
                        Task.waiting_since.is_(None),  # held for approval: it would block the queue
                        Experiment.status == ExperimentStatus.RUNNING,
                    )
                    .order_by(case((Task.kind == TaskKind.EVALUATE, 0), else_=1), Task.created_at, Task.id)
                    .limit(1)
                ).first()
                if row is None:
                    return None
                task, exp = row
                try:
                    public = self._task_public(task, exp, now)
                except (ValueError, KeyError, TypeError, LaulimaError) as exc:  # ValidationError is a ValueError
                    task.status, task.finished_at = TaskStatus.FAILED, now
                    task.failure_kind = FailureKind.ERROR.value
                    task.failure_reason = f"the hub cannot serve this task: {str(exc)[:300]}"
                    s.flush()
                    continue
                if task.status == TaskStatus.PENDING:
                    task.status, task.delivered_at = TaskStatus.DELIVERED, now
                return public
        return None

    def _task_public(self, task: Task, exp: Experiment, now: float) -> TaskPublic:
        spec = json.loads(exp.spec_json)
        bundle = exp.bundle_digest
        config = json.loads(task.config_json)
        privacy = config.pop(PRIVACY_KEY, None)  # typed fields of their own, not the algorithm's
        secure_aggregation = config.pop(SECAGG_CONFIG_KEY, None)
        return TaskPublic(
            id=task.id,
            experiment_id=exp.id,
            experiment_name=exp.name,
            round=task.round,
            kind=TaskKind(task.kind),
            algorithm=spec["algorithm"],
            dataset=spec["dataset"],
            cohort=spec.get("cohort"),
            config=config,
            privacy=privacy,
            secure_aggregation=secure_aggregation,
            weights_digest=task.weights_digest,
            weights_size=self.blobs.size(task.weights_digest),
            deadline=task.deadline,
            seconds_left=max(0.0, task.deadline - now),
            time_limit_s=task.time_limit_s,
            upload_nonce=task.upload_nonce,
            bundle_digest=bundle,
            bundle_size=self.blobs.size(bundle) if bundle else None,
            signatures=spec.get("signatures") or [],
            requester=ownership.owner_of(exp),
            rounds=max(exp.rounds, 1),  # an evaluate-mode experiment (0 rounds) is one pass; agents require >= 1
            approval_seconds_left=max(0.0, approval_deadline(exp) - now),
        )

    def site_may_read(self, site_id: int, digest: str) -> bool:
        """The weights of one of the site's tasks, or the algorithm bundle of an experiment it
        has a task in (its administrator reviews the code before approving)."""
        with self.sessions() as s:
            hit = s.scalar(select(Task.id).where(Task.site_id == site_id, Task.weights_digest == digest).limit(1))
            if hit is None:
                hit = s.scalar(
                    select(Task.id)
                    .join(Experiment, Task.experiment_id == Experiment.id)
                    .where(Task.site_id == site_id, Experiment.bundle_digest == digest)
                    .limit(1)
                )
        return hit is not None

    def set_task_waiting(self, task_id: str, site: Site, reason: str) -> None:
        """The site holds its open task for its administrator's approval, for ``reason``: the task
        is not handed out again, and its round waits for it until the approval deadline."""
        now = self.clock()
        with self.sessions.begin() as s:
            task, _ = check_result_allowed(s, task_id, site, kind=None, nonce=None, now=now, lock=True)
            task.waiting_reason = reason
            if task.waiting_since is None:
                task.waiting_since = now

    def resume_task(self, task_id: str, site: Site) -> TaskPublic:
        """The site's administrator approved: the task runs now, with a fresh time budget (its
        deadline, and its round's, at least ``round_timeout_s`` from now). A task that was not
        waiting is returned as it is (a retried request), so resuming cannot extend a round
        twice; one that can no longer run is a 409 saying why."""
        now = self.clock()
        with self.sessions.begin() as s:
            try:
                task, exp = check_result_allowed(s, task_id, site, kind=None, nonce=None, now=now, lock=True)
            except Conflict as exc:
                raise Conflict(f"{exc.message} — the task cannot resume; drop it", **exc.context) from exc
            if task.waiting_since is not None:
                # a local-only model gets its own (scaled) budget again, anything else a round's
                budget = task.deadline - task.created_at if task.model is not None else spec_of(exp).round_timeout_s
                task.deadline = max(task.deadline, now + budget)
                if task.kind == TaskKind.TRAIN:
                    rnd = s.scalar(
                        select(Round).where(Round.experiment_id == exp.id, Round.index == task.round).with_for_update()
                    )
                    if rnd is not None:
                        rnd.deadline = max(rnd.deadline, task.deadline)
                task.waiting_reason, task.waiting_since = None, None
            if task.status == TaskStatus.PENDING:
                task.status, task.delivered_at = TaskStatus.DELIVERED, now
            return self._task_public(task, exp, now)

    def check_result(
        self, task_id: str, site: Site, *, kind: TaskKind | None, nonce: str | None
    ) -> tuple[Task, Experiment]:
        """Refuse early, before a body is read, what recording the result would refuse."""
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
                        model=task.model,
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
                    model=task.model,
                )
            )

    def record_fingerprint(self, task_id: str, site: Site, fingerprint: SiteFingerprint) -> None:
        """Keep the site's fingerprint and complete its task, in one transaction. Its cases may
        not exceed what the site reported for the experiment's dataset (when it said)."""
        now = self.clock()
        try:
            with self.sessions.begin() as s:
                task, exp = check_result_allowed(
                    s, task_id, site, kind=TaskKind.FINGERPRINT, nonce=None, now=now, lock=True
                )
                dataset = json.loads(exp.spec_json).get("dataset")
                reported = _reported_cases(s, site.name, dataset) if isinstance(dataset, str) else None
                if reported is not None and fingerprint.n_cases > reported:
                    raise DataError(
                        f"fingerprint of task {task_id}: n_cases is {fingerprint.n_cases}, above the {reported} "
                        f"cases site {site.name!r} reported for dataset {dataset!r}",
                        task=task_id,
                    )
                task.status, task.finished_at = TaskStatus.COMPLETED, now
                s.add(
                    FingerprintResult(
                        task_id=task.id,
                        experiment_id=task.experiment_id,
                        site=site.name,
                        n_cases=fingerprint.n_cases,
                        fingerprint_json=fingerprint.model_dump_json(),
                        received_at=now,
                    )
                )
        except IntegrityError as exc:  # a concurrent post for the same task won the race
            raise Conflict(
                f"task {task_id} already has an accepted fingerprint; a second result is not counted", task=task_id
            ) from exc

    def fingerprint_parts(self, experiment_id: int) -> dict[str, SiteFingerprint]:
        """The sites' accepted fingerprints of a fingerprint-mode experiment, by site name."""
        with self.sessions() as s:
            rows = s.execute(
                select(FingerprintResult.site, FingerprintResult.fingerprint_json)
                .where(FingerprintResult.experiment_id == experiment_id)
                .order_by(FingerprintResult.site)
            ).all()
        return {site: SiteFingerprint.model_validate_json(raw) for site, raw in rows}

    def complete_fingerprint(self, experiment_id: int, merged: MergedFingerprint, sites: Sequence[str]) -> bool:
        """Store the merged fingerprint and complete the experiment, in one transaction; False
        if it is no longer running (nothing written)."""
        now = self.clock()
        with self.sessions.begin() as s:
            exp = _experiment(s, experiment_id)
            if exp.status != ExperimentStatus.RUNNING:
                return False
            s.add(
                MergedFingerprintRow(
                    experiment_id=exp.id,
                    sites_json=json.dumps(list(sites)),
                    n_cases=merged.n_cases,
                    fingerprint_json=json.dumps(merged.fingerprint),
                    dataset_json=json.dumps(merged.dataset_json),
                    created_at=now,
                )
            )
            self._stop(s, exp, ExperimentStatus.COMPLETED, None, now)
        return True

    def fingerprint(self, experiment_id: int, person: Person) -> FingerprintPublic:
        """The merged fingerprint of a completed fingerprint-mode experiment; 409 saying why
        for any other (running, failed, cancelled, or not of that mode)."""
        with self.sessions() as s:
            exp = ownership.readable_experiment(s, experiment_id, person)
            mode = json.loads(exp.spec_json).get("mode", "train")
            which = f"experiment {exp.id} ('{exp.name}')"
            if mode != "fingerprint":
                raise Conflict(
                    f"{which} is a {mode}-mode experiment and has no dataset fingerprint; submit one with "
                    "`laulima experiment fingerprint SPEC` (mode = 'fingerprint')",
                    experiment=exp.id,
                )
            if exp.status == ExperimentStatus.RUNNING:
                raise Conflict(
                    f"{which} is still running: its sites are computing their fingerprints; ask again once it "
                    "has completed",
                    experiment=exp.id,
                    status=exp.status,
                )
            row = s.scalar(select(MergedFingerprintRow).where(MergedFingerprintRow.experiment_id == exp.id))
            if row is None:
                raise Conflict(
                    f"{which} is {exp.status} and has no merged fingerprint: {exp.error or 'no reason recorded'}",
                    experiment=exp.id,
                    status=exp.status,
                )
        failures = {t.site: t.failure for t in self.finale_tasks(experiment_id, exp.rounds + 1) if t.failure}
        return FingerprintPublic(
            experiment_id=experiment_id,
            fingerprint=json.loads(row.fingerprint_json),
            dataset_json=json.loads(row.dataset_json),
            n_cases=row.n_cases,
            sites=json.loads(row.sites_json),
            failures=failures,
        )

    def record_failure(self, task_id: str, site: Site, failure: TaskFailure) -> None:
        now = self.clock()
        with self.sessions.begin() as s:
            task, _ = check_result_allowed(s, task_id, site, kind=None, nonce=None, now=now, lock=True)
            task.status, task.finished_at = TaskStatus.FAILED, now
            task.failure_kind, task.failure_reason = failure.kind.value, failure.reason

    def record_refusal(self, *, site: Site, task_id: str, status: int, reason: str, ends_task: bool = False) -> bool:
        """Record a refused result (at most ``MAX_REFUSALS_PER_TASK`` rows per task, reasons
        cut to ``MAX_REASON_CHARS``). With ``ends_task`` (the result itself was unacceptable)
        the site's open task fails at once, so its round need not wait for the deadline.
        Returns True if a task was ended."""
        now, reason = self.clock(), reason[:MAX_REASON_CHARS]
        with self.sessions.begin() as s:
            stored = s.scalar(select(func.count(Refusal.id)).where(Refusal.task_id == task_id))
            if not stored or stored < MAX_REFUSALS_PER_TASK:
                s.add(Refusal(at=now, site=site.name, task_id=task_id, status=status, reason=reason))
            if not ends_task:
                return False
            task = s.scalar(select(Task).where(Task.id == task_id).with_for_update())
            if task is None or task.site_id != site.id or task.status not in OPEN_TASK:
                return False
            task.status, task.finished_at = TaskStatus.FAILED, now
            task.failure_kind = FailureKind.REFUSED.value
            task.failure_reason = f"the hub refused its result ({status}): {reason}"
        return True

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
        self,
        experiment_id: int,
        index: int,
        sites: Sequence[str],
        tasks: Sequence[NewTask],
        deadline: float,
        *,
        left_out: dict[str, str] | None = None,
    ) -> bool:
        """Create round ``index`` and its tasks in one transaction; False if it already exists."""
        now = self.clock()
        with self.sessions.begin() as s:
            exp = _experiment(s, experiment_id)
            if exp.status != ExperimentStatus.RUNNING or exp.rounds_done != index - 1:
                return False
            if s.scalar(select(Round.id).where(Round.experiment_id == exp.id, Round.index == index)) is not None:
                return False
            exp.waiting = None
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
                    left_out_json=json.dumps(left_out) if left_out else None,
                )
            )
            self._add_tasks(s, exp.id, index, tasks, now)
        return True

    def set_waiting(self, experiment_id: int, note: str) -> bool:
        """Say why the experiment's next round cannot open; True if that is news."""
        with self.sessions() as s:
            if s.scalar(select(Experiment.waiting).where(Experiment.id == experiment_id)) == note:
                return False
        with self.sessions.begin() as s:
            s.execute(update(Experiment).where(Experiment.id == experiment_id).values(waiting=note))
        return True

    def checkpoint_round(
        self,
        round_id: int,
        *,
        update_ids: Sequence[int],
        global_digest: str,
        state_digest: str | None,
        evaluation: Sequence[NewTask],
        handoffs: Mapping[str, tuple[str, str]] | None = None,
    ) -> bool:
        """The checkpoint: round aggregated, experiment advanced, leftovers expired, evaluation
        tasks created, FedDC's ``handoffs`` (receiver -> (sender, digest of the model it
        continues from)) recorded, all in one transaction. False (nothing written) if the
        round changed since it was read: closed by someone else, or an update arrived meanwhile."""
        now = self.clock()
        with self.sessions.begin() as s:
            rnd = s.get(Round, round_id)
            if rnd is None or rnd.status != RoundStatus.OPEN:
                return False
            if self._updates_changed(s, rnd, update_ids):
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
            for site, (sender, digest) in sorted((handoffs or {}).items()):
                s.add(RoundHandoff(experiment_id=exp.id, round=rnd.index, site=site, sender=sender, digest=digest))
        return True

    def abort_round(self, round_id: int, reason: str, *, give_up_after: int = MAX_ABORTED_ROUNDS) -> bool:
        """Abandon an open round and keep the global model: the round counts as run, the next
        one opens. Secure aggregation does this when too many sites dropped to unmask the sum.
        After ``give_up_after`` aborted rounds in a row the experiment fails instead: something
        keeps the sites from finishing, and more rounds would only burn their time."""
        now = self.clock()
        with self.sessions.begin() as s:
            rnd = s.get(Round, round_id)
            if rnd is None or rnd.status != RoundStatus.OPEN:
                return False
            exp = _experiment(s, rnd.experiment_id)
            if exp.status != ExperimentStatus.RUNNING:
                return False
            rnd.status, rnd.closed_at, rnd.note = RoundStatus.ABORTED, now, reason
            rnd.global_out_digest = rnd.global_in_digest
            exp.rounds_done = rnd.index
            self._close_open_tasks(s, exp.id, TaskStatus.EXPIRED, now, "round aborted", round_index=rnd.index)
            recent = s.scalars(
                select(Round.status)
                .where(Round.experiment_id == exp.id, Round.index < rnd.index)
                .order_by(Round.index.desc())
                .limit(give_up_after - 1)
            ).all()
            if len(recent) == give_up_after - 1 and all(r == RoundStatus.ABORTED for r in recent):
                exp.status, exp.finished_at = ExperimentStatus.FAILED, now
                exp.error = f"{give_up_after} rounds in a row were aborted; the last: {reason}"
        return True

    def handoffs(self, experiment_id: int, round_index: int) -> dict[str, str]:
        """FedDC: receiver site -> digest of the weights it continues from after ``round_index``
        (recorded by that round's checkpoint; empty when everyone continues from the global model)."""
        with self.sessions() as s:
            rows = s.execute(
                select(RoundHandoff.site, RoundHandoff.digest).where(
                    RoundHandoff.experiment_id == experiment_id, RoundHandoff.round == round_index
                )
            )
            return {site: digest for site, digest in rows}

    def spent_update_digests(self, experiment_id: int) -> list[str]:
        """Blobs of updates whose round is closed, and of FedDC handoffs used up, that nothing
        else points at.

        A closed round's updates are never read again (its checkpoint holds the result),
        so keeping them would only grow the hub's disk by model size x sites every round.
        Blobs are content-addressed and may be shared, hence the reference check (one list
        of what refers to blobs: :func:`laulima.hub.housekeeping.referenced`).
        """
        with self.sessions() as s:
            closed = select(Round.index).where(Round.experiment_id == experiment_id, Round.status != RoundStatus.OPEN)
            candidates = set(
                s.scalars(select(Update.digest).where(Update.experiment_id == experiment_id, Update.round.in_(closed)))
            )
            # FedDC's handed-off models, once the round that trained from them is closed (or the
            # experiment stopped): the reference check below keeps the ones still to be used.
            candidates.update(s.scalars(select(RoundHandoff.digest).where(RoundHandoff.experiment_id == experiment_id)))
            if not candidates:
                return []
            in_use = referenced(s, candidates, spent_updates=False, uploads=True)  # people's uploads count
        return sorted(candidates - in_use)

    def fail_round(self, round_id: int, error: str, *, update_ids: Sequence[int] | None = None) -> bool:
        """Fail an open round (and its experiment). With ``update_ids`` (the updates the
        decision saw) nothing happens if another arrived meanwhile: the caller decides again."""
        now = self.clock()
        with self.sessions.begin() as s:
            rnd = s.get(Round, round_id)
            if rnd is None or rnd.status != RoundStatus.OPEN:
                return False
            if update_ids is not None and self._updates_changed(s, rnd, update_ids):
                return False
            rnd.status, rnd.closed_at = RoundStatus.FAILED, now
            self._close_open_tasks(s, rnd.experiment_id, TaskStatus.EXPIRED, now, "round failed", round_index=rnd.index)
            exp = _experiment(s, rnd.experiment_id)
            if exp.status == ExperimentStatus.RUNNING:
                exp.status, exp.finished_at, exp.error = ExperimentStatus.FAILED, now, error
        return True

    def expire_overdue(self) -> None:
        """Evaluation and fingerprint tasks whose deadline passed will not be answered any more
        (one statement for every experiment; it writes only when there is something to expire).
        One held for approval expires only at its experiment's approval deadline."""
        now = self.clock()
        overdue = (Task.kind.in_(RESULT_KINDS), Task.status.in_(OPEN_TASK), Task.deadline <= now)
        with self.sessions() as s:
            if s.scalar(select(Task.id).where(*overdue).limit(1)) is None:
                return
            waiting = s.execute(
                select(Task.id, Experiment)
                .join(Experiment, Task.experiment_id == Experiment.id)
                .where(*overdue, Task.waiting_since.is_not(None))
            ).all()
            undecided = [task_id for task_id, exp in waiting if approval_deadline(exp) <= now]
        with self.sessions.begin() as s:
            s.execute(
                update(Task)
                .where(*overdue, Task.waiting_since.is_(None))
                .values(status=TaskStatus.EXPIRED, finished_at=now, failure_reason="no result before the deadline")
            )
            if undecided:
                s.execute(
                    update(Task)
                    .where(*overdue, Task.id.in_(undecided))
                    .values(status=TaskStatus.EXPIRED, finished_at=now, failure_reason=NO_APPROVAL)
                )

    def evaluations_pending(self, experiment_id: int) -> bool:
        """Whether evaluation (or fingerprint) tasks are still open; those of sites that can no
        longer answer (revoked, removed) expire now instead of at their deadline."""
        open_evaluations = (
            select(Task.id, Site.name)
            .join(Site, Task.site_id == Site.id)
            .where(Task.experiment_id == experiment_id, Task.kind.in_(RESULT_KINDS), Task.status.in_(OPEN_TASK))
        )
        with self.sessions() as s:
            pending = list(s.execute(open_evaluations))
        if not pending:
            return False
        gone = self.gone(sorted({name for _, name in pending}))
        if gone:
            now = self.clock()
            with self.sessions.begin() as s:
                for task_id, name in pending:
                    if name in gone:
                        s.execute(
                            update(Task)
                            .where(Task.id == task_id, Task.status.in_(OPEN_TASK))
                            .values(status=TaskStatus.EXPIRED, finished_at=now, failure_reason=gone[name])
                        )
        return any(name not in gone for _, name in pending)

    def finish_experiment(self, experiment_id: int, status: ExperimentStatus, error: str | None = None) -> bool:
        """Completed (nothing left to do) or failed (with ``error``); False if no longer running."""
        with self.sessions.begin() as s:
            exp = _experiment(s, experiment_id)
            if exp.status != ExperimentStatus.RUNNING:
                return False
            self._stop(s, exp, status, error, self.clock())
        return True

    # -- after training: local-only models and the cross-site evaluation (or evaluate mode) --
    def finale_tasks(self, experiment_id: int, index: int) -> list[FinaleTask]:
        """The labelled tasks of round ``index`` (``rounds + 1``), in model then site order."""
        with self.sessions() as s:
            rows = s.execute(
                select(Task, Site.name, Update.digest)
                .join(Site, Task.site_id == Site.id)
                .outerjoin(Update, Update.task_id == Task.id)
                .where(Task.experiment_id == experiment_id, Task.round == index, Task.model.is_not(None))
                .order_by(Task.model, Site.name, Task.created_at)
            ).all()
        out = []
        for task, site, digest in rows:
            status = TaskStatus(task.status)
            failure = None
            if status == TaskStatus.FAILED:
                failure = failure_note(task.failure_kind, task.failure_reason)
            elif status in (TaskStatus.EXPIRED, TaskStatus.CANCELLED):
                failure = f"{status} ({task.failure_reason or 'no result'})"
            out.append(FinaleTask(task.id, site, TaskKind(task.kind), str(task.model), status, failure, digest))
        return out

    def participating_sites(self, experiment_id: int) -> dict[str, int]:
        """Sites whose updates went into an aggregated round, with how many rounds each: the
        cross-site matrix's sites, and each local-only model's budget in rounds."""
        aggregated = (
            (Round.experiment_id == Update.experiment_id)
            & (Round.index == Update.round)
            & (Round.status == RoundStatus.AGGREGATED)
        )
        with self.sessions() as s:
            rows = s.execute(
                select(Update.site, func.count(Update.id))
                .join(Round, aggregated)
                .where(Update.experiment_id == experiment_id)
                .group_by(Update.site)
            ).all()
        return {site: int(n) for site, n in sorted(rows)}

    def open_finale(self, experiment_id: int, index: int, kind: TaskKind, tasks: Sequence[NewTask]) -> bool:
        """Create the labelled ``kind`` tasks of round ``index`` in one transaction; False (nothing
        written) if the experiment stopped, is not past its rounds, or has such tasks already —
        so a restarted orchestrator, or a second tick, can never create them twice."""
        now = self.clock()
        with self.sessions.begin() as s:
            exp = s.scalar(select(Experiment).where(Experiment.id == experiment_id).with_for_update())
            if exp is None or exp.status != ExperimentStatus.RUNNING or exp.rounds_done != exp.rounds:
                return False
            exists = s.scalar(
                select(Task.id)
                .where(
                    Task.experiment_id == experiment_id,
                    Task.round == index,
                    Task.model.is_not(None),
                    Task.kind == kind,
                )
                .limit(1)
            )
            if exists is not None:
                return False
            exp.waiting = None
            self._add_tasks(s, exp.id, index, tasks, now)
        return True

    def expire_overdue_finale(self, experiment_id: int, index: int) -> None:
        """Local-model training tasks past their deadline (held for approval: past the
        experiment's approval deadline), or of sites that can no longer answer, will not be
        answered: they expire. (Evaluation tasks expire in :meth:`expire_overdue`.)"""
        now = self.clock()
        cond = (
            Task.experiment_id == experiment_id,
            Task.round == index,
            Task.model.is_not(None),
            Task.kind == TaskKind.TRAIN,
            Task.status.in_(OPEN_TASK),
        )
        with self.sessions() as s:
            rows = s.execute(
                select(Task.id, Task.deadline, Task.waiting_since, Site.name)
                .join(Site, Task.site_id == Site.id)
                .where(*cond)
            ).all()
            exp = s.get(Experiment, experiment_id)
        if not rows or exp is None:
            return
        gone = self.gone(sorted({name for *_, name in rows}))
        ends = approval_deadline(exp)
        expired: dict[str, str] = {}
        for task_id, deadline, waiting_since, name in rows:
            if name in gone:
                expired[task_id] = gone[name]
            elif waiting_since is not None and now >= max(deadline, ends):
                expired[task_id] = NO_APPROVAL
            elif waiting_since is None and now >= deadline:
                expired[task_id] = "no local model before the deadline"
        if not expired:
            return
        with self.sessions.begin() as s:
            for task_id, reason in expired.items():
                s.execute(
                    update(Task)
                    .where(Task.id == task_id, Task.status.in_(OPEN_TASK))
                    .values(status=TaskStatus.EXPIRED, finished_at=now, failure_reason=reason)
                )

    def cross_site(self, experiment_id: int, person: Person) -> CrossSiteMatrix:
        """The models x sites matrix of the evaluation after training (see core/crosssite.py),
        with what is missing and why. 404 for an experiment that has none."""
        with self.sessions() as s:
            exp = ownership.readable_experiment(s, experiment_id, person)
            spec = json.loads(exp.spec_json)
            evaluation = spec.get("evaluation") if isinstance(spec.get("evaluation"), dict) else {}
            if spec.get("mode") != "evaluate" and not evaluation.get("cross_site"):
                raise NotFound(
                    f"experiment {exp.id} ('{exp.name}') has no cross-site evaluation: its spec does not set "
                    "[evaluation] cross_site = true (nor mode = 'evaluate'); its per-round evaluations are at "
                    f"GET /api/v1/experiments/{exp.id}/metrics",
                    experiment=exp.id,
                )
            index, running = exp.rounds + 1, exp.status == ExperimentStatus.RUNNING
            rows = s.scalars(
                select(Metric).where(
                    Metric.experiment_id == exp.id,
                    Metric.round == index,
                    Metric.kind == TaskKind.EVALUATE,
                    Metric.model.is_not(None),
                )
            )
            records = [metric_record(m) for m in rows]
        tasks = self.finale_tasks(experiment_id, index)
        failures = [
            CrossSiteFailure(model=t.model, site=t.site, kind=t.kind, reason=t.failure) for t in tasks if t.failure
        ]
        complete = not running or (any(t.kind == TaskKind.EVALUATE for t in tasks) and not any(t.open for t in tasks))
        sites = sorted({t.site for t in tasks})
        return cross_site_matrix(experiment_id, index, records, failures=failures, sites=sites, complete=complete)

    def model_of(self, experiment_id: int, person: Person, model: str | None) -> tuple[ExperimentPublic, str, str]:
        """(experiment, digest, label) of a model a reader may download: the newest global
        model (``None``, ``global``, or ``model`` for evaluate mode) or a local-only model
        (``local:<site>``). 404 naming the experiment's models for any other label."""
        experiment = self.get_experiment(experiment_id, person)
        if model is None or model == GLOBAL or (model == MODEL and experiment.mode == "evaluate"):
            return experiment, experiment.global_digest, model or GLOBAL
        with self.sessions() as s:
            rows = dict(
                s.execute(
                    select(Task.model, Update.digest)
                    .join(Update, Update.task_id == Task.id)
                    .where(
                        Task.experiment_id == experiment_id,
                        Task.kind == TaskKind.TRAIN,
                        Task.model.is_not(None),
                    )
                ).all()
            )
        if model in rows and site_of_local(model) is not None:
            return experiment, rows[model], model
        available = [MODEL if experiment.mode == "evaluate" else GLOBAL, *sorted(str(m) for m in rows)]
        raise NotFound(
            f"experiment {experiment_id} ('{experiment.name}') has no model {model!r}; its models are "
            f"{', '.join(available)}",
            experiment=experiment_id,
            model=model,
            available=available,
        )

    # -- helpers ----------------------------------------------------------------------
    def _updates_changed(self, s: Session, rnd: Round, update_ids: Sequence[int]) -> bool:
        """Whether the round's accepted updates differ from those a decision was taken on."""
        current = sorted(u.id for u in self.round_updates(s, rnd.experiment_id, rnd.index))
        return current != sorted(update_ids)

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
                    model=t.model,
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


class MetricRow(Protocol):
    """What :func:`metric_record` reads: a ``Metric``, or a row selected with its columns."""

    @property
    def round(self) -> int: ...
    @property
    def site(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def n_samples(self) -> int: ...
    @property
    def metrics_json(self) -> str: ...
    @property
    def model(self) -> str | None: ...


def metric_record(m: MetricRow) -> MetricRecord:
    """A stored metric row as the API serves it."""
    return MetricRecord(
        round=m.round,
        site=m.site,
        kind=TaskKind(m.kind),
        n_samples=m.n_samples,
        metrics=json.loads(m.metrics_json),
        model=m.model,
    )


def spec_of(exp: Experiment) -> ExperimentSpec:
    """The experiment's spec as validated when it was submitted (rules added since do not
    stop a running experiment)."""
    return parse_spec(json.loads(exp.spec_json), source=f"experiment {exp.id}", accepted=True)


_CLIENT_ONLY = {"source", "requirements"}
"""Spec fields only the submitting client reads (it packs them into a bundle); never stored."""


def _refuse_local_fields(spec: ExperimentSpec) -> None:
    """A spec that still names the scientist's local files was not packed: say how to submit it."""
    if spec.source is not None:
        raise SpecError(
            f"field 'source': {spec.source[:200]!r} is a local path the hub cannot read; submit with "
            "`laulima experiment submit`, which packs it into a bundle",
            field="source",
        )
    if spec.requirements:
        raise SpecError(
            "field 'requirements': they belong in the bundle's manifest, which the hub cannot write; submit with "
            "`laulima experiment submit`, which packs them with the `source` into a bundle",
            field="requirements",
        )


WAITING_NOTE = "waiting for approval at the site: "


def site_notes(s: Session, experiments: Sequence[Experiment]) -> dict[int, dict[str, str]]:
    """What each site of each experiment is doing, where it is news: held for approval, or its
    latest finished task refused or failed. Per site the newest task decides (a task still
    open and not held passes the word to the one before it; a completed one clears it), so a
    refusal stays visible while the next round runs (a round's evaluation is newer than its
    training). One query over every experiment's last two rounds, however many are listed."""
    notes: dict[int, dict[str, str]] = {e.id: {} for e in experiments}
    if not experiments:
        return notes
    rows = s.execute(
        select(Task.experiment_id, Site.name, Task.status, Task.waiting_reason, Task.failure_kind, Task.failure_reason)
        .join(Site, Task.site_id == Site.id)
        .join(Experiment, Task.experiment_id == Experiment.id)
        .where(Task.experiment_id.in_(list(notes)), Task.round >= Experiment.rounds_done - 1)
        .order_by(
            Task.experiment_id,
            Task.round.desc(),
            case((Task.kind == TaskKind.EVALUATE, 0), else_=1),
            Task.created_at.desc(),
        )
    ).all()
    settled: set[tuple[int, str]] = set()
    for experiment_id, name, status, waiting_reason, failure_kind, failure_reason in rows:
        if (experiment_id, name) in settled:
            continue
        if status in OPEN_TASK and waiting_reason is not None:
            notes[experiment_id][name] = WAITING_NOTE + waiting_reason
        elif status == TaskStatus.FAILED:
            notes[experiment_id][name] = failure_note(failure_kind, failure_reason)
        elif status in OPEN_TASK:
            continue  # under way: what came before still says how this site is doing
        settled.add((experiment_id, name))
    return notes


def algorithm_digest(exp: Experiment) -> str:
    """What the sites run: the bundle's digest, a built-in's well-known digest, or "" for an
    experiment older than bundles that names neither."""
    if exp.bundle_digest:
        return exp.bundle_digest
    algorithm = json.loads(exp.spec_json).get("algorithm")
    return builtin_digest(algorithm) if isinstance(algorithm, str) and is_builtin_name(algorithm) else ""


def _experiment(s: Session, experiment_id: int) -> Experiment:
    exp = s.get(Experiment, experiment_id)
    if exp is None:
        raise NotFound(f"no experiment with id {experiment_id}", experiment=experiment_id)
    return exp


def _token_public(t: ApiToken) -> TokenPublic:
    return TokenPublic(id=t.id, name=t.name, role=Role(t.role), created_at=t.created_at, revoked_at=t.revoked_at)


def finale_started(s: Session, experiments: Sequence[Experiment]) -> set[int]:
    """Ids of ``experiments`` whose evaluation after training (labelled tasks of an evaluate
    mode run, or the cross-site matrix) has its evaluation tasks: one query for all."""
    ids = [e.id for e in experiments if e.status == ExperimentStatus.RUNNING and e.rounds_done >= e.rounds]
    if not ids:
        return set()
    return set(
        s.scalars(
            select(Task.experiment_id)
            .where(Task.experiment_id.in_(ids), Task.model.is_not(None), Task.kind == TaskKind.EVALUATE)
            .distinct()
        )
    )


def _reported_cases(s: Session, site_name: str, dataset: str) -> int | None:
    """The number of cases ``site_name`` reported for ``dataset`` (None: never said)."""
    raw = s.scalar(select(Site.datasets_json).where(Site.name == site_name))
    if not raw:
        return None
    value = json.loads(raw).get(dataset)
    return value if isinstance(value, int) else None


def experiment_phase(e: Experiment, spec: dict[str, Any], *, finale: bool) -> ExperimentPhase | None:
    """What a running experiment is doing, from its row and its stored spec; ``finale``:
    whether the evaluation tasks after training exist (:func:`finale_started`)."""
    if e.status != ExperimentStatus.RUNNING:
        return None
    if spec.get("mode") == "evaluate":
        return ExperimentPhase.EVALUATION
    if spec.get("mode") == "fingerprint":
        return ExperimentPhase.FINGERPRINT
    if e.rounds_done < e.rounds:
        return ExperimentPhase.TRAINING
    raw = spec.get("evaluation")
    evaluation: dict[str, Any] = raw if isinstance(raw, dict) else {}
    if not evaluation.get("cross_site"):
        return ExperimentPhase.FINAL_EVALUATION
    if evaluation.get("local_models") and not finale:
        return ExperimentPhase.LOCAL_MODELS
    return ExperimentPhase.CROSS_SITE


def _experiment_public(
    e: Experiment, shared_with: Sequence[str] = (), notes: dict[str, str] | None = None, *, finale: bool = False
) -> ExperimentPublic:
    spec = json.loads(e.spec_json)
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
        spec=spec,
        waiting=e.waiting if e.status == ExperimentStatus.RUNNING else None,
        owner=ownership.owner_of(e),
        shared_with=list(shared_with),
        algorithm_digest=algorithm_digest(e),
        site_notes=notes or {},
        mode=spec["mode"] if spec.get("mode") in UNTRAINED_MODES else "train",
        phase=experiment_phase(e, spec, finale=finale),
    )
