"""The hub's durable state: typed ORM tables and an engine that survives kill -9.

Everything the orchestrator decides is re-derived from these rows, so a restarted hub
continues where it stopped. Uniqueness the protocol depends on (one update per task, one
round per index) is enforced by the database itself.

Transactions are serialized, on both backends, because the service reads a row and writes
what follows from it in one transaction (a round still open, so it is checkpointed once).
SQLite runs in WAL mode and every transaction begins IMMEDIATE. PostgreSQL (several hub
processes may share it) gets the same guarantee from a transaction-level advisory lock taken
at every BEGIN: the hub's transactions are short, and one ordering for all of them keeps the
reasoning of a single process valid across processes. The schema is versioned by Alembic
(:mod:`laulima.hub.migrations`); :func:`migrate` brings a database to the newest revision.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    Double,
    Engine,
    ForeignKey,
    Index,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker
from sqlalchemy.orm import Session as Session
from sqlalchemy.pool import StaticPool

from laulima.errors import ConfigurationError

__all__ = [
    "ApiToken",
    "Base",
    "BlobPin",
    "Experiment",
    "ExperimentShare",
    "FingerprintResult",
    "Lease",
    "MergedFingerprintRow",
    "Metric",
    "MlflowExport",
    "Refusal",
    "Round",
    "RoundHandoff",
    "SecAggKey",
    "SecAggReveal",
    "SecAggRound",
    "SecAggShare",
    "Session",
    "SessionFactory",
    "Site",
    "Task",
    "UiSession",
    "Update",
    "Upload",
    "is_postgresql",
    "make_engine",
    "make_session_factory",
    "migrate",
]

SessionFactory = sessionmaker[Session]

_DIGEST = String(64)


class Base(DeclarativeBase):
    type_annotation_map = {float: Double(), str: String(255)}


class Site(Base):
    __tablename__ = "sites"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    token_hash: Mapped[str | None] = mapped_column(String(64), unique=True)
    """sha256 hex of the bearer token (token mode); the token itself is never stored. None for
    a site known by its certificate only."""
    created_at: Mapped[float]
    last_seen: Mapped[float | None]
    version: Mapped[str | None] = mapped_column(String(64), default=None)
    """The agent's Laulima version, from its last request."""
    cert_serial: Mapped[str | None] = mapped_column(String(64), default=None)
    """Hex serial of the certificate it last presented: how a revocation finds the site."""
    datasets_json: Mapped[str | None] = mapped_column(Text, default=None)
    """Its last report: dataset name -> number of cases (or null), JSON."""
    removed_at: Mapped[float | None] = mapped_column(default=None)
    """Set by ``laulima site remove``: refused from then on, never selected."""


