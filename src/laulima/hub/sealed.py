"""Blobs encrypted at rest: AES-256-GCM in 1 MiB segments, random access, keys kept apart.

File format (one blob)::

    header   "LLBLOB01" | segment size (u32) | key id length (u8) | key id | salt (16 bytes)
    segment  ciphertext of up to `segment size` plaintext bytes | GCM tag (16 bytes)
    ...      (the last segment may be shorter, even empty)

Each file gets its own AES key, derived with HKDF-SHA256 from the key named in its header
and the file's random salt; segment ``i`` uses the nonce ``i`` (11 bytes) followed by a
final-segment flag, and every segment authenticates the whole header. So segments cannot
be reordered, swapped between files, truncated or extended without a tag failure, and any
plaintext range can be read by decrypting only the segments it touches (the orchestrator
reads updates tensor by tensor). Memory per open blob: one segment.

A :class:`SealedReader` reads any seekable raw file: a local file, or an object store's
ranged reads (:mod:`laulima.hub.s3blobs`). Before reading segments it tells such a source
which byte span it is about to need (``advise(start, end)``, when the source has it), so a
remote source can fetch a tensor's segments, or a long sequential read, in few requests.

Keys are 32 random bytes in ``key_dir/<key id>.key`` (mode 0600, the folder 0700), outside
the blob folder: a copy of the blob folder alone (a backup, a stolen disk image of that
volume) reveals no weights. The blob's name stays the sha256 of its *plaintext*, so sites
verify exactly what they get.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from laulima.errors import ConfigurationError, LaulimaError

__all__ = [
    "HEADER_MAX_BYTES",
    "MAGIC",
    "SEGMENT_BYTES",
    "BlobIntegrityError",
    "Keyring",
    "SealedReader",
    "SealingFile",
    "plain_size",
    "sealed_plain_size",
]

MAGIC = b"LLBLOB01"
SEGMENT_BYTES = 256 * 1024
"""Plaintext per segment: small enough that twenty concurrent transfers hold little memory
(one segment in, one out per stream), large enough that the 16-byte tags and per-segment
calls cost nothing measurable."""
TAG_BYTES = 16
SALT_BYTES = 16
_KEY_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_FIXED = struct.Struct(">8sIB")
HEADER_MAX_BYTES = _FIXED.size + 255 + SALT_BYTES
"""No header is longer: enough bytes from a file's start to know its layout."""


class BlobIntegrityError(LaulimaError):
    """A stored blob failed authentication: its file was altered or damaged on disk."""


class Keyring:
    """Named 256-bit keys under ``key_dir``, created on first use."""

    def __init__(self, key_dir: str | os.PathLike[str]) -> None:
        self.dir = Path(key_dir)
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.dir, 0o700)
        self._cache: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def key(self, key_id: str, *, create: bool = False) -> bytes:
        if not _KEY_ID.fullmatch(key_id):
            raise ConfigurationError(f"blob key id {key_id!r} is not valid", field="key_id")
        with self._lock:
            if key_id in self._cache:
                return self._cache[key_id]
            path = self.dir / f"{key_id}.key"
            if create and not path.exists():
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                except FileExistsError:
                    pass
                else:
                    with os.fdopen(fd, "wb") as f:
                        f.write(os.urandom(32))
                        f.flush()
                        os.fsync(f.fileno())
            try:
                key = path.read_bytes()
            except FileNotFoundError as exc:
                raise BlobIntegrityError(
                    f"blob key {key_id!r} is missing from {self.dir}; blobs sealed with it cannot be read. "
                    "Restore the key folder from its backup",
                    key_id=key_id,
                ) from exc
            if len(key) != 32:
                raise BlobIntegrityError(f"blob key file {path} is damaged (not 32 bytes)", key_id=key_id)
            self._cache[key_id] = key
            return key


def _header(key_id: str, salt: bytes, segment: int) -> bytes:
    kid = key_id.encode("ascii")
    return _FIXED.pack(MAGIC, segment, len(kid)) + kid + salt


def _aead(key: bytes, salt: bytes) -> AESGCM:
    derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=b"laulima blob v1").derive(key)
    return AESGCM(derived)


def _nonce(index: int, final: bool) -> bytes:
    return index.to_bytes(11, "big") + (b"\x01" if final else b"\x00")


