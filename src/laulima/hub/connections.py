"""Connection limits: how many sockets one address and everybody may hold, and how long a
connection may take to say what it wants.

Without them a client needs no credentials to exhaust the hub's file descriptors: with
``CERT_OPTIONAL`` anyone completes the TLS handshake, and uvicorn times out only *keep-alive*
connections (after a response), not a fresh one that never sends a request. So:

* :class:`ConnectionGuard` counts open connections per client address (an IPv4 address, or
  an IPv6 /64, which one client typically owns whole) and in total, and refuses a connection
  over either cap at once, by closing it.
* :class:`GuardedConnectionMixin`, mixed into uvicorn's httptools or h11 protocol class, asks
  the guard at ``connection_made`` — before any TLS work: in TLS mode uvicorn gets no SSL
  context; the mixin wraps an admitted connection in the event loop's own ``SSLProtocol``
  (what ``create_server(ssl=...)`` would do) with a handshake time limit, which uvicorn does
  not expose. Then the request head (request line and headers) must arrive complete within
  ``request_header_timeout_s`` of the connection or of the first byte of the next request on
  a kept-alive connection, and within ``max_request_header_bytes``; a slow-drip (slowloris)
  client is closed even though it keeps sending. Keep-alive stays uvicorn's business.

Every refusal and time-out is logged, at most one line per address per ``LOG_INTERVAL_S``
with a count, so a flood cannot flood the log too.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import ssl
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = [
    "ConnectionGuard",
    "ConnectionLimits",
    "GuardedConnectionMixin",
    "address_key",
    "effective_max_connections",
    "guarded_protocol",
    "open_file_limit",
]

log = logging.getLogger("laulima.hub.connections")

LOG_INTERVAL_S = 10.0
MAX_LOGGED_ADDRESSES = 1024
"""Addresses with a pending refusal count; beyond it they are counted under one line."""
MIN_FD_HEADROOM = 64
"""Descriptors kept for the database, blob files, log files and the listening socket."""


def open_file_limit() -> int | None:
    """The process's soft ``RLIMIT_NOFILE``; None where unlimited or unknown."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return None
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft <= 0:
        return None
    return int(soft)


