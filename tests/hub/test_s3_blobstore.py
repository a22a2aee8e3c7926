"""The S3 blob store keeps every promise of the local one, against a real S3 server (moto).

The tests any store must pass run on both :class:`LocalBlobStore` and :class:`S3BlobStore`;
the rest are S3's own: multipart uploads, ranged reads, memory, conditional writes,
a writer killed mid-upload, and the errors of a wrong setting.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pytest

from laulima.errors import ConfigurationError, NotFound, ProtocolError
from laulima.hub.blobstore import BlobStore, LocalBlobStore
from laulima.hub.s3blobs import OPEN_BYTES, S3BlobStore
from laulima.hub.sealed import HEADER_MAX_BYTES, BlobIntegrityError

MIB = 1024 * 1024
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture()
def aws(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Test credentials only: no profile or config file of the machine may leak in."""
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))


def _client(endpoint: str) -> Any:
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


@pytest.fixture()
def bucket(s3_endpoint: str, aws: None) -> str:
    name = f"blobs-{uuid.uuid4().hex[:12]}"
    _client(s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture()
def make_s3(s3_endpoint: str, bucket: str, tmp_path: Path) -> Callable[..., S3BlobStore]:
    def make(**kwargs: Any) -> S3BlobStore:
        return S3BlobStore(
            f"s3://{bucket}/hub-1",
            key_dir=tmp_path / "keys",
            spool_dir=tmp_path / "tmp",
            endpoint_url=s3_endpoint,
            **kwargs,
        )

    return make


@pytest.fixture(params=["local", "s3"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[..., BlobStore]:
    """Either store, made with the same keyword arguments (``in_use``)."""
    if request.param == "local":
        return lambda **kwargs: LocalBlobStore(tmp_path, **kwargs)
    return request.getfixturevalue("make_s3")  # type: ignore[no-any-return]


class Stored:
    """The sealed bytes of a blob as they lie in the store, to alter them as an attacker or a fault would."""

    def __init__(self, store: BlobStore) -> None:
        self.store = store
        if isinstance(store, S3BlobStore):  # a client of its own: the store's publishes are conditional
            self.client = _client(str(store.endpoint_url))

    def read(self, digest: str) -> bytes:
        if isinstance(self.store, LocalBlobStore):
            return self.store.path(digest).read_bytes()
        assert isinstance(self.store, S3BlobStore)
        return bytes(
            self.client.get_object(Bucket=self.store.location.bucket, Key=self.store.key(digest))["Body"].read()
        )

    def write(self, digest: str, data: bytes) -> None:
        if isinstance(self.store, LocalBlobStore):
            path = self.store.path(digest)
            path.write_bytes(data)
            os.utime(path, ns=(time.time_ns(), time.time_ns() + 1000))  # a new version, even within the same tick
            return
        assert isinstance(self.store, S3BlobStore)
        self.client.put_object(Bucket=self.store.location.bucket, Key=self.store.key(digest), Body=data)


def _spool(tmp_path: Path) -> list[Path]:
    return list((tmp_path / "tmp").iterdir()) if (tmp_path / "tmp").exists() else []


# -- what every store does -----------------------------------------------------------------


def test_streamed_blob_is_named_by_its_sha256(make_store: Callable[..., BlobStore], tmp_path: Path):
    store = make_store()
    with store.writer() as w:
        w.write(b"hello ")
        w.write_many([b"wor", memoryview(b"ld")])
        digest, size = w.commit()
        assert w.created
    assert digest == hashlib.sha256(b"hello world").hexdigest() and size == 11
    assert store.read_bytes(digest) == b"hello world" and store.size(digest) == 11 and store.exists(digest)
    store.verify(digest)
    assert store.put_bytes(b"hello world") == digest  # identical content: fine
    assert b"hello world" not in Stored(store).read(digest)  # sealed at rest
    assert _spool(tmp_path) == []


def test_abort_and_exceptions_leave_nothing_behind(make_store: Callable[..., BlobStore], tmp_path: Path):
    store = make_store()
    with store.writer() as w:
        w.write(b"partial")
        w.abort()
    with pytest.raises(RuntimeError), store.writer() as w:
        w.write(b"partial")
        raise RuntimeError("client went away")
    assert _spool(tmp_path) == []
    assert not store.exists(hashlib.sha256(b"partial").hexdigest()) and list(store.stored()) == []


def test_the_writer_validates_from_its_spool_before_anything_is_published(make_store: Callable[..., BlobStore]):
    store = make_store()
    with store.writer() as w:
        w.write(b"to be checked")
        with w.reader() as r:
            assert r.readall() == b"to be checked"
        assert w.temp_path.is_file() and not store.exists(w.hexdigest())


@pytest.mark.parametrize("digest", ["../../etc/passwd", "AB" * 32, "ab" * 31, "ab" * 32 + "/x", ""])
def test_digests_are_checked_before_touching_storage(make_store: Callable[..., BlobStore], digest: str):
    store = make_store()
    for call in (store.open, store.size, store.verify, store.exists, store.delete, store.pin):
        with pytest.raises(ProtocolError, match="not a blob digest"):
            call(digest)


def test_missing_blob_is_not_found(make_store: Callable[..., BlobStore]):
    store = make_store()
    for call in (store.open, store.size, store.verify):
        with pytest.raises(NotFound):
            call("0" * 64)
    assert store.exists("0" * 64) is False and store.delete("0" * 64) is False


def test_stored_weights_read_back_lazily_with_every_dtype_and_shape(make_store: Callable[..., BlobStore]):
    from laulima.core.weights import from_safetensors
    from laulima.hub.orchestrator import LazyWeights, store_weights

    store = make_store()
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
    with pytest.raises(NotFound):
        LazyWeights.from_store(store, "1" * 64)


def test_same_bytes_twice_are_one_blob_and_the_second_commit_creates_nothing(make_store: Callable[..., BlobStore]):
    store = make_store()
    first = store.put_bytes(b"the same update")
    with store.writer() as w:
        w.write(b"the same update")
        assert w.commit()[0] == first and not w.created
    assert [d for d, _ in store.stored()] == [first]


def test_a_commit_of_content_already_stored_pins_it_until_the_writer_closes(make_store: Callable[..., BlobStore]):
    store = make_store()
    digest = store.put_bytes(b"the same update")  # stored earlier, referenced by nothing any more
    with store.writer() as w:
        w.write(b"the same update")
        assert w.commit()[0] == digest and not w.created
        assert store.is_pinned(digest) and store.delete(digest) is False
        assert store.read_bytes(digest) == b"the same update"
    assert not store.is_pinned(digest)
    assert store.delete(digest) is True and not store.exists(digest)


def test_pins_nest_and_a_new_blob_is_pinned_too(make_store: Callable[..., BlobStore]):
    store = make_store()
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


def test_delete_keeps_a_blob_the_database_refers_to_now(make_store: Callable[..., BlobStore]):
    rows: set[str] = set()
    asked: list[list[str]] = []

    def in_use(digests):
        asked.append(list(digests))
        return rows & set(digests)

    store = make_store(in_use=in_use)
    digest = store.put_bytes(b"weights")
    rows.add(digest)
    assert store.delete(digest) is False and store.exists(digest)
    rows.clear()
    assert store.delete(digest) is True and asked == [[digest], [digest]] and not store.exists(digest)


def test_stored_lists_every_blob_with_the_time_it_was_stored(make_store: Callable[..., BlobStore]):
    store = make_store()
    before = time.time()
    digests = sorted(store.put_bytes(bytes([i])) for i in range(3))
    listed = dict(store.stored())
    assert sorted(listed) == digests
    assert all(before - 2 <= listed[d] <= time.time() + 2 for d in digests)  # S3 keeps whole seconds


@pytest.mark.parametrize("how", ["flip", "truncate", "replace", "empty"])
def test_an_altered_blob_is_refused(make_store: Callable[..., BlobStore], how: str):
    store = make_store()
    data = random.Random(1).randbytes(3 * 256 * 1024 + 5)
    digest = store.put_bytes(data)
    store.verify(digest)  # verified once: a changed version must be checked again
    stored = Stored(store)
    sealed = bytearray(stored.read(digest))
    if how == "flip":
        sealed[len(sealed) // 2] ^= 0x01
    elif how == "truncate":
        del sealed[-1000:]
    elif how == "replace":  # a valid sealed blob, of other content, under this name
        other = store.put_bytes(b"other weights")
        sealed = bytearray(stored.read(other))
    else:
        sealed = bytearray()
    stored.write(digest, bytes(sealed))
    with pytest.raises(BlobIntegrityError):
        store.verify(digest)
    if how != "replace":  # same key, other content: only the digest check can tell
        with pytest.raises(BlobIntegrityError):
            store.read_bytes(digest)
    if how == "empty":  # (a cut at a segment's middle still has a plausible size: reading it fails)
        with pytest.raises(BlobIntegrityError):
            store.size(digest)


# -- S3 only -------------------------------------------------------------------------------


def _chunks(n_mib: int, seed: int = 7) -> Iterator[bytes]:
    """``n_mib`` MiB of incompressible bytes, one MiB at a time (never the whole in memory)."""
    for i in range(n_mib):
        yield random.Random(seed * 1_000_003 + i).randbytes(MIB)


class Requests:
    """Counts the GETs a store sends and the bytes they bring back (a boto3 event hook)."""

    def __init__(self, store: S3BlobStore) -> None:
        self.gets = 0
        self.bytes = 0
        self.parts = 0
        store.client.meta.events.register("after-call.s3.GetObject", self._get)
        store.client.meta.events.register("after-call.s3.UploadPart", self._part)

    def _get(self, parsed: dict[str, Any], **_: Any) -> None:
        self.gets += 1
        self.bytes += int(parsed.get("ContentLength", 0))

    def _part(self, **_: Any) -> None:
        self.parts += 1

    def reset(self) -> None:
        self.gets = self.bytes = self.parts = 0


def test_a_big_blob_streams_both_ways_in_multipart_and_windows(make_s3: Callable[..., S3BlobStore], bucket: str):
    size_mib = 24
    store = make_s3(part_bytes=5 * MIB)
    seen = Requests(store)
    expected = hashlib.sha256()
    tracemalloc.start()
    try:
        with store.writer() as w:
            for chunk in _chunks(size_mib):
                expected.update(chunk)
                w.write(chunk)
            digest, size = w.commit()
        _, written_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        seen.reset()
        got = hashlib.sha256()
        with store.open(digest) as reader:
            for piece in reader.iter_segments():
                got.update(piece)
        _, read_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert digest == expected.hexdigest() == got.hexdigest() and size == size_mib * MIB
    head = _client(str(store.endpoint_url)).head_object(Bucket=bucket, Key=store.key(digest))
    assert head["ETag"].strip('"').endswith("-5"), head["ETag"]  # a multipart upload of five parts
    assert written_peak < 10 * MIB, f"writing {size_mib} MiB peaked at {written_peak / MIB:.1f} MiB"
    print(f"peaks: writing {written_peak / MIB:.1f} MiB, reading {read_peak / MIB:.1f} MiB, {seen.gets} GETs")
    assert read_peak < 12 * MIB, f"reading {size_mib} MiB peaked at {read_peak / MIB:.1f} MiB"
    assert seen.gets <= 1 + -(-size_mib // 8) + 1, seen.gets  # the first GET, then 8 MiB windows
    assert seen.bytes < size + MIB


def test_a_tensor_read_fetches_its_own_range_only(make_s3: Callable[..., S3BlobStore]):
    from laulima.hub.orchestrator import LazyWeights, store_weights

    store = make_s3()
    rng = np.random.default_rng(3)
    weights = {f"layer{i}.weight": rng.standard_normal((1024, 1024), dtype=np.float32) for i in range(6)}  # 24 MiB
    digest = store_weights(store, weights)
    seen = Requests(store)
    lazy = LazyWeights.from_store(store, digest)
    try:
        opened = seen.bytes
        np.testing.assert_array_equal(lazy["layer3.weight"], weights["layer3.weight"])
    finally:
        lazy.close()
    tensor = weights["layer3.weight"].nbytes
    assert opened <= HEADER_MAX_BYTES + 2 * OPEN_BYTES  # size, index, then the reader's first GET
    assert seen.bytes - opened < tensor + 2 * 256 * 1024 + 64, (seen.bytes, tensor)  # its segments, no more
    assert seen.bytes < 24 * MIB / 4


def test_size_reads_only_the_header(make_s3: Callable[..., S3BlobStore]):
    store = make_s3()
    digest = store.put_bytes(bytes(3 * MIB))
    seen = Requests(store)
    assert store.size(digest) == 3 * MIB and seen.gets == 1 and seen.bytes <= HEADER_MAX_BYTES


def test_an_object_replaced_while_read_is_refused(make_s3: Callable[..., S3BlobStore]):
    store = make_s3(window_bytes=256 * 1024)
    data = random.Random(2).randbytes(2 * MIB)
    digest = store.put_bytes(data)
    stored = Stored(store)
    with store.open(digest) as reader:
        assert reader.read(100) == data[:100]
        with store.writer() as w:  # the same content sealed again: other salt, other bytes, other ETag
            w.write(data)
            w.reader().close()
            stored.write(digest, w.temp_path.read_bytes())
        with pytest.raises(BlobIntegrityError, match="replaced"):
            reader.read()
    assert store.read_bytes(digest) == data  # the new version reads fine from its start


def test_a_concurrent_identical_upload_keeps_the_first_object(make_s3: Callable[..., S3BlobStore], bucket: str):
    """Two hub processes store the same content at once: both see it absent, the first publication wins."""
    store = make_s3(part_bytes=5 * MIB)
    client = _client(str(store.endpoint_url))
    for n_mib in (1, 12):  # a single PUT, and a multipart upload
        data = b"".join(_chunks(n_mib, seed=n_mib))
        digest = store.put_bytes(data)
        etag = client.head_object(Bucket=bucket, Key=store.key(digest))["ETag"]
        store._head = lambda digest: None  # type: ignore[method-assign]  # the race: it looked before the other
        try:
            with store.writer() as w:
                w.write(data)
                assert w.commit()[0] == digest and not w.created
        finally:
            del store._head
        assert client.head_object(Bucket=bucket, Key=store.key(digest))["ETag"] == etag
        assert store.read_bytes(digest) == data
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


_KILLED_WRITER = """
import sys, time
from laulima.hub.s3blobs import S3BlobStore
url, keys, spool, endpoint = sys.argv[1:5]
store = S3BlobStore(url, key_dir=keys, spool_dir=spool, endpoint_url=endpoint, part_bytes=5 << 20)
def hang(**_):
    print("part sent", flush=True)
    time.sleep(120)  # killed here, in the middle of the multipart upload
store.client.meta.events.register("after-call.s3.UploadPart", hang)
with store.writer() as w:
    for i in range(12):
        w.write(bytes([i]) * (1 << 20))
    print(w.hexdigest(), flush=True)
    w.commit()
"""


def test_a_writer_killed_mid_upload_leaves_nothing_visible(
    make_s3: Callable[..., S3BlobStore], s3_endpoint: str, bucket: str, tmp_path: Path
):
    url = f"s3://{bucket}/hub-1"
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_KILLED_WRITER), url, str(tmp_path / "keys"), str(tmp_path / "tmp"),
         s3_endpoint],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert child.stdout is not None
        digest = child.stdout.readline().strip()
        assert child.stdout.readline().strip() == "part sent", "the child did not reach its upload"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    client = _client(s3_endpoint)
    assert len(client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])) == 1  # invisible, but there
    assert _spool(tmp_path) != []  # its spool file too
    store = make_s3()
    assert not store.exists(digest) and list(store.stored()) == []
    assert _spool(tmp_path) != []  # young: it could be another hub process's upload in progress
    make_s3(stale_upload_s=0)  # a store removes spools and multipart uploads older than its limit
    assert _spool(tmp_path) == []
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_a_missing_bucket_stops_the_store_with_what_to_do(s3_endpoint: str, aws: None, tmp_path: Path):
    with pytest.raises(ConfigurationError, match=r"bucket 'no-such-bucket' does not exist at http://127\.0\.0\.1"):
        S3BlobStore("s3://no-such-bucket", key_dir=tmp_path / "k", spool_dir=tmp_path / "t", endpoint_url=s3_endpoint)


def test_an_unreachable_endpoint_stops_the_store_with_what_to_do(aws: None, tmp_path: Path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens there once closed
    with pytest.raises(ConfigurationError, match=rf"bucket 'blobs'.*127\.0\.0\.1:{port}.*cannot be reached") as info:
        S3BlobStore(
            "s3://blobs", key_dir=tmp_path / "k", spool_dir=tmp_path / "t", endpoint_url=f"http://127.0.0.1:{port}"
        )
    assert "LAULIMA_HUB_S3_ENDPOINT_URL" in str(info.value)


def test_refused_credentials_are_explained(aws: None, tmp_path: Path):
    from tests.helpers.s3 import s3_server

    with (
        s3_server(authenticate=True) as endpoint,
        pytest.raises(ConfigurationError, match="refused this hub's credentials"),
    ):
        S3BlobStore("s3://blobs", key_dir=tmp_path / "k", spool_dir=tmp_path / "t", endpoint_url=endpoint)


def test_missing_credentials_are_explained(s3_endpoint: str, bucket: str, monkeypatch: pytest.MonkeyPatch, tmp_path):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(ConfigurationError, match="no S3 credentials.*AWS_ACCESS_KEY_ID"):
        S3BlobStore(f"s3://{bucket}", key_dir=tmp_path / "k", spool_dir=tmp_path / "t", endpoint_url=s3_endpoint)


@pytest.mark.parametrize(
    ("url", "endpoint", "message"),
    [
        ("s3://blobs", "http://minio.example.org:9000", "no plaintext off loopback; use https"),
        ("s3://blobs", "https://key:secret@minio.example.org", "contains credentials"),
        ("gs://blobs", None, "expected s3://bucket"),
        ("s3://Blobs_Here", None, "not a valid bucket name"),
        ("s3://blobs/a//b", None, "the prefix"),
    ],
)
def test_bad_settings_are_refused_before_any_request(aws: None, tmp_path: Path, url: str, endpoint, message: str):
    from laulima.hub.settings import HubSettings

    with pytest.raises(ConfigurationError, match=message):
        S3BlobStore(url, key_dir=tmp_path / "k", spool_dir=tmp_path / "t", endpoint_url=endpoint)
    with pytest.raises(ConfigurationError, match=message):
        HubSettings(home=tmp_path, blob_store_url=url, s3_endpoint_url=endpoint)


def test_the_hub_settings_choose_the_store(s3_endpoint: str, bucket: str, monkeypatch: pytest.MonkeyPatch, tmp_path):
    from laulima.hub.blobstores import open_blob_store
    from laulima.hub.settings import HubSettings

    for name in ("LAULIMA_HUB_BLOB_STORE_URL", "LAULIMA_HUB_S3_ENDPOINT_URL"):  # set by --hub-backend=postgres-s3
        monkeypatch.delenv(name, raising=False)
    assert isinstance(open_blob_store(HubSettings(home=tmp_path / "a")), LocalBlobStore)
    monkeypatch.setenv("LAULIMA_HUB_BLOB_STORE_URL", f"s3://{bucket}/prefix/")
    monkeypatch.setenv("LAULIMA_HUB_S3_ENDPOINT_URL", s3_endpoint)
    settings = HubSettings(home=tmp_path / "b")
    store = open_blob_store(settings)
    assert isinstance(store, S3BlobStore) and store.location.prefix == "prefix/"
    digest = store.put_bytes(b"x")
    assert store.key(digest) == f"prefix/blobs/{digest}"
    assert list((tmp_path / "b" / "keys").iterdir()) != []  # keys stay local, never in the bucket
    keys = [o["Key"] for o in _client(s3_endpoint).list_objects_v2(Bucket=bucket)["Contents"]]
    assert keys == [f"prefix/blobs/{digest}"]
    with pytest.raises(ConfigurationError, match="blob_store_url is not"):
        HubSettings(home=tmp_path / "c", s3_endpoint_url=s3_endpoint, blob_store_url=None)


def test_without_boto3_an_s3_setting_says_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setitem(sys.modules, "boto3", None)  # import boto3 now fails
    with pytest.raises(ConfigurationError, match=r"pip install 'laulima\[s3\]'"):
        S3BlobStore("s3://blobs", key_dir=tmp_path / "k", spool_dir=tmp_path / "t", endpoint_url="http://127.0.0.1:1")
