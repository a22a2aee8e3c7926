"""Blobs in an S3-compatible object store (AWS S3, MinIO, Ceph RGW), as safe as the local folder.

The objects are the local store's files under another roof: ``<prefix>blobs/<sha256 of the
plaintext>``, sealed exactly as on disk (:mod:`laulima.hub.sealed`, same ``LLBLOB01`` format),
with the keys in the hub's local ``key_dir``, never in the bucket: the bucket alone (a
replica, a leaked listing, a provider's disk) reveals no weights.

Nothing half-written is ever visible under a valid name. A writer (:class:`SpoolWriter`)
seals into a local temporary file, where validation reads it before anything is sent;
``commit`` then publishes it with one PUT, or a multipart upload with bounded part size and
concurrency. S3 has no rename and needs none: an object appears only when its PUT or
CompleteMultipartUpload succeeds, atomically, whole. A writer killed mid-upload leaves at
most an incomplete multipart upload, invisible under any name; the store aborts its own
stale ones at start (a bucket lifecycle rule ``AbortIncompleteMultipartUpload`` is the
belt to those braces). Publication is conditional (``If-None-Match: *``): where the server
supports it, the first of two identical uploads wins and the second keeps what is there.

Reads are ranged GETs bound to the object's ETag (``If-Match``), so a reader never mixes
two versions: a sequential read fetches large windows, a tensor-by-tensor read fetches
the segments it needs (the reader announces them, :meth:`_RangedObject.advise`); memory
per open blob is one window. Pins are in-process, as in :class:`LocalBlobStore`.

boto3 is an optional extra (``pip install 'laulima[s3]'``), imported only when a store is made.
"""

from __future__ import annotations

import io
import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

from laulima.errors import ConfigurationError, LaulimaError, NotFound, TransportError
from laulima.hub.blobstore import (
    _DIGEST,
    UPLOAD_KEY,
    BlobGuard,
    BlobStore,
    BlobWriter,
    SpoolWriter,
    VerifiedVersions,
    check_digest,
    remove_spools,
)
from laulima.hub.sealed import (
    HEADER_MAX_BYTES,
    SEGMENT_BYTES,
    BlobIntegrityError,
    Keyring,
    SealedReader,
    sealed_plain_size,
)

__all__ = ["S3BlobStore", "S3Location", "check_endpoint_url", "parse_store_url"]

log = logging.getLogger(__name__)

MIB = 1024 * 1024
PART_BYTES = 8 * MIB
"""Multipart part size (S3's minimum is 5 MiB); uploads above it go in parts."""
UPLOAD_CONCURRENCY = 4
"""Parts in flight per upload: bounds an upload's memory and connections."""
WINDOW_BYTES = 8 * MIB
"""Largest ranged GET: a sequential read of a 76 MB blob takes about ten."""
OPEN_BYTES = SEGMENT_BYTES + 64 * 1024
"""First GET of an opened blob: its header and first segment (where a safetensors index is)."""
STALE_UPLOAD_S = 24 * 3600.0
"""Incomplete multipart uploads and spool files older than this are a killed writer's; removed at start."""

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_PREFIX_PART = re.compile(r"^[A-Za-z0-9._-]{1,200}$")
_REGION = re.compile(r"^[a-z0-9-]{1,40}$")
_MISSING = {"NoSuchKey", "404", "NotFound"}
_REFUSED = {
    "AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch",
    "ExpiredToken", "InvalidToken", "TokenRefreshRequired", "AllAccessDisabled",
}  # fmt: skip


@dataclass(frozen=True)
class S3Location:
    """Where blobs live: ``bucket`` and a key ``prefix`` (empty, or ending with ``/``)."""

    bucket: str
    prefix: str = ""

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


def parse_store_url(url: str) -> S3Location:
    """``s3://bucket[/prefix]`` checked: a valid bucket name, a prefix of plain path segments."""
    parts = urlsplit(url.strip())
    usage = "expected s3://bucket or s3://bucket/prefix (unset: blobs in the local folder under home)"
    if parts.scheme != "s3":
        raise ConfigurationError(f"blob_store_url {url!r}: {usage}", field="blob_store_url")
    bucket = parts.netloc
    if (
        not _BUCKET.fullmatch(bucket)
        or ".." in bucket
        or re.fullmatch(r"[0-9.]+", bucket)
        or parts.query
        or parts.fragment
    ):
        raise ConfigurationError(
            f"blob_store_url {url!r}: {bucket!r} is not a valid bucket name (3 to 63 lowercase letters, digits, "
            f"dots and hyphens, starting and ending with a letter or digit); {usage}",
            field="blob_store_url",
        )
    prefix = parts.path.strip("/")
    if prefix and not all(_PREFIX_PART.fullmatch(p) and p not in (".", "..") for p in prefix.split("/")):
        raise ConfigurationError(
            f"blob_store_url {url!r}: the prefix {prefix!r} must be folder names of letters, digits, '.', '_' "
            "and '-' separated by single slashes",
            field="blob_store_url",
        )
    return S3Location(bucket, f"{prefix}/" if prefix else "")


