"""The hub's blob store, chosen by its settings: the local folder, or an S3-compatible bucket."""

from __future__ import annotations

from collections.abc import Callable, Collection

from laulima.hub.blobstore import BlobGuard, BlobStore, LocalBlobStore
from laulima.hub.settings import HubSettings

__all__ = ["open_blob_store"]


def open_blob_store(
    settings: HubSettings,
    *,
    in_use: Callable[[Collection[str]], Collection[str]] | None = None,
    guard: BlobGuard | None = None,
) -> BlobStore:
    """``LocalBlobStore`` under ``home`` unless ``blob_store_url`` names a bucket; either way
    the keys stay in ``key_dir`` and uploads are spooled under ``home/tmp``. An S3 store
    checks its bucket now, so a wrong endpoint, bucket or credential stops the hub at start.
    ``guard``: pins and deletes checked in the database (several hub processes)."""
    assert settings.key_dir is not None  # filled in by HubSettings
    if settings.blob_store_url is None:
        return LocalBlobStore(settings.home, key_dir=settings.key_dir, in_use=in_use, guard=guard)
    from laulima.hub.s3blobs import S3BlobStore  # boto3 only when a bucket is configured

    return S3BlobStore(
        settings.blob_store_url,
        key_dir=settings.key_dir,
        spool_dir=settings.home / "tmp",
        endpoint_url=settings.s3_endpoint_url,
        region=settings.s3_region,
        in_use=in_use,
        guard=guard,
    )
