"""The site dashboard as a FastAPI app: the pages, the two decisions, and who may see them.

Routes (all but ``/login`` and ``/static`` need a signed-in administrator)::

    GET  /login, POST /login, POST /logout      signing in with a dashboard token (laulima.web.auth)
    GET  /                                      pending jobs, recent decisions, datasets, privacy budget, audit
    GET  /fragments/pending                     the pending jobs' table alone (polled by live.js; ETag, 304)
    GET  /jobs/{id}                             a job: facts, policy, manifest, source, its audit entries
    POST /jobs/{id}/approve, /jobs/{id}/reject  the decision (CSRF token and same origin), then back to the job
    POST /datasets/{name}/verify                check a dataset's files against their checksums
    GET  /audit?page=N&experiment=E             the audit trail, newest first, with its verification

Deciding calls :func:`laulima.site.review.decide_job`, as ``laulima site approve|reject`` do:
the same store call and the same audit entry, recorded as the signed-in person's name. The
agent reads the decision from ``approvals.db`` at its next poll. Nothing here talks to the hub.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from markupsafe import Markup
from starlette.concurrency import run_in_threadpool
from starlette.middleware.trustedhost import TrustedHostMiddleware

from laulima.errors import ConfigurationError, Conflict, DataError, NotFound, ProtocolError
from laulima.site.approvals import AlreadyDecided, UnknownJob
from laulima.site.catalog import Catalog
from laulima.site.policy import load_policy
from laulima.site.privacy_ledger import format_epsilon
from laulima.site.review import Verb, decide_job
from laulima.site.ui import views
from laulima.site.ui.tokens import DashboardTokens
from laulima.web.auth import Credential, SignIn, install_error_pages
from laulima.web.forms import read_form
from laulima.web.security import SECURITY_HEADERS
from laulima.web.sessions import MemorySessions, SessionStore, UiUser
from laulima.web.templating import STATIC_DIR, Pages, content_etag, format_time

__all__ = ["COOKIE", "LOOPBACK_HOSTS", "ROLE", "AuditUnavailable", "create_app"]

log = logging.getLogger("laulima.site.ui")

COOKIE = "laulima_site_session"
ROLE = "site administrator"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost")
"""The ``Host`` names the dashboard answers to: a page of another site that rebinds its DNS
name to this machine gets a 400, not the sign-in form."""
TEMPLATES = Path(__file__).parent / "templates"
FRAGMENTS = "/fragments/"
MAX_REASON_CHARS = 1000


class AuditUnavailable(ProtocolError):
    """The site's audit trail cannot be written: nothing is decided until it can."""

    status = 503
    code = "audit_unavailable"


