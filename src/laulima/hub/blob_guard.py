"""Which blobs may be deleted, decided in the database, so several hub processes agree.

A blob store's own pins live in its process. With one process that is enough: a commit pins
its digest before it looks whether the bytes are already stored, and a delete skips pinned
digests. With several processes on one database and one blob store, process A may find the
bytes stored (and so write nothing) while process B — whose clean-up saw no row referring to
them — deletes them, before A writes the row that would have kept them: an update lost.

:class:`DatabaseBlobGuard` moves both halves into the database. A pin is a row
(:class:`laulima.hub.db.BlobPin`) committed *before* the store looks for the blob; a delete
runs in one transaction that finds neither a pin nor a referring row and deletes the blob
inside it. The hub's transactions are serialized (:func:`laulima.hub.db.make_engine`), so
A's pin either comes first (B keeps the blob) or after B's delete (A finds nothing stored
and stores the bytes again).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from sqlalchemy import delete, func, select

from laulima.hub.blobstore import check_digest
from laulima.hub.db import BlobPin, SessionFactory
from laulima.hub.housekeeping import referenced

__all__ = ["PIN_MAX_AGE_S", "DatabaseBlobGuard"]

PIN_MAX_AGE_S = 3600.0
"""A pin lasts from a commit to its row (moments); one this old was left by a process that died."""


class DatabaseBlobGuard:
    """Pins and deletes of one hub process, checked against every process's (``holder``: its id)."""

    def __init__(
        self, sessions: SessionFactory, holder: str, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.sessions = sessions
        self.holder = holder
        self.clock = clock

    def pin(self, digest: str) -> None:
        check_digest(digest)
        with self.sessions.begin() as s:
            row = s.get(BlobPin, (digest, self.holder))
            if row is None:
                s.add(BlobPin(digest=digest, holder=self.holder, count=1, pinned_at=self.clock()))
            else:
                row.count, row.pinned_at = row.count + 1, self.clock()

    def unpin(self, digest: str) -> None:
        with self.sessions.begin() as s:
            row = s.get(BlobPin, (digest, self.holder))
            if row is None:
                return
            if row.count > 1:
                row.count -= 1
            else:
                s.delete(row)

    def delete_unless_in_use(self, digest: str, remove: Callable[[], bool]) -> bool:
        """Call ``remove`` (which deletes the stored blob) unless a pin or a row keeps it, all in
        one transaction; False when it was kept or ``remove`` found nothing."""
        with self.sessions.begin() as s:
            recent = self.clock() - PIN_MAX_AGE_S
            if s.scalar(select(BlobPin.digest).where(BlobPin.digest == digest, BlobPin.pinned_at > recent).limit(1)):
                return False
            if referenced(s, [digest], spent_updates=False, uploads=True):
                return False
            return remove()

    def forget_stale(self) -> int:
        """Remove pins older than :data:`PIN_MAX_AGE_S` (their process died); the clean-up calls it."""
        stale = BlobPin.pinned_at <= self.clock() - PIN_MAX_AGE_S
        with self.sessions.begin() as s:
            count = s.scalar(select(func.count()).select_from(BlobPin).where(stale)) or 0
            if count:
                s.execute(delete(BlobPin).where(stale))
        return int(count)
