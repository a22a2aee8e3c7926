"""One router per resource, mounted under the protocol's ``API_PREFIX``."""

from __future__ import annotations

from fastapi import APIRouter

from laulima.hub.api.routes import audit, blobs, experiments, health, secagg, sites, tasks, tokens

__all__ = ["api_router"]

api_router = APIRouter()
for _module in (health, sites, tokens, tasks, secagg, blobs, experiments, audit):
    api_router.include_router(_module.router)
