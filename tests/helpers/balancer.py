"""A TCP load balancer for tests: what stands in front of several hub processes in production.

Round robin over the backends, per connection; a backend that refuses the connection is
skipped (as a load balancer's health check would take it out). It passes bytes through, so
mutual TLS stays end to end between the site and whichever hub process answers — as with a
layer-4 balancer (HAProxy in TCP mode, a cloud network load balancer).
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress

__all__ = ["Balancer", "balancer"]


class Balancer:
    def __init__(self, backends: Sequence[tuple[str, int]]) -> None:
        self.backends = list(backends)
        self._next = itertools.cycle(range(len(self.backends)))
        self.host = "127.0.0.1"
        self.port = 0
        self.connections: dict[int, int] = dict.fromkeys(range(len(self.backends)), 0)
        """Connections passed to each backend so far (the test checks both were used)."""

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream = None
        for _ in range(len(self.backends)):
            index = next(self._next)
            host, port = self.backends[index]
            try:
                upstream = await asyncio.open_connection(host, port)
            except OSError:
                continue
            self.connections[index] += 1
            break
        if upstream is None:
            writer.close()
            return
        up_reader, up_writer = upstream
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(256 * 1024):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with suppress(Exception):
            writer.close()


@contextmanager
def balancer(backends: Sequence[tuple[str, int]]) -> Iterator[Balancer]:
    """Serve on a free loopback port in a thread of its own until the block ends."""
    lb = Balancer(backends)
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    server: asyncio.Server | None = None

    async def serve() -> None:
        nonlocal server
        server = await asyncio.start_server(lb._handle, lb.host, 0)
        lb.port = server.sockets[0].getsockname()[1]
        ready.set()

    thread = threading.Thread(target=loop.run_forever, name="test-balancer", daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(serve(), loop).result(10)
    assert ready.is_set()
    try:
        yield lb
    finally:

        async def shut() -> None:
            if server is not None:
                server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(shut(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
