"""Sites, for the operator: register a name ahead of its first contact, list who is known.

On a hub with a CA a site is enrolled by its certificate (``laulima site enroll``) and known
from its first request; registering it here only makes its name usable in specs before
then. In token mode (loopback) registering issues the site's token, shown once.
"""

from __future__ import annotations

from fastapi import APIRouter, status

from laulima.core.protocol import SiteCreate, SiteCreated, SitePublic
from laulima.hub.api.deps import Operator, ServiceDep, SettingsDep

__all__ = ["router"]

router = APIRouter(tags=["sites"])


@router.post("/sites", status_code=status.HTTP_201_CREATED)
def create_site(body: SiteCreate, _: Operator, service: ServiceDep, settings: SettingsDep) -> SiteCreated:
    return service.register_site(body.name, with_token=not settings.tls)


@router.get("/sites")
def list_sites(_: Operator, service: ServiceDep) -> list[SitePublic]:
    return service.list_sites()