def check_endpoint_url(url: str | None) -> str | None:
    """An ``https://`` endpoint, or ``http://`` on loopback only; never credentials in it."""
    if url is None:
        return None
    from laulima.hub.settings import is_loopback

    url = url.strip().rstrip("/")
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        raise ConfigurationError(f"s3_endpoint_url {url!r}: bad port", field="s3_endpoint_url") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ConfigurationError(
            f"s3_endpoint_url {url!r}: expected https://host[:port] of an S3-compatible server "
            "(unset: AWS's own endpoint)",
            field="s3_endpoint_url",
        )
    if parts.username or parts.password:
        raise ConfigurationError(
            f"s3_endpoint_url for host {parts.hostname!r} contains credentials; remove them and give them as "
            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or an AWS profile (AWS_PROFILE)",
            field="s3_endpoint_url",
        )
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        raise ConfigurationError(
            f"s3_endpoint_url {url!r}: no plaintext off loopback; use https (requests carry signed "
            "credentials and the blob names of every experiment)",
            field="s3_endpoint_url",
        )
    return url


def check_region(region: str | None) -> str | None:
    if region is not None and not _REGION.fullmatch(region.strip()):
        raise ConfigurationError(f"s3_region {region!r} is not a region name (e.g. eu-west-1)", field="s3_region")
    return region.strip() if region is not None else None


def _boto() -> tuple[Any, Any]:
    """The boto3 and botocore modules, imported on first use (an optional extra)."""
    try:
        import boto3
        import boto3.s3.transfer
        import botocore
        import botocore.config
        import botocore.exceptions
    except ImportError as exc:
        raise ConfigurationError(
            "blob_store_url names an S3 bucket, but boto3 is not installed; pip install 'laulima[s3]' "
            "(or unset blob_store_url to keep blobs in the local folder)",
            field="blob_store_url",
        ) from exc
    return boto3, botocore


class _AlreadyStored(Exception):
    """A conditional write found the object there: identical content, published by another writer."""


