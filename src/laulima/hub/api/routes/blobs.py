"""Weights in and out, streamed: sites read their tasks' models, scientists upload models.

Blobs are sealed at rest; a download is verified against its sha256 (once per stored file)
before its first byte is sent, then decrypted segment by segment as it streams, so a
tampered file is refused with a clear error instead of a broken transfer.

A site reads the weights its tasks point to; a person reads what they uploaded and the
models of experiments they may read (:mod:`laulima.hub.ownership`), and anything else is
a 404, existing or not. Each person's upload is recorded, within their quota of uploads
that no experiment uses yet.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from functools import partial
from typing import Any
from urllib.parse import quote

import anyio
from fastapi import APIRouter, Request, status
from fastapi.responses import StreamingResponse

from laulima.core.protocol import BlobCreated, Header
from laulima.errors import Forbidden, NotFound, PayloadTooLarge, ProtocolError, WeightsError
from laulima.hub.api.deps import CallerDep, HubDep, Scientist
from laulima.hub.audit import HubAuditDep, HubAuditEvent
from laulima.hub.blobstore import BlobStore, BlobWriter, check_digest, receive_into
from laulima.hub.ownership import UploadQuota, check_upload_room

__all__ = ["BlobFile", "blob_response", "check_content_length", "check_claimed_digest", "router"]

router = APIRouter(tags=["blobs"])


class BlobFile(StreamingResponse):
    """A blob's plaintext in 1 MiB segments: twenty concurrent downloads of a 76 MB model
    hold only ~20 MiB of buffers in the hub. ``slot`` (a site's transfer slot) is released
    when the response ends, however it ends."""

    media_type = "application/octet-stream"
    slot: AbstractContextManager[object] | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if self.slot is not None:
                self.slot.__exit__(None, None, None)


async def blob_response(
    blobs: BlobStore,
    digest: str,
    filename: str | None = None,
    slot: AbstractContextManager[object] | None = None,
) -> BlobFile:
    """Verify (once per stored file), then stream; ``slot`` is held until the response ends."""
    await anyio.to_thread.run_sync(blobs.verify, digest)
    size = await anyio.to_thread.run_sync(blobs.size, digest)  # on S3 a request: never on the event loop

    def body() -> Iterator[bytes]:
        with blobs.open(digest) as reader:
            yield from reader.iter_segments()  # type: ignore[misc]

    headers = {Header.CONTENT_SHA256.value: digest, "Content-Length": str(size)}
    if filename:
        headers["Content-Disposition"] = f"attachment; filename*=utf-8''{quote(filename)}"
    response = BlobFile(body(), headers=headers)
    response.slot = slot
    return response


def check_content_length(request: Request, limit: int, what: str) -> None:
    """Refuse (413) a declared body above ``limit`` before reading any of it."""
    raw = request.headers.get("content-length")
    if raw is None:
        return
    try:
        declared = int(raw)
    except ValueError as exc:
        raise ProtocolError(f"{what}: Content-Length {raw!r} is not a number") from exc
    if declared > limit:
        raise PayloadTooLarge(
            f"{what}: body of {declared} bytes exceeds the limit of {limit} bytes", limit=limit, size=declared
        )


def check_claimed_digest(request: Request, writer: BlobWriter, what: str) -> None:
    claimed = request.headers.get(Header.CONTENT_SHA256)
    if claimed is not None and claimed.strip().lower() != writer.hexdigest():
        raise WeightsError(
            f"{what}: the body's sha256 is {writer.hexdigest()}, but the request announced {claimed.strip()}; "
            "the body was damaged in transit or the header is wrong — send it again",
            where=what,
        )


@router.get(
    "/blobs/{digest}",
    response_class=BlobFile,
    responses={200: {"content": {"application/octet-stream": {}}, "description": "The blob's bytes"}},
)
async def get_blob(digest: str, caller: CallerDep, hub: HubDep, audit: HubAuditDep) -> BlobFile:
    check_digest(digest)
    slot = None
    if caller.site is not None:
        site = caller.site
        allowed = await anyio.to_thread.run_sync(hub.service.site_may_read, site.id, digest)
        if not allowed:
            raise Forbidden(
                f"blob {digest} is not the model of any task of site {site.name!r}; "
                "a site may download only the weights its tasks point to",
                digest=digest,
                site=site.name,
            )
        slot = hub.limits.transfer(site.name)
    else:
        person = caller.person
        allowed = await anyio.to_thread.run_sync(hub.service.person_may_read_blob, person, digest)
        if not allowed:
            raise NotFound(
                f"no blob {digest} that you may read; a person may download the blobs they uploaded and the "
                "models of experiments they own or that are shared with them",
                digest=digest,
            )
        # A person's download is refused if it cannot be recorded; a site's own task weights never are.
        await anyio.to_thread.run_sync(audit.require, "hand out a blob")
    try:
        response = await blob_response(hub.blobs, digest, slot=slot)
        size = int(response.headers["content-length"])
        record = partial(audit.record, HubAuditEvent.DOWNLOADED, caller, what="blob", digest=digest, bytes=size)
        await anyio.to_thread.run_sync(record)
    except BaseException:
        if slot is not None:
            slot.__exit__(None, None, None)
        raise
    return response


@router.put(
    "/blobs",
    status_code=status.HTTP_201_CREATED,
    openapi_extra={
        "requestBody": {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}
    },
)
async def put_blob(request: Request, caller: Scientist, hub: HubDep, audit: HubAuditDep) -> BlobCreated:
    what = "blob upload"
    settings, run = hub.settings, anyio.to_thread.run_sync
    await run(audit.require, "accept an upload")  # before reading a byte
    quota = UploadQuota(
        settings.person_pending_upload_bytes, settings.person_pending_uploads, settings.unused_upload_ttl_s
    )
    check_content_length(request, settings.max_upload_bytes, what)
    claimed = request.headers.get(Header.CONTENT_SHA256, "").strip().lower() or None  # checked once read
    count, pending = await run(partial(hub.service.pending_uploads, caller.name, besides=claimed))
    check_upload_room(caller.name, count, pending, _declared(request), quota)  # before reading a byte
    limit = min(settings.max_upload_bytes, max(quota.max_bytes - pending, 0))
    with hub.blobs.writer() as writer:
        try:
            await receive_into(writer, request.stream(), limit=limit, what=what, stall_s=settings.body_timeout_s)
        except PayloadTooLarge:
            if limit < settings.max_upload_bytes:  # the quota, not the size limit, stopped it
                check_upload_room(caller.name, count, pending, limit + 1, quota)
            raise
        check_claimed_digest(request, writer, what)
        digest, size = await run(writer.commit)  # pinned until the writer closes: after the row
        try:
            await run(partial(hub.service.record_upload, caller.name, digest, size, quota))
        except BaseException:
            writer.abort()  # unpin, then remove the file if this upload created it and nothing else refers to it
            if writer.created:
                await run(hub.blobs.delete, digest)
            raise
    await run(partial(audit.record, HubAuditEvent.UPLOADED, caller, digest=digest, bytes=size))
    return BlobCreated(digest=digest, size=size)


def _declared(request: Request) -> int:
    """The body's declared size (0 if undeclared or not a number: checked again as it arrives)."""
    raw = request.headers.get("content-length", "")
    return int(raw) if raw.isdigit() else 0
