"""The site side of a round: fetch the next task (long poll), send its result or its failure.

Every refused result is recorded in ``refusals`` and answered with a 4xx saying why. When
the result itself is unacceptable (invalid weights, over ``max_update_norm``, an evaluation
with non-finite metrics) the site's task also ends there, so its round is decided at once
instead of waiting for the deadline. Uploads stream into the blob store and are validated
before they count.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from functools import partial
from typing import Annotated, TypeVar

import anyio
from fastapi import APIRouter, Path, Query, Request, Response, status
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from laulima.core.fingerprint import MAX_FINGERPRINT_BYTES, SiteFingerprint
from laulima.core.protocol import (
    EvaluationResult,
    Header,
    TaskFailure,
    TaskKind,
    TaskPublic,
    TaskWaiting,
    UploadAccepted,
)
from laulima.errors import DataError, LaulimaError, PayloadTooLarge
from laulima.hub.api.deps import CurrentSite, HubContext, HubDep, error_status
from laulima.hub.api.routes.blobs import check_claimed_digest, check_content_length
from laulima.hub.blobstore import experiment_key, receive_into
from laulima.hub.db import Site
from laulima.hub.secure_rounds import secagg_config
from laulima.hub.service import spec_of
from laulima.hub.validation import model_length, upload_limit, validate_masked_update_file, validate_update_file

__all__ = ["router"]

router = APIRouter(tags=["tasks"])

TaskId = Annotated[str, Path(pattern=r"^[0-9a-f]{32}$", description="A task id as the hub issued it")]
"""Malformed ids are answered 422 before anything is looked up or recorded."""

_VERSION = re.compile(r"^[\w.+-]{1,64}$")
Body = TypeVar("Body", EvaluationResult, TaskFailure, SiteFingerprint)


def _json_body(model: type[EvaluationResult] | type[TaskFailure] | type[SiteFingerprint]) -> dict[str, object]:
    """OpenAPI for a JSON body a route parses itself (to record what it refuses)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


@router.get(
    "/tasks/next",
    response_model=TaskPublic,
    responses={204: {"description": "No task arrived within `wait` seconds"}},
)
async def next_task(
    request: Request,
    site: CurrentSite,
    hub: HubDep,
    wait: Annotated[
        float, Query(ge=0, le=3600, allow_inf_nan=False, description="Seconds to wait (capped at the hub's limit)")
    ] = 0.0,
) -> Response:
    version = request.headers.get(Header.VERSION)
    version = version if version is not None and _VERSION.fullmatch(version) else None
    if not hub.service.heard_lately(site, hub.clock()):
        hub.orchestrator.wake(sites_changed=True)  # back online: experiments waiting for sites look again
    loop = asyncio.get_running_loop()
    deadline = loop.time() + min(wait, hub.settings.long_poll_max_s)
    with hub.limits.poll(site.name):
        while True:
            seen = hub.board.generation(site.name)
            task = await anyio.to_thread.run_sync(partial(hub.service.next_task, site.id, version=version))
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
async def upload_update(task_id: TaskId, request: Request, site: CurrentSite, hub: HubDep) -> UploadAccepted:
    hub.limits.take_upload(site.name)  # 429 before anything is read or recorded
    with hub.limits.transfer(site.name):
        try:
            accepted = await _receive_update(task_id, request, site, hub)
        except LaulimaError as exc:
            await anyio.to_thread.run_sync(partial(_refuse, hub, site, task_id, exc))
            raise
    hub.orchestrator.wake()
    return accepted


@router.post(
    "/tasks/{task_id}/evaluation", status_code=status.HTTP_204_NO_CONTENT, openapi_extra=_json_body(EvaluationResult)
)
async def post_evaluation(task_id: TaskId, request: Request, site: CurrentSite, hub: HubDep) -> Response:
    record, what = hub.service.record_evaluation, f"evaluation of task {task_id}"
    return await _json_result(task_id, request, site, hub, TaskKind.EVALUATE, EvaluationResult, record, what)