class S3BlobStore(BlobStore):
    """Blobs in ``s3://bucket/prefix``; keys in ``key_dir``; uploads spooled in ``spool_dir``.

    ``in_use`` and the pins mean what they mean for :class:`LocalBlobStore`; never call
    :meth:`delete` or :meth:`pin` inside a database transaction. The bucket is checked here
    (HeadBucket): a wrong endpoint, bucket or credential stops the hub at start."""

    def __init__(
        self,
        url: str,
        *,
        key_dir: str | Path,
        spool_dir: str | Path,
        endpoint_url: str | None = None,
        region: str | None = None,
        in_use: Callable[[Collection[str]], Collection[str]] | None = None,
        guard: BlobGuard | None = None,
        part_bytes: int = PART_BYTES,
        concurrency: int = UPLOAD_CONCURRENCY,
        window_bytes: int = WINDOW_BYTES,
        stale_upload_s: float = STALE_UPLOAD_S,
    ) -> None:
        if part_bytes < 5 * MIB or concurrency < 1 or window_bytes < SEGMENT_BYTES:
            raise ConfigurationError("S3 part size must be at least 5 MiB, concurrency at least 1, window >= a segment")
        self.location = parse_store_url(url)
        self.endpoint_url = check_endpoint_url(endpoint_url)
        boto3, botocore = _boto()
        self._exc = botocore.exceptions
        self.keyring = Keyring(key_dir)
        self.spool_dir = Path(spool_dir)
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        remove_spools(self.spool_dir, older_than_s=stale_upload_s)  # only old ones: processes share homes
        self._in_use = in_use
        self._guard = guard
        self._window = window_bytes
        self._pins: Counter[str] = Counter()
        self._deleting: set[str] = set()
        self._pin_lock = threading.Condition()
        """Guards pins and deletions in progress: a digest being deleted cannot be pinned until
        the deletion is over, and a pinned digest is not deleted."""
        self._verified = VerifiedVersions()
        custom = self.endpoint_url is not None
        config = botocore.config.Config(
            retries={"mode": "standard", "max_attempts": 3},
            connect_timeout=10,
            read_timeout=60,
            max_pool_connections=64,  # the hub's request threads (40) and the uploads' own share one pool
            # Other S3 servers expect path-style requests and may refuse the newer default checksums.
            s3={"addressing_style": "path"} if custom else None,
            request_checksum_calculation="when_required" if custom else "when_supported",
            response_checksum_validation="when_required" if custom else "when_supported",
        )
        session = boto3.session.Session(region_name=check_region(region))
        self.client = session.client("s3", endpoint_url=self.endpoint_url, config=config)
        for op in ("PutObject", "CompleteMultipartUpload"):  # first writer wins (conditional writes)
            self.client.meta.events.register(f"before-parameter-build.s3.{op}", _if_none_match)
        self._transfer = boto3.s3.transfer.TransferConfig(
            multipart_threshold=part_bytes,
            multipart_chunksize=part_bytes,
            max_concurrency=concurrency,
            use_threads=True,
            preferred_transfer_client="classic",
        )
        self._check_bucket()
        self._abort_stale_uploads(stale_upload_s)

    # -- names and errors ----------------------------------------------------------------
    @property
    def _where(self) -> str:
        return f"bucket {self.location.bucket!r} at {self.client.meta.endpoint_url}"

    def key(self, digest: str) -> str:
        return f"{self.location.prefix}blobs/{check_digest(digest)}"

    @contextmanager
    def _s3(self, action: str, digest: str | None = None) -> Iterator[None]:
        """Every S3 call goes through here: botocore's exceptions become Laulima's."""
        try:
            yield
        except self._exc.ClientError as exc:
            self._raise_client_error(exc, action, digest)
        except (self._exc.NoCredentialsError, self._exc.PartialCredentialsError) as exc:
            raise ConfigurationError(
                f"no S3 credentials for {self._where}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or an AWS "
                "profile (AWS_PROFILE); credentials are never part of the hub's settings",
                bucket=self.location.bucket,
            ) from exc
        except self._exc.BotoCoreError as exc:
            raise TransportError(
                f"{action}: the object store ({self._where}) cannot be reached: {exc}; check that it runs and that "
                "s3_endpoint_url (LAULIMA_HUB_S3_ENDPOINT_URL) names it",
                bucket=self.location.bucket,
            ) from exc

    def _raise_client_error(self, exc: Any, action: str, digest: str | None) -> NoReturn:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket":
            raise self._no_bucket() from exc
        if code in _MISSING and digest is not None:
            raise NotFound(f"no blob with digest {digest}", digest=digest) from exc
        if code in _REFUSED:
            raise ConfigurationError(
                f"{action}: the object store refused this hub's credentials for {self._where} ({code}); give the hub "
                "an identity (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE) allowed s3:ListBucket, "
                "s3:GetObject, s3:PutObject, s3:DeleteObject and s3:AbortMultipartUpload on it",
                bucket=self.location.bucket,
                code=code,
            ) from exc
        raise TransportError(
            f"{action}: the object store ({self._where}) answered {status} {code}: {error.get('Message', '')}",
            bucket=self.location.bucket,
            code=code,
        ) from exc

    def _no_bucket(self) -> ConfigurationError:
        return ConfigurationError(
            f"the bucket {self.location.bucket!r} does not exist at {self.client.meta.endpoint_url}; create it "
            f"(e.g. `aws s3 mb s3://{self.location.bucket} --endpoint-url {self.client.meta.endpoint_url}`) or fix "
            "blob_store_url / s3_endpoint_url (LAULIMA_HUB_BLOB_STORE_URL, LAULIMA_HUB_S3_ENDPOINT_URL)",
            bucket=self.location.bucket,
        )

    def _check_bucket(self) -> None:
        try:
            with self._s3("check the blob bucket"):
                try:
                    self.client.head_bucket(Bucket=self.location.bucket)
                except self._exc.ClientError as exc:
                    if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchBucket", "NotFound"):
                        raise self._no_bucket() from exc
                    raise
        except TransportError as exc:
            raise ConfigurationError(f"blob_store_url {self.location.url}: {exc}", bucket=self.location.bucket) from exc

    def _abort_stale_uploads(self, older_than_s: float) -> None:
        """Abort multipart uploads a killed writer left under our prefix (best effort)."""
        cutoff = time.time() - older_than_s
        try:
            with self._s3("clean up stale uploads"):
                pages = self.client.get_paginator("list_multipart_uploads").paginate(
                    Bucket=self.location.bucket, Prefix=f"{self.location.prefix}blobs/"
                )
                for page in pages:
                    for upload in page.get("Uploads", []):
                        if upload["Initiated"].timestamp() <= cutoff:
                            self.client.abort_multipart_upload(
                                Bucket=self.location.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                            )
        except LaulimaError as exc:
            log.warning("stale multipart uploads in %s not cleaned up: %s", self.location.url, exc)

    # -- objects -----------------------------------------------------------------------
    def _head(self, digest: str) -> tuple[str, int] | None:
        """(ETag, size) of the stored object, None if absent."""
        with self._s3("look up a blob", digest):
            try:
                head = self.client.head_object(Bucket=self.location.bucket, Key=self.key(digest))
            except self._exc.ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in _MISSING:
                    return None
                raise
        return str(head["ETag"]), int(head["ContentLength"])

    def _get(self, digest: str, start: int, end: int, etag: str | None) -> tuple[bytes, int, str]:
        """Bytes ``start:end`` (fewer at the object's end) of the object, its size and ETag.

        With ``etag``, only that version is read: a replaced object fails instead of mixing."""
        args: dict[str, Any] = {
            "Bucket": self.location.bucket,
            "Key": self.key(digest),
            "Range": f"bytes={start}-{end - 1}",
        }
        if etag:
            args["IfMatch"] = etag
        with self._s3("read a blob", digest):
            try:
                reply = self.client.get_object(**args)
            except self._exc.ClientError as exc:
                error = exc.response.get("Error", {})
                if error.get("Code") == "InvalidRange":  # an empty object (or one shorter than start)
                    return b"", int(error.get("ActualObjectSize", 0) or 0), etag or ""
                if error.get("Code") == "PreconditionFailed":
                    raise BlobIntegrityError(
                        f"blob {digest[:12]}: the object was replaced in {self._where} while it was read; "
                        "it is not used. Read it again; if this repeats, tell the federation operator",
                        digest=digest,
                    ) from exc
                raise
            body = reply["Body"]
            try:
                data = body.read(end - start)
            finally:
                body.close()
        total = _total_size(reply.get("ContentRange"), int(reply.get("ContentLength", len(data))))
        if len(data) != max(min(end, total) - start, 0):
            raise BlobIntegrityError(
                f"blob {digest[:12]}: {self._where} sent {len(data)} bytes at offset {start}, not the "
                f"{min(end, total) - start} its size promises; the object was altered or damaged",
                digest=digest,
            )
        return data, total, str(reply.get("ETag", etag or ""))

    def writer(self, key_id: str = UPLOAD_KEY) -> BlobWriter:
        return SpoolWriter(self.spool_dir, self.keyring, key_id, publish=self._publish, unpin=self.unpin, durable=False)

    def _publish(self, spool: Path, digest: str) -> bool:
        """Upload a finished spool unless the digest is stored; pin the digest first, so no
        delete can come between the existence check and the caller's database row."""
        self.pin(digest)
        try:
            if self._head(digest) is not None:
                return False
            try:
                self._upload(spool, digest)
            except _AlreadyStored:
                return False
            return True
        except BaseException:
            self.unpin(digest)
            raise
        finally:
            spool.unlink(missing_ok=True)

    def _upload(self, spool: Path, digest: str) -> None:
        from boto3.s3.transfer import create_transfer_manager

        with self._s3("store a blob", digest):
            try:
                with create_transfer_manager(self.client, self._transfer) as manager:
                    manager.upload(str(spool), self.location.bucket, self.key(digest)).result()
            except self._exc.ClientError as exc:
                if exc.response.get("Error", {}).get("Code") == "PreconditionFailed":
                    raise _AlreadyStored from exc
                raise

    def open(self, digest: str) -> SealedReader:
        return self._open(digest, None)

    def _open(self, digest: str, etag: str | None) -> SealedReader:
        raw = _RangedObject(self, digest, etag)
        return SealedReader(raw, self.keyring, name=digest)

    def size(self, digest: str) -> int:
        head, total, _ = self._get(digest, 0, HEADER_MAX_BYTES, None)
        return sealed_plain_size(head, total, name=digest)

    def verify(self, digest: str) -> None:
        """Checked once per object version (digest, ETag, size); a replaced object is checked again."""
        found = self._head(digest)
        if found is None:
            raise NotFound(f"no blob with digest {digest}", digest=digest)
        self._verified.check(
            (digest, *found), digest, lambda d: self._open(d, found[0]), f"the object was replaced in {self._where}"
        )

    def exists(self, digest: str) -> bool:
        return self._head(digest) is not None

    def delete(self, digest: str) -> bool:
        check_digest(digest)
        with self._pin_lock:
            while digest in self._deleting:
                self._pin_lock.wait()
            if self._pins[digest] > 0:
                return False
            self._deleting.add(digest)  # pins of this digest wait until we are done
        def remove() -> bool:
            if self._head(digest) is None:
                return False
            with self._s3("delete a blob", digest):
                self.client.delete_object(Bucket=self.location.bucket, Key=self.key(digest))
            return True

        try:
            if self._guard is not None:
                return self._guard.delete_unless_in_use(digest, remove)
            if self._in_use is not None and digest in self._in_use([digest]):
                return False
            return remove()
        finally:
            with self._pin_lock:
                self._deleting.discard(digest)
                self._pin_lock.notify_all()

    def pin(self, digest: str) -> None:
        check_digest(digest)
        with self._pin_lock:
            while digest in self._deleting:
                self._pin_lock.wait()
            self._pins[digest] += 1
        if self._guard is not None:  # before the caller looks for the blob (hub/blob_guard.py)
            try:
                self._guard.pin(digest)
            except BaseException:
                self._unpin_here(digest)
                raise

    def is_pinned(self, digest: str) -> bool:
        with self._pin_lock:
            return self._pins[digest] > 0

    def unpin(self, digest: str) -> None:
        self._unpin_here(digest)
        if self._guard is not None:
            self._guard.unpin(digest)

    def _unpin_here(self, digest: str) -> None:
        with self._pin_lock:
            left = self._pins[digest] - 1
            if left > 0:
                self._pins[digest] = left
            else:
                self._pins.pop(digest, None)

    def stored(self) -> Iterator[tuple[str, float]]:
        folder = f"{self.location.prefix}blobs/"
        with self._s3("list the blobs"):
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.location.bucket, Prefix=folder)
            for page in pages:
                for item in page.get("Contents", []):
                    digest = item["Key"][len(folder) :]
                    if _DIGEST.fullmatch(digest):
                        yield digest, item["LastModified"].timestamp()


