"""The round state machine as pure logic, so the hub's orchestrator only does I/O around it.

Given what the database says about one open round (who was selected, who delivered, who
failed, the deadline and the clock), :func:`decide` says whether to keep waiting, aggregate
or fail the round; :func:`evaluation_due` says whether a checkpoint is followed by
evaluation tasks. No I/O, no clock of its own: the same view always yields the same answer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType

from laulima.core.spec import ExperimentSpec

__all__ = ["Decision", "RoundState", "RoundView", "decide", "evaluation_due"]


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

    @property
    def outstanding(self) -> tuple[str, ...]:
        return tuple(s for s in self.selected if s not in self.completed and s not in self.failed)


@dataclass(frozen=True)
class Decision:
    state: RoundState
    reason: str = ""
    sites: tuple[str, ...] = ()
    """For AGGREGATE: the sites whose updates are folded in, ordered by name."""


def decide(view: RoundView) -> Decision:
    """Wait, aggregate or fail: the round closes when nobody is outstanding or time is up,
    and fails at once when the sites still outstanding could no longer make the quorum."""
    outstanding = view.outstanding
    done = tuple(sorted(s for s in view.selected if s in view.completed))
    quorum_possible = len(done) + len(outstanding) >= view.min_sites
    if outstanding and view.now < view.deadline and quorum_possible:
        return Decision(RoundState.WAIT)
    if len(done) >= view.min_sites:
        return Decision(RoundState.AGGREGATE, sites=done)
    reasons = [f"{site}: {view.failed[site]}" for site in sorted(view.failed) if site in view.selected]
    reasons += [f"{site}: no result before the deadline" for site in sorted(outstanding)]
    when = "by the deadline" if outstanding and quorum_possible else "(the others failed or were refused)"
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
