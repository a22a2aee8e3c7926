"""People's API tokens, for the operator: create one per person and role, list, revoke."""

from __future__ import annotations

from fastapi import APIRouter, status

from laulima.core.protocol import TokenCreate, TokenCreated, TokenPublic
from laulima.hub.api.deps import Operator, RowId, ServiceDep

__all__ = ["router"]

router = APIRouter(prefix="/tokens", tags=["tokens"])


@router.post("", status_code=status.HTTP_201_CREATED)
def create_token(body: TokenCreate, _: Operator, service: ServiceDep) -> TokenCreated:
    """A new token for ``name`` with ``role``; the token is in this answer only."""
    return service.create_token(body)


@router.get("")
def list_tokens(_: Operator, service: ServiceDep) -> list[TokenPublic]:
    return service.list_tokens()


@router.post("/{token_id}/revoke")
def revoke_token(token_id: RowId, _: Operator, service: ServiceDep) -> TokenPublic:
    return service.revoke_token(token_id)