def _read_header(f: io.RawIOBase | io.BufferedIOBase | BinaryIO, where: str) -> tuple[str, bytes, int, bytes]:
    """(key id, salt, segment size, raw header) of an open sealed file."""
    fixed = f.read(_FIXED.size) or b""
    if len(fixed) != _FIXED.size:
        raise BlobIntegrityError(f"{where}: too short to be a sealed blob", where=where)
    magic, segment, kid_len = _FIXED.unpack(fixed)
    if magic != MAGIC or not 0 < segment <= 64 * SEGMENT_BYTES:
        raise BlobIntegrityError(f"{where}: not a sealed blob (bad header)", where=where)
    rest = f.read(kid_len + SALT_BYTES) or b""
    if len(rest) != kid_len + SALT_BYTES:
        raise BlobIntegrityError(f"{where}: header ends early", where=where)
    try:
        key_id = rest[:kid_len].decode("ascii")
    except UnicodeDecodeError as exc:
        raise BlobIntegrityError(f"{where}: bad key id in header", where=where) from exc
    return key_id, rest[kid_len:], segment, fixed + rest


def _layout(file_size: int, header_len: int, segment: int) -> tuple[int, int]:
    """(number of segments, plaintext size) of a sealed file of ``file_size`` bytes."""
    body = file_size - header_len
    stride = segment + TAG_BYTES
    if body < TAG_BYTES:
        return 0, -1
    n = (body + stride - 1) // stride
    last = body - (n - 1) * stride
    if last < TAG_BYTES:
        return 0, -1
    return n, body - n * TAG_BYTES


def plain_size(path: Path) -> int:
    """Plaintext size of a sealed file, from its header and length (nothing decrypted)."""
    with open(path, "rb", buffering=0) as f:
        head = f.read(HEADER_MAX_BYTES) or b""
        size = os.fstat(f.fileno()).st_size
    return sealed_plain_size(head, size, name=path.name)


def sealed_plain_size(head: bytes, file_size: int, *, name: str) -> int:
    """Plaintext size of a sealed file of ``file_size`` bytes that starts with ``head`` (its
    first :data:`HEADER_MAX_BYTES` bytes, or all of it if shorter): for stores that cannot
    stat a local file."""
    _, _, segment, header = _read_header(io.BytesIO(head), f"blob {name[:12]}")
    n, plain = _layout(file_size, len(header), segment)
    if n == 0:
        raise BlobIntegrityError(f"blob {name[:12]}: truncated sealed file", where=name)
    return plain


