"""Who is signed in to a dashboard: sessions behind an opaque cookie.

A session remembers the person's name and role, its CSRF token, and the sha256 of the
credential it was opened with, so a dashboard re-checks that credential on every request:
revoking an API token (or replacing the site's dashboard token) ends its sessions at once.
The hub keeps sessions in its database (several hub processes may serve one federation);
the site's dashboard is one process and keeps them in memory (:class:`MemorySessions`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from laulima.web.security import digest, new_secret

__all__ = ["SESSION_TTL_S", "MemorySessions", "SessionStore", "UiUser"]

SESSION_TTL_S = 12 * 3600
"""A session ends this long after sign-in, used or not: a working day and some."""


@dataclass(frozen=True)
class UiUser:
    """A signed-in person as pages see them."""

    name: str
    role: str
    csrf: str
    credential_hash: str
    expires_at: float


class SessionStore(Protocol):
    def open(self, name: str, role: str, credential_hash: str) -> tuple[str, UiUser]:
        """A new session: the cookie's value (shown once) and the user."""
        ...

    def find(self, cookie: str) -> UiUser | None:
        """The live session of a cookie's value, or None."""
        ...

    def close(self, cookie: str) -> None: ...


class MemorySessions:
    """Sessions of one process; at most ``limit`` at once (the oldest goes first)."""

    def __init__(self, *, ttl_s: float = SESSION_TTL_S, clock: Callable[[], float] = time.time, limit: int = 1000):
        self.ttl_s, self.clock, self.limit = ttl_s, clock, limit
        self._sessions: dict[str, UiUser] = {}
        self._lock = threading.Lock()

    def open(self, name: str, role: str, credential_hash: str) -> tuple[str, UiUser]:
        cookie = new_secret()
        user = UiUser(name, role, new_secret(), credential_hash, self.clock() + self.ttl_s)
        with self._lock:
            self._drop_expired()
            while len(self._sessions) >= self.limit:
                self._sessions.pop(next(iter(self._sessions)))
            self._sessions[digest(cookie)] = user
        return cookie, user

    def find(self, cookie: str) -> UiUser | None:
        with self._lock:
            user = self._sessions.get(digest(cookie))
            if user is None or user.expires_at <= self.clock():
                return None
            return user

    def close(self, cookie: str) -> None:
        with self._lock:
            self._sessions.pop(digest(cookie), None)

    def _drop_expired(self) -> None:
        now = self.clock()
        for key in [k for k, u in self._sessions.items() if u.expires_at <= now]:
            del self._sessions[key]