@router.post(
    "/tasks/{task_id}/fingerprint", status_code=status.HTTP_204_NO_CONTENT, openapi_extra=_json_body(SiteFingerprint)
)
async def post_fingerprint(task_id: TaskId, request: Request, site: CurrentSite, hub: HubDep) -> Response:
    """The site's dataset fingerprint for a FINGERPRINT task (laulima.core.fingerprint), at most
    MAX_FINGERPRINT_BYTES; anything malformed, non-finite or inconsistent is refused (422 or
    413) and ends the task, as a bad evaluation does."""
    record, what = hub.service.record_fingerprint, f"fingerprint of task {task_id}"
    return await _json_result(
        task_id,
        request,
        site,
        hub,
        TaskKind.FINGERPRINT,
        SiteFingerprint,
        record,
        what,
        max_bytes=MAX_FINGERPRINT_BYTES,
    )


@router.post("/tasks/{task_id}/failure", status_code=status.HTTP_204_NO_CONTENT, openapi_extra=_json_body(TaskFailure))
async def post_failure(task_id: TaskId, request: Request, site: CurrentSite, hub: HubDep) -> Response:
    record, what = hub.service.record_failure, f"failure report of task {task_id}"
    return await _json_result(task_id, request, site, hub, None, TaskFailure, record, what)


@router.put("/tasks/{task_id}/waiting", status_code=status.HTTP_204_NO_CONTENT)
async def put_waiting(task_id: TaskId, body: TaskWaiting, site: CurrentSite, hub: HubDep) -> Response:
    """The site holds this open task for its administrator's approval, and says why. The hub
    stops handing it out (it would block the site's queue) and its round waits for it until the
    experiment's approval deadline; the scientist sees the reason at once."""
    await anyio.to_thread.run_sync(hub.service.set_task_waiting, task_id, site, body.reason)
    hub.orchestrator.wake()
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/tasks/{task_id}/resume", response_model=TaskPublic)
async def resume_task(task_id: TaskId, site: CurrentSite, hub: HubDep) -> Response:
    """The administrator approved: the task runs now, with a fresh time budget (the answer's
    ``seconds_left``). 409 when the task can no longer run (round closed, experiment stopped)."""
    task = await anyio.to_thread.run_sync(hub.service.resume_task, task_id, site)
    hub.orchestrator.wake()
    return JSONResponse(task.model_dump(mode="json"))


async def _json_result(
    task_id: str,
    request: Request,
    site: Site,
    hub: HubContext,
    kind: TaskKind | None,
    model: type[Body],
    record: Callable[[str, Site, Body], None],
    what: str,
    *,
    max_bytes: int | None = None,
) -> Response:
    """Check the task first (a body sent to the wrong task must not end that task), then
    parse and record the body; any refusal is recorded, and ends the task if the body was bad.
    ``max_bytes``: a bound below the hub's ``max_json_bytes`` for this kind of body."""
    run = anyio.to_thread.run_sync
    try:
        await run(partial(hub.service.check_result, task_id, site, kind=kind, nonce=None))
        if max_bytes is not None:
            check_content_length(request, max_bytes, what)
        raw = await request.body()
        if max_bytes is not None and len(raw) > max_bytes:
            raise PayloadTooLarge(f"{what}: body of {len(raw)} bytes exceeds {max_bytes} bytes", where=what)
        body = _parse(model, raw, what)
        await run(record, task_id, site, body)
    except LaulimaError as exc:
        await run(partial(_refuse, hub, site, task_id, exc))
        raise
    hub.orchestrator.wake()
    return Response(status_code=status.HTTP_204_NO_CONTENT)