def effective_max_connections(requested: int, fd_limit: int | None) -> int:
    """``requested``, lowered so connections leave ``max(64, limit / 8)`` descriptors for the rest."""
    if fd_limit is None:
        return requested
    headroom = max(MIN_FD_HEADROOM, fd_limit // 8)
    return max(1, min(requested, fd_limit - headroom))


def address_key(peername: Any) -> str:
    """The address a per-address cap counts: the IPv4 address, or the IPv6 /64."""
    if not isinstance(peername, tuple) or not peername:
        return "unknown"
    host = str(peername[0])
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


@dataclass(frozen=True)
class ConnectionLimits:
    """The hub's connection settings, with the total cap already fitted to the descriptor limit."""

    max_connections: int
    max_connections_per_address: int
    request_header_timeout_s: float
    max_request_header_bytes: int
    tls_handshake_timeout_s: float

    @classmethod
    def from_settings(cls, settings: Any, fd_limit: int | None) -> ConnectionLimits:
        return cls(
            max_connections=effective_max_connections(settings.max_connections, fd_limit),
            max_connections_per_address=settings.max_connections_per_address,
            request_header_timeout_s=settings.request_header_timeout_s,
            max_request_header_bytes=settings.max_request_header_bytes,
            tls_handshake_timeout_s=settings.tls_handshake_timeout_s,
        )


class _ThrottledLog:
    """At most one line per address per interval: the first event at once, then a count."""

    def __init__(self, interval_s: float = LOG_INTERVAL_S, max_addresses: int = MAX_LOGGED_ADDRESSES) -> None:
        self.interval_s = interval_s
        self.max_addresses = max_addresses
        self._pending: dict[str, Counter[str]] = {}

    def event(self, address: str, what: str) -> None:
        if address not in self._pending and len(self._pending) >= self.max_addresses:
            address = "other addresses"
        pending = self._pending.get(address)
        if pending is not None:
            pending[what] += 1
            return
        log.warning("closed a connection from %s: %s", address, what)
        self._pending[address] = Counter()
        asyncio.get_running_loop().call_later(self.interval_s, self._flush, address)

    def _flush(self, address: str) -> None:
        pending = self._pending.get(address)
        if not pending:
            self._pending.pop(address, None)
            return
        log.warning(
            "closed %d more connection(s) from %s in the last %g s: %s",
            sum(pending.values()),
            address,
            self.interval_s,
            "; ".join(f"{n} x {what}" for what, n in pending.most_common()),
        )
        pending.clear()
        asyncio.get_running_loop().call_later(self.interval_s, self._flush, address)


class ConnectionGuard:
    """Open connections per address and in total; admits or refuses. Used from the event loop only."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.total = 0
        self.per_address: Counter[str] = Counter()
        self.events = _ThrottledLog()

    def admit(self, address: str) -> bool:
        """Count the connection in, or refuse it (and log why) when a cap is reached."""
        limits = self.limits
        if self.total >= limits.max_connections:
            self.events.event(address, f"the hub holds max_connections ({limits.max_connections}) connections")
            return False
        if self.per_address[address] >= limits.max_connections_per_address:
            self.events.event(
                address,
                f"the address holds max_connections_per_address ({limits.max_connections_per_address}) connections",
            )
            return False
        self.total += 1
        self.per_address[address] += 1
        return True

    def release(self, address: str) -> None:
        self.total -= 1
        left = self.per_address[address] - 1
        if left > 0:
            self.per_address[address] = left
        else:
            del self.per_address[address]

    def describe(self) -> str:
        limits = self.limits
        return (
            f"at most {limits.max_connections} connections, {limits.max_connections_per_address} per address; "
            f"request head within {limits.request_header_timeout_s:g} s and "
            f"{limits.max_request_header_bytes} bytes; TLS handshake within {limits.tls_handshake_timeout_s:g} s"
        )


def _ssl_protocol_class(loop: asyncio.AbstractEventLoop) -> Any:
    """The loop's own SSLProtocol: the class its ``create_server(ssl=...)`` wraps connections in."""
    uvloop = sys.modules.get("uvloop")
    if uvloop is not None and isinstance(loop, uvloop.Loop):
        return uvloop.loop.SSLProtocol
    from asyncio.sslproto import SSLProtocol

    return SSLProtocol


def _plain_response(status: bytes, message: str) -> bytes:
    body = message.encode("ascii", "replace")
    return (
        b"HTTP/1.1 " + status + b"\r\ncontent-type: text/plain; charset=utf-8\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body
    )


class GuardedConnectionMixin:
    """Admission, TLS with a handshake limit, and the request-head limits for a uvicorn protocol.

    Mixed in before uvicorn's ``HttpToolsProtocol`` or ``H11Protocol`` (and before
    :class:`laulima.hub.tls._PeerCertMixin`). Both implementations assign ``self.cycle`` when a
    request head is complete and call ``on_response_complete`` when its response is sent;
    those two points, and ``data_received``, are all this class relies on.
    """

    guard: ClassVar[ConnectionGuard]
    tls_context: ClassVar[ssl.SSLContext | None] = None

    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport

    _address: str | None = None
    """Set while this connection is counted by the guard."""
    _handshaking = False
    _http_started = False
    _awaiting_head = True
    _head_bytes = 0
    _head_timer: asyncio.TimerHandle | None = None

    # -- connection life ----------------------------------------------------------------
    def connection_made(self, transport: Any) -> None:
        if self._handshaking:  # called again by the SSLProtocol: the handshake is done
            self._handshaking = False
            self._start_http(transport)
            return
        address = address_key(transport.get_extra_info("peername"))
        if not self.guard.admit(address):
            transport.abort()
            return
        self._address = address
        if self.tls_context is None:
            self._start_http(transport)
        else:
            self._start_tls(transport)

    def _start_tls(self, transport: Any) -> None:
        """Wrap the raw connection as ``create_server(ssl=...)`` would, with our handshake limit."""
        self._handshaking = True
        waiter = self.loop.create_future()
        waiter.add_done_callback(self._handshake_done)
        tls = _ssl_protocol_class(self.loop)(
            self.loop,
            self,
            self.tls_context,
            waiter,
            server_side=True,
            ssl_handshake_timeout=self.guard.limits.tls_handshake_timeout_s,
            ssl_shutdown_timeout=self.guard.limits.tls_handshake_timeout_s,  # else 30 s per closed connection
        )
        transport.set_protocol(tls)
        tls.connection_made(transport)

    def _handshake_done(self, waiter: asyncio.Future[Any]) -> None:
        """A handshake that failed, timed out or lost its connection never reaches ``connection_lost``."""
        exc = None if waiter.cancelled() else waiter.exception()
        if self._http_started:
            return
        self._handshaking = False
        if self._address is not None and isinstance(exc, ConnectionAbortedError):
            limit = self.guard.limits.tls_handshake_timeout_s
            self.guard.events.event(self._address, f"TLS handshake not completed within {limit:g} s")
        self._release()

    def _start_http(self, transport: Any) -> None:
        self._http_started = True
        super().connection_made(transport)  # type: ignore[misc]
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        self._release()
        if self._http_started:
            super().connection_lost(exc)  # type: ignore[misc]

    def _release(self) -> None:
        if self._address is not None:
            self.guard.release(self._address)
            self._address = None

    # -- the request head ---------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        was_awaiting = self._awaiting_head
        if was_awaiting and self._head_timer is None:
            self._arm_head_timer()  # the first byte of a request on a kept-alive connection
        super().data_received(data)  # type: ignore[misc]
        # Count the chunk only if it was head from start to end. One that ended a refused
        # request's body (an early answer) began as body: its tail, if any, is not counted.
        if was_awaiting and self._awaiting_head:
            self._head_bytes += len(data)
            limit = self.guard.limits.max_request_header_bytes
            if self._head_bytes > limit and not self.transport.is_closing():
                self._close_with(
                    b"431 Request Header Fields Too Large",
                    f"the request line and headers exceed {limit} bytes (max_request_header_bytes)",
                )

    @property
    def cycle(self) -> Any:
        return self.__dict__.get("_cycle")

    @cycle.setter
    def cycle(self, value: Any) -> None:
        self.__dict__["_cycle"] = value
        if value is not None:  # uvicorn starts a request-response cycle: the head is complete
            self._awaiting_head = False
            self._head_bytes = 0
            self._cancel_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        cycle = self.cycle
        if cycle is None or not getattr(cycle, "more_body", False):
            self._awaiting_head, self._head_bytes = True, 0  # timed from the next request's first byte
        # else: an early answer (a refused upload) while the body still arrives; those bytes
        # are body, not the next head, and on_message_complete says when they end

    def on_message_complete(self) -> None:
        """httptools: the request's body has fully arrived (h11 has no such hook)."""
        parent = getattr(super(), "on_message_complete", None)
        if parent is not None:
            parent()
        cycle = self.cycle
        if cycle is not None and getattr(cycle, "response_complete", False):
            self._awaiting_head, self._head_bytes = True, 0

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.guard.limits.request_header_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self._awaiting_head or self.transport.is_closing():
            return
        limit = self.guard.limits.request_header_timeout_s
        if self._head_bytes:
            self._close_with(
                b"408 Request Timeout",
                f"the request line and headers did not arrive within {limit:g} s (request_header_timeout_s)",
            )
        else:
            self._report(f"no request within {limit:g} s (request_header_timeout_s)")
            self.transport.abort()  # nothing to flush; with TLS, no closing handshake to wait for

    def _close_with(self, status: bytes, message: str) -> None:
        self._report(message)
        self._awaiting_head = False
        self._cancel_head_timer()
        self.transport.write(_plain_response(status, message))
        self.transport.close()

    def _report(self, what: str) -> None:
        if self._address is not None:
            self.guard.events.event(self._address, what)


def guarded_protocol(base: type, guard: ConnectionGuard, tls_context: ssl.SSLContext | None) -> type:
    """``base`` (a uvicorn HTTP protocol class) with the guard, and TLS when a context is given."""
    return type(
        f"Guarded{base.__name__}",
        (GuardedConnectionMixin, base),
        {"guard": guard, "tls_context": tls_context, "__module__": __name__},
    )
