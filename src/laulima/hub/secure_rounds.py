"""Secure aggregation at the hub: the phases of a round, kept in the database.

As soon as they start a training task (Bonawitz et al. 2017) sites advertise two public keys
(*keys*) and send each member of their neighbourhood in the round's graph (every roster member,
with the complete graph; SecAgg+'s sparse graph with many sites) its encrypted Shamir shares
(*shares*), while they train;
then they upload their masked update through the ordinary update route (*masking*) and, once
the hub names whose masked update arrived, answer with the shares that remove the masks
(*unmasking*). The hub routes ciphertexts it cannot read
and learns only the sum. Each phase closes when every expected site has answered (or failed),
or when its time is up; who is in it is then fixed in ``secagg_rounds``, so a restarted hub
answers every site the same. Too few sites to reach the threshold aborts the round: the global
model is kept and the next round runs (``HubService.abort_round``).

Writes here are secure aggregation's own tables; the round itself is closed by the service.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from laulima.core.privacy.graph import communication_graph
from laulima.core.privacy.messages import (
    Advertisement,
    Roster,
    SecAggPhase,
    ShareInbox,
    ShareOutbox,
    TaskSecureAggregation,
    Unmasking,
    UnmaskingAnswer,
)
from laulima.core.privacy.phases import PhaseView, decide_phase
from laulima.core.privacy.secagg import RoundContext
from laulima.core.protocol import ExperimentStatus, RoundStatus, TaskKind, TaskStatus
from laulima.errors import Conflict, DataError, NotFound
from laulima.hub.db import (
    Experiment,
    Round,
    SecAggKey,
    SecAggReveal,
    SecAggRound,
    SecAggShare,
    Session,
    SessionFactory,
    Site,
    Task,
    Update,
)

__all__ = ["SECAGG_CONFIG_KEY", "SecAggState", "SecureRounds", "secagg_config"]

SECAGG_CONFIG_KEY = "__secure_aggregation__"
"""Where a TRAIN task's config row keeps its :class:`TaskSecureAggregation` (see service.py)."""

_FAILED = (TaskStatus.FAILED, TaskStatus.CANCELLED, TaskStatus.EXPIRED)


@dataclass(frozen=True)
class SecAggState:
    """One round's secure aggregation as last recorded."""

    experiment_id: int
    round: int
    threshold: int
    phase: str
    since: float
    roster: tuple[str, ...] | None
    shared: tuple[str, ...] | None
    survivors: tuple[str, ...] | None
    reason: str


def secagg_config(task: Task) -> TaskSecureAggregation | None:
    raw = json.loads(task.config_json).get(SECAGG_CONFIG_KEY)
    return TaskSecureAggregation.model_validate(raw) if raw is not None else None


