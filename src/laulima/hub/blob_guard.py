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

import logging
import queue
import threading
import time
from collections.abc import Callable

from sqlalchemy import delete, func, select

from laulima.hub.blobstore import check_digest
from laulima.hub.db import BlobPin, SessionFactory
from laulima.hub.housekeeping import referenced

__all__ = ["PIN_MAX_AGE_S", "DatabaseBlobGuard"]

log = logging.getLogger(__name__)

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
        self._unpins: queue.Queue[str] = queue.Queue()
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None

    def pin(self, digest: str) -> None:
        check_digest(digest)
        with self.sessions.begin() as s:
            row = s.get(BlobPin, (digest, self.holder))
            if row is None:
                s.add(BlobPin(digest=digest, holder=self.holder, count=1, pinned_at=self.clock()))
            else:
                row.count, row.pinned_at = row.count + 1, self.clock()

    def unpin(self, digest: str) -> None:
        """Released by a thread of its own: a writer closes on the request's event loop, and a
        late unpin only keeps a blob a moment longer."""
        self._unpins.put(digest)
        with self._lock:
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._release_pins, name="laulima-blob-pins", daemon=True)
                self._worker.start()

    def _release_pins(self) -> None:
        while True:
            try:
                digest = self._unpins.get(timeout=5.0)
            except queue.Empty:
                with self._lock:
                    if self._unpins.empty():
                        self._worker = None
                        return
                continue
            try:
                self._unpin_now(digest)
            except Exception:  # the pin ages out (PIN_MAX_AGE_S) and the clean-up removes it
                log.exception("could not release the pin of blob %s", digest[:12])
            finally:
                self._unpins.task_done()

    def drain(self) -> None:
        """Wait until every unpin asked for so far is written (at a clean stop; tests)."""
        self._unpins.join()

    def _unpin_now(self, digest: str) -> None:
        with self.sessions.begin() as s:
            row = s.get(BlobPin, (digest, self.holder))
            if row is None:
                return
            if row.count > 1:
                row.count -= 1
            else:
                s.delete(row)

    def delete_unless_in_use(self, digest: str, remove: Callable[[], bool]) -> bool:
        """Call ``remove`` (which deletes the stored blob) unless another process's pin or a row
        keeps it, all in one transaction; False when it was kept or ``remove`` found nothing.
        This process's own pins are the store's in-process ones, checked before this is called:
        its rows only tell the other processes (and may lag, being released by a thread)."""
        with self.sessions.begin() as s:
            recent = self.clock() - PIN_MAX_AGE_S
            others = (BlobPin.digest == digest, BlobPin.holder != self.holder, BlobPin.pinned_at > recent)
            if s.scalar(select(BlobPin.digest).where(*others).limit(1)):
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
