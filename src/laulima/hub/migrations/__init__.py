"""The hub's schema, versioned: Alembic migrations that SQLite and PostgreSQL both run.

Every hub start calls :func:`upgrade`, which brings the database to the newest revision
inside one transaction. That transaction is serialized like every other (SQLite's
``BEGIN IMMEDIATE``, PostgreSQL's advisory lock: :func:`laulima.hub.db.make_engine`), so
several hub processes starting at once on one database migrate it once. A database made
before migrations existed (no ``alembic_version`` table) is upgraded by the first revision
(``versions/0001_baseline.py``), which fills in what that hub's own start-up used to add.

New revisions: ``alembic -c src/laulima/hub/migrations/alembic.ini revision -m "..."`` with
``LAULIMA_HUB_DATABASE_URL`` pointing at a database at head, then write ``upgrade()`` by
hand; ``tests/hub/test_migrations.py`` fails until the models in ``laulima.hub.db`` and the
newest revision describe the same schema.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine

__all__ = ["SCRIPTS", "alembic_config", "current_revision", "head_revision", "upgrade"]

SCRIPTS = Path(__file__).resolve().parent


def alembic_config(connection: Connection | None = None) -> Config:
    """Alembic's configuration for the hub's scripts; ``connection`` is the one they run on."""
    config = Config()
    config.set_main_option("script_location", str(SCRIPTS))
    config.attributes["connection"] = connection
    return config


def upgrade(engine: Engine) -> None:
    """Bring the database to the newest revision (nothing happens when it is there)."""
    with engine.begin() as connection:
        if current_revision(connection) == head_revision():
            return
        command.upgrade(alembic_config(connection), "head")


def current_revision(connection: Connection) -> str | None:
    """The revision the database is at; None for an empty one or one made before migrations."""
    return MigrationContext.configure(connection).get_current_revision()


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "the hub's migrations have no head revision"
    return head
