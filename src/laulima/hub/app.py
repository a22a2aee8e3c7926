"""The hub as an ASGI app: wires settings, database, blob store and orchestrator to the routes.

Errors leave the API in one shape (:class:`~laulima.core.protocol.ErrorBody`); the status
code comes from the exception type (:func:`~laulima.hub.api.deps.error_status`), and an
unexpected exception becomes a 500 that says where to look, never what broke inside.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
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
from laulima.hub.blobstore import LocalBlobStore
from laulima.hub.db import create_all, make_engine, make_session_factory
from laulima.hub.notify import TaskBoard
from laulima.hub.orchestrator import Orchestrator
from laulima.hub.service import HubService
from laulima.hub.settings import HubSettings

__all__ = ["create_app"]

log = logging.getLogger(__name__)


def create_app(settings: HubSettings | None = None, *, clock: Callable[[], float] = time.time) -> FastAPI:
    """The hub app; its lifespan opens the database and runs the orchestrator thread.

    ``clock`` is injectable so tests can move deadlines without sleeping.
    """
    settings = settings or HubSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        hub = _start(settings, clock)
        hub.board.bind(asyncio.get_running_loop())
        app.state.hub = hub
        hub.orchestrator.start()
        log.info("hub ready at %s (home %s)", settings.url, settings.home)
        try:
            yield
        finally:
            hub.board.close()
            hub.orchestrator.stop()
            hub.engine.dispose()

    app = FastAPI(
        title="Laulima hub",
        version=__version__,
        description="Federation server of Laulima: sites pull tasks, send updates; the hub aggregates.",
        lifespan=lifespan,
    )
    app.include_router(api_router, prefix=API_PREFIX)
    app.add_exception_handler(LaulimaError, _laulima_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
    return app


def _start(settings: HubSettings, clock: Callable[[], float]) -> HubContext:
    settings.home.mkdir(parents=True, exist_ok=True)
    admin_token = settings.resolve_admin_token()
    assert settings.database_url is not None  # filled in by HubSettings
    engine = make_engine(settings.database_url)
    create_all(engine)
    sessions = make_session_factory(engine)
    blobs = LocalBlobStore(settings.home)
    board = TaskBoard()
    orchestrator = Orchestrator(
        sessions,
        blobs,
        clock,
        tick_s=settings.orchestrator_tick_s,
        notify=board.notify,
        keep_updates=settings.keep_updates,
    )
    return HubContext(
        settings=settings,
        engine=engine,
        sessions=sessions,
        blobs=blobs,
        service=HubService(sessions, blobs, clock),
        orchestrator=orchestrator,
        board=board,
        admin_token=admin_token,
        clock=clock,
    )


def _error(status: int, code: str, detail: str, context: dict[str, Any] | None = None) -> JSONResponse:
    body = ErrorBody(error=code, detail=detail, context=_plain(context or {}))
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body.model_dump(mode="json"), status_code=status, headers=headers)


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
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return _error(exc.status_code, code, str(exc.detail))


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("unexpected error in %s %s", request.method, request.url.path, exc_info=exc)
    return _error(
        500, "internal_error", "the hub failed unexpectedly while handling this request; the hub's log has the details"
    )
