"""Per-person bounds (pending upload bytes and count, running experiments), the clean-up of
unused uploads and orphan blobs, and the race between deleting a blob and re-uploading it."""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from laulima.core.protocol import Header
from laulima.core.weights import to_safetensors
from laulima.hub.housekeeping import Collected, collect_unused_uploads
from laulima.hub.ownership import UploadQuota, UploadQuotaExceeded

from .conftest import Hub, make_weights, spec, update_bytes


def _parts(hub: Hub) -> Any:
    return hub.client.app.state.hub  # type: ignore[attr-defined]


def _put(hub: Hub, who: dict[str, str], data: Any) -> Any:
    return hub.client.put(hub.url("/blobs"), content=data, headers=who)


def _submit(hub: Hub, who: dict[str, str], digest: str, **changes: Any) -> Any:
    body = {"spec": spec(sites=["site-a"], **changes), "initial_weights": digest}
    return hub.client.post(hub.url("/experiments"), json=body, headers=who)


def _leftovers(hub: Hub) -> list[str]:
    return [p.name for p in (hub.home / "tmp").iterdir()]


# -- quotas ------------------------------------------------------------------------------
def test_uploads_no_experiment_uses_are_bounded_per_person_until_one_is_used(make_hub: Callable[..., Hub]):
    w0, w1, w2 = (to_safetensors(make_weights(i)) for i in range(3))
    hub = make_hub(person_pending_upload_bytes=2 * len(w0) + 10)
    hub.register("site-a")
    alice, bob = hub.person("alice"), hub.person("bob")
    first = _put(hub, alice, w0).json()["digest"]
    assert _put(hub, alice, w1).status_code == 201
    again = hub.client.put(  # the same bytes again, announced (as the client does): adds nothing
        hub.url("/blobs"), content=w0, headers={**alice, Header.CONTENT_SHA256.value: first}
    )
    assert again.status_code == 201 and _parts(hub).service.pending_uploads("alice")[0] == 2

    refused = _put(hub, alice, w2)
    assert refused.status_code == 413 and refused.json()["error"] == "upload_quota_exceeded"
    detail = refused.json()["detail"]
    assert "'alice'" in detail and "person_pending_upload_bytes" in detail
    assert "submit an experiment" in detail and "wait until unused uploads are deleted (24 h" in detail
    w2_digest = hashlib.sha256(w2).hexdigest()
    assert not hub.stored.exists(w2_digest) and _leftovers(hub) == []

    streamed = _put(hub, alice, iter([w2[:100], w2[100:]]))  # no Content-Length: stopped while reading
    assert streamed.status_code == 413 and streamed.json()["error"] == "upload_quota_exceeded"
    assert not hub.stored.exists(w2_digest) and _leftovers(hub) == []

    assert _put(hub, bob, w2).status_code == 201  # one person's quota is theirs alone
    assert _submit(hub, alice, first).status_code == 201  # now used by an experiment: no longer pending
    assert _put(hub, alice, w2).status_code == 201


def test_the_number_of_unused_uploads_is_bounded_too(make_hub: Callable[..., Hub]):
    hub = make_hub(person_pending_uploads=2)
    alice = hub.person("alice")
    assert _put(hub, alice, b"a").status_code == 201 and _put(hub, alice, b"b").status_code == 201
    r = _put(hub, alice, b"c")
    assert r.status_code == 413 and "person_pending_uploads = 2" in r.json()["detail"]
    assert not hub.stored.exists(hashlib.sha256(b"c").hexdigest())


