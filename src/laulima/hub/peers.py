"""What one hub process tells the others on the same database: tasks exist, a result arrived.

Within a process, the orchestrator wakes long-polling sites through the
:class:`~laulima.hub.notify.TaskBoard` and is woken by the routes when a result arrives.
With several processes behind a load balancer, the site's long poll may wait in another
process than the one whose orchestrator created its task, and an update may arrive at a
process that does not orchestrate its experiment. On PostgreSQL, :class:`PgPeers` carries
both over ``LISTEN``/``NOTIFY``: a publisher thread sends, a listener thread receives and
wakes the local board and orchestrator. Notifications are hints — everything is re-read from
the database — so one lost while the listener reconnects costs at most a wake of everyone.
On SQLite (one machine) there is no channel; ``peer_poll_s`` makes long polls re-read the
database instead (:attr:`laulima.hub.notify.TaskBoard.recheck_s`).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Callable, Iterable
from typing import Any

from sqlalchemy import Engine

__all__ = ["CHANNEL", "PgPeers", "Peers"]

log = logging.getLogger(__name__)

CHANNEL = "laulima_hub"
MAX_PAYLOAD = 7900
"""PostgreSQL refuses NOTIFY payloads of 8000 bytes or more; longer site lists become "everyone"."""


class Peers:
    """No other processes to tell (SQLite, or one hub process): every call does nothing."""

    def publish_tasks(self, sites: Iterable[str] | None) -> None:
        """New tasks exist for ``sites`` (None: for anyone)."""

    def publish_wake(self, *, sites_changed: bool = False) -> None:
        """A result arrived, or (``sites_changed``) a site came or went."""

    def start(self, on_tasks: Callable[[list[str] | None], None], on_wake: Callable[[bool], None]) -> None:
        """Begin listening; the callbacks run on the listener's thread."""

    def stop(self) -> None: ...


class PgPeers(Peers):
    """Hub processes sharing one PostgreSQL database, told each other's news over NOTIFY."""

    def __init__(self, engine: Engine, *, sender: str, reconnect_s: float = 1.0) -> None:
        args, kwargs = engine.dialect.create_connect_args(engine.url)
        self._connect_args: tuple[Any, ...] = tuple(args)
        self._connect_kwargs: dict[str, Any] = {**kwargs, "autocommit": True}
        self.sender = sender
        self.reconnect_s = reconnect_s
        self._outbox: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def publish_tasks(self, sites: Iterable[str] | None) -> None:
        payload = json.dumps({"from": self.sender, "tasks": None if sites is None else sorted(sites)})
        if len(payload.encode()) > MAX_PAYLOAD:
            payload = json.dumps({"from": self.sender, "tasks": None})
        self._outbox.put(payload)

    def publish_wake(self, *, sites_changed: bool = False) -> None:
        self._outbox.put(json.dumps({"from": self.sender, "wake": bool(sites_changed)}))

    def start(self, on_tasks: Callable[[list[str] | None], None], on_wake: Callable[[bool], None]) -> None:
        self._stop.clear()
        for target, name in ((self._send, "publisher"), (lambda: self._listen(on_tasks, on_wake), "listener")):
            thread = threading.Thread(target=target, name=f"laulima-peers-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        self._outbox.put(None)
        for thread in self._threads:
            thread.join(5.0)
        self._threads.clear()

    def _connect(self) -> Any:
        import psycopg

        return psycopg.connect(*self._connect_args, **self._connect_kwargs)

    def _send(self) -> None:
        conn = None
        while not self._stop.is_set():
            payload = self._outbox.get()
            if payload is None:
                break
            try:
                if conn is None or conn.closed:
                    conn = self._connect()
                conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))
            except Exception as exc:  # the next message tries a new connection; peers re-read the DB anyway
                log.warning("could not tell the other hub processes (%s); continuing", exc)
                conn = None
        if conn is not None:
            conn.close()

    def _listen(self, on_tasks: Callable[[list[str] | None], None], on_wake: Callable[[bool], None]) -> None:
        first = True
        while not self._stop.is_set():
            try:
                with self._connect() as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    if not first:  # news may have been missed while disconnected
                        on_tasks(None)
                        on_wake(True)
                    first = False
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=0.5):
                            self._deliver(note.payload, on_tasks, on_wake)
            except Exception as exc:
                if self._stop.is_set():
                    break
                log.warning("lost the notification channel to the other hub processes (%s); reconnecting", exc)
                self._stop.wait(self.reconnect_s)

    def _deliver(
        self, payload: str, on_tasks: Callable[[list[str] | None], None], on_wake: Callable[[bool], None]
    ) -> None:
        try:
            message = json.loads(payload)
        except ValueError:
            return
        if not isinstance(message, dict) or message.get("from") == self.sender:
            return
        if "tasks" in message:
            sites = message["tasks"]
            on_tasks([str(s) for s in sites] if isinstance(sites, list) else None)
        if "wake" in message:
            on_wake(bool(message["wake"]))
