"""The hub's schema as the last release without migrations created it (Laulima 0.1, before
Alembic), and the upgrade of a database that release made.

A fresh database gets these tables. A database an older hub made has tables but no
``alembic_version``: Alembic starts here too, and this revision creates the tables it lacks
and adds the nullable columns it lacks (what that older hub's ``create_all`` did at every
start), so every later revision finds the same schema whatever made the database. The
tables are written out here, not imported from ``laulima.hub.db``: the ORM models move on
with later revisions, this one never changes.

Revision ID: 0001
Revises: (none)
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def baseline() -> sa.MetaData:
    """The schema of revision 0001."""
    metadata = sa.MetaData()
    sa.Table(
        "api_tokens",
        metadata,
        sa.Column("id", sa.Integer(), primary_key=True, nullable=False),
        sa.Column("name", sa.String(64), nullable=False, index=True),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("revoked_at", sa.Double(), nullable=True),
    )
    sa.Table(
        "experiments",
        metadata,
        sa.Column("id", sa.Integer(), primary_key=True, nullable=False),
        sa.Column("name", sa.String(64), nullable=False, index=True),
        sa.Column("spec_json", sa.Text(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False, index=True),
        sa.Column("initial_digest", sa.String(64), nullable=False),
        sa.Column("global_digest", sa.String(64), nullable=False),
        sa.Column("strategy_state_digest", sa.String(64), nullable=True),
        sa.Column("rounds_done", sa.Integer(), nullable=False),
        sa.Column("rounds", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("finished_at", sa.Double(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("waiting", sa.Text(), nullable=True),
        sa.Column("owner", sa.String(64), nullable=True),
        sa.Column("bundle_digest", sa.String(64), nullable=True),
    )
    sa.Table(
        "refusals",
        metadata,
        sa.Column("id", sa.Integer(), primary_key=True, nullable=False),
        sa.Column("at", sa.Double(), nullable=False),
        sa.Column("site", sa.String(64), nullable=True),
        sa.Column("task_id", sa.String(64), nullable=True, index=True),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
    )
    sa.Table(
        "sites",
        metadata,
        sa.Column("id", sa.Integer(), primary_key=True, nullable=False),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("token_hash", sa.String(64), nullable=True, unique=True),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("last_seen", sa.Double(), nullable=True),
        sa.Column("version", sa.String(64), nullable=True),
        sa.Column("cert_serial", sa.String(64), nullable=True),
        sa.Column("datasets_json", sa.Text(), nullable=True),
        sa.Column("removed_at", sa.Double(), nullable=True),
    )
    sa.Table(
        "ui_sessions",
        metadata,
        sa.Column("id_hash", sa.String(64), primary_key=True, nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("credential_hash", sa.String(64), nullable=False),
        sa.Column("csrf", sa.String(64), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("expires_at", sa.Double(), nullable=False, index=True),
    )
    sa.Table(
        "uploads",
        metadata,
        sa.Column("id", sa.Integer(), primary_key=True, nullable=False),
        sa.Column("digest", sa.String(64), nullable=False, index=True),
        sa.Column("owner", sa.String(64), nullable=False, index=True),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.UniqueConstraint("digest", "owner"),
    )
    sa.Table(
        "experiment_shares",
        metadata,
        sa.Column("id", sa.Integer(), primary_key=True, nullable=False),
        sa.Column("experiment_id", sa.Integer(), sa.ForeignKey("experiments.id"), nullable=False),
        sa.Column("name", sa.String(64), nullable=False, index=True),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.UniqueConstraint("experiment_id", "name"),
    )
    sa.Table(
        "merged_fingerprints",
        metadata,
        sa.Column("id", sa.Integer(), primary_key=True, nullable=False),
        sa.Column("experiment_id", sa.Integer(), sa.ForeignKey("experiments.id"), nullable=False, unique=True),
        sa.Column("sites_json", sa.Text(), nullable=False),
        sa.Column("n_cases", sa.Integer(), nullable=False),
        sa.Column("fingerprint_json", sa.Text(), nullable=False),
        sa.Column("dataset_json", sa.Text(), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
    )
    sa.Table(
        "metrics",
        metadata,
        sa.Column("id", sa.Integer(), primary_key=True, nullable=False),
        sa.Column("experiment_id", sa.Integer(), sa.ForeignKey("experiments.id"), nullable=False, index=True),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("site", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("n_samples", sa.Integer(), nullable=False),
        sa.Column("metrics_json", sa.Text(), nullable=False),
        sa.Column("model", sa.String(80), nullable=True),
    )
    sa.Table(
        "mlflow_exports",
        metadata,
        sa.Column("experiment_id", sa.Integer(), sa.ForeignKey("experiments.id"), primary_key=True, nullable=False),
        sa.Column("target", sa.String(64), primary_key=True, nullable=False),
        sa.Column("run_id", sa.String(64), nullable=True),
        sa.Column("params_done", sa.Boolean(), nullable=False),
        sa.Column("rounds_done", sa.Integer(), nullable=False),
        sa.Column("finished", sa.Boolean(), nullable=False),
    )
    sa.Table(
        "round_handoffs",
        metadata,
        sa.Column("id", sa.Integer(), primary_key=True, nullable=False),
        sa.Column("experiment_id", sa.Integer(), sa.ForeignKey("experiments.id"), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("site", sa.String(64), nullable=False),
        sa.Column("sender", sa.String(64), nullable=False),
        sa.Column("digest", sa.String(64), nullable=False, index=True),
        sa.UniqueConstraint("experiment_id", "round", "site"),
    )
    sa.Table(
        "rounds",
        metadata,
        sa.Column("id", sa.Integer(), primary_key=True, nullable=False),
        sa.Column("experiment_id", sa.Integer(), sa.ForeignKey("experiments.id"), nullable=False),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("sites_json", sa.Text(), nullable=False),
        sa.Column("deadline", sa.Double(), nullable=False),
        sa.Column("started_at", sa.Double(), nullable=False),
        sa.Column("closed_at", sa.Double(), nullable=True),
        sa.Column("global_in_digest", sa.String(64), nullable=False),
        sa.Column("global_out_digest", sa.String(64), nullable=True),
        sa.Column("strategy_state_digest", sa.String(64), nullable=True),
        sa.Column("left_out_json", sa.Text(), nullable=True),
        sa.Column("note", sa.Text(), nullable=True),
        sa.UniqueConstraint("experiment_id", "index"),
    )
    sa.Table(
        "secagg_keys",
        metadata,
        sa.Column("id", sa.Integer(), primary_key=True, nullable=False),
        sa.Column("experiment_id", sa.Integer(), sa.ForeignKey("experiments.id"), nullable=False, index=True),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("site", sa.String(64), nullable=False),
        sa.Column("encryption_key", sa.String(64), nullable=False),
        sa.Column("masking_key", sa.String(64), nullable=False),
        sa.UniqueConstraint("experiment_id", "round", "site"),
    )
    sa.Table(
        "secagg_reveals",
        metadata,
        sa.Column("id", sa.Integer(), primary_key=True, nullable=False),
        sa.Column("experiment_id", sa.Integer(), sa.ForeignKey("experiments.id"), nullable=False, index=True),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("site", sa.String(64), nullable=False),
        sa.Column("answer_json", sa.Text(), nullable=False),
        sa.UniqueConstraint("experiment_id", "round", "site"),
    )
    sa.Table(
        "secagg_rounds",
        metadata,
        sa.Column("id", sa.Integer(), primary_key=True, nullable=False),
        sa.Column("experiment_id", sa.Integer(), sa.ForeignKey("experiments.id"), nullable=False, index=True),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("threshold", sa.Integer(), nullable=False),
        sa.Column("phase", sa.String(16), nullable=False),
        sa.Column("phase_since", sa.Double(), nullable=False),
        sa.Column("roster_json", sa.Text(), nullable=True),
        sa.Column("shared_json", sa.Text(), nullable=True),
        sa.Column("survivors_json", sa.Text(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.UniqueConstraint("experiment_id", "round"),
    )
    sa.Table(
        "secagg_shares",
        metadata,
        sa.Column("id", sa.Integer(), primary_key=True, nullable=False),
        sa.Column("experiment_id", sa.Integer(), sa.ForeignKey("experiments.id"), nullable=False, index=True),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("sender", sa.String(64), nullable=False),
        sa.Column("receiver", sa.String(64), nullable=False),
        sa.Column("ciphertext", sa.Text(), nullable=False),
        sa.UniqueConstraint("experiment_id", "round", "sender", "receiver"),
    )
    sa.Table(
        "tasks",
        metadata,
        sa.Column("id", sa.String(32), primary_key=True, nullable=False),
        sa.Column("experiment_id", sa.Integer(), sa.ForeignKey("experiments.id"), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("site_id", sa.Integer(), sa.ForeignKey("sites.id"), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("weights_digest", sa.String(64), nullable=False),
        sa.Column("config_json", sa.Text(), nullable=False),
        sa.Column("upload_nonce", sa.String(64), nullable=False),
        sa.Column("deadline", sa.Double(), nullable=False),
        sa.Column("time_limit_s", sa.Double(), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("delivered_at", sa.Double(), nullable=True),
        sa.Column("finished_at", sa.Double(), nullable=True),
        sa.Column("failure_kind", sa.String(16), nullable=True),
        sa.Column("failure_reason", sa.Text(), nullable=True),
        sa.Column("waiting_reason", sa.Text(), nullable=True),
        sa.Column("waiting_since", sa.Double(), nullable=True),
        sa.Column("model", sa.String(80), nullable=True),
        sa.Index("ix_tasks_experiment_round", "experiment_id", "round"),
        sa.Index("ix_tasks_site_status", "site_id", "status"),
    )
    sa.Table(
        "fingerprints",
        metadata,
        sa.Column("id", sa.Integer(), primary_key=True, nullable=False),
        sa.Column("task_id", sa.String(32), sa.ForeignKey("tasks.id"), nullable=False, unique=True),
        sa.Column("experiment_id", sa.Integer(), sa.ForeignKey("experiments.id"), nullable=False, index=True),
        sa.Column("site", sa.String(64), nullable=False),
        sa.Column("n_cases", sa.Integer(), nullable=False),
        sa.Column("fingerprint_json", sa.Text(), nullable=False),
        sa.Column("received_at", sa.Double(), nullable=False),
    )
    sa.Table(
        "updates",
        metadata,
        sa.Column("id", sa.Integer(), primary_key=True, nullable=False),
        sa.Column("task_id", sa.String(32), sa.ForeignKey("tasks.id"), nullable=False, unique=True),
        sa.Column("experiment_id", sa.Integer(), sa.ForeignKey("experiments.id"), nullable=False, index=True),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("site", sa.String(64), nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("n_samples", sa.Integer(), nullable=False),
        sa.Column("metrics_json", sa.Text(), nullable=False),
        sa.Column("received_at", sa.Double(), nullable=False),
    )
    return metadata


def upgrade() -> None:
    bind = op.get_bind()
    before = set(sa.inspect(bind).get_table_names())
    schema = baseline()
    schema.create_all(bind, checkfirst=True)
    inspector = sa.inspect(bind)
    for table in schema.sorted_tables:
        if table.name not in before:
            continue
        have = {column["name"] for column in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name in have:
                continue
            if not column.nullable:
                raise RuntimeError(
                    f"hub database: table {table.name!r} lacks column {column.name!r}, which cannot be added to "
                    "existing rows; this database was made by an incompatible version of Laulima"
                )
            op.add_column(table.name, sa.Column(column.name, column.type, nullable=True))


def downgrade() -> None:
    raise NotImplementedError("revision 0001 is the first schema; there is nothing to go back to")
