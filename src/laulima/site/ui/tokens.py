"""Who may sign in to the site dashboard: named tokens, stored as their sha256 only.

``home/ui-tokens.json`` (mode 0600, replaced atomically) lists one token per administrator::

    {"version": 1, "tokens": [{"name": "dr.kealoha", "sha256": "…", "created_at": 1714557603.2}]}

The name is who a decision made from the dashboard is recorded as (``by`` in the approvals
store and the audit trail). The token itself is printed once, when it is made (``laulima site
ui`` at its first start, for the OS user; ``laulima site ui-token add NAME``), and never
stored. Revoking a name (``laulima site ui-token revoke NAME``) ends that person's sessions
at their next request: the dashboard re-reads this file for every request.

A file other users may write is refused: whoever can add a hash here can approve jobs.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import hmac
import json
import os
import re
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from laulima.errors import ConfigurationError
from laulima.private_files import PRIVATE_FILE, private_dir, write_atomic
from laulima.web.security import digest, new_secret

__all__ = ["TOKENS_FILE", "DashboardToken", "DashboardTokens", "check_name", "default_name"]

TOKENS_FILE = "ui-tokens.json"
_LOCK_FILE = ".ui-tokens.lock"
_VERSION = 1
_MAX_BYTES = 1024 * 1024
_MAX_TOKENS = 1000
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class DashboardToken:
    """One administrator's token, as stored: their name and the token's sha256."""

    name: str
    sha256: str
    created_at: float


def check_name(name: str) -> str:
    """``name`` if it can name an administrator (letters, digits, ``. _ @ -``, at most 64)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigurationError(
            f"{name!r:.80} cannot name a dashboard user: use letters, digits, '.', '_', '@' or '-' "
            "(at most 64, starting with a letter or digit)",
            field="name",
        )
    return name


def default_name() -> str:
    """The OS user running the dashboard, when it can be a token's name; ``admin`` otherwise."""
    try:
        name = getpass.getuser()
    except (KeyError, OSError):  # no login name and no passwd entry (some containers)
        return "admin"
    return name if _NAME.fullmatch(name) else "admin"


class DashboardTokens:
    """``home/ui-tokens.json``. Every call reads the file afresh (the commands that add and
    revoke tokens are other processes); writes are serialised by a lock file."""

    def __init__(self, home: str | Path) -> None:
        self.home = Path(home)
        self.path = self.home / TOKENS_FILE

    # -- reading -------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.path.exists()

    def tokens(self) -> list[DashboardToken]:
        """Every token, in the order they were made; [] when there is no file."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise ConfigurationError(f"{self.path}: cannot read the dashboard's tokens ({exc})") from exc
        if os.name == "posix" and st.st_mode & 0o022:
            raise ConfigurationError(
                f"{self.path}: other users may edit the dashboard's tokens (mode {st.st_mode & 0o777:o}); "
                f"run `chmod 600 {self.path}`",
                file=str(self.path),
            )
        if not stat.S_ISREG(st.st_mode) or st.st_size > _MAX_BYTES:
            raise ConfigurationError(f"{self.path}: not a token file of at most {_MAX_BYTES // 1024} KiB")
        try:
            data = json.loads(self.path.read_bytes())
            items = data["tokens"]
            if data.get("version") != _VERSION or not isinstance(items, list):
                raise ValueError(f"version {data.get('version')!r}, expected {_VERSION}")
            tokens = [
                DashboardToken(check_name(item["name"]), _hex(item["sha256"]), float(item["created_at"]))
                for item in items
            ]
        except (OSError, ValueError, KeyError, TypeError, ConfigurationError) as exc:
            raise ConfigurationError(
                f"{self.path}: the dashboard's tokens cannot be read ({exc}); move the file aside and make new "
                "tokens with `laulima site ui-token add NAME`",
                file=str(self.path),
            ) from exc
        return tokens

    def check(self, token: str) -> str | None:
        """The name a token belongs to, or None for an unknown (or revoked) token."""
        hashed = digest(token)
        for item in self.tokens():
            if hmac.compare_digest(item.sha256, hashed):
                return item.name
        return None

    def holds(self, name: str, token_hash: str) -> bool:
        """Whether ``name`` still has the token whose sha256 is ``token_hash`` (not revoked)."""
        return any(t.name == name and hmac.compare_digest(t.sha256, token_hash) for t in self.tokens())

    # -- writing -------------------------------------------------------------------------
    def add(self, name: str) -> str:
        """A new token for ``name``; returns it (the only time it is seen). One token per name."""
        check_name(name)
        token = new_secret()
        with self._locked():
            tokens = self.tokens()
            if any(t.name == name for t in tokens):
                raise ConfigurationError(
                    f"{name} already has a dashboard token; revoke it first (`laulima site ui-token revoke {name}`) "
                    "to make a new one",
                    field="name",
                )
            if len(tokens) >= _MAX_TOKENS:
                raise ConfigurationError(f"{self.path} holds {_MAX_TOKENS} tokens already; revoke some first")
            self._write([*tokens, DashboardToken(name, digest(token), time.time())])
        return token

    def revoke(self, name: str) -> bool:
        """Remove ``name``'s token; False when they had none. Their sessions end at their next request."""
        with self._locked():
            tokens = self.tokens()
            kept = [t for t in tokens if t.name != name]
            if len(kept) == len(tokens):
                return False
            self._write(kept)
        return True

    def first_start(self, name: str | None = None) -> tuple[str, str] | None:
        """At the dashboard's first start (no token file yet): a token for ``name`` (default: the
        OS user), as (name, token). None when the file exists, even empty: revoking everyone is
        a decision this does not undo."""
        with self._locked():
            if self.path.exists():
                return None
            who = check_name(name or default_name())
            token = new_secret()
            self._write([DashboardToken(who, digest(token), time.time())])
        return who, token

    def _write(self, tokens: list[DashboardToken]) -> None:
        body = {
            "version": _VERSION,
            "tokens": [{"name": t.name, "sha256": t.sha256, "created_at": t.created_at} for t in tokens],
        }
        write_atomic(self.path, json.dumps(body, indent=1) + "\n", fsync=True)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        private_dir(self.home)
        fd = os.open(self.home / _LOCK_FILE, os.O_RDWR | os.O_CREAT, PRIVATE_FILE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def _hex(value: object) -> str:
    if not isinstance(value, str) or not _HEX64.fullmatch(value):
        raise ValueError("a token's sha256 must be 64 lower-case hex digits")
    return value
