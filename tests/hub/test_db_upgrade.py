"""A hub home made by an older version starts: columns added since are added to its tables."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from sqlalchemy import inspect

from laulima.hub.db import make_engine, migrate


def test_missing_nullable_columns_are_added_and_old_rows_survive(tmp_path: Path):
    path = tmp_path / "hub.db"
    with sqlite3.connect(path) as old:  # the sites table as the first release wrote it
        old.execute(
            "CREATE TABLE sites (id INTEGER PRIMARY KEY, name VARCHAR(64) UNIQUE, token_hash VARCHAR(64) UNIQUE, "
            "created_at FLOAT NOT NULL, last_seen FLOAT)"
        )
        old.execute("INSERT INTO sites (name, token_hash, created_at, last_seen) VALUES ('site-a', NULL, 1.0, 2.0)")
    engine = make_engine(f"sqlite:///{path}")
    migrate(engine)
    columns = {c["name"] for c in inspect(engine).get_columns("sites")}
    assert {"version", "cert_serial", "datasets_json", "removed_at"} <= columns
    with engine.connect() as conn:
        row = conn.exec_driver_sql("SELECT name, last_seen, removed_at FROM sites").one()
    assert tuple(row) == ("site-a", 2.0, None)
    migrate(engine)  # idempotent
    engine.dispose()


def test_experiments_and_tasks_of_a_hub_older_than_bundles_and_approvals_get_their_columns(tmp_path: Path):
    path = tmp_path / "hub.db"
    engine = make_engine(f"sqlite:///{path}")
    migrate(engine)
    with engine.begin() as conn:  # as the hub before bundles and approvals (and before migrations) wrote them
        conn.exec_driver_sql("DROP TABLE alembic_version")
        conn.exec_driver_sql("DROP TABLE leases")
        conn.exec_driver_sql("ALTER TABLE experiments DROP COLUMN bundle_digest")
        conn.exec_driver_sql("ALTER TABLE tasks DROP COLUMN waiting_reason")
        conn.exec_driver_sql("ALTER TABLE tasks DROP COLUMN waiting_since")
        conn.exec_driver_sql(
            "INSERT INTO experiments (name, spec_json, status, initial_digest, global_digest, rounds_done, rounds, "
            "created_at) VALUES ('old', '{}', 'running', :d, :d, 0, 1, 1.0)",
            {"d": "ab" * 32},
        )
    engine.dispose()
    engine = make_engine(f"sqlite:///{path}")
    migrate(engine)
    assert "bundle_digest" in {c["name"] for c in inspect(engine).get_columns("experiments")}
    assert {"waiting_reason", "waiting_since"} <= {c["name"] for c in inspect(engine).get_columns("tasks")}
    with engine.connect() as conn:
        row = conn.exec_driver_sql("SELECT name, bundle_digest FROM experiments").one()
    assert tuple(row) == ("old", None)
    engine.dispose()