class SecureRounds:
    """The hub's half of secure aggregation: what sites post, what they may read, phase changes."""

    def __init__(self, sessions: SessionFactory, clock: Callable[[], float] = time.time) -> None:
        self.sessions = sessions
        self.clock = clock

    # -- the sites' requests ---------------------------------------------------------------
    def advertise(self, task_id: str, site: Site, ad: Advertisement) -> None:
        """Phase 1: keep the site's public keys. The same keys again are fine (a retried
        request); different ones are refused: a site that lost its keys has dropped out."""
        with self.sessions.begin() as s:
            task, state = self._task(s, task_id, site)
            have = s.scalar(_of(SecAggKey, task).where(SecAggKey.site == site.name))
            if have is not None:
                if (have.encryption_key, have.masking_key) == (ad.encryption_key, ad.masking_key):
                    return
                raise Conflict(
                    f"secure aggregation, round {task.round}: site {site.name!r} advertised other keys before; a "
                    "site that lost its keys takes no further part in this round",
                    task=task_id,
                )
            _expect_phase(state, "keys", task)
            s.add(
                SecAggKey(
                    experiment_id=task.experiment_id,
                    round=task.round,
                    site=site.name,
                    encryption_key=ad.encryption_key,
                    masking_key=ad.masking_key,
                )
            )

    def roster(self, task_id: str, site: Site) -> Roster | SecAggPhase:
        with self.sessions() as s:
            task, state = self._task(s, task_id, site)
            if state.roster is None:
                return _not_yet(state)
            _member(state.roster, site.name, "advertised keys in time", task)
            rows = s.scalars(_of(SecAggKey, task).where(SecAggKey.site.in_(state.roster))).all()
            return Roster(
                sites={
                    r.site: Advertisement(encryption_key=r.encryption_key, masking_key=r.masking_key)
                    for r in sorted(rows, key=lambda r: r.site)
                }
            )

    def post_shares(self, task_id: str, site: Site, outbox: ShareOutbox) -> None:
        """Phase 2: one ciphertext for every member of the site's neighbourhood in the round's
        graph (with the complete graph: every roster member), itself included, exactly."""
        with self.sessions.begin() as s:
            task, state = self._task(s, task_id, site)
            _expect_phase(state, "shares", task)
            roster = state.roster or ()
            _member(roster, site.name, "advertised keys in time", task)
            expected = _neighbourhood(task, state, site.name)
            if set(outbox.ciphertexts) != expected:
                missing = sorted(expected - set(outbox.ciphertexts))[:5]
                extra = sorted(set(outbox.ciphertexts) - expected)[:5]
                if len(expected) == len(roster):
                    to = f"exactly the roster's {len(roster)} sites (missing {missing}, not in the roster {extra})"
                else:
                    to = (
                        f"exactly the site's neighbourhood in the round's graph, its {len(expected) - 1} neighbours "
                        f"and itself (missing {missing}, not in it {extra})"
                    )
                raise DataError(
                    f"secure aggregation, round {task.round}: shares must go to {to}; fetch the roster and share again",
                    task=task_id,
                )
            if s.scalar(_of(SecAggShare, task).where(SecAggShare.sender == site.name).limit(1)) is not None:
                return  # sent before: the first shares stand (a retried request)
            for receiver, ciphertext in sorted(outbox.ciphertexts.items()):
                s.add(
                    SecAggShare(
                        experiment_id=task.experiment_id,
                        round=task.round,
                        sender=site.name,
                        receiver=receiver,
                        ciphertext=ciphertext,
                    )
                )

    def inbox(self, task_id: str, site: Site) -> ShareInbox | SecAggPhase:
        with self.sessions() as s:
            task, state = self._task(s, task_id, site)
            if state.shared is None:
                return _not_yet(state)
            _member(state.shared, site.name, "sent its shares in time", task)
            rows = s.scalars(
                _of(SecAggShare, task).where(SecAggShare.receiver == site.name, SecAggShare.sender.in_(state.shared))
            ).all()
            return ShareInbox(ciphertexts={r.sender: r.ciphertext for r in sorted(rows, key=lambda r: r.sender)})

    def check_masking(self, task_id: str, site: Site) -> TaskSecureAggregation:
        """Before a masked update is read: the round is at masking and the site shared."""
        with self.sessions() as s:
            task, state = self._task(s, task_id, site)
            _expect_phase(state, "masking", task)
            _member(state.shared or (), site.name, "sent its shares in time", task)
            config = secagg_config(task)
            assert config is not None  # _task checked it
            return config

    def unmasking(self, task_id: str, site: Site) -> Unmasking | SecAggPhase:
        with self.sessions() as s:
            task, state = self._task(s, task_id, site)
            if state.survivors is None:
                return _not_yet(state)
            _member(state.survivors, site.name, "sent its masked update in time", task)
            shared = state.shared or ()
            return Unmasking(survivors=list(state.survivors), dropped=sorted(set(shared) - set(state.survivors)))

    def answer(self, task_id: str, site: Site, answer: UnmaskingAnswer) -> None:
        """Phase 4: the shares that remove the masks; exactly the sites the hub named."""
        with self.sessions.begin() as s:
            task, state = self._task(s, task_id, site)
            _expect_phase(state, "unmasking", task)
            survivors = state.survivors or ()
            _member(survivors, site.name, "sent its masked update in time", task)
            near = _neighbourhood(task, state, site.name)
            alive = set(survivors) & near
            dropped = (set(state.shared or ()) - set(survivors)) & near
            if set(answer.self_mask) != alive or set(answer.masking_key) != dropped:
                whose = "" if near >= set(state.roster or ()) else " in the site's neighbourhood"
                raise DataError(
                    f"secure aggregation, round {task.round}: the answer must hold a self-mask share for each of the "
                    f"{len(alive)} survivors and a key share for each of the {len(dropped)} dropped sites{whose}, as "
                    "named by GET .../secagg/unmasking",
                    task=task_id,
                )
            try:
                with s.begin_nested():
                    s.add(
                        SecAggReveal(
                            experiment_id=task.experiment_id,
                            round=task.round,
                            site=site.name,
                            answer_json=answer.model_dump_json(),
                        )
                    )
            except IntegrityError:
                return  # answered before (a retried request): the first answer stands

    # -- the orchestrator's view -------------------------------------------------------------
    def step(
        self,
        experiment_id: int,
        round_index: int,
        *,
        selected: Sequence[str],
        threshold: int,
        round_deadline: float,
        phase_timeout_s: float,
    ) -> tuple[SecAggState, bool]:
        """Close the current phase if it is due; return the state after, and whether it changed."""
        now = self.clock()
        with self.sessions.begin() as s:
            state = _state(s, experiment_id, round_index, threshold, now)
            failed = _failed_sites(s, experiment_id, round_index)
            if state.phase == "keys":
                expected = frozenset(selected)
                arrived = _sites(s, SecAggKey.site, experiment_id, round_index)
                closes_at = round_deadline
            elif state.phase == "shares":
                expected = frozenset(state.roster or ())
                arrived = _sites(s, SecAggShare.sender, experiment_id, round_index)
                closes_at = state.since + phase_timeout_s
            elif state.phase == "masking":
                expected = frozenset(state.shared or ())
                arrived = frozenset(
                    s.scalars(
                        select(Update.site).where(Update.experiment_id == experiment_id, Update.round == round_index)
                    )
                )
                # The sites exchanged keys before they trained: their updates may take until the
                # round's deadline (as in any round), and a phase's time after it.
                closes_at = max(round_deadline, state.since + phase_timeout_s)
            elif state.phase == "unmasking":
                expected = frozenset(state.survivors or ())
                arrived = _sites(s, SecAggReveal.site, experiment_id, round_index)
                failed = frozenset()  # a survivor's task is complete; it only answers or not
                closes_at = state.since + phase_timeout_s
            else:
                return state, False
            decision = decide_phase(
                PhaseView(
                    phase=state.phase,
                    expected=expected,
                    arrived=arrived & expected,
                    failed=failed & expected,
                    threshold=threshold,
                    now=now,
                    closes_at=closes_at,
                )
            )
            if decision.action == "wait":
                return state, False
            row = _row(s, experiment_id, round_index)
            if decision.action == "abort":
                row.phase, row.phase_since, row.reason = "aborted", now, f"round {round_index}: {decision.reason}"
            else:
                members = json.dumps(sorted(decision.members))
                if state.phase == "keys":
                    row.roster_json, row.phase = members, "shares"
                    _extend_deadlines(s, experiment_id, round_index, decision.members, now + 3 * phase_timeout_s)
                elif state.phase == "shares":
                    row.shared_json, row.phase = members, "masking"
                elif state.phase == "masking":
                    row.survivors_json, row.phase = members, "unmasking"
                else:
                    row.phase = "done"
                row.phase_since = now
            return _as_state(row), True

    def material(self, experiment_id: int, round_index: int) -> tuple[dict[str, Advertisement], dict[str, dict]]:
        """The roster's public keys and the unmasking answers, for removing the masks."""
        with self.sessions() as s:
            keys = s.scalars(
                select(SecAggKey).where(SecAggKey.experiment_id == experiment_id, SecAggKey.round == round_index)
            ).all()
            reveals = s.scalars(
                select(SecAggReveal).where(
                    SecAggReveal.experiment_id == experiment_id, SecAggReveal.round == round_index
                )
            ).all()
        ads = {k.site: Advertisement(encryption_key=k.encryption_key, masking_key=k.masking_key) for k in keys}
        answers = {}
        for r in reveals:
            answer = UnmaskingAnswer.model_validate_json(r.answer_json)
            answers[r.site] = {
                "self_mask": {site: base64.b64decode(v) for site, v in answer.self_mask.items()},
                "masking_key": {site: base64.b64decode(v) for site, v in answer.masking_key.items()},
            }
        return ads, answers

    def forget(self, experiment_id: int, round_index: int) -> None:
        """Drop a closed round's keys, shares and answers: useless once the round is decided,
        and nobody should be able to combine them with a later leak."""
        with self.sessions.begin() as s:
            for table in (SecAggKey, SecAggShare, SecAggReveal):
                s.query(table).filter(table.experiment_id == experiment_id, table.round == round_index).delete()

    # -- helpers ----------------------------------------------------------------------------
    def _task(self, s: Session, task_id: str, site: Site) -> tuple[Task, SecAggState]:
        """This site's TRAIN task of an open secure-aggregation round, and the round's state."""
        task = s.get(Task, task_id)
        if task is None or task.site_id != site.id:
            raise NotFound(f"no task {task_id} for site {site.name!r}", task=task_id)
        config = secagg_config(task)
        if task.kind != TaskKind.TRAIN or config is None or task.model is not None:
            raise DataError(
                f"task {task_id} is not a training task under secure aggregation; only those take part in its phases",
                task=task_id,
            )
        exp = s.get(Experiment, task.experiment_id)
        rnd = s.scalar(select(Round).where(Round.experiment_id == task.experiment_id, Round.index == task.round))
        if exp is None or exp.status != ExperimentStatus.RUNNING or rnd is None or rnd.status != RoundStatus.OPEN:
            raise Conflict(f"task {task_id}: its round is closed; nothing more to do for it", task=task_id)
        if task.status in _FAILED:
            raise Conflict(f"task {task_id} has ended ({task.status}); it takes no further part", task=task_id)
        return task, _state(s, task.experiment_id, task.round, config.threshold, self.clock())


