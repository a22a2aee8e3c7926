"""When a phase of secure aggregation closes: the rule, apart from the database and the clock.

A phase waits for the sites it expects. It closes as soon as every one of them has answered
or failed, or when its time is up; it advances with those that answered if they are at least
the threshold (the shares needed to remove the masks), and aborts otherwise — at once, when so
many have failed that the threshold is out of reach.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["PhaseDecision", "PhaseView", "decide_phase"]

_WHAT = {
    "keys": "advertised keys",
    "shares": "sent their shares",
    "masking": "sent a masked update",
    "unmasking": "answered the unmasking",
}


@dataclass(frozen=True)
class PhaseView:
    phase: str
    expected: frozenset[str]
    arrived: frozenset[str]
    failed: frozenset[str]
    threshold: int
    now: float
    closes_at: float


@dataclass(frozen=True)
class PhaseDecision:
    action: Literal["wait", "advance", "abort"]
    members: frozenset[str] = frozenset()
    reason: str = ""


def decide_phase(view: PhaseView) -> PhaseDecision:
    arrived = view.arrived & view.expected
    failed = (view.failed & view.expected) - arrived
    what = _WHAT.get(view.phase, view.phase)
    reachable = len(view.expected - failed)
    if reachable < view.threshold:
        return PhaseDecision(
            "abort",
            reason=(
                f"secure aggregation aborted at the {view.phase} phase: only {reachable} of {len(view.expected)} sites "
                f"can still take part, {view.threshold} are needed to unmask the sum (failed: "
                f"{', '.join(sorted(failed)[:10])}); the global model is kept and the next round runs"
            ),
        )
    if arrived | failed >= view.expected or view.now >= view.closes_at:
        if len(arrived) >= view.threshold:
            return PhaseDecision("advance", members=arrived)
        missing = sorted(view.expected - arrived)
        return PhaseDecision(
            "abort",
            reason=(
                f"secure aggregation aborted at the {view.phase} phase: {len(arrived)} of {len(view.expected)} sites "
                f"{what} in time, {view.threshold} are needed to unmask the sum (missing: "
                f"{', '.join(missing[:10])}); the global model is kept and the next round runs"
            ),
        )
    return PhaseDecision("wait")
