"""The hub's durable state: typed ORM tables and an engine that survives kill -9.

Everything the orchestrator decides is re-derived from these rows, so a restarted hub
continues where it stopped. Uniqueness the protocol depends on (one update per task, one
round per index) is enforced by the database itself. SQLite runs in WAL mode and every
transaction begins IMMEDIATE, so concurrent writers serialize instead of failing late.
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
    inspect,
)
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker
from sqlalchemy.orm import Session as Session
from sqlalchemy.pool import StaticPool

__all__ = [
    "ApiToken",
    "Base",
    "Experiment",
    "ExperimentShare",
    "FingerprintResult",
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
    "create_all",
    "make_engine",
    "make_session_factory",
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


def make_engine(url: str, *, busy_timeout_ms: int = 30_000) -> Engine:
    """An engine for any SQLAlchemy URL; SQLite gets WAL, a busy timeout and foreign keys."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)
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


def make_session_factory(engine: Engine) -> SessionFactory:
    return sessionmaker(engine, expire_on_commit=False)


def create_all(engine: Engine) -> None:
    """Create missing tables, then add columns that a newer version defines to tables an
    older hub created. Only nullable columns are ever added, so old rows stay valid; this
    is the whole migration story until the schema needs more than additions."""
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        existing = inspect(conn)
        for table in Base.metadata.sorted_tables:
            have = {c["name"] for c in existing.get_columns(table.name)}
            for column in table.columns:
                if column.name in have:
                    continue
                if not column.nullable:
                    raise RuntimeError(
                        f"hub database: table {table.name!r} lacks column {column.name!r}, which cannot be added "
                        "to existing rows; this hub home was made by an incompatible version"
                    )
                kind = column.type.compile(dialect=engine.dialect)
                conn.exec_driver_sql(f'ALTER TABLE "{table.name}" ADD COLUMN "{column.name}" {kind}')


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