def test_the_quota_is_checked_again_when_the_upload_is_recorded(make_hub: Callable[..., Hub]):
    """Two uploads of one person at once both pass the check made before their bodies are read;
    the one recorded second is refused, and the file it created is removed."""
    hub = make_hub(person_pending_upload_bytes=1000)
    alice = hub.person("alice")
    parts = _parts(hub)
    other = parts.blobs.put_bytes(b"o" * 600)
    quota = UploadQuota(1000, 1000, 3600.0)

    def body() -> Iterator[bytes]:
        yield b"x" * 600
        parts.service.record_upload("alice", other, 600, quota)  # the other upload finishes meanwhile

    r = _put(hub, alice, body())
    assert r.status_code == 413 and r.json()["error"] == "upload_quota_exceeded", r.text
    assert "600 bytes of uploads that no experiment uses yet" in r.json()["detail"]
    assert not hub.stored.exists(hashlib.sha256(b"x" * 600).hexdigest())
    assert parts.service.pending_uploads("alice") == (1, 600)
    with pytest.raises(UploadQuotaExceeded):
        parts.service.record_upload("alice", "5" * 64, 401, quota)


def test_running_experiments_are_bounded_per_person(make_hub: Callable[..., Hub]):
    hub = make_hub(person_max_running_experiments=2)
    hub.register("site-a")
    alice, bob = hub.person("alice"), hub.person("bob")
    digest = _put(hub, alice, to_safetensors(make_weights(0))).json()["digest"]
    first = _submit(hub, alice, digest).json()
    assert _submit(hub, alice, digest).status_code == 201
    r = _submit(hub, alice, digest)
    assert r.status_code == 429 and r.json()["error"] == "running_experiments_limit"
    assert "person_max_running_experiments = 2" in r.json()["detail"] and "cancel" in r.json()["detail"]
    assert [e["owner"] for e in hub.get("/experiments")] == ["alice", "alice"]  # nothing half-made

    bobs = _put(hub, bob, to_safetensors(make_weights(1))).json()["digest"]
    assert _submit(hub, bob, bobs).status_code == 201  # alice's limit is hers
    assert hub.client.post(hub.url(f"/experiments/{first['id']}/cancel"), headers=alice).status_code == 200
    assert _submit(hub, alice, digest).status_code == 201


# -- clean-up ----------------------------------------------------------------------------
def test_unused_uploads_and_orphan_blobs_are_deleted_once_the_ttl_has_passed(make_hub: Callable[..., Hub]):
    ttl = 3600.0
    hub = make_hub(unused_upload_ttl_s=ttl)
    hub.register("site-a")
    alice = hub.person("alice")
    parts = _parts(hub)
    used = _put(hub, alice, to_safetensors(make_weights(0))).json()["digest"]
    exp = _submit(hub, alice, used).json()
    unused = _put(hub, alice, b"uploaded, never used").json()["digest"]
    orphan = parts.blobs.put_bytes(b"left behind by a crash")
    assert parts.service.pending_uploads("alice") == (1, len(b"uploaded, never used"))

    early = collect_unused_uploads(parts.sessions, parts.blobs, hub.clock() + ttl - 60, ttl)
    assert early == Collected(uploads=0, blobs=0) and hub.stored.exists(unused)

    hub.clock.advance(ttl + 61)  # the orchestrator's loop runs the clean-up (at most once a minute)
    fresh = _put(hub, alice, b"uploaded just now").json()["digest"]  # its file's time is old by the fake clock
    hub.wait_for(
        lambda: not hub.stored.exists(unused) and not hub.stored.exists(orphan),
        "the unused upload and the orphan to be deleted",
    )
    assert parts.service.pending_uploads("alice") == (1, len(b"uploaded just now"))
    for digest in (used, fresh, exp["global_digest"]):
        assert hub.stored.exists(digest)
    r = hub.client.get(hub.url(f"/blobs/{unused}"), headers=alice)
    assert r.status_code == 404
    assert hub.client.get(hub.url(f"/blobs/{used}"), headers=alice).status_code == 200


