"""Weights in and out, streamed: sites read their tasks' models, the operator uploads models."""

from __future__ import annotations

from pathlib import Path

import anyio
from fastapi import APIRouter, Request, status
from fastapi.responses import FileResponse

from laulima.core.protocol import BlobCreated, Header
from laulima.errors import Forbidden, PayloadTooLarge, ProtocolError, WeightsError
from laulima.hub.api.deps import Admin, BlobsDep, CallerDep, ServiceDep, SettingsDep
from laulima.hub.blobstore import BlobWriter, check_digest, receive_into

__all__ = ["BlobFile", "blob_response", "check_content_length", "check_claimed_digest", "router"]

router = APIRouter(tags=["blobs"])


class BlobFile(FileResponse):
    """A file response read in 1 MiB chunks: a 76 MB model is ~76 reads, not ~1200, while
    twenty concurrent downloads hold only ~20 MiB of buffers in the hub."""

    chunk_size = 1024 * 1024


def blob_response(path: Path, digest: str, filename: str | None = None) -> BlobFile:
    return BlobFile(
        path,
        media_type="application/octet-stream",
        filename=filename,
        headers={Header.CONTENT_SHA256.value: digest},
    )


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


@router.get("/blobs/{digest}", response_class=BlobFile)
def get_blob(digest: str, caller: CallerDep, service: ServiceDep, blobs: BlobsDep) -> BlobFile:
    check_digest(digest)
    if caller.site is not None and not service.site_may_read(caller.site.id, digest):
        raise Forbidden(
            f"blob {digest} is not the model of any task of site {caller.site.name!r}; "
            "a site may download only the weights its tasks point to",
            digest=digest,
            site=caller.site.name,
        )
    return blob_response(blobs.path(digest), digest)


@router.put("/blobs", status_code=status.HTTP_201_CREATED)
async def put_blob(request: Request, _: Admin, blobs: BlobsDep, settings: SettingsDep) -> BlobCreated:
    what = "blob upload"
    check_content_length(request, settings.max_upload_bytes, what)
    with blobs.writer() as writer:
        await receive_into(writer, request.stream(), limit=settings.max_upload_bytes, what=what)
        check_claimed_digest(request, writer, what)
        digest, size = await anyio.to_thread.run_sync(writer.commit)
    return BlobCreated(digest=digest, size=size)