def _parse(model: type[Body], raw: bytes, what: str) -> Body:
    """The body as ``model``; anything else is a DataError naming the first bad field."""
    try:
        return model.model_validate_json(raw)
    except (ValidationError, RecursionError, ValueError) as exc:
        if isinstance(exc, ValidationError):
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "body"
            more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
            reason = f"field '{where}': {err['msg']}{more}"
        else:
            reason = "not a JSON object of the expected shape"
        raise DataError(f"{what}: {reason}; send a {model.__name__} as documented in the API", where=what) from exc


async def _receive_update(task_id: str, request: Request, site: Site, hub: HubContext) -> UploadAccepted:
    svc, run = hub.service, anyio.to_thread.run_sync
    nonce = request.headers.get(Header.UPLOAD_NONCE, "")
    what = f"update for task {task_id}"
    task, exp = await run(partial(svc.check_result, task_id, site, kind=TaskKind.TRAIN, nonce=nonce))
    blobs, global_digest = hub.blobs, task.weights_digest
    limit = upload_limit(await run(blobs.size, global_digest), hub.settings.max_upload_bytes)  # S3: a request
    check_content_length(request, limit, what)
    spec = spec_of(exp)
    max_n, bound_reason = await run(partial(_sample_bound, hub, site.name, spec.dataset, spec.max_samples_per_site))
    masked = secagg_config(task)
    if masked is not None:  # secure aggregation: only while the round is at its masking phase
        await run(hub.orchestrator.secure.check_masking, task_id, site)
        if max_n is None or masked.max_weight < max_n:
            max_n, bound_reason = masked.max_weight, "the weight cap of this round's secure aggregation"
    with blobs.writer(experiment_key(exp.id)) as writer:
        await receive_into(writer, request.stream(), limit=limit, what=what, stall_s=hub.settings.body_timeout_s)
        check_claimed_digest(request, writer, what)
        if masked is not None:
            validate = partial(
                validate_masked_update_file,
                writer.reader,
                length=await run(model_length, lambda: blobs.open(global_digest)),
                task_id=task_id,
                max_n_samples=max_n,
                bound_reason=bound_reason,
            )
        else:
            validate = partial(
                validate_update_file,
                writer.reader,
                global_path=lambda: blobs.open(global_digest),
                task_id=task_id,
                # A local-only model is never aggregated, and trains for many rounds' budget at
                # once: the per-round bound on a step away from the global model does not apply.
                max_update_norm=spec.max_update_norm if task.model is None else None,
                max_n_samples=max_n,
                bound_reason=bound_reason,
            )
        valid = await run(validate)
        digest, _ = await run(writer.commit)
        # Inside the writer: the digest stays pinned until its row is written (blobstore.py).
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


def _sample_bound(hub: HubContext, site: str, dataset: str, spec_cap: int | None) -> tuple[int | None, str | None]:
    """The most samples ``site`` may claim for one update, and where that bound comes from:
    the cases it reported for the dataset, or the spec's ``max_samples_per_site``
    (validate_update_file adds the hub's own N_SAMPLES_MAX)."""
    bounds = [] if spec_cap is None else [(spec_cap, "the experiment's max_samples_per_site")]
    cases = hub.service.reported_cases(site, dataset)
    if cases is not None:
        bounds.append((cases, f"the {cases} cases site {site!r} reported for dataset {dataset!r}"))
    return min(bounds) if bounds else (None, None)


#: Refusals of the result itself: the site sent something that will never be accepted, so
#: its part in the round ends now. A 403/404/408/409/429 leaves the task as it is.
_CONTENT_REFUSALS = (DataError, PayloadTooLarge)


def _refuse(hub: HubContext, site: Site, task_id: str, exc: LaulimaError) -> None:
    status_code, _ = error_status(exc)
    ended = hub.service.record_refusal(
        site=site, task_id=task_id, status=status_code, reason=str(exc), ends_task=isinstance(exc, _CONTENT_REFUSALS)
    )
    if ended:
        exc.context["task_closed"] = True  # the site need not report the task's failure itself
        hub.orchestrator.wake()
