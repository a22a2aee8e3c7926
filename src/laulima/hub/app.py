"""The hub as an ASGI app: wires settings, database, blob store and orchestrator to the routes.

Errors leave the API in one shape (:class:`~laulima.core.protocol.ErrorBody`); the status
code comes from the exception type (:func:`~laulima.hub.api.deps.error_status`), and an
unexpected exception becomes a 500 that says where to look, never what broke inside.
Every body except the two weight uploads is limited to ``max_json_bytes`` and must keep
arriving (:class:`BodyLimit`); the uploads have their own limits in their routes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from laulima import __version__
from laulima.core.protocol import API_PREFIX, ErrorBody
from laulima.errors import LaulimaError
from laulima.hub.api.deps import HubContext, error_status
from laulima.hub.api.routes import api_router
from laulima.hub.audit import HubAudit
from laulima.hub.blob_guard import DatabaseBlobGuard
from laulima.hub.blobstores import open_blob_store
from laulima.hub.db import is_postgresql, make_engine, make_session_factory, migrate
from laulima.hub.housekeeping import Housekeeper, live_references
from laulima.hub.leases import Leases
from laulima.hub.limits import SiteLimits
from laulima.hub.mlflow import open_mlflow_export
from laulima.hub.notify import TaskBoard
from laulima.hub.orchestrator import Orchestrator
from laulima.hub.peers import Peers, PgPeers
from laulima.hub.service import HubService
from laulima.hub.settings import HubSettings
from laulima.hub.ui import MOUNT as DASHBOARD_MOUNT
from laulima.hub.ui import attach, create_dashboard
from laulima.pki.ca import RevocationList

__all__ = ["create_app"]

log = logging.getLogger(__name__)


def create_app(settings: HubSettings | None = None, *, clock: Callable[[], float] = time.time) -> FastAPI:
    """The hub app; its lifespan opens the database and runs the orchestrator thread.

    ``clock`` is injectable so tests can move deadlines without sleeping.
    """
    settings = settings or HubSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        mlflow_export = open_mlflow_export(settings)  # None unless set; an unusable URI stops the start here
        hub = _start(settings, clock)
        hub.board.bind(asyncio.get_running_loop())
        app.state.hub = hub
        assert settings.audit_dir is not None  # filled in by HubSettings
        app.state.audit = HubAudit(settings.audit_dir)
        app.state.audit.check_at_start()
        attach(dashboard, hub, app.state.audit)
        hub.orchestrator.peers.start(on_tasks=hub.board.notify, on_wake=hub.orchestrator.wake_here)
        hub.orchestrator.start()
        app.state.mlflow_export = mlflow_export
        if mlflow_export is not None:  # hub/mlflow/: a mirror from the database, in its own thread
            mlflow_export.start(hub.sessions, hub.orchestrator.leases)
        log.info("hub ready at %s (home %s)", settings.url, settings.home)
        try:
            yield
        finally:
            if mlflow_export is not None:
                mlflow_export.stop()
            hub.board.close()
            hub.orchestrator.stop()
            hub.orchestrator.peers.stop()
            hub.engine.dispose()

    app = FastAPI(
        title="Laulima hub",
        version=__version__,
        description="Federation server of Laulima: sites pull tasks, send updates; the hub aggregates.",
        lifespan=lifespan,
    )
    app.include_router(api_router, prefix=API_PREFIX)
    dashboard = create_dashboard()
    app.mount(DASHBOARD_MOUNT, dashboard)
    app.add_middleware(BodyLimit, limit=settings.max_json_bytes, stall_s=settings.body_timeout_s)
    app.add_exception_handler(LaulimaError, _laulima_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
    return app


def _start(settings: HubSettings, clock: Callable[[], float]) -> HubContext:
    _private_dir(settings.home)
    admin_token = settings.resolve_admin_token()
    assert settings.database_url is not None  # filled in by HubSettings
    engine = make_engine(settings.database_url)
    migrate(engine)
    _private_file(settings.home / "hub.db")
    sessions = make_session_factory(engine)
    assert settings.key_dir is not None
    leases = Leases(sessions, ttl_s=settings.lease_s)
    # Several hub processes: pins and deletes of blobs are checked in the database (hub/blob_guard.py).
    guard = DatabaseBlobGuard(sessions, leases.holder) if settings.scaled_out else None
    blobs = open_blob_store(settings, in_use=live_references(sessions), guard=guard)
    board = TaskBoard(recheck_s=settings.peer_poll_s)
    peers = PgPeers(engine, sender=leases.holder) if is_postgresql(settings.database_url) else Peers()
    revocations = _revocations(settings)

    def service() -> HubService:
        return HubService(
            sessions, blobs, clock, revocations=revocations, site_offline_after_s=settings.site_offline_after_s
        )

    orchestrator = Orchestrator(
        sessions,
        blobs,
        clock,
        tick_s=settings.orchestrator_tick_s,
        notify=board.notify,
        keep_updates=settings.keep_updates,
        service=service(),
        leases=leases,
        peers=peers,
    )
    orchestrator.housekeeping = Housekeeper(
        sessions, blobs, ttl_s=settings.unused_upload_ttl_s, clock=clock, guard=guard
    ).run_if_due
    return HubContext(
        settings=settings,
        engine=engine,
        sessions=sessions,
        blobs=blobs,
        service=service(),
        orchestrator=orchestrator,
        board=board,
        admin_token=admin_token,
        clock=clock,
        revocations=revocations,
        limits=SiteLimits(
            settings.site_uploads_per_minute,
            settings.site_upload_burst,
            settings.site_max_transfers,
            requests_per_minute=settings.requests_per_minute,
            request_burst=settings.request_burst,
            max_polls=settings.site_max_polls,
        ),
    )


def _private_dir(path: Path) -> None:
    """The hub's home holds its database, sealed blobs and tokens: owner-only, whatever
    the umask, and tightened if an older version left it open."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.stat().st_mode & 0o077:
        log.warning("hub home %s was accessible to other users; restricting it to its owner (0700)", path)
        path.chmod(0o700)


