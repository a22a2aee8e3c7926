"""Hub processes on one PostgreSQL database tell each other of new tasks and results (LISTEN/NOTIFY),
and on SQLite a long poll re-reads the database instead."""

from __future__ import annotations

import asyncio
import queue
import time

from laulima.hub.db import make_engine
from laulima.hub.notify import TaskBoard
from laulima.hub.peers import PgPeers


def _listening(peers: PgPeers) -> tuple[queue.Queue, queue.Queue]:
    tasks: queue.Queue = queue.Queue()
    wakes: queue.Queue = queue.Queue()
    peers.start(on_tasks=tasks.put, on_wake=wakes.put)
    return tasks, wakes


def test_news_of_one_process_reaches_the_others_and_not_itself(postgres):
    url = postgres.create_database("peers_news")
    engine = make_engine(url)
    a, b = PgPeers(engine, sender="a"), PgPeers(engine, sender="b")
    a_tasks, a_wakes = _listening(a)
    b_tasks, b_wakes = _listening(b)
    try:
        time.sleep(1.0)  # both listening
        a.publish_tasks(["site-b", "site-a"])
        assert b_tasks.get(timeout=10) == ["site-a", "site-b"]
        a.publish_wake(sites_changed=True)
        assert b_wakes.get(timeout=10) is True
        b.publish_wake()
        assert a_wakes.get(timeout=10) is False
        a.publish_tasks([f"site-{i:04d}-with-a-long-name" for i in range(1000)])  # over NOTIFY's 8000 bytes
        assert b_tasks.get(timeout=10) is None  # "everyone": they all look again
        time.sleep(0.5)
        assert a_tasks.empty(), "a process must not wake itself through the channel"
    finally:
        a.stop()
        b.stop()
        engine.dispose()
        postgres.drop_database("peers_news")


def test_a_waiting_long_poll_looks_again_when_another_process_may_have_made_its_task():
    async def run() -> tuple[bool, bool]:
        board = TaskBoard(recheck_s=0.2)
        board.bind(asyncio.get_running_loop())
        again = await board.wait("site-a", board.generation("site-a"), 30.0)
        plain = TaskBoard()
        plain.bind(asyncio.get_running_loop())
        timed_out = await plain.wait("site-a", plain.generation("site-a"), 0.2)
        return again, timed_out

    again, timed_out = asyncio.run(run())
    assert again is True  # "read the database again" (after 30 s without a recheck it would be False)
    assert timed_out is False  # without peers: the wait simply ends
