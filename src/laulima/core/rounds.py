"""The round state machine as pure logic, so the hub's orchestrator only does I/O around it.

Given what the database says about one open round (who was selected, who delivered, who
failed, who waits for its administrator's approval, the deadlines and the clock),
:func:`decide` says whether to keep waiting, aggregate or fail the round;
:func:`evaluation_due` says whether a checkpoint is followed by evaluation tasks. No I/O, no
clock of its own: the same view always yields the same answer.

A site whose policy holds the job for its administrator is *deciding*: a person, not a
program, must act, which can take longer than a round's deadline. So a deciding site keeps
the round open until the experiment's approval deadline (never less than the round's own
deadline); after that it counts as failed, and the round is decided without it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType

from laulima.core.protocol import FailureKind
from laulima.core.spec import ExperimentSpec

__all__ = ["NO_APPROVAL", "Decision", "RoundState", "RoundView", "decide", "evaluation_due", "failure_note"]

NO_APPROVAL = "no approval decision by the experiment's approval deadline"
"""Why a site still waiting for its administrator is counted as failed."""


class RoundState(StrEnum):
    """What an open round needs next."""

    WAIT = "wait"
    """Results are outstanding and the deadline is ahead."""
    AGGREGATE = "aggregate"
    """Every selected site is done, or the deadline passed, and the quorum is met."""
    FAIL = "fail"
    """Every selected site is done, or the deadline passed, and the quorum is not met."""


@dataclass(frozen=True)
class RoundView:
    """What the orchestrator knows about one open round at one instant."""

    index: int
    selected: tuple[str, ...]
    completed: frozenset[str]
    """Sites whose update was accepted."""
    failed: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    """Sites whose task ended without an update, with the reason (failed, cancelled, ...)."""
    deadline: float = 0.0
    min_sites: int = 1
    now: float = 0.0
    deciding: frozenset[str] = frozenset()
    """Selected sites whose task waits for their administrator's approval."""
    approval_deadline: float = 0.0
    """When the experiment's approval window closes (submission + ``approval_timeout_s``)."""

    @property
    def outstanding(self) -> tuple[str, ...]:
        return tuple(s for s in self.selected if s not in self.completed and s not in self.failed)

    def expected(self, site: str) -> bool:
        """Whether an outstanding ``site`` may still answer: before the deadline, or, while it
        waits for approval, before the approval deadline."""
        if site in self.deciding:
            return self.now < max(self.deadline, self.approval_deadline)
        return self.now < self.deadline


@dataclass(frozen=True)
class Decision:
    state: RoundState
    reason: str = ""
    sites: tuple[str, ...] = ()
    """For AGGREGATE: the sites whose updates are folded in, ordered by name."""


def failure_note(kind: str | None, reason: str | None) -> str:
    """How a site's failed task reads to people: ``refused: <reason>`` when the site's policy or
    administrator refused the job, ``failed (<kind>): <reason>`` otherwise."""
    if kind == FailureKind.REJECTED:
        return f"refused: {reason or 'no reason given'}"
    return f"failed ({kind or FailureKind.ERROR}): {reason or 'no reason given'}"


def _site_reason(site: str, why: str) -> str:
    """``site-b refused: <reason>`` for a refusal, ``site-a: <why>`` for everything else."""
    return f"{site} {why}" if why.startswith("refused: ") else f"{site}: {why}"


def decide(view: RoundView) -> Decision:
    """Wait, aggregate or fail: the round closes when nobody is outstanding or time is up,
    and fails at once when the sites still outstanding could no longer make the quorum.
    A site deciding on approval is waited for until the approval deadline (see the module)."""
    outstanding = view.outstanding
    done = tuple(sorted(s for s in view.selected if s in view.completed))
    expected = [s for s in outstanding if view.expected(s)]
    quorum_possible = len(done) + len(expected) >= view.min_sites
    if expected and quorum_possible:
        return Decision(RoundState.WAIT)
    if len(done) >= view.min_sites:
        return Decision(RoundState.AGGREGATE, sites=done)
    reasons = [_site_reason(site, view.failed[site]) for site in sorted(view.failed) if site in view.selected]
    for site in sorted(outstanding):
        if site in expected:
            why = "still waiting for approval at the site" if site in view.deciding else "no result yet"
        else:
            why = NO_APPROVAL if site in view.deciding else "no result before the deadline"
        reasons.append(f"{site}: {why}")
    timed_out = len(expected) < len(outstanding)
    when = "by the deadline" if timed_out and not expected else "(the others failed or were refused)"
    return Decision(
        RoundState.FAIL,
        reason=(
            f"round {view.index}: only {len(done)} of {len(view.selected)} selected sites returned "
            f"results {when} (min_sites = {view.min_sites}): {'; '.join(reasons) or 'none'}"
        ),
    )


def evaluation_due(spec: ExperimentSpec, round_index: int) -> bool:
    """Whether the global model produced by ``round_index`` is sent out for evaluation."""
    every = spec.evaluation.every
    if every > 0 and round_index % every == 0:
        return True
    return round_index == spec.rounds and spec.evaluation.final