class _Flashes:
    """One message per session, shown on the next page it opens (after a redirect)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._messages: dict[str, str] = {}

    def put(self, user: UiUser, message: str) -> None:
        with self._lock:
            if len(self._messages) > 1000:
                self._messages.clear()
            self._messages[user.csrf] = message

    def pop(self, user: UiUser) -> str:
        with self._lock:
            return self._messages.pop(user.csrf, "")


def create_app(
    home: Path,
    *,
    sessions: SessionStore | None = None,
    allowed_hosts: Sequence[str] = LOOPBACK_HOSTS,
) -> FastAPI:
    """The dashboard of the site whose home is ``home`` (served on loopback by :func:`laulima.site.ui.server.serve`)."""
    home = Path(home)
    pages = Pages(TEMPLATES, base_path="", product="site dashboard")
    pages.env.filters.update(utc=format_time, eps=format_epsilon)
    pages.env.globals["field_text"] = views.field_text
    store: SessionStore = sessions if sessions is not None else MemorySessions()
    tokens = DashboardTokens(home)
    flashes = _Flashes()
    verifier = views.AuditVerifier(home)
    verifications: dict[str, views.Verification] = {}

    def check_token(request: Request, token: str) -> Credential | None:
        name = tokens.check(token)
        if name is None:
            return None
        log.info("dashboard: %s signed in", name)
        return Credential(name, ROLE)

    def still_valid(request: Request, user: UiUser) -> bool:
        return tokens.holds(user.name, user.credential_hash)

    signin = SignIn(
        pages,
        lambda request: store,
        cookie=COOKIE,
        check_token=check_token,
        still_valid=still_valid,
        token_label="Dashboard token",
        token_help=(
            "The token `laulima site ui` printed at its first start, or one made with "
            "`laulima site ui-token add NAME` on this machine."
        ),
    )
    signed_in = Depends(signin.user)

    app = FastAPI(title="Laulima site dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    install_error_pages(app, pages, fragments=lambda request: request.url.path.startswith(FRAGMENTS))
    app.state.home = home
    app.state.sessions = store

    def context(user: UiUser, nav: str, **extra: Any) -> dict[str, Any]:
        return {"user": user, "csrf": user.csrf, "flash": flashes.pop(user), "nav": nav, **extra}

    def pending_fragment() -> tuple[str, str]:
        body = pages.render("_pending.html", {"jobs": views.pending_jobs(home)})
        return body, content_etag(body)

    # -- pages ---------------------------------------------------------------------------
    def overview(request: Request, user: UiUser = signed_in) -> HTMLResponse:
        pending_html, etag = pending_fragment()
        rows = views.datasets(home, verifications)
        policy_error = None
        try:
            policy = load_policy(home)
        except ConfigurationError as exc:
            policy, policy_error = None, str(exc)
        audit_status = verifier.status()
        latest = views.audit_page(home, size=5)
        return pages.page(
            request,
            "overview.html",
            context(
                user,
                "overview",
                pending_html=Markup(pending_html),
                pending_etag=etag,
                decisions=views.recent_decisions(home),
                datasets=rows,
                budget=views.budget(home, [row.name for row in rows]),
                policy=policy,
                policy_error=policy_error,
                audit=audit_status,
                latest=latest,
            ),
        )

    def pending(request: Request, user: UiUser = signed_in) -> Response:
        return pages.fragment(request, "_pending.html", {"jobs": views.pending_jobs(home)})

    def job_page(request: Request, job_id: str, user: UiUser = signed_in) -> HTMLResponse:
        return _job_response(request, user, job_id)

    def _job_response(
        request: Request,
        user: UiUser,
        job_id: str,
        *,
        errors: dict[str, str] | None = None,
        reasons: dict[str, str] | None = None,
        status_code: int = 200,
    ) -> HTMLResponse:
        try:
            view = views.job_view(home, job_id)
        except UnknownJob as exc:
            raise NotFound(str(exc)) from exc
        return pages.page(
            request,
            "job.html",
            context(
                user,
                "overview",
                view=view,
                errors=errors or {},
                reasons=reasons or {},
                max_reason=MAX_REASON_CHARS,
            ),
            status_code=status_code,
        )

    async def decide(request: Request, job_id: str, user: UiUser, verb: Verb) -> Response:
        form = await read_form(request)
        signin.check_form(request, form, user)
        reason = form.get("reason", "")
        try:
            decided = await run_in_threadpool(decide_job, home, job_id, verb, reason, user.name)
        except UnknownJob as exc:
            raise NotFound(str(exc)) from exc
        except AlreadyDecided as exc:
            raise Conflict(str(exc)) from exc
        except ConfigurationError as exc:  # the reason: missing for a rejection, too long, not text
            return _job_response(
                request, user, job_id, errors={verb: str(exc)}, reasons={verb: reason}, status_code=422
            )
        except DataError as exc:  # the audit trail cannot be written: nothing was decided
            raise AuditUnavailable(str(exc)) from exc
        log.info("dashboard: %s", decided.summary())
        flashes.put(user, f"{decided.summary()}. The agent takes it up at its next poll.")
        return RedirectResponse(f"/jobs/{decided.job.id}", status_code=303, headers=dict(SECURITY_HEADERS))

    async def approve(request: Request, job_id: str, user: UiUser = signed_in) -> Response:
        return await decide(request, job_id, user, "approve")

    async def reject(request: Request, job_id: str, user: UiUser = signed_in) -> Response:
        return await decide(request, job_id, user, "reject")

    async def verify_dataset(request: Request, name: str, user: UiUser = signed_in) -> Response:
        form = await read_form(request)
        signin.check_form(request, form, user)
        catalog = Catalog(home)
        if name not in catalog:
            raise NotFound(f"no dataset {name!r} is registered at this site")
        problems = await run_in_threadpool(catalog.verify, name)
        verifications[name] = views.Verification(time.time(), tuple(problems))
        if problems:
            message = (
                f"dataset {name}: {len(problems)} file(s) changed or gone since registration; restore them or "
                f"register it again with `laulima site dataset add {name} SOURCE`"
            )
        else:
            message = f"dataset {name}: every file is as registered"
        log.info("dashboard: %s checked %s", user.name, message)
        flashes.put(user, message)
        return RedirectResponse("/#datasets", status_code=303, headers=dict(SECURITY_HEADERS))

    def audit(
        request: Request,
        user: UiUser = signed_in,
        page: Annotated[int, Query(ge=1, le=10**9)] = 1,
        experiment: str = "",
    ) -> HTMLResponse:
        chosen = _experiment(experiment)
        return pages.page(
            request,
            "audit.html",
            context(
                user,
                "audit",
                audit=verifier.status(),
                listing=views.audit_page(home, page=page, experiment=chosen),
                experiment_text=experiment.strip(),
            ),
        )

    signin.add_routes(app.router)
    add: Callable[..., None] = app.router.add_api_route
    add("/", overview, methods=["GET"], include_in_schema=False)
    add(f"{FRAGMENTS}pending", pending, methods=["GET"], include_in_schema=False)
    add("/jobs/{job_id}", job_page, methods=["GET"], include_in_schema=False)
    add("/jobs/{job_id}/approve", approve, methods=["POST"], include_in_schema=False)
    add("/jobs/{job_id}/reject", reject, methods=["POST"], include_in_schema=False)
    add("/datasets/{name}/verify", verify_dataset, methods=["POST"], include_in_schema=False)
    add("/audit", audit, methods=["GET"], include_in_schema=False)
    return app


class _BadQuery(ProtocolError):
    status = 400
    code = "bad_query"


def _experiment(text: str) -> int | None:
    text = text.strip()
    if not text:
        return None
    if not (text.isascii() and text.isdigit() and len(text) <= 18):
        raise _BadQuery(f"experiment {text!r:.40} is not an experiment number")
    return int(text)
