"""Two hub processes share one blob store: one's clean-up never deletes a blob the other has
just found already stored and is about to refer to (hub/blob_guard.py).

Each "process" here is a store of its own with its own guard (its own holder id) on one
database and one folder or bucket, as two hub processes have.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import func, select

from laulima.hub.blob_guard import PIN_MAX_AGE_S, DatabaseBlobGuard
from laulima.hub.blobstore import BlobStore, LocalBlobStore
from laulima.hub.db import BlobPin, SessionFactory
from laulima.hub.housekeeping import live_references

from .conftest import SteppedClock
from .test_s3_blobstore import aws, bucket, make_s3  # noqa: F401  (fixtures)

DATA = b"the same update bytes, uploaded twice"


class DrainedGuard(DatabaseBlobGuard):
    """Unpins are written by a thread of their own; a test looks only once they are."""

    def unpin(self, digest: str) -> None:
        super().unpin(digest)
        self.drain()


@pytest.fixture(params=["local", "s3"])
def two_processes(
    request: pytest.FixtureRequest, tmp_path: Path, hub_sessions: SessionFactory
) -> tuple[BlobStore, BlobStore, SteppedClock]:
    clock = SteppedClock()
    guards = [DrainedGuard(hub_sessions, f"process-{i}", clock=clock) for i in (1, 2)]
    if request.param == "local":
        stores: list[BlobStore] = [
            LocalBlobStore(tmp_path, in_use=live_references(hub_sessions), guard=g) for g in guards
        ]
    else:
        make: Callable[..., BlobStore] = request.getfixturevalue("make_s3")
        stores = [make(in_use=live_references(hub_sessions), guard=g) for g in guards]
    return stores[0], stores[1], clock


def test_a_blob_one_process_found_stored_survives_the_other_process_s_delete(two_processes):
    a, b, _ = two_processes
    digest = a.put_bytes(DATA)  # stored long ago; no row refers to it any more
    with b.writer() as upload:  # process B receives the same bytes again
        upload.write(DATA)
        assert upload.commit() == (digest, len(DATA)) and upload.created is False
        # ... and before B writes its row, A's clean-up decides the blob is unused:
        assert a.delete(digest) is False, "A must see B's pin in the database"
        assert b.exists(digest)
    # B's row was never written (its request failed): now nothing keeps the blob.
    assert a.delete(digest) is True
    assert not b.exists(digest)


def test_pins_nest_across_processes_and_are_released_by_their_owner(two_processes, hub_sessions: SessionFactory):
    a, b, _ = two_processes
    digest = a.put_bytes(DATA)
    with b.pinned(digest), b.pinned(digest):
        with a.pinned(digest):
            assert b.delete(digest) is False  # A's own pin, and B's
        assert a.delete(digest) is False  # B still holds two
    with hub_sessions() as s:
        assert s.scalar(select(func.count()).select_from(BlobPin)) == 0
    assert a.delete(digest) is True


def test_a_pin_left_by_a_process_that_died_stops_counting_and_is_cleaned_up(two_processes, hub_sessions):
    a, b, clock = two_processes
    digest = a.put_bytes(DATA)
    b.pin(digest)  # and B is killed before it unpins
    assert a.delete(digest) is False
    clock.now += PIN_MAX_AGE_S + 1
    assert DatabaseBlobGuard(hub_sessions, "process-3", clock=clock).forget_stale() == 1
    assert a.delete(digest) is True