def _of(table: type[SecAggKey] | type[SecAggShare], task: Task):  # type: ignore[no-untyped-def]
    return select(table).where(table.experiment_id == task.experiment_id, table.round == task.round)


def _row(s: Session, experiment_id: int, round_index: int) -> SecAggRound:
    row = s.scalar(
        select(SecAggRound).where(SecAggRound.experiment_id == experiment_id, SecAggRound.round == round_index)
    )
    assert row is not None
    return row


def _state(s: Session, experiment_id: int, round_index: int, threshold: int, now: float) -> SecAggState:
    row = s.scalar(
        select(SecAggRound).where(SecAggRound.experiment_id == experiment_id, SecAggRound.round == round_index)
    )
    if row is None:
        row = SecAggRound(
            experiment_id=experiment_id, round=round_index, threshold=threshold, phase="keys", phase_since=now
        )
        try:
            with s.begin_nested():
                s.add(row)
        except IntegrityError:  # created meanwhile by another request
            row = _row(s, experiment_id, round_index)
    return _as_state(row)


def _as_state(row: SecAggRound) -> SecAggState:
    def members(raw: str | None) -> tuple[str, ...] | None:
        return tuple(json.loads(raw)) if raw is not None else None

    return SecAggState(
        experiment_id=row.experiment_id,
        round=row.round,
        threshold=row.threshold,
        phase=row.phase,
        since=row.phase_since,
        roster=members(row.roster_json),
        shared=members(row.shared_json),
        survivors=members(row.survivors_json),
        reason=row.reason or "",
    )


