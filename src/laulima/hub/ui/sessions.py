"""Dashboard sessions in the hub's database, so every hub process serving the federation
knows them and a restarted hub keeps them; a session whose API token has been revoked, or
whose bootstrap operator token has changed, is refused and deleted."""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable

from sqlalchemy import delete, select

from laulima.hub.db import ApiToken, SessionFactory, UiSession
from laulima.web.security import digest, new_secret
from laulima.web.sessions import SESSION_TTL_S, UiUser

__all__ = ["DbSessions"]

MAX_SESSIONS_PER_PERSON = 20
"""Older sessions of a person are ended beyond this: a leaked-cookie collection stays small."""


class DbSessions:
    """:class:`~laulima.web.sessions.SessionStore` over the ``ui_sessions`` table."""

    def __init__(
        self, sessions: SessionFactory, *, clock: Callable[[], float] = time.time, ttl_s: float = SESSION_TTL_S
    ):
        self.sessions, self.clock, self.ttl_s = sessions, clock, ttl_s

    def open(self, name: str, role: str, credential_hash: str) -> tuple[str, UiUser]:
        cookie, now = new_secret(), self.clock()
        row = UiSession(
            id_hash=digest(cookie),
            name=name,
            role=role,
            credential_hash=credential_hash,
            csrf=new_secret(),
            created_at=now,
            expires_at=now + self.ttl_s,
        )
        with self.sessions.begin() as s:
            s.execute(delete(UiSession).where(UiSession.expires_at <= now))
            older = s.scalars(
                select(UiSession.id_hash).where(UiSession.name == name).order_by(UiSession.created_at.desc())
            ).all()
            if len(older) >= MAX_SESSIONS_PER_PERSON:
                s.execute(delete(UiSession).where(UiSession.id_hash.in_(older[MAX_SESSIONS_PER_PERSON - 1 :])))
            s.add(row)
        return cookie, _user(row)

    def find(self, cookie: str) -> UiUser | None:
        with self.sessions() as s:
            row = s.get(UiSession, digest(cookie))
            if row is None or row.expires_at <= self.clock():
                return None
            return _user(row)

    def close(self, cookie: str) -> None:
        with self.sessions.begin() as s:
            s.execute(delete(UiSession).where(UiSession.id_hash == digest(cookie)))

    def credential_live(self, user: UiUser, *, admin_token: str) -> bool:
        """Whether the token ``user`` signed in with still grants their name and role."""
        if user.name == "admin" and hmac.compare_digest(user.credential_hash, digest(admin_token)):
            return user.role == "operator"
        with self.sessions() as s:
            token = s.scalar(select(ApiToken).where(ApiToken.token_hash == user.credential_hash))
        return token is not None and token.revoked_at is None and (token.name, token.role) == (user.name, user.role)


def _user(row: UiSession) -> UiUser:
    return UiUser(row.name, row.role, row.csrf, row.credential_hash, row.expires_at)
