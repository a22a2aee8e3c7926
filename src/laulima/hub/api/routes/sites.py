"""Sites: the operator registers, lists and removes them; an agent reports what it holds.

On a hub with a CA a site is enrolled by its certificate (``laulima site enroll``) and known
from its first request; registering it here only makes its name usable in specs before
then. In token mode (loopback) registering issues the site's token, shown once. Removing a
site refuses its agent from the next request and cancels its open tasks, so no round waits
for it; registering the name again brings it back.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, status

from laulima.core.protocol import SiteCreate, SiteCreated, SitePublic, SiteReport
from laulima.hub.api.deps import CurrentSite, Operator, OrchestratorDep, ServiceDep, SettingsDep
from laulima.hub.audit import HubAuditDep, HubAuditEvent

__all__ = ["router"]

router = APIRouter(tags=["sites"])

SiteNameParam = Annotated[str, Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", description="A site's name")]


@router.post("/sites", status_code=status.HTTP_201_CREATED)
def create_site(
    body: SiteCreate,
    caller: Operator,
    service: ServiceDep,
    settings: SettingsDep,
    orchestrator: OrchestratorDep,
    audit: HubAuditDep,
) -> SiteCreated:
    audit.require("register a site")
    created = service.register_site(body.name, with_token=not settings.tls)
    audit.record(HubAuditEvent.SITE_REGISTERED, caller, site=created.name)
    orchestrator.wake(sites_changed=True)
    return created


@router.get("/sites")
def list_sites(_: Operator, service: ServiceDep) -> list[SitePublic]:
    """Every site with its status (online, offline, revoked, removed), last contact, agent
    version and the cohort sizes it reported."""
    return service.list_sites()


@router.delete("/sites/{name}")
def remove_site(
    name: SiteNameParam, caller: Operator, service: ServiceDep, orchestrator: OrchestratorDep, audit: HubAuditDep
) -> SitePublic:
    removed = service.remove_site(name)
    audit.record(HubAuditEvent.SITE_REMOVED, caller, site=removed.name)
    orchestrator.wake(sites_changed=True)
    return removed


@router.put("/sites/self/report", status_code=status.HTTP_204_NO_CONTENT)
def report_site(body: SiteReport, site: CurrentSite, service: ServiceDep, orchestrator: OrchestratorDep) -> None:
    """An agent says which version it runs and how many cases each of its datasets holds
    (at start and when its catalog changes). Sample counts it claims later are bounded by these."""
    service.report_site(site.id, body)
    orchestrator.wake(sites_changed=True)
