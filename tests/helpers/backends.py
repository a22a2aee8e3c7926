"""Which database and blob store the hubs of a test run use: ``pytest --hub-backend=...``.

``sqlite`` (the default): each hub keeps SQLite and a blob folder in its home, as a small
deployment does. ``postgres-s3``: each test gets a database of its own on a real PostgreSQL
server and a prefix of its own in a bucket on a real S3 server (moto's server mode), both
started once per session on loopback. The hubs learn it from ``LAULIMA_HUB_DATABASE_URL``,
``LAULIMA_HUB_BLOB_STORE_URL`` and ``LAULIMA_HUB_S3_ENDPOINT_URL`` — the variables an
operator sets — so in-process hubs and hub processes alike run on them, unchanged.

Tests of what only the default backend has (SQLite files, the blob folder's layout) are
marked ``local_backend`` and deselected on the other, with the count printed.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from functools import partial
from typing import Any

import pytest

__all__ = ["BACKENDS", "POSTGRES_S3", "SQLITE", "S3_BUCKET", "backend_of", "use_backend"]

SQLITE = "sqlite"
POSTGRES_S3 = "postgres-s3"
BACKENDS = (SQLITE, POSTGRES_S3)
S3_BUCKET = "laulima-tests"
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}

_numbers = itertools.count(1)
_templates: dict[int, str] = {}


def _migrated_template(server: Any) -> str:
    """A database at the newest revision that each test's database is copied from: the hub's
    start then finds nothing to migrate (one migration per session instead of one per test).
    The upgrade itself is tested on empty databases (tests/hub/test_migrations.py)."""
    if server.port not in _templates:
        from laulima.hub.db import make_engine, migrate

        name = f"template_{os.getpid()}"
        engine = make_engine(server.create_database(name))
        migrate(engine)
        engine.dispose()
        _templates[server.port] = name
    return _templates[server.port]


def backend_of(config: pytest.Config) -> str:
    return str(config.getoption("hub_backend"))


def use_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Callable[[], None] | None:
    """Point this test's hubs at a fresh database and blob prefix; returns what drops the
    database afterwards (None on the default backend)."""
    if backend_of(request.config) != POSTGRES_S3:
        return None
    server = request.getfixturevalue("postgres")
    name = f"test_{os.getpid()}_{next(_numbers)}"
    monkeypatch.setenv("LAULIMA_HUB_DATABASE_URL", server.create_database(name, template=_migrated_template(server)))
    endpoint = request.getfixturevalue("s3_bucket")
    monkeypatch.setenv("LAULIMA_HUB_BLOB_STORE_URL", f"s3://{S3_BUCKET}/{name}/")
    monkeypatch.setenv("LAULIMA_HUB_S3_ENDPOINT_URL", endpoint)
    for key, value in S3_CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    return partial(server.drop_database, name)
