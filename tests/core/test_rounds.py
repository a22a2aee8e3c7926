"""The round state machine: when an open round waits, aggregates or fails."""

from __future__ import annotations

import pytest

from laulima.core.rounds import RoundState, RoundView, decide, evaluation_due
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
            "algorithm": "m:C",
            "dataset": "d",
            "rounds": rounds,
            "evaluation": {"every": every, "final": final},
        }
    )
    assert [r for r in range(1, rounds + 1) if evaluation_due(spec, r)] == due
