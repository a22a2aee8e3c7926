"""Leases: exactly one hub process orchestrates each experiment, and another takes over when it stops."""

from __future__ import annotations

import os
import subprocess
import sys

from sqlalchemy import select

from laulima.hub.db import Lease, SessionFactory
from laulima.hub.leases import Leases, experiment_lease

from .conftest import SteppedClock


def _holders(hub_sessions: SessionFactory) -> dict[str, str]:
    with hub_sessions() as s:
        return {row.name: row.holder for row in s.scalars(select(Lease))}


def test_one_process_holds_each_lease_until_it_expires_then_another_takes_over(hub_sessions: SessionFactory):
    clock = SteppedClock()
    a, b = Leases(hub_sessions, ttl_s=10, clock=clock), Leases(hub_sessions, ttl_s=10, clock=clock)
    names = [experiment_lease(1), experiment_lease(2)]
    assert a.claim(names[:1]) == {names[0]}
    assert b.claim(names) == {names[1]}  # the first is a's, the second was free
    assert a.claim(names) == {names[0]}
    assert _holders(hub_sessions) == {names[0]: a.holder, names[1]: b.holder}

    clock.now += 6  # past half the time: each renews its own, nobody takes anything
    assert a.claim(names) == {names[0]} and b.claim(names) == {names[1]}
    clock.now += 9  # 15 s after the first claim, 9 s after the renewals: still theirs
    assert b.claim(names) == {names[1]} and a.holds(names[0])

    clock.now += 11  # a stopped renewing (paused, or died on another machine): b takes over
    assert b.claim(names) == set(names)
    assert _holders(hub_sessions)[names[0]] == b.holder
    assert not a.holds(names[0])
    assert a.claim(names) == set()  # a, waking up, learns it lost it and does not take it back


def test_release_lets_another_process_take_over_at_once(hub_sessions: SessionFactory):
    clock = SteppedClock()
    a, b = Leases(hub_sessions, ttl_s=60, clock=clock), Leases(hub_sessions, ttl_s=60, clock=clock)
    name = experiment_lease(7)
    assert a.claim([name]) == {name}
    assert b.claim([name]) == set()
    a.release()
    assert b.claim([name]) == {name}


def test_a_lease_of_a_dead_process_on_this_machine_is_taken_over_before_it_expires(hub_sessions: SessionFactory):
    clock = SteppedClock()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has exited
    a = Leases(hub_sessions, ttl_s=3600, clock=clock)
    a.holder = a.holder.replace(f":{os.getpid()}:", f":{pid}:")  # as that process would have named itself
    name = experiment_lease(3)
    assert a.claim([name]) == {name}
    b = Leases(hub_sessions, ttl_s=3600, clock=clock)
    assert b.claim([name]) == {name}, "a killed hub's experiments must not wait an hour"


def test_a_living_process_keeps_its_lease(hub_sessions: SessionFactory):
    clock = SteppedClock()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        a = Leases(hub_sessions, ttl_s=3600, clock=clock)
        a.holder = a.holder.replace(f":{os.getpid()}:", f":{other.pid}:")
        name = experiment_lease(4)
        assert a.claim([name]) == {name}
        assert Leases(hub_sessions, ttl_s=3600, clock=clock).claim([name]) == set()
    finally:
        other.kill()
        other.wait()


def test_leases_are_written_only_when_taken_or_renewed(hub_sessions: SessionFactory):
    clock = SteppedClock()
    a = Leases(hub_sessions, ttl_s=10, clock=clock)
    name = experiment_lease(5)
    a.claim([name])
    with hub_sessions.begin() as s:  # if claim wrote again within half the time, it would restore the holder
        s.get(Lease, name).holder = "someone-else"
    clock.now += 4
    assert a.claim([name]) == {name}
    assert _holders(hub_sessions)[name] == "someone-else"


def test_renewal_keeps_a_busy_process_s_leases_and_drops_those_taken_from_it(hub_sessions: SessionFactory):
    """A step longer than the lease (hundreds of updates read back from a bucket) must not
    let another process take the experiment over while this one still works on it."""
    clock = SteppedClock()
    a, b = Leases(hub_sessions, ttl_s=10, clock=clock), Leases(hub_sessions, ttl_s=10, clock=clock)
    busy, lost = experiment_lease(8), experiment_lease(9)
    assert a.claim([busy, lost]) == {busy, lost}
    with hub_sessions.begin() as s:  # as if a had been paused past the lease and b had taken it
        s.get(Lease, lost).holder = b.holder
    for _ in range(5):  # 40 s of work, renewed every 8 s (the renewal thread's pace)
        clock.now += 8
        a.renew()
    assert b.claim([busy]) == set() and a.holds(busy)
    assert not a.holds(lost) and lost not in a.held()
