"""An owner-only SQLite file in the site's home, opened per call (approvals, privacy ledger).

Every call opens its own connection, so one store may serve several threads, and the agent and
the site's administrator commands may use the file at the same time. Writes take the database
at once (``BEGIN IMMEDIATE``), so a check followed by a write is atomic. A file written by a
newer Laulima is refused rather than misread.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import ClassVar

from laulima.errors import ConfigurationError
from laulima.private_files import PRIVATE_FILE, private_dir

__all__ = ["SiteStore"]


class SiteStore:
    """Base of the site's SQLite stores; subclasses name the file, its schema and what to do
    when it is damaged."""

    file_name: ClassVar[str]
    what: ClassVar[str]
    """How messages name the store, e.g. "the approvals store"."""
    schema: ClassVar[str]
    schema_version: ClassVar[int] = 1
    when_damaged: ClassVar[str]
    """What the administrator should do when the file cannot be read."""

    def __init__(self, home: str | Path, *, clock: Callable[[], float] = time.time) -> None:
        self.home = Path(home)
        self.path = self.home / self.file_name
        self._clock = clock
        private_dir(self.home)
        self._create()

    def _create(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, PRIVATE_FILE)
        except OSError as exc:
            raise ConfigurationError(f"{self.path}: cannot open {self.what} ({exc})", file=str(self.path)) from exc
        try:
            if hasattr(os, "fchmod"):
                os.fchmod(fd, PRIVATE_FILE)  # a file made with another umask or by hand
        finally:
            os.close(fd)
        with self._transaction() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > self.schema_version:
                raise ConfigurationError(
                    f"{self.path} was written by a newer Laulima (schema {version}); upgrade laulima on this site",
                    file=str(self.path),
                )
            for statement in self.schema.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(f"PRAGMA user_version = {self.schema_version}")

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        db.row_factory = sqlite3.Row
        return db

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken at once (BEGIN IMMEDIATE): check-then-write is atomic."""
        try:
            with closing(self._connect()) as db:
                db.execute("BEGIN IMMEDIATE")
                try:
                    yield db
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                db.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            raise self._damaged(exc) from exc

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        try:
            with closing(self._connect()) as db:
                yield db
        except sqlite3.DatabaseError as exc:
            raise self._damaged(exc) from exc

    def _damaged(self, exc: sqlite3.DatabaseError) -> ConfigurationError:
        return ConfigurationError(
            f"{self.path}: {self.what} cannot be read ({exc}); {self.when_damaged}", file=str(self.path)
        )
