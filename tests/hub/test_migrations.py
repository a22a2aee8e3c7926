"""The hub's schema is versioned by Alembic, on SQLite and PostgreSQL alike.

Run on the backend of ``--hub-backend``: the database URL comes from the environment the
run sets (tests/helpers/backends.py), or a SQLite file of the test's own.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tarfile
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import MetaData, inspect, text

from laulima.auditlog import HashChainLog
from laulima.hub.audit import VERIFY_COMMAND, HubAuditEvent
from laulima.hub.db import Base, make_engine, migrate
from laulima.hub.migrations import SCRIPTS, current_revision, head_revision

from .conftest import Hub, make_weights, spec, update_bytes

OLD_HOME = Path(__file__).resolve().parents[1] / "data" / "hub-home-0.1.tar.gz"
"""A hub home the last version without migrations (commit 22122aa) left behind: two sites, a
scientist and a reader, one experiment of two rounds with evaluations, shared, completed."""
OLD_EXPERIMENT_DIGEST = "232354ad2a8576813c7ab8dc87fe2a23ab6cc557b3f6ab37c2a1e8594c414b0a"


def _baseline() -> MetaData:
    """Revision 0001's schema: what a hub made before migrations has."""
    spec = importlib.util.spec_from_file_location("baseline", SCRIPTS / "versions" / "0001_baseline.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.baseline()


def _database(tmp_path: Path) -> str:
    return os.environ.get("LAULIMA_HUB_DATABASE_URL") or f"sqlite:///{tmp_path / 'hub.db'}"


def test_a_database_at_head_has_exactly_the_models_schema(tmp_path: Path):
    engine = make_engine(_database(tmp_path))
    migrate(engine)
    with engine.connect() as conn:
        assert current_revision(conn) == head_revision()
        differences = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    engine.dispose()
    assert differences == [], "the models in laulima.hub.db and the newest migration disagree; add a revision"


def test_upgrading_twice_changes_nothing_and_keeps_rows(tmp_path: Path):
    url = _database(tmp_path)
    engine = make_engine(url)
    migrate(engine)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO leases (name, holder, expires_at) VALUES ('x', 'h', 1.0)"))
    engine.dispose()
    engine = make_engine(url)
    migrate(engine)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT holder FROM leases")).scalar_one() == "h"
    engine.dispose()


def test_a_database_made_before_migrations_gets_the_columns_and_tables_added_since(tmp_path: Path):
    """As a hub before bundles, approvals and leases left it: no alembic_version, columns and a table missing."""
    url = _database(tmp_path)
    engine = make_engine(url)
    migrate(engine)
    later = set(Base.metadata.tables) - set(_baseline().tables)  # tables added by revisions after 0001
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE alembic_version"))
        for table in sorted(later):
            conn.execute(text(f"DROP TABLE {table}"))
        conn.execute(text("ALTER TABLE experiments DROP COLUMN bundle_digest"))
        conn.execute(text("ALTER TABLE tasks DROP COLUMN waiting_reason"))
        conn.execute(text("ALTER TABLE tasks DROP COLUMN waiting_since"))
        conn.execute(
            text(
                "INSERT INTO experiments (name, spec_json, status, initial_digest, global_digest, rounds_done, "
                "rounds, created_at) VALUES ('old', '{}', 'running', :d, :d, 0, 1, 1.0)"
            ),
            {"d": "ab" * 32},
        )
    engine.dispose()
    engine = make_engine(url)
    migrate(engine)
    schema = inspect(engine)
    assert "bundle_digest" in {c["name"] for c in schema.get_columns("experiments")}
    assert {"waiting_reason", "waiting_since"} <= {c["name"] for c in schema.get_columns("tasks")}
    assert "leases" in schema.get_table_names()
    with engine.connect() as conn:
        assert tuple(conn.execute(text("SELECT name, bundle_digest FROM experiments")).one()) == ("old", None)
        assert current_revision(conn) == head_revision()
    engine.dispose()


def test_hub_processes_starting_at_once_migrate_the_database_once(tmp_path: Path):
    url = _database(tmp_path)
    engines = [make_engine(url) for _ in range(3)]
    errors: list[BaseException] = []
    start = threading.Barrier(len(engines))

    def run(engine) -> None:
        try:
            start.wait()
            migrate(engine)
        except BaseException as exc:  # collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(e,)) for e in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    with engines[0].connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM alembic_version")).scalar_one() == 1
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    for e in engines:
        e.dispose()


@pytest.mark.local_backend  # the home holds SQLite and the blob folder
def test_a_hub_home_made_before_migrations_starts_with_everything_it_held(
    tmp_path: Path, make_hub: Callable[..., Hub]
):
    home = tmp_path / "hub"
    with tarfile.open(OLD_HOME) as archive:
        archive.extractall(home, filter="data")
    hub = make_hub()  # the fixture's hub lives in tmp_path / "hub": the old home
    assert hub.home == home

    engine = make_engine(f"sqlite:///{home / 'hub.db'}")
    with engine.connect() as conn:
        assert current_revision(conn) == head_revision()
    engine.dispose()
    (old,) = hub.get("/experiments")
    assert (old["name"], old["status"], old["rounds_done"]) == ("before-migrations", "completed", 2)
    assert old["global_digest"] == OLD_EXPERIMENT_DIGEST
    rounds = hub.get(f"/experiments/{old['id']}/rounds")
    assert [(r["status"], r["n_updates"]) for r in rounds] == [("aggregated", 2), ("aggregated", 2)]
    evaluations = [m for m in hub.get(f"/experiments/{old['id']}/metrics") if m["kind"] == "evaluate"]
    assert sorted((m["round"], m["site"]) for m in evaluations) == [
        (1, "site-a"), (1, "site-b"), (2, "site-a"), (2, "site-b")
    ]  # fmt: skip
    # The sealed blobs and their keys came along: the model still decrypts to its digest.
    model = hub.client.get(hub.url(f"/experiments/{old['id']}/model"), headers=hub.admin)
    assert model.status_code == 200 and hashlib.sha256(model.content).hexdigest() == OLD_EXPERIMENT_DIGEST
    # The reader it was shared with still reads it; the audit chain continues unbroken.
    reader = hub.person("bob")
    assert hub.client.get(hub.url(f"/experiments/{old['id']}"), headers=reader).status_code == 200
    audit = HashChainLog(home, events=HubAuditEvent, verify_command=VERIFY_COMMAND).verify()
    assert audit.ok, audit

    # And it runs new work: a site registered now, an experiment of one round.
    hub.register("site-c")
    exp = hub.submit(spec(sites=["site-c"]), make_weights(3))
    task = hub.next_task("site-c")
    assert task is not None
    assert hub.upload("site-c", task, update_bytes(make_weights(4))).status_code == 200
    hub.wait_status(exp["id"], "completed")
    shutil.rmtree(home / "tmp", ignore_errors=True)
