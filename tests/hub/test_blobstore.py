"""The blob folder's own rules: where a blob lies, and no path tricks.

What every store must do (atomic commits, no leftovers, pins, deletes that ask the database,
listing) is tested on the folder and on S3 alike in ``test_s3_blobstore.py``."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from laulima.errors import NotFound, ProtocolError
from laulima.hub.blobstore import LocalBlobStore


def test_streamed_blob_is_named_by_its_sha256(tmp_path: Path):
    store = LocalBlobStore(tmp_path)
    with store.writer() as w:
        w.write(b"hello ")
        w.write_many([b"wor", memoryview(b"ld")])
        digest, size = w.commit()
    assert digest == hashlib.sha256(b"hello world").hexdigest() and size == 11
    assert store.path(digest) == tmp_path / "blobs" / digest[:2] / digest[2:]
    assert store.read_bytes(digest) == b"hello world" and store.size(digest) == 11 and store.exists(digest)
    assert store.put_bytes(b"hello world") == digest  # identical content: fine
    assert list((tmp_path / "tmp").iterdir()) == []


@pytest.mark.parametrize("digest", ["../../etc/passwd", "AB" * 32, "ab" * 31, "ab" * 32 + "/x", ""])
def test_digests_are_checked_before_touching_the_filesystem(tmp_path: Path, digest: str):
    store = LocalBlobStore(tmp_path)
    with pytest.raises(ProtocolError, match="not a blob digest"):
        store.path(digest)


def test_missing_blob_is_not_found(tmp_path: Path):
    with pytest.raises(NotFound):
        LocalBlobStore(tmp_path).path("0" * 64)
