"""Leases: several hub processes on one database, and exactly one of them doing each job.

A lease is a row (:class:`laulima.hub.db.Lease`): a job's name, the process holding it and
until when. A process claims a free or expired lease, renews its own well before they expire
and lets go of them when it stops; a process killed with -9 simply stops renewing, and
another takes the job over once the lease has expired. Claims run in the hub's serialized
transactions (:func:`laulima.hub.db.make_engine`), so two processes never both win a lease.

A lease is not what keeps a round from being aggregated twice: every checkpoint is a
conditional write (the round must still be open, with the updates the decision saw), so a
process that lost its lease while paused, and then wakes and writes, changes nothing. The
lease keeps the processes from doing the same work twice, and makes one of them responsible.

Expiry compares wall-clock times written by different processes: the hub machines' clocks
must agree to well within ``ttl_s`` (NTP), as the hub's deadlines already assume.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable

from sqlalchemy import delete, select

from laulima.hub.db import Lease, SessionFactory

__all__ = ["Leases", "experiment_lease"]

log = logging.getLogger(__name__)


_LIVING: set[str] = set()
"""Holders of this process that have not stopped (tests run several hubs in one process)."""


def experiment_lease(experiment_id: int) -> str:
    """The lease of orchestrating one experiment."""
    return f"experiment:{int(experiment_id)}"


class Leases:
    """The leases one hub process holds, claimed and renewed through the database."""

    def __init__(
        self, sessions: SessionFactory, *, ttl_s: float = 15.0, clock: Callable[[], float] = time.time
    ) -> None:
        if not ttl_s > 0:
            raise ValueError("lease ttl_s must be positive")
        self.sessions = sessions
        self.ttl_s = ttl_s
        self.clock = clock
        self.holder = f"{socket.gethostname()[:30]}:{os.getpid()}:{secrets.token_hex(6)}"
        """This process's id in the ``leases`` table: host, pid and a random part (a restarted
        process is another holder, even with the same pid)."""
        _LIVING.add(self.holder)
        self._held: dict[str, float] = {}
        """Leases this process holds, with when they expire (as last written)."""
        self._renewer: threading.Thread | None = None
        self._stop_renewing = threading.Event()

    def claim(self, names: Iterable[str]) -> set[str]:
        """Of ``names``, those this process holds now: its own (renewed when past half their
        time), and free or expired ones it takes over. Leases of other names it held are kept
        (see :meth:`release`). Writes only when something is taken or renewed."""
        wanted = sorted(set(names))
        now = self.clock()
        due = [n for n in wanted if self._held.get(n, 0.0) - now < self.ttl_s / 2]
        if not due:
            return set(wanted)
        held = {n for n in wanted if n not in due}
        expires = now + self.ttl_s
        with self.sessions.begin() as s:
            rows = {row.name: row for row in s.scalars(select(Lease).where(Lease.name.in_(due)))}
            for name in due:
                row = rows.get(name)
                if row is None:
                    s.add(Lease(name=name, holder=self.holder, expires_at=expires))
                elif row.holder == self.holder or row.expires_at <= now or self._gone(row.holder):
                    if row.holder != self.holder:
                        log.warning("taking over %s from hub process %s (gone, or its lease ran out)", name, row.holder)
                    row.holder, row.expires_at = self.holder, expires
                else:
                    self._held.pop(name, None)  # someone else has it (we may have lost it while paused)
                    continue
                held.add(name)
        for name in held & set(due):
            self._held[name] = expires
        return held

    def _gone(self, holder: str) -> bool:
        """A holder on this machine whose process no longer runs (killed, restarted): its leases
        are taken over at once instead of after they expire. Holders on other machines, and
        any holder this cannot parse, are waited for."""
        host, _, rest = holder.partition(":")
        pid_text, _, _random = rest.partition(":")
        if host != socket.gethostname()[:30] or not pid_text.isdigit():
            return False
        pid = int(pid_text)
        if pid == os.getpid():
            return holder not in _LIVING  # this pid's earlier life (a container restarted as pid 1)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, someone else's
            return False
        return False

    def renew(self) -> None:
        """Extend every lease this process holds, whatever it is busy with (the renewal
        thread calls this): a step that takes longer than ``ttl_s`` — aggregating hundreds of
        updates from an object store — must not let another process take the experiment over
        while this one still works on it. A lease found taken by another is dropped."""
        held = sorted(self._held)
        if not held:
            return
        expires = self.clock() + self.ttl_s
        with self.sessions.begin() as s:
            rows = s.scalars(select(Lease).where(Lease.name.in_(held), Lease.holder == self.holder)).all()
            for row in rows:
                row.expires_at = expires
            kept = {row.name for row in rows}
        for name in held:
            if name in kept:
                self._held[name] = expires
            else:
                self._held.pop(name, None)

    def start_renewing(self) -> None:
        """Renew the held leases from a thread of their own, every third of ``ttl_s``."""
        if self._renewer is not None:
            return
        self._stop_renewing.clear()

        def run() -> None:
            while not self._stop_renewing.wait(self.ttl_s / 3):
                try:
                    self.renew()
                except Exception:  # the database is in trouble; the next try may succeed
                    log.exception("could not renew this hub process's leases")

        self._renewer = threading.Thread(target=run, name="laulima-leases", daemon=True)
        self._renewer.start()

    def stop_renewing(self) -> None:
        self._stop_renewing.set()
        if self._renewer is not None:
            self._renewer.join(10.0)
            self._renewer = None

    def holds(self, name: str) -> bool:
        """Whether this process held ``name`` at its last claim and the lease has not run out since."""
        return self._held.get(name, 0.0) > self.clock()

    def release(self, names: Iterable[str] | None = None) -> None:
        """Give up ``names`` (None: every lease of this process), so another process may take
        them at once: at a clean stop, and for experiments that ended."""
        if names is None:
            _LIVING.discard(self.holder)
        chosen = list(self._held) if names is None else [n for n in names if n in self._held]
        if not chosen:
            return
        with self.sessions.begin() as s:
            s.execute(delete(Lease).where(Lease.name.in_(chosen), Lease.holder == self.holder))
        for name in chosen:
            self._held.pop(name, None)

    def held(self) -> set[str]:
        return set(self._held)
