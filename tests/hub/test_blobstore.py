"""The content-addressed blob store: atomic commits, no leftovers, no path tricks."""

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


def test_abort_and_exceptions_leave_nothing_behind(tmp_path: Path):
    store = LocalBlobStore(tmp_path)
    with store.writer() as w:
        w.write(b"partial")
        w.abort()
    with pytest.raises(RuntimeError), store.writer() as w:
        w.write(b"partial")
        raise RuntimeError("client went away")
    assert list((tmp_path / "tmp").iterdir()) == []
    assert not store.exists(hashlib.sha256(b"partial").hexdigest())


@pytest.mark.parametrize("digest", ["../../etc/passwd", "AB" * 32, "ab" * 31, "ab" * 32 + "/x", ""])
def test_digests_are_checked_before_touching_the_filesystem(tmp_path: Path, digest: str):
    store = LocalBlobStore(tmp_path)
    with pytest.raises(ProtocolError, match="not a blob digest"):
        store.path(digest)


def test_missing_blob_is_not_found(tmp_path: Path):
    with pytest.raises(NotFound):
        LocalBlobStore(tmp_path).path("0" * 64)


def test_stored_weights_read_back_lazily_with_every_dtype_and_shape(tmp_path: Path):
    import numpy as np

    from laulima.core.weights import from_safetensors
    from laulima.hub.orchestrator import LazyWeights, store_weights

    store = LocalBlobStore(tmp_path)
    rng = np.random.default_rng(0)
    weights = {
        "half.T": rng.standard_normal((3, 4)).astype(np.float16).T,  # not C-contiguous
        "count": np.array(7, dtype=np.int64),  # 0-d stays 0-d
        "empty": np.zeros((0, 3), np.float32),
        "mask": np.array([True, False, True]),
        "w": rng.standard_normal((2, 5)).astype(np.float32),
    }
    digest = store_weights(store, weights)
    eager = from_safetensors(store.read_bytes(digest))
    lazy = LazyWeights.from_store(store, digest)
    try:
        assert sorted(lazy) == sorted(weights) and len(lazy) == 5
        for name, expected in weights.items():
            for got in (eager[name], lazy[name]):
                assert got.dtype == expected.dtype and got.shape == expected.shape
                np.testing.assert_array_equal(got, expected)
    finally:
        lazy.close()


def test_a_commit_of_content_already_stored_pins_it_until_the_writer_closes(tmp_path: Path):
    """The race: a clean-up deletes a blob that an identical upload just found already stored
    (and so did not write) before that upload's database row refers to it."""
    store = LocalBlobStore(tmp_path)
    digest = store.put_bytes(b"the same update")  # stored earlier, referenced by nothing any more
    with store.writer() as w:
        w.write(b"the same update")
        assert w.commit()[0] == digest and not w.created  # found, not written: the old file is the blob
        assert store.delete(digest) is False  # the clean-up runs now: it must not take the blob
        assert store.read_bytes(digest) == b"the same update"
    assert store.delete(digest) is True  # the writer closed without a row: deletable again
    assert not store.exists(digest)


def test_pins_nest_and_a_new_blob_is_pinned_too(tmp_path: Path):
    store = LocalBlobStore(tmp_path)
    with store.writer() as w:
        w.write(b"new")
        digest, _ = w.commit()
        assert w.created
        with store.pinned(digest):
            assert store.delete(digest) is False
        assert store.delete(digest) is False  # the writer still holds its pin
    with store.pinned(digest), store.pinned(digest):
        pass
    assert store.delete(digest) is True and store.delete(digest) is False


def test_delete_keeps_a_blob_the_database_refers_to_now(tmp_path: Path):
    """A clean-up decides from a query; by the time it deletes, a row may refer to the blob."""
    rows: set[str] = set()
    asked: list[list[str]] = []

    def in_use(digests):
        asked.append(list(digests))
        return rows & set(digests)

    store = LocalBlobStore(tmp_path, in_use=in_use)
    digest = store.put_bytes(b"weights")
    rows.add(digest)
    assert store.delete(digest) is False and store.exists(digest)
    rows.clear()
    assert store.delete(digest) is True and asked == [[digest], [digest]]


def test_stored_lists_every_blob_with_the_time_it_was_stored(tmp_path: Path):
    store = LocalBlobStore(tmp_path)
    digests = sorted(store.put_bytes(bytes([i])) for i in range(3))
    (tmp_path / "blobs" / "zz").mkdir()  # not ours: ignored
    listed = dict(store.stored())
    assert sorted(listed) == digests
    assert all(abs(listed[d] - store.path(d).stat().st_mtime) < 1e-6 for d in digests)