class ApiToken(Base):
    """A person's (or a service's) credential: a role and the sha256 of a random token."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), index=True)
    role: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[float]
    revoked_at: Mapped[float | None]


class UiSession(Base):
    """A browser signed in to the dashboard (``laulima.hub.ui``): the sha256 of its cookie,
    who it is, the sha256 of the API token it signed in with (re-checked on every request,
    so revoking the token ends the session) and its CSRF token."""

    __tablename__ = "ui_sessions"

    id_hash: Mapped[str] = mapped_column(_DIGEST, primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(16))
    credential_hash: Mapped[str] = mapped_column(_DIGEST)
    csrf: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float]
    expires_at: Mapped[float] = mapped_column(index=True)


class Experiment(Base):
    __tablename__ = "experiments"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), index=True)
    spec_json: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), index=True)
    initial_digest: Mapped[str] = mapped_column(_DIGEST)
    global_digest: Mapped[str] = mapped_column(_DIGEST)
    """The newest checkpointed global model."""
    strategy_state_digest: Mapped[str | None] = mapped_column(_DIGEST)
    rounds_done: Mapped[int] = mapped_column(default=0)
    rounds: Mapped[int]
    created_at: Mapped[float]
    finished_at: Mapped[float | None]
    error: Mapped[str | None] = mapped_column(Text)
    waiting: Mapped[str | None] = mapped_column(Text, default=None)
    """Why the next round cannot open yet (too few sites online); None when it is not stuck."""
    owner: Mapped[str | None] = mapped_column(String(64), default=None)
    """The name of the person who submitted it (their token's name). None only for rows of a
    hub older than ownership: those belong to the bootstrap operator ("admin")."""
    bundle_digest: Mapped[str | None] = mapped_column(_DIGEST, default=None)
    """The algorithm bundle its sites run (a blob, verified at submission); None for a built-in.
    A column rather than only in the spec: blob clean-up and read access look it up in SQL."""


class ExperimentShare(Base):
    """Read access to an experiment granted by its owner (or an operator) to another person."""

    __tablename__ = "experiment_shares"
    __table_args__ = (UniqueConstraint("experiment_id", "name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    experiment_id: Mapped[int] = mapped_column(ForeignKey("experiments.id"))
    name: Mapped[str] = mapped_column(String(64), index=True)
    created_at: Mapped[float]


class Upload(Base):
    """A blob a person uploaded: who may read it, and what counts against their quota.

    One row per (digest, owner): uploading the same bytes again only refreshes
    ``created_at``. Rows no experiment uses are removed after ``unused_upload_ttl_s``."""

    __tablename__ = "uploads"
    __table_args__ = (UniqueConstraint("digest", "owner"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    digest: Mapped[str] = mapped_column(_DIGEST, index=True)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    size: Mapped[int]
    created_at: Mapped[float]


class Round(Base):
    __tablename__ = "rounds"
    __table_args__ = (UniqueConstraint("experiment_id", "index"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    experiment_id: Mapped[int] = mapped_column(ForeignKey("experiments.id"))
    index: Mapped[int]
    status: Mapped[str] = mapped_column(String(16))
    sites_json: Mapped[str] = mapped_column(Text)
    deadline: Mapped[float]
    started_at: Mapped[float]
    closed_at: Mapped[float | None]
    global_in_digest: Mapped[str] = mapped_column(_DIGEST)
    global_out_digest: Mapped[str | None] = mapped_column(_DIGEST)
    strategy_state_digest: Mapped[str | None] = mapped_column(_DIGEST)
    left_out_json: Mapped[str | None] = mapped_column(Text, default=None)
    note: Mapped[str | None] = mapped_column(Text, default=None)
    """Why an aborted round (secure aggregation that could not be unmasked) was abandoned."""
    """Sites the experiment would have used but this round did not select, with why (JSON)."""


class Task(Base):
    __tablename__ = "tasks"
    __table_args__ = (
        Index("ix_tasks_site_status", "site_id", "status"),
        Index("ix_tasks_experiment_round", "experiment_id", "round"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    experiment_id: Mapped[int] = mapped_column(ForeignKey("experiments.id"))
    round: Mapped[int]
    site_id: Mapped[int] = mapped_column(ForeignKey("sites.id"))
    kind: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))
    weights_digest: Mapped[str] = mapped_column(_DIGEST)
    config_json: Mapped[str] = mapped_column(Text)
    upload_nonce: Mapped[str] = mapped_column(String(64))
    deadline: Mapped[float]
    time_limit_s: Mapped[float]
    created_at: Mapped[float]
    delivered_at: Mapped[float | None]
    finished_at: Mapped[float | None]
    failure_kind: Mapped[str | None] = mapped_column(String(16))
    failure_reason: Mapped[str | None] = mapped_column(Text)
    waiting_reason: Mapped[str | None] = mapped_column(Text, default=None)
    """Set while the site holds the task for its administrator's approval (``PUT
    /tasks/{id}/waiting``): the task is not handed out, and its round waits for it until the
    experiment's approval deadline."""
    waiting_since: Mapped[float | None] = mapped_column(default=None)
    model: Mapped[str | None] = mapped_column(String(80), default=None)
    """For the tasks after training (round ``rounds + 1``): which model the task trains or
    evaluates — ``global``, ``local:<site>``, ``model`` (evaluate mode). Kept here, never in
    the task's config, so no site learns whose local model it is evaluating. None for the
    tasks of ordinary rounds."""


