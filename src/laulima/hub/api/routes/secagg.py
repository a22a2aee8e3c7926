"""Secure aggregation's phases, site side: keys, shares, unmasking (hub/secure_rounds.py).

The masked update itself goes through ``PUT /tasks/{id}/update``. Reads long-poll: they answer
200 with the phase's result once the phase closed, or 202 with where the round stands after
``wait`` seconds. A site left out of a phase, or a round that was aborted, gets 409 saying why.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from functools import partial
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Query, Response, status
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from laulima.core.privacy.messages import (
    Advertisement,
    Roster,
    SecAggPhase,
    ShareInbox,
    ShareOutbox,
    Unmasking,
    UnmaskingAnswer,
)
from laulima.errors import Conflict
from laulima.hub.api.deps import CurrentSite, HubContext, HubDep
from laulima.hub.api.routes.tasks import TaskId
from laulima.hub.db import Site

__all__ = ["router"]

router = APIRouter(tags=["secure aggregation"])

Wait = Annotated[float, Query(ge=0, le=3600, allow_inf_nan=False, description="Seconds to wait for the phase")]
_PENDING: dict[int | str, dict[str, Any]] = {
    202: {"model": SecAggPhase, "description": "The phase is still open; where the round stands"}
}


@router.post("/tasks/{task_id}/secagg/keys", status_code=status.HTTP_204_NO_CONTENT)
async def advertise(task_id: TaskId, body: Advertisement, site: CurrentSite, hub: HubDep) -> Response:
    await anyio.to_thread.run_sync(hub.orchestrator.secure.advertise, task_id, site, body)
    hub.orchestrator.wake()
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/tasks/{task_id}/secagg/roster", response_model=Roster, responses=_PENDING)
async def roster(task_id: TaskId, site: CurrentSite, hub: HubDep, wait: Wait = 0.0) -> Response:
    return await _long_poll(hub, site, wait, partial(hub.orchestrator.secure.roster, task_id, site))


@router.post("/tasks/{task_id}/secagg/shares", status_code=status.HTTP_204_NO_CONTENT)
async def post_shares(task_id: TaskId, body: ShareOutbox, site: CurrentSite, hub: HubDep) -> Response:
    await anyio.to_thread.run_sync(hub.orchestrator.secure.post_shares, task_id, site, body)
    hub.orchestrator.wake()
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/tasks/{task_id}/secagg/shares", response_model=ShareInbox, responses=_PENDING)
async def inbox(task_id: TaskId, site: CurrentSite, hub: HubDep, wait: Wait = 0.0) -> Response:
    return await _long_poll(hub, site, wait, partial(hub.orchestrator.secure.inbox, task_id, site))


@router.get("/tasks/{task_id}/secagg/unmasking", response_model=Unmasking, responses=_PENDING)
async def unmasking(task_id: TaskId, site: CurrentSite, hub: HubDep, wait: Wait = 0.0) -> Response:
    return await _long_poll(hub, site, wait, partial(hub.orchestrator.secure.unmasking, task_id, site))


@router.post("/tasks/{task_id}/secagg/unmasking", status_code=status.HTTP_204_NO_CONTENT)
async def answer(task_id: TaskId, body: UnmaskingAnswer, site: CurrentSite, hub: HubDep) -> Response:
    await anyio.to_thread.run_sync(hub.orchestrator.secure.answer, task_id, site, body)
    hub.orchestrator.wake()
    return Response(status_code=status.HTTP_204_NO_CONTENT)


async def _long_poll(
    hub: HubContext, site: Site, wait: float, read: Callable[[], BaseModel]
) -> Response:
    """Ask ``read`` until it gives the phase's result, the round is aborted, or ``wait`` ends;
    the orchestrator wakes this site's waiters whenever a phase changes."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + min(wait, hub.settings.long_poll_max_s)
    with hub.limits.poll(site.name):
        while True:
            seen = hub.board.generation(site.name)
            result = await anyio.to_thread.run_sync(read)
            if not isinstance(result, SecAggPhase):
                return JSONResponse(result.model_dump(mode="json"))
            if result.phase == "aborted":
                raise Conflict(f"secure aggregation, {result.reason}")
            remaining = deadline - loop.time()
            # Phase changes come from the orchestrator's thread, which wakes the board; the
            # short cap covers a change this request's read raced with.
            if remaining <= 0:
                return JSONResponse(result.model_dump(mode="json"), status_code=status.HTTP_202_ACCEPTED)
            await hub.board.wait(site.name, seen, min(remaining, 1.0))
