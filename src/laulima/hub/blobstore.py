"""Content-addressed blob storage for weights: streamed in, hashed on the way, never rewritten.

A tiny interface (:class:`BlobStore`, :class:`BlobWriter`) with two stores: this module's
:class:`LocalBlobStore` and the S3-compatible :class:`laulima.hub.s3blobs.S3BlobStore`.
Blobs are named by the sha256 of their plaintext; a writer (:class:`SpoolWriter`, both
stores) streams into a local temporary file, and only :meth:`BlobWriter.commit` makes the
blob visible, atomically, so a crash never leaves a half-written blob under a valid name.

At rest every blob is sealed (:mod:`laulima.hub.sealed`: AES-GCM segments, a key per
experiment, keys outside the blob folder); :meth:`BlobStore.open` reads the plaintext back
with random access, authenticating each segment it touches.

Content addressing means a new upload may find its bytes already stored and write nothing,
while a clean-up decided, from the database, to delete that very blob. So a commit *pins*
its digest until the writer is closed (after the caller wrote the database row that refers
to it), and :meth:`BlobStore.delete` skips pinned digests and, under the same lock, asks
the database (``in_use``) whether a row refers to the blob now.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import re
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import AsyncIterable, Callable, Collection, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Protocol

import anyio

from laulima.errors import NotFound, PayloadTooLarge, ProtocolError, RequestTimeout
from laulima.hub.sealed import BlobIntegrityError, Keyring, SealedReader, SealingFile, plain_size

__all__ = [
    "UPLOAD_KEY",
    "VerifiedVersions",
    "BlobGuard",
    "BlobIntegrityError",
    "BlobStore",
    "BlobWriter",
    "LocalBlobStore",
    "SpoolWriter",
    "check_digest",
    "experiment_key",
    "receive_into",
]

UPLOAD_KEY = "uploads"
"""Key of blobs uploaded before any experiment exists (a scientist's initial weights)."""


def experiment_key(experiment_id: int) -> str:
    """Key id of everything an experiment produces: updates, global models, strategy state."""
    return f"experiment-{int(experiment_id)}"


BATCH_BYTES = 1024 * 1024
"""Request chunks are handed to a worker thread in batches this big (hash + write there)."""

_DIGEST = re.compile(r"^[0-9a-f]{64}$")


def check_digest(digest: str) -> str:
    """Refuse anything but 64 lowercase hex characters before it reaches a file name."""
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
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
        """The uncommitted (sealed) file, on local disk whatever the store."""

    @abstractmethod
    def reader(self) -> SealedReader:
        """The plaintext written so far, for validation before ``commit`` (ends writing)."""

    @abstractmethod
    def commit(self) -> tuple[str, int]:
        """Make the blob durable and visible; returns ``(digest, size)``.

        The digest stays pinned (:meth:`BlobStore.pin`) until the writer is closed: keep it
        open until the database row that refers to the blob is written (or has failed)."""

    @property
    @abstractmethod
    def created(self) -> bool:
        """True if ``commit`` stored a new file; False if identical content was already there."""

    @abstractmethod
    def abort(self) -> None:
        """Forget everything written (after ``commit``: release its pin); safe to call twice."""

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.abort()


class BlobStore(ABC):
    """Where weights live, addressed by sha256."""

    @abstractmethod
    def writer(self, key_id: str = UPLOAD_KEY) -> BlobWriter: ...

    @abstractmethod
    def open(self, digest: str) -> SealedReader:
        """The blob's plaintext, seekable; every segment read is authenticated (``NotFound`` when absent)."""

    @abstractmethod
    def size(self, digest: str) -> int:
        """Plaintext size, without decrypting anything (``NotFound`` when absent)."""

    @abstractmethod
    def verify(self, digest: str) -> None:
        """Decrypt it all and check its sha256; raises :class:`BlobIntegrityError`."""

    @abstractmethod
    def exists(self, digest: str) -> bool: ...

    @abstractmethod
    def delete(self, digest: str) -> bool:
        """Remove a blob unless it is pinned or in use; False if nothing was removed."""

    @abstractmethod
    def pin(self, digest: str) -> None:
        """Keep ``digest`` from :meth:`delete` until as many :meth:`unpin` calls (pins nest)."""

    @abstractmethod
    def unpin(self, digest: str) -> None: ...

    @abstractmethod
    def is_pinned(self, digest: str) -> bool: ...

    @contextmanager
    def pinned(self, digest: str) -> Iterator[str]:
        """``digest`` cannot be deleted inside this block (e.g. while a row referring to it
        is being written)."""
        self.pin(digest)
        try:
            yield digest
        finally:
            self.unpin(digest)

    @abstractmethod
    def stored(self) -> Iterator[tuple[str, float]]:
        """Every stored blob as ``(digest, unix time it was stored)``: what clean-up scans."""

    def put_bytes(self, data: bytes) -> str:
        with self.writer() as w:
            w.write(data)
            digest, _ = w.commit()
        return digest

    def read_bytes(self, digest: str) -> bytes:
        with self.open(digest) as f:
            return f.readall()


SPOOL_PREFIX = "upload-"
"""Name prefix of writers' temporary files; a store removes leftovers of a killed process at start."""

STALE_SPOOL_S = 24 * 3600.0
"""With several hub processes sharing a spool folder, a spool file this old is a killed writer's."""


class BlobGuard(Protocol):
    """Pins and deletes checked in the database, for stores shared by several hub processes
    (:class:`laulima.hub.blob_guard.DatabaseBlobGuard`)."""

    def pin(self, digest: str) -> None:
        """Record a pin; it must be durable before the caller looks whether the blob is stored."""

    def unpin(self, digest: str) -> None: ...

    def delete_unless_in_use(self, digest: str, remove: Callable[[], bool]) -> bool:
        """Call ``remove`` unless a pin (of any process) or a row keeps the blob."""
        ...

    def forget_stale(self) -> int:
        """Remove pins left by processes that died (the clean-up calls it)."""
        ...


class VerifiedVersions:
    """Versions of blobs (a store's stamp: digest plus what changes when the stored bytes are
    replaced) whose plaintext was found to hash to their name: a download decrypts a blob in
    full once per version, not every time."""

    def __init__(self, limit: int = 10_000) -> None:
        self._seen: set[tuple[object, ...]] = set()
        self._lock = threading.Lock()
        self._limit = limit

    def check(
        self, stamp: tuple[object, ...], digest: str, open_blob: Callable[[str], SealedReader], where: str
    ) -> None:
        """Raise :class:`BlobIntegrityError` (naming ``where`` it was replaced) unless this
        version was checked before or hashes to ``digest`` now."""
        with self._lock:
            if stamp in self._seen:
                return
        with open_blob(digest) as f:
            actual = f.sha256()
        if actual != digest:
            raise BlobIntegrityError(
                f"blob {digest[:12]}: decrypts to content with sha256 {actual[:12]}…, not its name; {where}. "
                "It is not used; tell the federation operator",
                digest=digest,
            )
        with self._lock:
            if len(self._seen) > self._limit:
                self._seen.clear()
            self._seen.add(stamp)


def remove_spools(folder: Path, *, older_than_s: float) -> None:
    """Remove writers' temporary files older than ``older_than_s`` (0: all) from ``folder``."""
    cutoff = time.time() - older_than_s
    for spool in folder.glob(SPOOL_PREFIX + "*"):
        try:
            if older_than_s <= 0 or spool.stat().st_mtime < cutoff:
                spool.unlink(missing_ok=True)
        except FileNotFoundError:
            continue


class SpoolWriter(BlobWriter):
    """Seals and hashes a blob into a temporary file in ``tmp_dir``; ``commit`` hands that
    finished file to ``publish(path, digest)``, which stores it (or finds the digest already
    stored), removes the file, pins ``digest`` and says whether it stored a new blob."""

    def __init__(
        self,
        tmp_dir: Path,
        keyring: Keyring,
        key_id: str,
        *,
        publish: Callable[[Path, str], bool],
        unpin: Callable[[str], None],
        durable: bool = True,
    ) -> None:
        self._publish, self._unpin, self._durable = publish, unpin, durable
        self._keyring = keyring
        fd, name = tempfile.mkstemp(dir=tmp_dir, prefix=SPOOL_PREFIX)
        self._path = Path(name)
        self._file: io.RawIOBase | None = os.fdopen(fd, "wb", buffering=0)
        try:
            self._sealed = SealingFile(self._file, keyring, key_id)
        except BaseException:
            self._file.close()
            self._path.unlink(missing_ok=True)
            raise
        self._hash = hashlib.sha256()
        self._size = 0
        self._done = False
        self._created = False
        self._pinned: str | None = None

    def write(self, chunk: bytes | memoryview) -> None:
        if self._file is None or self._sealed.finished:
            raise RuntimeError("blob writer is closed")
        self._hash.update(chunk)
        self._sealed.write(chunk)
        self._size += len(chunk)

    def reader(self) -> SealedReader:
        if self._file is None:
            raise RuntimeError("blob writer is closed")
        self._sealed.finish()
        return SealedReader(self._path, self._keyring, name=self._hash.hexdigest())

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
        self._sealed.finish()
        if self._durable:
            os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        digest = self._hash.hexdigest()
        try:
            self._created = self._publish(self._path, digest)  # pins digest
        except BaseException:
            self._path.unlink(missing_ok=True)
            self._done = True
            raise
        self._pinned, self._done = digest, True
        return digest, self._size

    @property
    def created(self) -> bool:
        return self._created

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if not self._done:
            self._path.unlink(missing_ok=True)
            self._done = True
        if self._pinned is not None:
            digest, self._pinned = self._pinned, None
            self._unpin(digest)


class LocalBlobStore(BlobStore):
    """Blobs under ``root/blobs/ab/cdef…``; uploads in progress under ``root/tmp``; keys in
    ``key_dir`` (default ``root/keys``). ``in_use(digests)`` returns those of ``digests``
    the database still refers to; :meth:`delete` keeps them (the hub passes
    :func:`laulima.hub.housekeeping.live_references`). With ``guard`` (several hub processes
    sharing the folder) pins and the last check before a delete go through the database
    instead (:class:`BlobGuard`), and only old leftovers of killed writers are removed at
    start: another process's uploads may be in progress. Never call :meth:`delete` or
    :meth:`pin` inside a database transaction: both open their own."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        key_dir: str | os.PathLike[str] | None = None,
        *,
        in_use: Callable[[Collection[str]], Collection[str]] | None = None,
        guard: BlobGuard | None = None,
    ) -> None:
        self.root = Path(root)
        self._in_use = in_use
        self._guard = guard
        self._pins: Counter[str] = Counter()
        self._pin_lock = threading.Lock()
        """Taken by commit (existence check, rename, pin), unpin and delete (pin and database check, unlink)."""
        self.keyring = Keyring(key_dir if key_dir is not None else self.root / "keys")
        self._verified = VerifiedVersions()
        self.blob_dir = self.root / "blobs"
        self.tmp_dir = self.root / "tmp"
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        remove_spools(self.tmp_dir, older_than_s=STALE_SPOOL_S if guard is not None else 0.0)

    def path_for(self, digest: str) -> Path:
        check_digest(digest)
        return self.blob_dir / digest[:2] / digest[2:]

    def writer(self, key_id: str = UPLOAD_KEY) -> BlobWriter:
        return SpoolWriter(self.tmp_dir, self.keyring, key_id, publish=self._publish, unpin=self.unpin)

    def open(self, digest: str) -> SealedReader:
        return SealedReader(self.path(digest), self.keyring, name=digest)

    def size(self, digest: str) -> int:
        return plain_size(self.path(digest))

    def verify(self, digest: str) -> None:
        """Checked once per file version (name, mtime, size); a later change is checked again."""
        path = self.path(digest)
        st = path.stat()
        self._verified.check(
            (digest, st.st_mtime_ns, st.st_size), digest, self.open, "the file was replaced on the hub's disk"
        )

    def path(self, digest: str) -> Path:
        """The local file holding the (sealed) blob (raises ``NotFound`` when absent)."""
        path = self.path_for(digest)
        if not path.is_file():
            raise NotFound(f"no blob with digest {digest}", digest=digest)
        return path

    def exists(self, digest: str) -> bool:
        return self.path_for(digest).is_file()

    def delete(self, digest: str) -> bool:
        path = self.path_for(digest)

        def unlink() -> bool:
            try:
                path.unlink()
            except FileNotFoundError:
                return False
            return True

        with self._pin_lock:
            if self._pins[digest] > 0:
                return False
            if self._guard is not None:
                return self._guard.delete_unless_in_use(digest, unlink)
            if self._in_use is not None and digest in self._in_use([digest]):
                return False
            return unlink()

    def pin(self, digest: str) -> None:
        check_digest(digest)
        if self._guard is not None:
            self._guard.pin(digest)
        with self._pin_lock:
            self._pins[digest] += 1

    def is_pinned(self, digest: str) -> bool:
        with self._pin_lock:
            return self._pins[digest] > 0

    def unpin(self, digest: str) -> None:
        with self._pin_lock:
            left = self._pins[digest] - 1
            if left > 0:
                self._pins[digest] = left
            else:
                self._pins.pop(digest, None)
        if self._guard is not None:
            self._guard.unpin(digest)

    def stored(self) -> Iterator[tuple[str, float]]:
        for folder in sorted(self.blob_dir.iterdir()):
            if not folder.is_dir() or len(folder.name) != 2:
                continue
            for path in sorted(folder.iterdir()):
                digest = folder.name + path.name
                if not _DIGEST.fullmatch(digest):
                    continue
                try:
                    yield digest, path.stat().st_mtime
                except FileNotFoundError:  # deleted meanwhile
                    continue

    def _publish(self, temp: Path, digest: str) -> bool:
        """Move a finished upload to its name, or drop it if identical content is there;
        either way pin ``digest``, atomically with the existence check (with a guard, the
        database's pin is written before the check). True if new."""
        target = self.path_for(digest)
        if self._guard is not None:
            self._guard.pin(digest)
        try:
            with self._pin_lock:
                created = not target.exists()
                if created:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(temp, target)
                else:
                    temp.unlink(missing_ok=True)
                self._pins[digest] += 1
        except BaseException:
            if self._guard is not None:
                self._guard.unpin(digest)
            raise
        if created:
            _fsync_dir(target.parent)
        return created


async def receive_into(
    writer: BlobWriter, chunks: AsyncIterable[bytes], *, limit: int, what: str, stall_s: float | None = None
) -> int:
    """Stream an HTTP body into ``writer``; refuse (413) once it exceeds ``limit`` bytes, and
    (408) when the client sends nothing for ``stall_s`` seconds.

    Hashing, sealing and writing happen in a worker thread, a batch at a time, so the event
    loop does no per-chunk work beyond collecting chunks, and that work overlaps with receiving.
    """
    batch: list[bytes] = []
    buffered = total = 0
    job: asyncio.Task[None] | None = None
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(stall_s) as watchdog:  # one timer, moved on at each chunk
            async for chunk in chunks:
                if stall_s is not None:
                    watchdog.reschedule(loop.time() + stall_s)
                total += len(chunk)
                if total > limit:
                    raise PayloadTooLarge(
                        f"{what}: body exceeds the limit of {limit} bytes; stopped reading", limit=limit
                    )
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
    except TimeoutError as exc:
        raise RequestTimeout(
            f"{what}: nothing received for {stall_s:g} s after {total} bytes; upload aborted", size=total
        ) from exc
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
