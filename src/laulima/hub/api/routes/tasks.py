"""The site side of a round: fetch the next task (long poll), send its result or its failure.

Every refused result is recorded in ``refusals`` and answered with a 4xx saying why.
Uploads stream into the blob store and are validated before they count.
"""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Annotated

import anyio
from fastapi import APIRouter, Query, Request, Response, status
from fastapi.responses import JSONResponse

from laulima.core.protocol import EvaluationResult, Header, TaskFailure, TaskKind, TaskPublic, UploadAccepted
from laulima.errors import LaulimaError
from laulima.hub.api.deps import CurrentSite, HubContext, HubDep, error_status
from laulima.hub.api.routes.blobs import check_claimed_digest, check_content_length
from laulima.hub.blobstore import experiment_key, receive_into
from laulima.hub.db import Site
from laulima.hub.service import spec_of
from laulima.hub.validation import upload_limit, validate_update_file

__all__ = ["router"]

router = APIRouter(tags=["tasks"])


@router.get(
    "/tasks/next",
    response_model=TaskPublic,
    responses={204: {"description": "No task arrived within `wait` seconds"}},
)
async def next_task(
    site: CurrentSite,
    hub: HubDep,
    wait: Annotated[float, Query(ge=0, description="Seconds to wait for a task (capped at the hub's limit)")] = 0.0,
) -> Response:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + min(wait, hub.settings.long_poll_max_s)
    while True:
        seen = hub.board.generation(site.name)
        task = await anyio.to_thread.run_sync(hub.service.next_task, site.id)
        if task is not None:
            return JSONResponse(task.model_dump(mode="json"))
        remaining = deadline - loop.time()
        if remaining <= 0 or not await hub.board.wait(site.name, seen, remaining):
            return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.put(
    "/tasks/{task_id}/update",
    openapi_extra={
        "requestBody": {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}
    },
)
async def upload_update(task_id: str, request: Request, site: CurrentSite, hub: HubDep) -> UploadAccepted:
    hub.limits.take_upload(site.name)  # 429 before anything is read or recorded
    with hub.limits.transfer(site.name):
        try:
            accepted = await _receive_update(task_id, request, site, hub)
        except LaulimaError as exc:
            await anyio.to_thread.run_sync(partial(_refuse, hub, site, task_id, exc))
            raise
    hub.orchestrator.wake()
    return accepted


@router.post("/tasks/{task_id}/evaluation", status_code=status.HTTP_204_NO_CONTENT)
def post_evaluation(task_id: str, body: EvaluationResult, site: CurrentSite, hub: HubDep) -> None:
    try:
        hub.service.record_evaluation(task_id, site, body)
    except LaulimaError as exc:
        _refuse(hub, site, task_id, exc)
        raise
    hub.orchestrator.wake()


@router.post("/tasks/{task_id}/failure", status_code=status.HTTP_204_NO_CONTENT)
def post_failure(task_id: str, body: TaskFailure, site: CurrentSite, hub: HubDep) -> None:
    try:
        hub.service.record_failure(task_id, site, body)
    except LaulimaError as exc:
        _refuse(hub, site, task_id, exc)
        raise
    hub.orchestrator.wake()


async def _receive_update(task_id: str, request: Request, site: Site, hub: HubContext) -> UploadAccepted:
    svc, run = hub.service, anyio.to_thread.run_sync
    nonce = request.headers.get(Header.UPLOAD_NONCE, "")
    what = f"update for task {task_id}"
    task, exp = await run(partial(svc.check_result, task_id, site, kind=TaskKind.TRAIN, nonce=nonce))
    blobs, global_digest = hub.blobs, task.weights_digest
    limit = upload_limit(blobs.size(global_digest), hub.settings.max_upload_bytes)
    check_content_length(request, limit, what)
    spec = spec_of(exp)
    with blobs.writer(experiment_key(exp.id)) as writer:
        await receive_into(writer, request.stream(), limit=limit, what=what, stall_s=hub.settings.body_timeout_s)
        check_claimed_digest(request, writer, what)
        valid = await run(
            partial(
                validate_update_file,
                writer.reader,
                global_path=lambda: blobs.open(global_digest),
                task_id=task_id,
                max_update_norm=spec.max_update_norm,
            )
        )
        digest, _ = await run(writer.commit)
    return await run(
        partial(
            svc.record_update,
            task_id,
            site,
            nonce=nonce,
            digest=digest,
            n_samples=valid.n_samples,
            metrics=valid.metrics,
        )
    )


def _refuse(hub: HubContext, site: Site, task_id: str, exc: LaulimaError) -> None:
    status_code, _ = error_status(exc)
    hub.service.record_refusal(site=site.name, task_id=task_id[:64], status=status_code, reason=str(exc))