class SealingFile:
    """Writes plaintext into a sealed file, one segment at a time; ``finish`` seals the last."""

    def __init__(self, raw: io.RawIOBase, keyring: Keyring, key_id: str, segment: int = SEGMENT_BYTES) -> None:
        self._raw = raw
        self._segment = segment
        salt = os.urandom(SALT_BYTES)
        self._aead = _aead(keyring.key(key_id, create=True), salt)
        self._header = _header(key_id, salt, segment)
        self._buf = bytearray(segment)
        self._fill = 0
        self._index = 0
        self.finished = False
        self._put(self._header)

    def _put(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            n = self._raw.write(view)
            view = view[n or 0 :]

    def write(self, chunk: bytes | memoryview) -> None:
        """Copy into one fixed segment buffer; seal each full segment once more data follows
        (the last segment is sealed by :meth:`finish`, with the final flag)."""
        if self.finished:
            raise RuntimeError("sealed file already finished")
        src = memoryview(chunk).cast("B")
        seg = self._segment
        while src:
            if self._fill == seg:
                self._put(self._aead.encrypt(_nonce(self._index, False), self._buf, self._header))
                self._index += 1
                self._fill = 0
            n = min(seg - self._fill, len(src))
            self._buf[self._fill : self._fill + n] = src[:n]
            self._fill += n
            src = src[n:]

    def finish(self) -> None:
        if not self.finished:
            last = memoryview(self._buf)[: self._fill]
            self._put(self._aead.encrypt(_nonce(self._index, True), bytes(last), self._header))
            last.release()
            self._buf = bytearray()
            self.finished = True


RawSource = io.RawIOBase | io.BufferedIOBase | BinaryIO
"""A seekable binary file positioned at its start; it may have ``advise(start, end)``."""


class SealedReader(io.RawIOBase):
    """A sealed blob read as its plaintext: seekable, authenticated segment by segment.

    ``source`` is a path, or an open seekable binary file (at its start) that the reader
    then owns and closes."""

    def __init__(
        self, source: str | os.PathLike[str] | RawSource, keyring: Keyring, *, name: str | None = None
    ) -> None:
        super().__init__()
        if isinstance(source, str | os.PathLike):
            self.path: Path | None = Path(source)
            self._f: RawSource = open(self.path, "rb", buffering=0)  # noqa: SIM115 - closed by close()
        else:
            self.path, self._f = None, source
        self.name = name or (self.path.name if self.path is not None else str(getattr(source, "name", "blob")))
        self._advise = getattr(self._f, "advise", None)
        try:
            key_id, salt, self._segment, self._header = _read_header(self._f, self._where)
            self.key_id = key_id
            self._aead = _aead(keyring.key(key_id), salt)
            self._file_size = self._f.seek(0, io.SEEK_END)
            self._n, self.size = _layout(self._file_size, len(self._header), self._segment)
            if self._n == 0:
                raise BlobIntegrityError(f"{self._where}: truncated sealed file", where=self.name)
        except BaseException:
            self._f.close()
            raise
        self._pos = 0
        self._cached: tuple[int, bytes] | None = None

    @property
    def _where(self) -> str:
        return f"blob {self.name[:12]}"

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def _will_read(self, first: int, last: int) -> None:
        """Tell the source that segments ``first..last`` are about to be read."""
        if self._advise is not None and first <= last:
            stride = self._segment + TAG_BYTES
            start = len(self._header) + first * stride
            self._advise(start, min(start + (last - first + 1) * stride, self._file_size))

    def _plain(self, index: int) -> bytes:
        if self._cached is not None and self._cached[0] == index:
            return self._cached[1]
        stride = self._segment + TAG_BYTES
        self._f.seek(len(self._header) + index * stride)
        data = _read_full(self._f, stride)
        final = index == self._n - 1
        try:
            plain = self._aead.decrypt(_nonce(index, final), data, self._header)
        except InvalidTag as exc:
            raise BlobIntegrityError(
                f"{self._where}: segment {index + 1} of {self._n} failed authentication — the stored file was "
                "altered or damaged on the hub's disk; it is not used. Tell the federation operator",
                where=self.name,
                segment=index,
            ) from exc
        self._cached = (index, plain)
        return plain

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(b).cast("B")
        done = 0
        if view and self._pos < self.size:
            last = min(self._pos + len(view), self.size) - 1
            first = self._pos // self._segment
            if self._cached is not None and self._cached[0] == first:
                first += 1
            self._will_read(first, last // self._segment)
        while done < len(view) and self._pos < self.size:
            index, offset = divmod(self._pos, self._segment)
            plain = self._plain(index)
            n = min(len(plain) - offset, len(view) - done)
            view[done : done + n] = plain[offset : offset + n]
            done += n
            self._pos += n
        return done

    def segments(self) -> tuple[int, int]:
        return self._n, self._segment

    def readall(self) -> bytes:
        """The rest of the plaintext, announced to the source as one span."""
        out = bytearray(max(self.size - self._pos, 0))
        n = self.readinto(out)
        del out[n:]
        return bytes(out)

    def iter_segments(self) -> Iterator[bytes]:
        """Plaintext in segment-sized pieces from the start (for streaming responses)."""
        self._will_read(0, self._n - 1)
        for index in range(self._n):
            yield self._plain(index)
            self._cached = None

    def close(self) -> None:
        if not self.closed:
            self._f.close()
            self._cached = None
        super().close()

    def sha256(self) -> str:
        h = hashlib.sha256()
        for piece in self.iter_segments():
            h.update(piece)
        return h.hexdigest()


def _read_full(f: RawSource, n: int) -> bytes:
    """Up to ``n`` bytes, fewer only at the end of the file (a raw read may return less)."""
    data = f.read(n) or b""
    if len(data) == n or not data:
        return data
    parts = [data]
    got = len(data)
    while got < n:
        more = f.read(n - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)
