"""The hub's web dashboard, mounted at ``/ui``: the federation, its experiments, live.

A FastAPI app of its own (so its errors are pages, not the API's JSON), sharing the hub's
parts: the lifespan of the hub's app hands it the running :class:`HubContext` and audit
trail (:func:`attach`). People sign in with the API token they already have and keep the
role it carries; a site's credentials cannot sign in. Only ``/ui/static`` (the stylesheet
and ``live.js``, the same for everyone) and the sign-in form answer without a session.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.staticfiles import StaticFiles

from laulima.core.protocol import Role
from laulima.errors import Forbidden
from laulima.hub.api.deps import HubContext, person_of_token
from laulima.hub.audit import HubAudit
from laulima.hub.ui.routes import build_router
from laulima.hub.ui.sessions import DbSessions
from laulima.web.auth import Credential, SignIn, install_error_pages
from laulima.web.sessions import UiUser
from laulima.web.templating import STATIC_DIR, Pages

__all__ = ["MOUNT", "SESSION_COOKIE", "attach", "create_dashboard"]

MOUNT = "/ui"
SESSION_COOKIE = "laulima_hub_session"
_TEMPLATES = Path(__file__).parent / "templates"


def create_dashboard() -> FastAPI:
    """The dashboard app; mount it at :data:`MOUNT` and :func:`attach` the hub when it starts."""
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    pages = Pages(_TEMPLATES, base_path=MOUNT, product="hub dashboard")
    sign_in = SignIn(
        pages,
        lambda request: request.app.state.ui_sessions,
        cookie=SESSION_COOKIE,
        check_token=_check_token,
        still_valid=_still_valid,
        token_label="API token",
        token_help="The token from `laulima token create NAME --role scientist` (or the operator's token). "
        "It stays on the hub: your browser keeps only a session cookie.",
    )
    app.state.sign_in = sign_in
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.include_router(build_router(pages, sign_in))
    install_error_pages(app, pages, fragments=_is_fragment)
    return app


def attach(dashboard: FastAPI, hub: HubContext, audit: HubAudit) -> None:
    """Give a mounted dashboard the running hub's parts (called by the hub's lifespan)."""
    dashboard.state.hub = hub
    dashboard.state.audit = audit
    dashboard.state.ui_sessions = DbSessions(hub.sessions, clock=hub.clock)


def _hub(request: Request) -> HubContext:
    return request.app.state.hub  # type: ignore[no-any-return]


def _check_token(request: Request, token: str) -> Credential | None:
    hub = _hub(request)
    peer = request.client.host if request.client else "unknown"
    hub.limits.take_request(f"sign-in:{peer}")
    caller = person_of_token(hub, token)
    if caller is not None:
        return Credential(caller.name, caller.role.value)
    if not hub.settings.tls and hub.service.authenticate_site(token) is not None:
        raise Forbidden(
            "a site's token cannot sign in to the dashboard; sign in with a person's API token "
            "(`laulima token create NAME --role scientist`)"
        )
    return None


def _still_valid(request: Request, user: UiUser) -> bool:
    hub = _hub(request)
    if user.role not in (Role.OPERATOR, Role.SCIENTIST):
        return False
    sessions: DbSessions = request.app.state.ui_sessions
    return sessions.credential_live(user, admin_token=hub.admin_token)


def _is_fragment(request: Request) -> bool:
    """Live regions and downloads get a bare status, not a page or a redirect."""
    path = request.url.path
    return "/live" in path or path.endswith(("/model", "/card"))
