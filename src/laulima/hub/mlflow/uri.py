"""The tracking URI setting: refused early when it is plainly not a URI, and never shown with its credentials.

Apart from the exporter so that the hub's settings can check the value without the rest of
the export. The URI's credentials (user info, query string) never reach a log line or an
error message; prefer ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` /
``MLFLOW_TRACKING_TOKEN``.
"""

from __future__ import annotations

import hashlib
import re
from urllib.parse import urlsplit, urlunsplit

from laulima.errors import ConfigurationError

__all__ = ["ENV", "check_tracking_uri", "credentials_in", "public_uri", "tracking_target"]

ENV = "LAULIMA_MLFLOW_TRACKING_URI"

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:")


def public_uri(uri: str) -> str:
    """``uri`` as it may be shown: no user name or password, no query string."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return "<unparsable URI>"
    if "@" in parts.netloc:
        parts = parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2])
    elif "@" in uri:  # no authority (``user:pw@host``): keep only what follows the last @
        return "***@" + uri.rpartition("@")[2].partition("?")[0]
    return urlunsplit(parts._replace(query="***" if parts.query else "", fragment=""))


def credentials_in(uri: str) -> list[str]:
    """The parts of ``uri`` that may be credentials, longest first (to scrub from messages)."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return [uri]
    found = [parts.query] if parts.query else []
    if "@" in parts.netloc:
        userinfo = parts.netloc.rpartition("@")[0]
        found += [userinfo, *userinfo.split(":", 1)]
    elif "@" in uri:
        found.append(uri.rpartition("@")[0])
    return sorted({s for s in found if len(s) >= 3}, key=len, reverse=True)


def tracking_target(uri: str) -> str:
    """What identifies a tracking server in the cursor table: sha256 of the URI without user info."""
    parts = urlsplit(uri)
    netloc = parts.netloc.rpartition("@")[2]
    return hashlib.sha256(urlunsplit(parts._replace(netloc=netloc)).encode()).hexdigest()


def check_tracking_uri(value: str | None) -> str | None:
    """The setting, stripped; None when unset or empty. Refuses what is plainly not a tracking
    URI; whether MLflow can use it is asked at start (:func:`~laulima.hub.mlflow.exporter.open_mlflow_export`)."""
    if value is None or not value.strip():
        return None
    uri = value.strip()

    def refuse(why: str) -> ConfigurationError:
        return ConfigurationError(f"{ENV} = {public_uri(uri)!r}: {why}", field="mlflow_tracking_uri")

    if len(uri) > 4096 or any(c.isspace() or not c.isprintable() for c in uri):
        raise refuse("not a URI (it holds spaces or control characters, or is over 4096 characters)")
    if not _SCHEME.match(uri):
        raise refuse(
            "not a URI; give a tracking server (http://host:5000), a database (sqlite:///path/mlflow.db) "
            "or a local folder (file:///path/mlruns)"
        )
    try:
        parts = urlsplit(uri)
    except ValueError as exc:  # an unbalanced [ in the host, say
        raise refuse(f"not a URI ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        try:
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
        except ValueError:
            raise refuse("its port is not a number from 0 to 65535") from None
        if not parts.hostname:
            raise refuse("names no host")
    elif scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise refuse("a file: URI names a folder on this machine: file:///path/mlruns")
        if not parts.path.strip("/"):
            raise refuse("names no folder: file:///path/mlruns")
    return uri
