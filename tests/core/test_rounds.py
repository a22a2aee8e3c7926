"""The round state machine: when an open round waits, aggregates or fails."""

from __future__ import annotations

import pytest

from laulima.core.protocol import FailureKind
from laulima.core.rounds import NO_APPROVAL, RoundState, RoundView, decide, evaluation_due, failure_note
from laulima.core.spec import parse_spec

ABC = ("a", "b", "c")


def view(completed: str = "", failed: dict[str, str] | None = None, now: float = 0.0, min_sites: int = 2) -> RoundView:
    return RoundView(
        index=3,
        selected=ABC,
        completed=frozenset(completed),
        failed=failed or {},
        deadline=10.0,
        min_sites=min_sites,
        now=now,
    )


@pytest.mark.parametrize(
    ("round_view", "state", "sites"),
    [
        (view(), RoundState.WAIT, ()),
        (view("ab"), RoundState.WAIT, ()),  # c is outstanding and time is left
        (view("abc"), RoundState.AGGREGATE, ("a", "b", "c")),
        (view("cb", {"a": "failed (error): boom"}), RoundState.AGGREGATE, ("b", "c")),
        (view("ba", now=10.0), RoundState.AGGREGATE, ("a", "b")),  # deadline reached, quorum met
        (view("a", now=11.0), RoundState.FAIL, ()),
        (view("a", {"b": "x", "c": "y"}), RoundState.FAIL, ()),  # everyone is done, quorum missed
        (view("", {"a": "x", "b": "y", "c": "z"}, min_sites=1), RoundState.FAIL, ()),
        (view("a", {"b": "x"}, min_sites=1), RoundState.WAIT, ()),  # c may still come
        (view("a", {"b": "x"}, now=10.0, min_sites=1), RoundState.AGGREGATE, ("a",)),
        (view("", {"a": "refused", "b": "x"}, min_sites=2), RoundState.FAIL, ()),  # c alone cannot make 2
        (view("", {"a": "refused"}, min_sites=2), RoundState.WAIT, ()),  # b and c still can
    ],
)
def test_decide(round_view: RoundView, state: RoundState, sites: tuple[str, ...]):
    decision = decide(round_view)
    assert decision.state == state
    assert decision.sites == sites


def test_failure_reason_names_the_round_the_counts_and_each_site():
    decision = decide(view("a", {"b": "failed (error): out of memory"}, now=12.0))
    assert decision.state == RoundState.FAIL
    assert decision.reason.startswith(
        "round 3: only 1 of 3 selected sites returned results by the deadline (min_sites = 2): "
    )
    assert "b: failed (error): out of memory" in decision.reason
    assert "c: no result before the deadline" in decision.reason


def deciding_view(
    completed: str = "a", deciding: str = "b", now: float = 0.0, approval_deadline: float = 100.0, min_sites: int = 2
) -> RoundView:
    """a, b, c selected, deadline 10; ``deciding`` sites wait for their administrator."""
    return RoundView(
        index=3,
        selected=ABC,
        completed=frozenset(completed),
        failed={"c": "failed (error): boom"},
        deadline=10.0,
        min_sites=min_sites,
        now=now,
        deciding=frozenset(deciding),
        approval_deadline=approval_deadline,
    )


@pytest.mark.parametrize("now", [0.0, 10.0, 50.0, 99.9])
def test_a_site_waiting_for_approval_keeps_the_round_open_until_the_approval_deadline(now: float):
    assert decide(deciding_view(now=now)).state == RoundState.WAIT


def test_a_site_still_deciding_at_the_approval_deadline_counts_as_failed():
    decision = decide(deciding_view(now=100.0))
    assert decision.state == RoundState.FAIL
    assert f"b: {NO_APPROVAL}" in decision.reason
    assert "c: failed (error): boom" in decision.reason
    # with the quorum met by the others, the round aggregates without it
    decision = decide(deciding_view(now=100.0, min_sites=1))
    assert (decision.state, decision.sites) == (RoundState.AGGREGATE, ("a",))


def test_an_approval_deadline_before_the_round_deadline_never_shortens_the_round():
    assert decide(deciding_view(now=5.0, approval_deadline=1.0)).state == RoundState.WAIT
    decision = decide(deciding_view(now=10.0, approval_deadline=1.0))
    assert decision.state == RoundState.FAIL and f"b: {NO_APPROVAL}" in decision.reason


def test_a_site_that_is_not_deciding_is_not_waited_for_past_the_deadline():
    decision = decide(deciding_view(deciding="", now=10.0))
    assert decision.state == RoundState.FAIL
    assert "b: no result before the deadline" in decision.reason


def test_a_deciding_site_that_cannot_make_the_quorum_is_not_waited_for():
    decision = decide(deciding_view(completed="", now=0.0, min_sites=3))
    assert decision.state == RoundState.FAIL
    assert "b: still waiting for approval at the site" in decision.reason


def test_a_refusal_by_a_site_reads_as_such_in_the_round_failure():
    assert failure_note(FailureKind.REJECTED.value, "not approved: unknown requester") == (
        "refused: not approved: unknown requester"
    )
    assert failure_note("timeout", "ran past 60 s") == "failed (timeout): ran past 60 s"
    assert failure_note(None, None) == "failed (error): no reason given"
    failed = {"b": failure_note("rejected", "policy: bundles only"), "c": failure_note("error", "boom")}
    decision = decide(view("a", failed))
    assert decision.state == RoundState.FAIL
    assert "b refused: policy: bundles only" in decision.reason
    assert "c: failed (error): boom" in decision.reason


def test_decide_is_independent_of_arrival_order():
    one = decide(RoundView(1, ("x", "y"), frozenset({"y", "x"}), {}, 5.0, 1, 0.0))
    two = decide(RoundView(1, ("y", "x"), frozenset({"x", "y"}), {}, 5.0, 1, 0.0))
    assert one.sites == two.sites == ("x", "y")


@pytest.mark.parametrize(
    ("every", "final", "rounds", "due"),
    [
        (1, True, 3, [1, 2, 3]),
        (2, False, 5, [2, 4]),
        (2, True, 5, [2, 4, 5]),
        (0, True, 3, [3]),
        (0, False, 3, []),
    ],
)
def test_evaluation_due(every: int, final: bool, rounds: int, due: list[int]):
    spec = parse_spec(
        {
            "name": "e",
            "algorithm": "laulima.algorithms.identity:Identity",
            "dataset": "d",
            "rounds": rounds,
            "evaluation": {"every": every, "final": final},
        }
    )
    assert [r for r in range(1, rounds + 1) if evaluation_due(spec, r)] == due