def _private_file(path: Path) -> None:
    for candidate in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        if candidate.exists() and candidate.stat().st_mode & 0o077:
            candidate.chmod(0o600)


def _revocations(settings: HubSettings) -> RevocationList | None:
    if not settings.tls:
        return None
    revocations = RevocationList(settings.revoked_file)
    revocations.is_revoked(0)  # an unreadable list stops the start, not the first request
    return revocations


def _is_upload(method: str, path: str) -> bool:
    if method != "PUT" or not path.startswith(API_PREFIX):
        return False
    rest = path[len(API_PREFIX) :]
    return rest == "/blobs" or (rest.startswith("/tasks/") and rest.endswith("/update"))


class BodyLimit:
    """Pure ASGI middleware: bodies of at most ``limit`` bytes (413), none stalling for
    ``stall_s`` (408); the weight uploads are exempt (their routes limit them)."""

    def __init__(self, app: Any, limit: int, stall_s: float) -> None:
        self.app, self.limit, self.stall_s = app, limit, stall_s

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or _is_upload(scope["method"], scope["path"]):
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            response = _error(413, "payload_too_large", f"body of {int(declared)} bytes exceeds {self.limit} bytes")
            await response(scope, receive, send)
            return
        received, done = 0, False

        async def limited() -> Any:
            nonlocal received, done
            if done:  # the body is in; later receives wait for a disconnect, without a deadline
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.stall_s)
            except TimeoutError as exc:
                raise StarletteHTTPException(408, f"request body stalled for {self.stall_s:g} s") from exc
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                done = not message.get("more_body", False)
                if received > self.limit:
                    raise StarletteHTTPException(413, f"body exceeds the limit of {self.limit} bytes")
            return message

        await self.app(scope, limited, send)


def _error(status: int, code: str, detail: str, context: dict[str, Any] | None = None) -> JSONResponse:
    body = ErrorBody(error=code, detail=detail, context=_plain(context or {}))
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
    if status in (429, 503) and context and "retry_after" in context:
        headers["Retry-After"] = str(context["retry_after"])
    return JSONResponse(body.model_dump(mode="json"), status_code=status, headers=headers or None)


def _plain(value: Any) -> Any:
    """JSON-safe copy of an exception's context (anything unusual becomes its ``str``)."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_plain(v) for v in value]
    return str(value)


async def _laulima_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, LaulimaError)
    status, code = error_status(exc)
    if exc.context.get("reason") in ("revoked", "expired", "removed") or status >= 500:
        log.warning("%s %s refused (%d): %s", request.method, request.url.path, status, exc)
    return _error(status, code, str(exc), exc.context)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
        for e in exc.errors()
    ]
    first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
    where = ".".join(first["loc"]) or "request"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return _error(422, "invalid_request", f"{where}: {first['msg']}{more}", {"errors": errors})


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = {404: "not_found", 405: "method_not_allowed", 408: "request_timeout", 413: "payload_too_large"}.get(
        exc.status_code, "http_error"
    )
    return _error(exc.status_code, code, str(exc.detail))


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("unexpected error in %s %s", request.method, request.url.path, exc_info=exc)
    return _error(
        500, "internal_error", "the hub failed unexpectedly while handling this request; the hub's log has the details"
    )