class Update(Base):
    __tablename__ = "updates"

    id: Mapped[int] = mapped_column(primary_key=True)
    task_id: Mapped[str] = mapped_column(ForeignKey("tasks.id"), unique=True)
    """UNIQUE: the database makes counting one task's update twice impossible."""
    experiment_id: Mapped[int] = mapped_column(ForeignKey("experiments.id"), index=True)
    round: Mapped[int]
    site: Mapped[str] = mapped_column(String(64))
    digest: Mapped[str] = mapped_column(_DIGEST)
    n_samples: Mapped[int]
    metrics_json: Mapped[str] = mapped_column(Text)
    received_at: Mapped[float]


class RoundHandoff(Base):
    """Which model a site continues from in the round after ``round`` (FedDC's daisy chain).

    Written in the checkpoint transaction of ``round``; read when round ``round + 1`` opens,
    whose TRAIN task of ``site`` then gets ``digest`` as its weights. ``digest`` is a blob the
    hub wrote: the sender's update without its metadata (sample count, metrics, task), so the
    receiver learns nothing about the sender but the weights. A plain column, so the blob
    clean-up can see it (hub/housekeeping.py: alive while the experiment runs and has not
    checkpointed a later round)."""

    __tablename__ = "round_handoffs"
    __table_args__ = (UniqueConstraint("experiment_id", "round", "site"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    experiment_id: Mapped[int] = mapped_column(ForeignKey("experiments.id"))
    round: Mapped[int]
    site: Mapped[str] = mapped_column(String(64))
    """The receiver."""
    sender: Mapped[str] = mapped_column(String(64))
    """The site whose update this was (for the hub's own records; never sent to a site)."""
    digest: Mapped[str] = mapped_column(_DIGEST, index=True)


class FingerprintResult(Base):
    """A site's dataset fingerprint for one FINGERPRINT task (``POST /tasks/{id}/fingerprint``),
    as the validated JSON of a :class:`laulima.core.fingerprint.SiteFingerprint`. Written in
    the transaction that completes the task."""

    __tablename__ = "fingerprints"

    id: Mapped[int] = mapped_column(primary_key=True)
    task_id: Mapped[str] = mapped_column(ForeignKey("tasks.id"), unique=True)
    """UNIQUE: one fingerprint per task, whatever races the site runs."""
    experiment_id: Mapped[int] = mapped_column(ForeignKey("experiments.id"), index=True)
    site: Mapped[str] = mapped_column(String(64))
    n_cases: Mapped[int]
    fingerprint_json: Mapped[str] = mapped_column(Text)
    received_at: Mapped[float]


class MergedFingerprintRow(Base):
    """The merge of an experiment's site fingerprints, stored when the experiment completes
    (so what a reader gets never changes, whatever version of the merge runs later)."""

    __tablename__ = "merged_fingerprints"

    id: Mapped[int] = mapped_column(primary_key=True)
    experiment_id: Mapped[int] = mapped_column(ForeignKey("experiments.id"), unique=True)
    sites_json: Mapped[str] = mapped_column(Text)
    """The sites whose fingerprint is in the merge (JSON list, name order)."""
    n_cases: Mapped[int]
    fingerprint_json: Mapped[str] = mapped_column(Text)
    """nnU-Net's dataset_fingerprint.json."""
    dataset_json: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float]


class SecAggRound(Base):
    """Where one round's secure aggregation stands (hub/secure_rounds.py). The member lists
    fix who is in each phase once it closes, so a restarted hub answers the same."""

    __tablename__ = "secagg_rounds"
    __table_args__ = (UniqueConstraint("experiment_id", "round"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    experiment_id: Mapped[int] = mapped_column(ForeignKey("experiments.id"), index=True)
    round: Mapped[int]
    threshold: Mapped[int]
    phase: Mapped[str] = mapped_column(String(16))
    phase_since: Mapped[float]
    roster_json: Mapped[str | None] = mapped_column(Text, default=None)
    """Sites that advertised keys (U1), once the key phase closed."""
    shared_json: Mapped[str | None] = mapped_column(Text, default=None)
    """Sites that sent their shares (U2), once the share phase closed."""
    survivors_json: Mapped[str | None] = mapped_column(Text, default=None)
    """Sites whose masked update arrived (U3), once the masking phase closed."""
    reason: Mapped[str | None] = mapped_column(Text, default=None)


class SecAggKey(Base):
    __tablename__ = "secagg_keys"
    __table_args__ = (UniqueConstraint("experiment_id", "round", "site"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    experiment_id: Mapped[int] = mapped_column(ForeignKey("experiments.id"), index=True)
    round: Mapped[int]
    site: Mapped[str] = mapped_column(String(64))
    encryption_key: Mapped[str] = mapped_column(String(64))
    masking_key: Mapped[str] = mapped_column(String(64))


class SecAggShare(Base):
    """One site's encrypted Shamir shares for another: the hub routes them, it cannot read them."""

    __tablename__ = "secagg_shares"
    __table_args__ = (UniqueConstraint("experiment_id", "round", "sender", "receiver"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    experiment_id: Mapped[int] = mapped_column(ForeignKey("experiments.id"), index=True)
    round: Mapped[int]
    sender: Mapped[str] = mapped_column(String(64))
    receiver: Mapped[str] = mapped_column(String(64))
    ciphertext: Mapped[str] = mapped_column(Text)


class SecAggReveal(Base):
    __tablename__ = "secagg_reveals"
    __table_args__ = (UniqueConstraint("experiment_id", "round", "site"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    experiment_id: Mapped[int] = mapped_column(ForeignKey("experiments.id"), index=True)
    round: Mapped[int]
    site: Mapped[str] = mapped_column(String(64))
    answer_json: Mapped[str] = mapped_column(Text)


class Metric(Base):
    __tablename__ = "metrics"

    id: Mapped[int] = mapped_column(primary_key=True)
    experiment_id: Mapped[int] = mapped_column(ForeignKey("experiments.id"), index=True)
    round: Mapped[int]
    site: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))
    n_samples: Mapped[int]
    metrics_json: Mapped[str] = mapped_column(Text)
    model: Mapped[str | None] = mapped_column(String(80), default=None)
    """Copied from the task's ``model``: which model these numbers are about (None: an ordinary round)."""


class Refusal(Base):
    __tablename__ = "refusals"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[float]
    site: Mapped[str | None] = mapped_column(String(64))
    task_id: Mapped[str | None] = mapped_column(String(64), index=True)
    status: Mapped[int]
    reason: Mapped[str] = mapped_column(Text)


SERIALIZE_LOCK = 0x4C41554C494D41
"""PostgreSQL advisory lock key every hub transaction takes (``LAULIMA`` in ASCII, shortened)."""


def is_postgresql(url: str) -> bool:
    return make_url(url).get_backend_name() == "postgresql"


def make_engine(url: str, *, busy_timeout_ms: int = 30_000) -> Engine:
    """An engine for a SQLite or PostgreSQL URL, with transactions serialized (module docstring).

    A lock not obtained within ``busy_timeout_ms`` raises ``OperationalError`` on both."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "postgresql":
        return _postgresql_engine(url, busy_timeout_ms)
    if backend != "sqlite":
        raise ConfigurationError(
            f"hub database {parsed.render_as_string(hide_password=True)!r}: the hub runs on SQLite or PostgreSQL "
            "(sqlite:///path/hub.db or postgresql+psycopg://user@host/db), not on "
            f"{backend!r}",
            field="database_url",
        )
    connect_args = {"check_same_thread": False, "timeout": busy_timeout_ms / 1000}
    if parsed.database in (None, "", ":memory:"):  # one shared connection, or each would see its own DB
        engine = create_engine(url, connect_args=connect_args, poolclass=StaticPool)
    else:
        engine = create_engine(url, connect_args=connect_args)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # SQLAlchemy emits BEGIN itself (below)
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA synchronous=FULL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def _postgresql_engine(url: str, busy_timeout_ms: int) -> Engine:
    if make_url(url).drivername == "postgresql":  # SQLAlchemy's default driver is psycopg2; ours is psycopg 3
        url = make_url(url).set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    try:
        import psycopg  # noqa: F401
    except ImportError as exc:
        raise ConfigurationError(
            "the hub database is PostgreSQL, but its driver is not installed: pip install 'laulima[postgres]'",
            field="database_url",
        ) from exc
    engine = create_engine(
        url,
        pool_pre_ping=True,
        pool_size=10,
        max_overflow=30,
        connect_args={"options": f"-c lock_timeout={int(busy_timeout_ms)}", "connect_timeout": 10},
    )

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({SERIALIZE_LOCK})")

    return engine


def make_session_factory(engine: Engine) -> SessionFactory:
    return sessionmaker(engine, expire_on_commit=False)


def migrate(engine: Engine) -> None:
    """Bring the database to the newest schema (creating it when empty); see :mod:`laulima.hub.migrations`."""
    from laulima.hub.migrations import upgrade

    upgrade(engine)


class Lease(Base):
    """A job only one hub process may do at a time, and who does it until when (hub/leases.py).

    ``experiment:<id>`` is the orchestration of one experiment; other names are the hub's
    singleton chores (the blob clean-up, the MLflow mirror)."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    holder: Mapped[str] = mapped_column(String(64))
    """The process's random id (``laulima.hub.leases.Leases.holder``)."""
    expires_at: Mapped[float]
    """Unix time after which another process may take the lease over."""


class BlobPin(Base):
    """A blob one hub process is about to refer to (hub/blob_guard.py): written before the
    process looks whether the blob is stored, removed once its row is written. Another process
    deletes a blob only in a transaction that finds neither a pin nor a row referring to it."""

    __tablename__ = "blob_pins"

    digest: Mapped[str] = mapped_column(_DIGEST, primary_key=True)
    holder: Mapped[str] = mapped_column(String(64), primary_key=True)
    """The pinning process (``Leases.holder``)."""
    count: Mapped[int]
    """Pins nest: removed when the last is released."""
    pinned_at: Mapped[float]
    """When the row was last pinned; a pin older than ``blob_guard.PIN_MAX_AGE_S`` (a process
    that died holding it) no longer counts."""


class MlflowExport(Base):
    """How far one experiment is mirrored into one MLflow tracking server (hub/mlflow/).

    The export's only memory: committed after each step, so a restarted hub continues where
    it stopped instead of creating a second run or logging a round twice."""

    __tablename__ = "mlflow_exports"

    experiment_id: Mapped[int] = mapped_column(ForeignKey("experiments.id"), primary_key=True)
    target: Mapped[str] = mapped_column(String(64), primary_key=True)
    """sha256 of the tracking URI without its credentials: pointing the hub at another
    server exports every experiment there afresh."""
    run_id: Mapped[str | None] = mapped_column(String(64), default=None)
    params_done: Mapped[bool] = mapped_column(default=False)
    rounds_done: Mapped[int] = mapped_column(default=0)
    """Every round up to this index has its metrics in the run."""
    finished: Mapped[bool] = mapped_column(default=False)
    """The run has its final status (FINISHED, FAILED, KILLED): nothing is left to export."""
