"""Site enrollment by the operator: a site's token is shown once, only its hash is kept."""

from __future__ import annotations

from fastapi import APIRouter, status

from laulima.core.protocol import SiteCreate, SiteCreated, SitePublic
from laulima.hub.api.deps import Admin, ServiceDep

__all__ = ["router"]

router = APIRouter(tags=["sites"])


@router.post("/sites", status_code=status.HTTP_201_CREATED)
def create_site(body: SiteCreate, _: Admin, service: ServiceDep) -> SiteCreated:
    return service.register_site(body.name)


@router.get("/sites")
def list_sites(_: Admin, service: ServiceDep) -> list[SitePublic]:
    return service.list_sites()