def _if_none_match(params: dict[str, Any], **_: Any) -> None:
    params.setdefault("IfNoneMatch", "*")


def _total_size(content_range: str | None, length: int) -> int:
    """The object's size from ``bytes a-b/TOTAL``; a server that ignored the range sent it all."""
    if content_range and "/" in content_range:
        total = content_range.rsplit("/", 1)[1]
        if total.isdigit():
            return int(total)
    return length


class _RangedObject(io.RawIOBase):
    """One S3 object as a seekable raw file, read through ranged GETs of at most one window.

    A read continuing the previous fetch (sequential) fetches a whole window; any other
    read fetches what was asked or announced (:meth:`advise`), so random access costs the
    bytes it touches. One window is held at a time."""

    def __init__(self, store: S3BlobStore, digest: str, etag: str | None) -> None:
        super().__init__()
        self.name = digest
        self._store, self._digest = store, digest
        self._limit = store._window
        data, self._size, self._etag = store._get(digest, 0, min(OPEN_BYTES, self._limit), etag)
        self._start, self._data = 0, data
        self._hint = (0, 0)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def advise(self, start: int, end: int) -> None:
        """The caller is about to read ``start:end``: fetch it in as few GETs as the window allows."""
        self._hint = (start, end)

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        if self.closed:
            raise ValueError("I/O operation on closed blob")
        view = memoryview(b).cast("B")
        n = max(min(len(view), self._size - self._pos), 0)
        done = 0
        while done < n:
            at = self._pos + done
            offset = at - self._start
            if not 0 <= offset < len(self._data):
                self._fetch(at, n - done)
                offset = 0
            k = min(n - done, len(self._data) - offset)
            view[done : done + k] = self._data[offset : offset + k]
            done += k
        self._pos += n
        return n

    def _fetch(self, at: int, need: int) -> None:
        end = at + need
        if self._hint[0] <= at < self._hint[1]:
            end = max(end, self._hint[1])
        if at == self._start + len(self._data):  # sequential: read ahead
            end = max(end, at + self._limit)
        end = min(end, at + self._limit, self._size)
        self._data = b""  # one window at a time
        self._data, _, _ = self._store._get(self._digest, at, end, self._etag)
        self._start = at
        if not self._data:
            raise BlobIntegrityError(f"blob {self._digest[:12]}: the object ends early", digest=self._digest)

    def close(self) -> None:
        self._data = b""
        super().close()
