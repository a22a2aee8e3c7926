"""Request dependencies, in one place: the hub's parts, and who is calling (site or operator)."""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy import Engine

from laulima.errors import (
    ConfigurationError,
    DataError,
    Forbidden,
    LaulimaError,
    ProtocolError,
    SpecError,
    WeightsError,
)
from laulima.hub.blobstore import BlobStore
from laulima.hub.db import SessionFactory, Site
from laulima.hub.notify import TaskBoard
from laulima.hub.orchestrator import Orchestrator
from laulima.hub.service import HubService
from laulima.hub.settings import HubSettings

__all__ = [
    "Admin",
    "BlobsDep",
    "Caller",
    "CallerDep",
    "CurrentSite",
    "HubContext",
    "HubDep",
    "OrchestratorDep",
    "ServiceDep",
    "SettingsDep",
    "Unauthorized",
    "error_status",
]


class Unauthorized(ProtocolError):
    status = 401
    code = "unauthorized"


def error_status(exc: LaulimaError) -> tuple[int, str]:
    """HTTP status and error code of a Laulima error: the one mapping the API uses."""
    if isinstance(exc, ProtocolError):
        return exc.status, exc.code
    if isinstance(exc, WeightsError):
        return 422, "invalid_weights"
    if isinstance(exc, DataError):
        return 422, "invalid_data"
    if isinstance(exc, SpecError):
        return 422, "invalid_spec"
    if isinstance(exc, ConfigurationError):
        return 422, "invalid_configuration"
    return 400, "bad_request"


@dataclass
class HubContext:
    """The parts of one running hub, created by the app's lifespan."""

    settings: HubSettings
    engine: Engine
    sessions: SessionFactory
    blobs: BlobStore
    service: HubService
    orchestrator: Orchestrator
    board: TaskBoard
    admin_token: str = field(repr=False)
    clock: Callable[[], float] = time.time


@dataclass(frozen=True)
class Caller:
    """Who sent a request that both sites and the operator may send."""

    site: Site | None
    admin: bool


def get_hub(request: Request) -> HubContext:
    return request.app.state.hub  # type: ignore[no-any-return]


HubDep = Annotated[HubContext, Depends(get_hub)]


def get_settings(hub: HubDep) -> HubSettings:
    return hub.settings


def get_service(hub: HubDep) -> HubService:
    return hub.service


def get_blobs(hub: HubDep) -> BlobStore:
    return hub.blobs


def get_orchestrator(hub: HubDep) -> Orchestrator:
    return hub.orchestrator


SettingsDep = Annotated[HubSettings, Depends(get_settings)]
ServiceDep = Annotated[HubService, Depends(get_service)]
BlobsDep = Annotated[BlobStore, Depends(get_blobs)]
OrchestratorDep = Annotated[Orchestrator, Depends(get_orchestrator)]


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("missing bearer token; send 'Authorization: Bearer <token>'")
    return token.strip()


def _is_admin(hub: HubContext, token: str) -> bool:
    return hmac.compare_digest(token.encode(), hub.admin_token.encode())


def current_site(request: Request, hub: HubDep) -> Site:
    token = _bearer(request)
    site = hub.service.authenticate_site(token)
    if site is None:
        if _is_admin(hub, token):
            raise Forbidden("this endpoint is for sites; the operator's token cannot act as a site")
        raise Unauthorized("unknown site token; use the token printed when the site was registered")
    return site


def require_admin(request: Request, hub: HubDep) -> None:
    token = _bearer(request)
    if _is_admin(hub, token):
        return
    if hub.service.authenticate_site(token) is not None:
        raise Forbidden("this endpoint needs the operator's token; site tokens cannot use it")
    raise Unauthorized(
        f"invalid operator token; use LAULIMA_HUB_ADMIN_TOKEN or the token in {hub.settings.admin_token_file}"
    )


def current_caller(request: Request, hub: HubDep) -> Caller:
    token = _bearer(request)
    if _is_admin(hub, token):
        return Caller(site=None, admin=True)
    site = hub.service.authenticate_site(token)
    if site is None:
        raise Unauthorized("unknown token; use a site token or the operator's token")
    return Caller(site=site, admin=False)


CurrentSite = Annotated[Site, Depends(current_site)]
Admin = Annotated[None, Depends(require_admin)]
CallerDep = Annotated[Caller, Depends(current_caller)]
