"""Alembic's entry point: runs the hub's revisions on the connection ``upgrade`` hands over,
or, from the ``alembic`` command line, on ``LAULIMA_HUB_DATABASE_URL``."""

from __future__ import annotations

import os

from alembic import context

from laulima.hub.db import Base, make_engine

connection = context.config.attributes.get("connection")
if connection is not None:
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
else:  # `alembic -c .../alembic.ini ...` by a developer
    url = os.environ.get("LAULIMA_HUB_DATABASE_URL")
    if not url:
        raise SystemExit("set LAULIMA_HUB_DATABASE_URL to the database Alembic should work on")
    engine = make_engine(url)
    with engine.begin() as conn:
        context.configure(connection=conn, target_metadata=Base.metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()
