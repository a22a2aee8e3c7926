"""Signing in and out of a dashboard, and the pages a refused request gets.

A dashboard passes :class:`SignIn` how to check a token (the hub: an API token of a
person; the site: its dashboard token) and where sessions live; :class:`SignIn` adds the
sign-in and sign-out routes and gives the dependency every other page uses. Its errors are
pages, not JSON: a signed-out visitor of a page is sent to the sign-in form (and back
afterwards), a live region or a download gets a bare 401, a wrong role a 403 page.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from laulima.errors import Forbidden, LaulimaError, ProtocolError
from laulima.web.forms import read_form
from laulima.web.security import (
    CSRF_FIELD,
    LOGIN_COOKIE,
    SECURITY_HEADERS,
    check_csrf,
    check_origin,
    digest,
    new_secret,
    set_cookie,
)
from laulima.web.sessions import SESSION_TTL_S, SessionStore, UiUser
from laulima.web.templating import Pages

__all__ = ["Credential", "SignIn", "SignInRequired", "install_error_pages"]

log = logging.getLogger(__name__)


class SignInRequired(ProtocolError):
    status = 401
    code = "unauthorized"


@dataclass(frozen=True)
class Credential:
    """Who a token belongs to: their name and role."""

    name: str
    role: str


class SignIn:
    """Sign-in, sign-out and the signed-in user of one dashboard.

    ``check_token`` answers who a token is (None: unknown; it raises :class:`Forbidden` for
    a valid token that may not use the dashboard); ``still_valid`` re-checks, on every
    request, that the credential a session was opened with has not been revoked.
    """

    def __init__(
        self,
        pages: Pages,
        sessions: Callable[[Request], SessionStore],
        *,
        cookie: str,
        check_token: Callable[[Request, str], Credential | None],
        still_valid: Callable[[Request, UiUser], bool],
        token_label: str,
        token_help: str,
        on_sign_in: Callable[[Request, UiUser], None] | None = None,
    ) -> None:
        self.pages, self.sessions, self.cookie = pages, sessions, cookie
        self.check_token, self.still_valid = check_token, still_valid
        self.token_label, self.token_help = token_label, token_help
        self.on_sign_in = on_sign_in

    # -- the dependency every page uses -------------------------------------------------------
    def user(self, request: Request) -> UiUser:
        """The signed-in user, or :class:`SignInRequired`."""
        value = request.cookies.get(self.cookie)
        user = self.sessions(request).find(value) if value else None
        if user is not None and not self.still_valid(request, user):
            self.sessions(request).close(value or "")
            user = None
        if user is None:
            raise SignInRequired("sign in first: this page needs a signed-in person")
        return user

    def check_form(self, request: Request, form: dict[str, str], user: UiUser) -> None:
        """CSRF and origin checks of a state-changing form."""
        check_csrf(request, form, user.csrf)

    # -- routes ---------------------------------------------------------------------------------
    def add_routes(self, router: APIRouter) -> None:
        router.add_api_route("/login", self.login_form, methods=["GET"], include_in_schema=False)
        router.add_api_route("/login", self.login, methods=["POST"], include_in_schema=False)
        router.add_api_route("/logout", self.logout, methods=["POST"], include_in_schema=False)

    def login_form(self, request: Request, next: str = "") -> HTMLResponse:  # noqa: A002 - the query's name
        return self._form(request, next_url=next)

    async def login(self, request: Request) -> Response:
        form = await read_form(request)
        sent, expected = form.get(CSRF_FIELD, ""), request.cookies.get(LOGIN_COOKIE, "")
        if not sent or not expected or not hmac.compare_digest(sent.encode(), expected.encode()):
            raise Forbidden(
                "cross-site request refused: the sign-in form was not this dashboard's; open the sign-in page and "
                "try again",
                reason="csrf",
            )
        check_origin(request)
        token = form.get("token", "").strip()
        next_url = form.get("next", "")
        try:
            who = self.check_token(request, token) if token else None
        except Forbidden as exc:
            return self._form(request, next_url=next_url, error=str(exc), status_code=403)
        if who is None:
            log.warning("dashboard sign-in refused: unknown or revoked token from %s", _peer(request))
            return self._form(
                request, next_url=next_url, error="That token is unknown or has been revoked.", status_code=401
            )
        value, user = self.sessions(request).open(who.name, who.role, digest(token))
        if self.on_sign_in is not None:
            self.on_sign_in(request, user)
        response = RedirectResponse(self._safe_next(next_url), status_code=303, headers=dict(SECURITY_HEADERS))
        set_cookie(response, request, self.cookie, value, max_age=SESSION_TTL_S, path=self._cookie_path)
        response.delete_cookie(LOGIN_COOKIE, path=self._cookie_path)
        return response

    async def logout(self, request: Request) -> Response:
        user = self.user(request)
        form = await read_form(request)
        self.check_form(request, form, user)
        self.sessions(request).close(request.cookies.get(self.cookie, ""))
        response = RedirectResponse(f"{self.pages.base_path}/login", status_code=303, headers=dict(SECURITY_HEADERS))
        response.delete_cookie(self.cookie, path=self._cookie_path)
        return response

    # -- helpers --------------------------------------------------------------------------------
    @property
    def _cookie_path(self) -> str:
        return self.pages.base_path or "/"

    def _safe_next(self, next_url: str) -> str:
        """Only a path inside this dashboard: never an open redirect to another site."""
        base = self.pages.base_path
        ok = next_url.startswith(f"{base}/") and not next_url.startswith("//") and "\\" not in next_url
        return next_url if ok and "://" not in next_url else f"{base}/"

    def _form(self, request: Request, *, next_url: str, error: str = "", status_code: int = 200) -> HTMLResponse:
        login_csrf = new_secret()
        response = self.pages.page(
            request,
            "login.html",
            {
                "login_csrf": login_csrf,
                "next_url": next_url,
                "error": error,
                "token_label": self.token_label,
                "token_help": self.token_help,
            },
            status_code=status_code,
        )
        set_cookie(response, request, LOGIN_COOKIE, login_csrf, max_age=3600, path=self._cookie_path)
        return response


def install_error_pages(app: FastAPI, pages: Pages, *, fragments: Callable[[Request], bool]) -> None:
    """Errors of a dashboard app as pages: sign-in redirect, 403/404/4xx pages, never a trace.

    ``fragments(request)`` says whether the request is for a live region or a download,
    which get a bare status instead of a page or a redirect.
    """

    def page(request: Request, status: int, heading: str, detail: str) -> Response:
        if fragments(request):
            return Response(detail, status_code=status, media_type="text/plain", headers=dict(SECURITY_HEADERS))
        return pages.page(
            request, "error.html", {"status": status, "heading": heading, "detail": detail}, status_code=status
        )

    async def laulima_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, LaulimaError)
        status = exc.status if isinstance(exc, ProtocolError) else 422
        if isinstance(exc, SignInRequired) and request.method == "GET" and not fragments(request):
            target = f"{pages.base_path}/login?next={quote(request.url.path, safe='/')}"
            return RedirectResponse(target, status_code=303, headers=dict(SECURITY_HEADERS))
        headings = {401: "Sign in first", 403: "Not allowed", 404: "Not found", 409: "Not now"}
        return page(request, status, headings.get(status, "That did not work"), str(exc))

    async def validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        first: dict[str, Any] = dict(exc.errors()[0]) if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())) or "request"
        return page(request, 422, "That did not work", f"{where}: {first.get('msg', 'invalid request')}")

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        heading = {404: "Not found", 405: "Not allowed"}.get(exc.status_code, "That did not work")
        detail = "There is no such page." if exc.status_code == 404 else str(exc.detail)
        return page(request, exc.status_code, heading, detail)

    async def unexpected(request: Request, exc: Exception) -> Response:
        log.error("unexpected error in %s %s", request.method, request.url.path, exc_info=exc)
        return page(request, 500, "Something went wrong", "The dashboard failed unexpectedly; its log has the details.")

    app.add_exception_handler(LaulimaError, laulima_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)


def _peer(request: Request) -> str:
    return request.client.host if request.client else "an unknown address"
