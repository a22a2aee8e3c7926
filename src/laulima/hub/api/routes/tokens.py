"""People's API tokens, for the operator: create one per person and role, list, revoke."""

from __future__ import annotations

from fastapi import APIRouter, status

from laulima.core.protocol import TokenCreate, TokenCreated, TokenPublic
from laulima.hub.api.deps import Operator, RowId, ServiceDep
from laulima.hub.audit import HubAuditDep, HubAuditEvent

__all__ = ["router"]

router = APIRouter(prefix="/tokens", tags=["tokens"])


@router.post("", status_code=status.HTTP_201_CREATED)
def create_token(body: TokenCreate, caller: Operator, service: ServiceDep, audit: HubAuditDep) -> TokenCreated:
    """A new token for ``name`` with ``role``; the token is in this answer only."""
    audit.require("create a token")
    created = service.create_token(body)
    audit.record(
        HubAuditEvent.TOKEN_CREATED, caller, token_id=created.id, name=created.name, token_role=created.role.value
    )
    return created


@router.get("")
def list_tokens(_: Operator, service: ServiceDep) -> list[TokenPublic]:
    return service.list_tokens()


@router.post("/{token_id}/revoke")
def revoke_token(token_id: RowId, caller: Operator, service: ServiceDep, audit: HubAuditDep) -> TokenPublic:
    revoked = service.revoke_token(token_id)
    audit.record(HubAuditEvent.TOKEN_REVOKED, caller, token_id=revoked.id, name=revoked.name)
    return revoked
