"""Weights in and out, streamed: sites read their tasks' models, scientists upload models.

Blobs are sealed at rest; a download is verified against its sha256 (once per stored file)
before its first byte is sent, then decrypted segment by segment as it streams, so a
tampered file is refused with a clear error instead of a broken transfer.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any
from urllib.parse import quote

import anyio
from fastapi import APIRouter, Request, status
from fastapi.responses import StreamingResponse

from laulima.core.protocol import BlobCreated, Header
from laulima.errors import Forbidden, PayloadTooLarge, ProtocolError, WeightsError
from laulima.hub.api.deps import BlobsDep, CallerDep, HubDep, Scientist, SettingsDep
from laulima.hub.blobstore import BlobStore, BlobWriter, check_digest, receive_into

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
    size = blobs.size(digest)

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
async def get_blob(digest: str, caller: CallerDep, hub: HubDep) -> BlobFile:
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
    try:
        return await blob_response(hub.blobs, digest, slot=slot)
    except BaseException:
        if slot is not None:
            slot.__exit__(None, None, None)
        raise


@router.put(
    "/blobs",
    status_code=status.HTTP_201_CREATED,
    openapi_extra={
        "requestBody": {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}
    },
)
async def put_blob(request: Request, _: Scientist, blobs: BlobsDep, settings: SettingsDep) -> BlobCreated:
    what = "blob upload"
    check_content_length(request, settings.max_upload_bytes, what)
    with blobs.writer() as writer:
        await receive_into(
            writer, request.stream(), limit=settings.max_upload_bytes, what=what, stall_s=settings.body_timeout_s
        )
        check_claimed_digest(request, writer, what)
        digest, size = await anyio.to_thread.run_sync(writer.commit)
    return BlobCreated(digest=digest, size=size)
