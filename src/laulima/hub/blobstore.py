"""Content-addressed blob storage for weights: streamed in, hashed on the way, never rewritten.

A tiny interface (:class:`BlobStore`, :class:`BlobWriter`) so an S3-compatible store can
replace :class:`LocalBlobStore` later. Blobs are named by the sha256 of their bytes; a
writer streams into a temporary file, and only :meth:`BlobWriter.commit` makes the blob
visible, atomically, so a crash never leaves a half-written blob under a valid name.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import tempfile
from abc import ABC, abstractmethod
from collections.abc import AsyncIterable, Iterable
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import anyio

from laulima.errors import NotFound, PayloadTooLarge, ProtocolError

__all__ = ["BlobStore", "BlobWriter", "LocalBlobStore", "check_digest", "receive_into"]

BATCH_BYTES = 1024 * 1024
"""Request chunks are handed to a worker thread in batches this big (hash + write there)."""

_DIGEST = re.compile(r"^[0-9a-f]{64}$")


def check_digest(digest: str) -> str:
    """Refuse anything but 64 lowercase hex characters before it reaches a file name."""
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise ProtocolError(
            f"{digest!r} is not a blob digest; expected 64 lowercase hexadecimal characters (sha256)",
            digest=str(digest)[:80],
        )
    return digest


class BlobWriter(ABC):
    """Streams one blob in; ``commit`` publishes it, ``abort`` (or an exception) drops it."""

    @abstractmethod
    def write(self, chunk: bytes | memoryview) -> None: ...

    def write_many(self, chunks: Iterable[bytes | memoryview]) -> None:
        for chunk in chunks:
            self.write(chunk)

    @property
    @abstractmethod
    def size(self) -> int:
        """Bytes written so far."""

    @abstractmethod
    def hexdigest(self) -> str:
        """sha256 of the bytes written so far."""

    @property
    @abstractmethod
    def temp_path(self) -> Path:
        """The uncommitted bytes, readable for validation before ``commit``."""

    @abstractmethod
    def commit(self) -> tuple[str, int]:
        """Make the blob durable and visible; returns ``(digest, size)``."""

    @abstractmethod
    def abort(self) -> None:
        """Forget everything written; safe to call twice or after ``commit``."""

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.abort()


class BlobStore(ABC):
    """Where weights live, addressed by sha256."""

    @abstractmethod
    def writer(self) -> BlobWriter: ...

    @abstractmethod
    def path(self, digest: str) -> Path:
        """A local file holding the blob (raises ``NotFound`` when absent)."""

    @abstractmethod
    def exists(self, digest: str) -> bool: ...

    @abstractmethod
    def delete(self, digest: str) -> bool:
        """Remove a blob; False if it was not there."""

    def put_bytes(self, data: bytes) -> str:
        with self.writer() as w:
            w.write(data)
            digest, _ = w.commit()
        return digest

    def open(self, digest: str) -> BinaryIO:
        return self.path(digest).open("rb")

    def size(self, digest: str) -> int:
        return self.path(digest).stat().st_size

    def read_bytes(self, digest: str) -> bytes:
        return self.path(digest).read_bytes()


class _LocalWriter(BlobWriter):
    def __init__(self, store: LocalBlobStore) -> None:
        self._store = store
        fd, name = tempfile.mkstemp(dir=store.tmp_dir, prefix="upload-")
        self._path = Path(name)
        self._file: BinaryIO | None = os.fdopen(fd, "wb", buffering=0)
        self._hash = hashlib.sha256()
        self._size = 0
        self._done = False

    def write(self, chunk: bytes | memoryview) -> None:
        if self._file is None:
            raise RuntimeError("blob writer is closed")
        self._hash.update(chunk)
        view = memoryview(chunk)
        while view:  # raw files may write less than asked
            n = self._file.write(view)
            view = view[n or 0 :]
        self._size += len(chunk)

    @property
    def size(self) -> int:
        return self._size

    def hexdigest(self) -> str:
        return self._hash.hexdigest()

    @property
    def temp_path(self) -> Path:
        return self._path

    def commit(self) -> tuple[str, int]:
        if self._file is None or self._done:
            raise RuntimeError("blob writer is closed")
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        digest = self._hash.hexdigest()
        target = self._store.path_for(digest)
        if target.exists():  # identical content is already stored
            self._path.unlink(missing_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self._path, target)
            _fsync_dir(target.parent)
        self._done = True
        return digest, self._size

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if not self._done:
            self._path.unlink(missing_ok=True)
            self._done = True


class LocalBlobStore(BlobStore):
    """Blobs under ``root/blobs/ab/cdef…``; uploads in progress under ``root/tmp``."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.blob_dir = self.root / "blobs"
        self.tmp_dir = self.root / "tmp"
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.tmp_dir.glob("upload-*"):  # left behind by a killed process
            stale.unlink(missing_ok=True)

    def path_for(self, digest: str) -> Path:
        check_digest(digest)
        return self.blob_dir / digest[:2] / digest[2:]

    def writer(self) -> BlobWriter:
        return _LocalWriter(self)

    def path(self, digest: str) -> Path:
        path = self.path_for(digest)
        if not path.is_file():
            raise NotFound(f"no blob with digest {digest}", digest=digest)
        return path

    def exists(self, digest: str) -> bool:
        return self.path_for(digest).is_file()

    def delete(self, digest: str) -> bool:
        try:
            self.path_for(digest).unlink()
        except FileNotFoundError:
            return False
        return True


async def receive_into(writer: BlobWriter, chunks: AsyncIterable[bytes], *, limit: int, what: str) -> int:
    """Stream an HTTP body into ``writer``; refuse (413) once it exceeds ``limit`` bytes.

    Hashing and writing happen in a worker thread, a batch at a time, so the event loop
    does no per-chunk work beyond collecting chunks, and hashing overlaps with receiving.
    """
    batch: list[bytes] = []
    buffered = total = 0
    job: asyncio.Task[None] | None = None
    try:
        async for chunk in chunks:
            total += len(chunk)
            if total > limit:
                raise PayloadTooLarge(f"{what}: body exceeds the limit of {limit} bytes; stopped reading", limit=limit)
            batch.append(chunk)
            buffered += len(chunk)
            if buffered >= BATCH_BYTES:
                if job is not None:
                    await job
                job = asyncio.ensure_future(anyio.to_thread.run_sync(writer.write_many, batch))
                batch, buffered = [], 0
        if job is not None:
            await job
            job = None
        if batch:
            await anyio.to_thread.run_sync(writer.write_many, batch)
    finally:
        if job is not None:  # never let the caller abort the writer under a running write
            if not job.done():
                with anyio.CancelScope(shield=True):
                    await asyncio.wait([job])
            if not job.cancelled():
                job.exception()  # retrieved: the exception already propagating wins
    return total


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
