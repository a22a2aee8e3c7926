"""Request dependencies, in one place: the hub's parts, and who is calling.

Three roles (:class:`~laulima.core.protocol.Role`). A **site** is identified by its client
certificate on a hub with a CA (verified by TLS, then checked here on every request: a
Laulima site identity, not expired, not revoked), or by its bearer token on a loopback hub
in token mode. **Operators** and **scientists** are people: they send a bearer API token
whose role the hub looks up by its sha256 (the bootstrap operator token is
``home/admin.token``). Each endpoint states the roles it accepts; a caller with another
role gets 403 naming the role needed, a caller without credentials 401.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Path, Request
from sqlalchemy import Engine

from laulima.core.protocol import Role
from laulima.errors import (
    ConfigurationError,
    DataError,
    Forbidden,
    LaulimaError,
    ProtocolError,
    SpecError,
    WeightsError,
)
from laulima.hub.blobstore import BlobIntegrityError, BlobStore
from laulima.hub.db import SessionFactory, Site
from laulima.hub.notify import TaskBoard
from laulima.hub.orchestrator import Orchestrator
from laulima.hub.ownership import Person
from laulima.hub.service import HubService
from laulima.hub.settings import HubSettings
from laulima.hub.tls import peer_cert_der
from laulima.pki.ca import Identity, RevocationList, identity_of

__all__ = [
    "Admin",
    "Operator",
    "Scientist",
    "BlobsDep",
    "Caller",
    "CallerDep",
    "CurrentSite",
    "HubContext",
    "RowId",
    "HubDep",
    "OrchestratorDep",
    "ServiceDep",
    "SettingsDep",
    "Unauthorized",
    "error_status",
    "person_of_token",
]


RowId = Annotated[int, Path(ge=0, le=2**31 - 1, description="A row id")]
"""A numeric id in a path, bounded so no value can overflow the database's integers (32-bit
ids on PostgreSQL: a larger one would fail there instead of being a 422)."""


class Unauthorized(ProtocolError):
    status = 401
    code = "unauthorized"


def error_status(exc: LaulimaError) -> tuple[int, str]:
    """HTTP status and error code of a Laulima error: the one mapping the API uses."""
    if isinstance(exc, BlobIntegrityError):
        return 500, "blob_integrity"
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
    revocations: RevocationList | None = None
    limits: Any = None
    """The per-site upload limiter (:class:`laulima.hub.limits.SiteLimits`)."""
    _identities: dict[bytes, Identity | None] = field(default_factory=dict, repr=False)

    def identity(self, der: bytes) -> Identity | None:
        """The identity in a (TLS-verified) certificate, parsed once per certificate."""
        if der not in self._identities:
            if len(self._identities) > 4096:
                self._identities.clear()
            self._identities[der] = identity_of(der)
        return self._identities[der]


@dataclass(frozen=True)
class Caller:
    """Who sent a request: a site, or a person with a role."""

    role: Role
    name: str
    site: Site | None = None

    @property
    def admin(self) -> bool:
        return self.role == Role.OPERATOR

    @property
    def person(self) -> Person:
        """A person caller as ownership checks see them (hub/ownership.py)."""
        return Person(self.name, operator=self.admin)


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


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("malformed Authorization header; send 'Authorization: Bearer <token>'")
    return token.strip()


def person_of_token(hub: HubContext, token: str) -> Caller | None:
    """The person (operator or scientist) a bearer token belongs to, or None."""
    if hmac.compare_digest(token.encode(), hub.admin_token.encode()):
        return Caller(Role.OPERATOR, "admin")
    found = hub.service.authenticate_person(token)
    return Caller(found[1], found[0]) if found else None


def _certificate_site(request: Request, hub: HubContext) -> Site | None:
    """The site of the request's verified client certificate; refuses a revoked or expired one."""
    der = peer_cert_der(request.scope)
    if der is None:
        return None
    ident = hub.identity(der)
    if ident is None or ident.kind != "site":
        raise Forbidden("this client certificate names no Laulima site; use the certificate of a site bundle")
    if hub.revocations is not None and hub.revocations.is_revoked(ident.serial):
        raise Forbidden(
            f"certificate refused by the hub: the certificate of site {ident.name!r} (serial {ident.serial:x}) "
            "has been revoked; ask the federation operator for a new enrolment bundle",
            site=ident.name,
            reason="revoked",
        )
    now = hub.clock()
    if now > ident.not_after or now < ident.not_before:
        raise Forbidden(
            f"certificate refused by the hub: the certificate of site {ident.name!r} is not valid now "
            f"(expired or not yet valid); renew it with `laulima ca renew {ident.name}`",
            site=ident.name,
            reason="expired",
        )
    return _present(hub.service.site_by_certificate(ident.name, ident.serial))


