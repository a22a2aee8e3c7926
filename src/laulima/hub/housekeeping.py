"""What keeps a blob alive, and the clean-up of the blobs and uploads that nothing keeps alive.

A blob is *referenced* while a row points at it: a task's weights, an experiment's initial
or global model, strategy state or algorithm bundle, a round's models, an update, a FedDC
handoff, a person's upload. The
one list of those columns is here, so the orchestrator's deletion of spent updates, the
blob store's last check before a delete, the upload quota and this clean-up all agree.

The clean-up (:func:`collect_unused_uploads`, run by :class:`Housekeeper` from the
orchestrator's loop at most once a minute) removes, once ``unused_upload_ttl_s`` has passed:
people's upload records that no experiment uses, and blob files that no row refers to at
all (the ones those records held, and orphans left by a refused upload or a crash).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, delete, exists, select
from sqlalchemy.orm import InstrumentedAttribute

from laulima.core.protocol import ExperimentStatus, RoundStatus, TaskKind
from laulima.hub.blobstore import BlobGuard, BlobStore
from laulima.hub.db import Experiment, Round, RoundHandoff, Session, SessionFactory, Task, Update, Upload

__all__ = [
    "COLLECT_INTERVAL_S",
    "Collected",
    "Housekeeper",
    "collect_unused_uploads",
    "live_references",
    "referenced",
    "unreferenced",
]

log = logging.getLogger(__name__)

COLLECT_INTERVAL_S = 60.0
"""The clean-up runs at most this often (by the hub's clock)."""

_CHUNK = 500
"""Digests per IN (...) list: well below every database's limit on bound parameters."""

_Holder = tuple[InstrumentedAttribute[Any], Select[Any]]


def _holders(*, spent_updates: bool, uploads: bool) -> list[_Holder]:
    """Every column that refers to a blob, with the query of its non-null values.

    ``spent_updates``: whether updates of closed rounds count (their blobs are deleted after
    the checkpoint unless the hub keeps updates), and with them FedDC's handoffs that are
    used up: a handoff of round r (``round_handoffs``) is alive while its experiment runs and
    has not checkpointed round r + 1; a training task's weights, while its round is open (a
    closed round's global input stays held by ``rounds.global_in_digest``). ``uploads``:
    whether people's upload records count (they do for blobs; not when asking whether an
    experiment uses an upload).
    """
    columns: list[InstrumentedAttribute[Any]] = [
        Experiment.initial_digest,
        Experiment.global_digest,
        Experiment.strategy_state_digest,
        Experiment.bundle_digest,
        Round.global_in_digest,
        Round.global_out_digest,
        Round.strategy_state_digest,
    ]
    holders: list[_Holder] = [(c, select(c).where(c.is_not(None))) for c in columns]
    if spent_updates:
        holders.append((Task.weights_digest, select(Task.weights_digest)))
        holders.append((RoundHandoff.digest, select(RoundHandoff.digest)))
        holders.append((Update.digest, select(Update.digest)))
    else:
        closed_training = exists().where(
            Task.kind == TaskKind.TRAIN,
            Round.experiment_id == Task.experiment_id,
            Round.index == Task.round,
            Round.status != RoundStatus.OPEN,
        )
        holders.append((Task.weights_digest, select(Task.weights_digest).where(~closed_training)))
        pending = (Experiment.id == RoundHandoff.experiment_id) & (Experiment.rounds_done == RoundHandoff.round)
        holders.append(
            (
                RoundHandoff.digest,
                select(RoundHandoff.digest)
                .join(Experiment, pending)
                .where(Experiment.status == ExperimentStatus.RUNNING),
            )
        )
        open_round = (Round.experiment_id == Update.experiment_id) & (Round.index == Update.round)
        holders.append(
            (Update.digest, select(Update.digest).join(Round, open_round).where(Round.status == RoundStatus.OPEN))
        )
        # Local-only models (labelled training tasks, no round) are results, not spent updates:
        # kept, and downloadable, for as long as their experiment exists.
        local_model = (Task.id == Update.task_id) & Task.model.is_not(None)
        holders.append((Update.digest, select(Update.digest).join(Task, local_model)))
    if uploads:
        holders.append((Upload.digest, select(Upload.digest)))
    return holders


def referenced(
    s: Session, digests: Collection[str] | None, *, spent_updates: bool = True, uploads: bool = True
) -> set[str]:
    """Those of ``digests`` (None: all) that some row refers to (see :func:`_holders`)."""
    holders = _holders(spent_updates=spent_updates, uploads=uploads)
    found: set[str] = set()
    if digests is None:
        for _, query in holders:
            found.update(s.scalars(query.distinct()))
        return found
    wanted = sorted(set(digests))
    for start in range(0, len(wanted), _CHUNK):
        chunk = wanted[start : start + _CHUNK]
        for column, query in holders:
            found.update(s.scalars(query.where(column.in_(chunk))))
    return found


def unreferenced(column: InstrumentedAttribute[str], *, spent_updates: bool, uploads: bool) -> ColumnElement[bool]:
    """SQL condition: ``column``'s digest is referred to by no row (see :func:`_holders`)."""
    return and_(*(column.not_in(query) for _, query in _holders(spent_updates=spent_updates, uploads=uploads)))


def live_references(sessions: SessionFactory) -> Callable[[Collection[str]], set[str]]:
    """The blob store's last check before it deletes (``LocalBlobStore(in_use=...)``):
    the digests a row refers to *now*, spent updates of closed rounds excepted."""

    def in_use(digests: Collection[str]) -> set[str]:
        with sessions() as s:
            return referenced(s, digests, spent_updates=False, uploads=True)

    return in_use


@dataclass(frozen=True)
class Collected:
    uploads: int
    """Upload records removed (unused, older than the TTL)."""
    blobs: int
    """Blob files deleted."""


def collect_unused_uploads(sessions: SessionFactory, blobs: BlobStore, now: float, ttl_s: float) -> Collected:
    """Remove upload records no experiment uses, and blob files no row refers to, once they
    are older than ``ttl_s`` at ``now``. Safe against concurrent uploads: the blob store
    skips pinned digests and re-checks the database before each delete."""
    cutoff = now - ttl_s
    with sessions.begin() as s:
        rows = s.execute(select(Upload.id, Upload.digest).where(Upload.created_at < cutoff)).all()
        used = referenced(s, {d for _, d in rows}, uploads=False)
        expired = [(row_id, digest) for row_id, digest in rows if digest not in used]
        ids = [row_id for row_id, _ in expired]
        for start in range(0, len(ids), _CHUNK):
            s.execute(delete(Upload).where(Upload.id.in_(ids[start : start + _CHUNK])))
    candidates = {digest for _, digest in expired}
    candidates.update(digest for digest, stored_at in blobs.stored() if stored_at < cutoff)
    if candidates:
        with sessions() as s:
            candidates -= referenced(s, None)
    deleted = sum(blobs.delete(digest) for digest in sorted(candidates))
    if expired or deleted:
        log.info("clean-up: %d unused upload records and %d unreferenced blobs removed", len(expired), deleted)
    return Collected(uploads=len(expired), blobs=deleted)


class Housekeeper:
    """Runs :func:`collect_unused_uploads` at most every ``interval_s`` by ``clock``;
    meant to be called on every pass of the orchestrator's loop."""

    def __init__(
        self,
        sessions: SessionFactory,
        blobs: BlobStore,
        *,
        ttl_s: float,
        clock: Callable[[], float] = time.time,
        interval_s: float = COLLECT_INTERVAL_S,
        guard: BlobGuard | None = None,
    ) -> None:
        self.sessions, self.blobs, self.ttl_s, self.clock, self.interval_s = sessions, blobs, ttl_s, clock, interval_s
        self.guard = guard
        """With several hub processes: the database's blob pins, whose dead processes' leftovers go too."""
        self._last: float | None = None

    def run_if_due(self) -> Collected | None:
        """Collect if ``interval_s`` has passed since the last run; never raises (logs)."""
        now = self.clock()
        if self._last is not None and 0 <= now - self._last < self.interval_s:
            return None
        self._last = now
        try:
            if self.guard is not None:
                self.guard.forget_stale()
            return collect_unused_uploads(self.sessions, self.blobs, now, self.ttl_s)
        except Exception:
            log.exception("clean-up of unused uploads and orphan blobs failed; retrying in %.0f s", self.interval_s)
            return None
