"""The hub's blob storage seen from outside the hub: a disk or a bucket changed behind its back.

Tests that damage, lose or inspect stored blobs use this, so they run on the blob folder and
on S3 alike (``--hub-backend``). It reads the hub's settings (as the test set them) and goes
to the files or objects directly, never through the hub's own store.
"""

from __future__ import annotations

from pathlib import Path

from laulima.hub.s3blobs import parse_store_url
from laulima.hub.settings import HubSettings

__all__ = ["StoredBlobs"]


class StoredBlobs:
    def __init__(self, settings: HubSettings) -> None:
        self.settings = settings
        self.s3 = None
        if settings.blob_store_url:
            import boto3

            self.location = parse_store_url(settings.blob_store_url)
            self.s3 = boto3.client("s3", endpoint_url=settings.s3_endpoint_url)

    def _path(self, digest: str) -> Path:
        return self.settings.home / "blobs" / digest[:2] / digest[2:]

    def _key(self, digest: str) -> str:
        return f"{self.location.prefix}blobs/{digest}"

    def exists(self, digest: str) -> bool:
        if self.s3 is None:
            return self._path(digest).is_file()
        found = self.s3.list_objects_v2(Bucket=self.location.bucket, Prefix=self._key(digest))
        return any(o["Key"] == self._key(digest) for o in found.get("Contents", []))

    def read(self, digest: str) -> bytes:
        """The stored (sealed) bytes."""
        if self.s3 is None:
            return self._path(digest).read_bytes()
        return bytes(self.s3.get_object(Bucket=self.location.bucket, Key=self._key(digest))["Body"].read())

    def write(self, digest: str, data: bytes) -> None:
        """Replace what is stored under ``digest`` (a disk or bucket tampered with)."""
        if self.s3 is None:
            self._path(digest).write_bytes(data)
        else:
            self.s3.put_object(Bucket=self.location.bucket, Key=self._key(digest), Body=data)

    def delete(self, digest: str) -> None:
        """The storage lost it."""
        if self.s3 is None:
            self._path(digest).unlink()
        else:
            self.s3.delete_object(Bucket=self.location.bucket, Key=self._key(digest))

    def flip(self, digest: str, offset: int) -> None:
        """Flip one bit of the stored bytes at ``offset`` (negative: from the end)."""
        data = bytearray(self.read(digest))
        data[offset] ^= 0x01
        self.write(digest, bytes(data))

    def names(self) -> list[str]:
        """Everything stored where the blobs live (relative names), to check nothing else is there."""
        if self.s3 is None:
            root = self.settings.home / "blobs"
            return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
        prefix = f"{self.location.prefix}blobs/"
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.location.bucket, Prefix=prefix)
        return sorted(o["Key"][len(prefix) :] for page in pages for o in page.get("Contents", []))