def test_the_clean_up_keeps_every_blob_a_row_refers_to(make_hub: Callable[..., Hub]):
    hub = make_hub(keep_updates=True)
    hub.register("site-a", "site-b")
    exp = hub.submit(spec(rounds=1), make_weights(0))
    updates = []
    for site, seed in (("site-a", 1), ("site-b", 2)):
        task = hub.next_task(site)
        assert task is not None
        r = hub.upload(site, task, update_bytes(make_weights(seed)))
        assert r.status_code == 200, r.text
        updates.append(r.json()["digest"])
    done = hub.wait_status(exp["id"], "completed")
    parts = _parts(hub)
    orphan = parts.blobs.put_bytes(b"orphan")
    far = hub.clock() + 100 * 86400
    assert collect_unused_uploads(parts.sessions, parts.blobs, far, 3600.0).blobs == 1
    assert not hub.stored.exists(orphan)
    for digest in [*updates, exp["global_digest"], done["global_digest"]]:  # kept updates, models
        assert hub.stored.exists(digest), digest


# -- the race between a delete and an identical upload ------------------------------------
@pytest.mark.local_backend  # holds SQLite's write lock by hand; the pins it tests are the same on every store
def test_a_blob_found_already_stored_by_an_upload_survives_a_delete_until_its_row_is_written(
    make_hub: Callable[..., Hub],
):
    """The upload's bytes are already stored (nothing refers to them); the clean-up runs after
    the upload's commit found them, but before its row is written. The database is held
    locked from the moment the body has arrived, so that moment is pinned down."""
    hub = make_hub()
    alice = hub.person("alice")
    parts = _parts(hub)
    data = b"identical bytes"
    digest = parts.blobs.put_bytes(data)
    lock = sqlite3.connect(hub.home / "hub.db", timeout=30, isolation_level=None, check_same_thread=False)
    locked = threading.Event()

    def body() -> Iterator[bytes]:
        yield data
        lock.execute("BEGIN IMMEDIATE")  # the hub has the whole body; its row must now wait
        locked.set()

    answer: list[Any] = []
    upload = threading.Thread(target=lambda: answer.append(_put(hub, alice, body())))
    upload.start()
    try:
        assert locked.wait(30)
        hub.wait_for(lambda: parts.blobs.is_pinned(digest), "the upload to commit", timeout=30)
        assert parts.blobs.delete(digest) is False  # the clean-up's delete, while the row is not written
    finally:
        if locked.is_set():
            lock.execute("ROLLBACK")
        upload.join(60)
        lock.close()
    assert answer and answer[0].status_code == 201, answer
    assert not parts.blobs.is_pinned(digest)
    r = hub.client.get(hub.url(f"/blobs/{digest}"), headers=alice)
    assert r.status_code == 200 and r.content == data
    assert parts.blobs.delete(digest) is False  # now the row keeps it


def test_spent_updates_uploaded_again_by_a_person_are_not_deleted(make_hub: Callable[..., Hub]):
    """The orchestrator lists spent update blobs, then deletes them; a person uploads the same
    bytes as one of them in between. Person uploads count as references, and the delete asks
    the database again."""
    hub = make_hub(keep_updates=True)
    hub.register("site-a", "site-b")
    exp = hub.submit(spec(rounds=1), make_weights(0))
    bodies = {}
    for site, seed in (("site-a", 1), ("site-b", 2)):
        task = hub.next_task(site)
        assert task is not None
        bodies[site] = update_bytes(make_weights(seed))
        assert hub.upload(site, task, bodies[site]).status_code == 200
    hub.wait_status(exp["id"], "completed")
    parts = _parts(hub)
    a, b = (hashlib.sha256(bodies[s]).hexdigest() for s in ("site-a", "site-b"))
    stale = parts.service.spent_update_digests(exp["id"])
    assert stale == sorted([a, b])

    bob = hub.person("bob")
    assert _put(hub, bob, bodies["site-a"]).json()["digest"] == a
    assert parts.service.spent_update_digests(exp["id"]) == [b]
    assert [parts.blobs.delete(d) for d in stale] == [d == b for d in stale]  # the stale list, deleted
    got = hub.client.get(hub.url(f"/blobs/{a}"), headers=bob)
    assert got.status_code == 200 and got.content == bodies["site-a"]

    parts.orchestrator.keep_updates = False
    assert parts.orchestrator.discard_spent_updates(exp["id"]) == 0
    assert hub.stored.exists(a) and not hub.stored.exists(b)