def _present(site: Site) -> Site:
    """A site an operator removed is refused until it is registered again."""
    if site.removed_at is not None:
        raise Forbidden(
            f"site {site.name!r} was removed from this federation by an operator; ask the operator to "
            "register it again (`laulima site register`) if it should take part",
            site=site.name,
            reason="removed",
        )
    return site


def _caller(request: Request, hub: HubContext) -> Caller | None:
    """A person by bearer token first (a site never sends one on a TLS hub), else a site."""
    token = _bearer(request)
    if token is not None:
        person = person_of_token(hub, token)
        if person is not None:
            return person
        if not hub.settings.tls:
            site = hub.service.authenticate_site(token)
            if site is not None:
                return Caller(Role.SITE, site.name, _present(site))
        raise Unauthorized(
            "unknown or revoked token; use a token from `laulima token create`, the operator's "
            f"token (LAULIMA_HUB_ADMIN_TOKEN or {hub.settings.admin_token_file})"
            + ("" if hub.settings.tls else ", or a site token")
        )
    if hub.settings.tls:
        site = _certificate_site(request, hub)
        if site is not None:
            return Caller(Role.SITE, site.name, site)
    return None


_NEEDS = {
    Role.OPERATOR: "an operator token",
    Role.SCIENTIST: "a scientist or operator token",
    Role.SITE: "a site's credentials",
}


def _require(*roles: Role) -> Callable[[Request, HubContext], Caller]:
    wanted = set(roles)

    def dependency(request: Request, hub: HubDep) -> Caller:
        caller = _caller(request, hub)
        if caller is not None:  # every authenticated request spends from its caller's bucket
            hub.limits.take_request(f"{'site' if caller.role == Role.SITE else 'person'}:{caller.name}")
        if caller is None:
            if Role.SITE in wanted and hub.settings.tls:
                raise Unauthorized(
                    "no client certificate: this endpoint is for sites, which present the certificate "
                    "of their enrolment bundle (laulima site init BUNDLE)"
                    + (", or for people with an API token" if len(wanted) > 1 else "")
                )
            raise Unauthorized("missing bearer token; send 'Authorization: Bearer <token>'")
        if caller.role in wanted:
            return caller
        if caller.role == Role.OPERATOR and Role.SCIENTIST in wanted:
            return caller
        needed = _NEEDS[Role.SCIENTIST] if Role.SCIENTIST in wanted else _NEEDS[min(wanted)]
        if wanted == {Role.SITE}:
            raise Forbidden(
                f"this endpoint is for sites; a person's token (role {caller.role}) cannot act as a site",
                role_needed="site",
            )
        what = "a site certificate" if caller.role == Role.SITE and hub.settings.tls else f"a {caller.role} credential"
        raise Forbidden(
            f"this endpoint needs {needed}; {what} cannot use it",
            role_needed=sorted(r.value for r in wanted),
            role=caller.role.value,
        )

    return dependency


def current_site(caller: Annotated[Caller, Depends(_require(Role.SITE))]) -> Site:
    assert caller.site is not None
    return caller.site


CurrentSite = Annotated[Site, Depends(current_site)]
Operator = Annotated[Caller, Depends(_require(Role.OPERATOR))]
Scientist = Annotated[Caller, Depends(_require(Role.SCIENTIST))]
Admin = Operator
CallerDep = Annotated[Caller, Depends(_require(Role.SITE, Role.SCIENTIST))]
