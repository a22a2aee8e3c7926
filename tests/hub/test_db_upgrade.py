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
