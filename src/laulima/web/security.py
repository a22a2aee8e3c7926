"""Cookies, CSRF and response headers of both dashboards.

A signed-in browser holds one random session id in an HttpOnly, SameSite=Strict cookie
(Secure whenever the page came over TLS or from loopback, where browsers treat plain HTTP
as secure). Every state-changing request must carry the session's CSRF token in the form
(synchronizer token; a cross-site page cannot read it) *and*, when the browser sends one,
an ``Origin`` equal to the page's own: either check alone would already stop a forged
form, both together survive a bug in one. The login form, which has no session yet, uses a
double-submit cookie instead.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from fastapi import Request, Response

from laulima.errors import Forbidden

__all__ = [
    "CSRF_FIELD",
    "LOGIN_COOKIE",
    "SECURITY_HEADERS",
    "check_csrf",
    "check_origin",
    "digest",
    "new_secret",
    "secure_cookies",
    "set_cookie",
]

CSRF_FIELD = "csrf_token"
LOGIN_COOKIE = "laulima_login"
"""The login form's double-submit cookie (not a credential: it only binds the form to the browser)."""

SECURITY_HEADERS: Mapping[str, str] = {
    # Scripts, styles and images only from the dashboard itself; no inline script or style, no
    # framing (clickjacking an Approve button), no form posted elsewhere.
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def new_secret() -> str:
    """A random token for a session id or a CSRF token (256 bits)."""
    return secrets.token_urlsafe(32)


def digest(secret: str) -> str:
    """What is stored of a session id: its sha256 (a leaked table opens no session)."""
    return hashlib.sha256(secret.encode()).hexdigest()


def secure_cookies(request: Request) -> bool:
    """Whether cookies get the Secure flag: over TLS, and on loopback, which browsers treat as
    a secure context (so the flag costs nothing there and protects the day it is not loopback)."""
    if request.url.scheme == "https":
        return True
    host = (request.url.hostname or "").lower()
    return host in ("127.0.0.1", "::1", "localhost")


def set_cookie(response: Response, request: Request, name: str, value: str, *, max_age: int, path: str) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path=path,
        httponly=True,
        secure=secure_cookies(request),
        samesite="strict",
    )


def check_origin(request: Request) -> None:
    """Refuses a state-changing request whose ``Origin`` (or, lacking one, ``Referer``) is another site's."""
    claimed = request.headers.get("origin") or request.headers.get("referer")
    if claimed is None:
        return  # browsers send one on every form post; a client without them has no cookie to abuse
    if claimed == "null":
        raise Forbidden("cross-site request refused: the request came from an opaque origin", reason="csrf")
    parts = urlsplit(claimed)
    own = urlsplit(str(request.url))
    if (parts.scheme, parts.hostname, _port(parts)) != (own.scheme, own.hostname, _port(own)):
        raise Forbidden(
            f"cross-site request refused: it came from {parts.scheme}://{parts.netloc}, not from this dashboard",
            reason="csrf",
        )


def check_csrf(request: Request, form: Mapping[str, Any], expected: str) -> None:
    """The form's CSRF token must equal the session's; then the origin must be this page's."""
    sent = str(form.get(CSRF_FIELD, ""))
    if not sent or not hmac.compare_digest(sent.encode(), expected.encode()):
        raise Forbidden(
            "cross-site request refused: the form carried no valid CSRF token; reload the page and try again",
            reason="csrf",
        )
    check_origin(request)


def _port(parts: Any) -> int | None:
    try:
        return parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    except ValueError:
        return -1
