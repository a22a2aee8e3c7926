"""Wakes long-polling sites when the orchestrator creates their tasks, without polling the DB.

Each site has a generation counter. A long-poll reads the generation, queries the
database, and if nothing is there waits until the generation moves (or time runs out):
a task created between the query and the wait bumps the generation first, so it is
never missed. The orchestrator runs in its own thread and notifies through
``loop.call_soon_threadsafe``; everything else happens on the event loop.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable, Iterable

__all__ = ["TaskBoard"]


class TaskBoard:
    """Per-site generation counters owned by one asyncio event loop."""

    def __init__(self, *, recheck_s: float | None = None) -> None:
        self.recheck_s = recheck_s
        """Set when another hub process may create tasks without telling this one (several
        processes on SQLite): :meth:`wait` returns "look again" at least this often."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._generation: defaultdict[str, int] = defaultdict(int)
        self._epoch = 0
        """Bumped for everyone at once (``notify(None)``, shutdown)."""
        self._events: dict[str, asyncio.Event] = {}
        self.closed = False

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Attach to the loop that serves requests (called from the app's lifespan)."""
        self._loop = loop
        self.closed = False

    def generation(self, site: str) -> int:
        """Call on the event loop; pass the value to :meth:`wait` after querying the DB."""
        return self._generation[site] + self._epoch

    def notify(self, sites: Iterable[str] | None = None) -> None:
        """Thread-safe: new tasks exist for ``sites`` (None: for everyone)."""
        self._call(self._bump, None if sites is None else tuple(sites))

    def close(self) -> None:
        """Release every waiter (shutdown); later waits return at once."""
        self.closed = True
        self._call(self._bump, None)

    async def wait(self, site: str, seen: int, timeout: float) -> bool:
        """Wait until ``site``'s generation differs from ``seen``; False on timeout or close.
        True also after ``recheck_s`` (when set): the caller reads the database again."""
        if self.closed:
            return False
        if self.generation(site) != seen:
            return True
        event = self._events.get(site)
        if event is None:
            event = self._events[site] = asyncio.Event()
        recheck = self.recheck_s is not None and timeout > self.recheck_s
        try:
            await asyncio.wait_for(event.wait(), self.recheck_s if recheck else timeout)
        except TimeoutError:
            return recheck and not self.closed
        return not self.closed

    def _call(self, fn: Callable[[tuple[str, ...] | None], None], arg: tuple[str, ...] | None) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(fn, arg)
        except RuntimeError:  # the loop closed between the check and the call
            pass

    def _bump(self, sites: tuple[str, ...] | None) -> None:
        if sites is None:
            self._epoch += 1
            events, self._events = list(self._events.values()), {}
        else:
            events = []
            for name in sites:
                self._generation[name] += 1
                if name in self._events:
                    events.append(self._events.pop(name))
        for event in events:
            event.set()