def _sites(s: Session, column, experiment_id: int, round_index: int) -> frozenset[str]:  # type: ignore[no-untyped-def]
    table = column.class_
    return frozenset(
        s.scalars(select(column).where(table.experiment_id == experiment_id, table.round == round_index).distinct())
    )


def _failed_sites(s: Session, experiment_id: int, round_index: int) -> frozenset[str]:
    rows = s.scalars(
        select(Site.name)
        .join(Task, Task.site_id == Site.id)
        .where(
            Task.experiment_id == experiment_id,
            Task.round == round_index,
            Task.kind == TaskKind.TRAIN,
            Task.model.is_(None),
            Task.status.in_(_FAILED),
        )
    )
    return frozenset(rows)


def _extend_deadlines(s: Session, experiment_id: int, round_index: int, sites: frozenset[str], until: float) -> None:
    """The roster's tasks (and their round) may still take uploads after the round's deadline:
    the key phase can close as late as that deadline, and the three phases after it have their
    own time limits."""
    site_ids = select(Site.id).where(Site.name.in_(sorted(sites)))
    s.execute(
        update(Task)
        .where(
            Task.experiment_id == experiment_id,
            Task.round == round_index,
            Task.kind == TaskKind.TRAIN,
            Task.model.is_(None),
            Task.site_id.in_(site_ids),
            Task.deadline < until,
        )
        .values(deadline=until)
    )
    s.execute(
        update(Round)
        .where(Round.experiment_id == experiment_id, Round.index == round_index, Round.deadline < until)
        .values(deadline=until)
    )


def _neighbourhood(task: Task, state: SecAggState, site: str) -> frozenset[str]:
    """The site and its neighbours in the round's graph over the closed roster (all of it when
    the graph is complete): the same graph the sites compute (core/privacy/graph.py)."""
    config = secagg_config(task)
    assert config is not None  # _task checked it
    context = RoundContext(
        experiment=task.experiment_id, round=task.round, threshold=state.threshold, neighbours=config.neighbours
    )
    graph = communication_graph(state.roster or (), context)
    return graph.get(site, frozenset()) | {site}


def _not_yet(state: SecAggState) -> SecAggPhase:
    return SecAggPhase(phase=state.phase, reason=state.reason)  # type: ignore[arg-type]


def _expect_phase(state: SecAggState, phase: str, task: Task) -> None:
    if state.phase == "aborted":
        raise Conflict(f"secure aggregation, {state.reason}", task=task.id)
    if state.phase != phase:
        raise Conflict(
            f"secure aggregation, round {task.round}: the {phase} phase is not open (now: {state.phase}); this "
            "site is too late or too early for it",
            task=task.id,
        )


def _member(members: Sequence[str], site: str, what: str, task: Task) -> None:
    if site not in members:
        raise Conflict(
            f"secure aggregation, round {task.round}: site {site!r} is left out of this round (it had not {what})",
            task=task.id,
        )
