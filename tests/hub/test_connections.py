"""Connection limits against a real hub under uvicorn on a loopback port, plain and mutual TLS.

Idle and slow-drip connections are closed after the request-head timeout, a handshake that
never completes after the TLS handshake timeout; one address cannot hold more than its share
of connections, and the hub logs each refusal (throttled). Linux routes all of 127.0.0.0/8 to
the loopback interface, so 127.0.0.2 plays "another client".
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from laulima.core.protocol import API_PREFIX
from laulima.hub.app import create_app
from laulima.hub.connections import address_key, effective_max_connections
from laulima.hub.server import uvicorn_config
from laulima.hub.settings import HubSettings
from laulima.pki.ca import CertificateAuthority
from laulima.processes import free_port

ADMIN_TOKEN = "connections-test-operator-token-0123"
OTHER_CLIENT = "127.0.0.2"
CLOSE_BOUND_S = 15.0
"""How long a test waits for the hub to close a connection before it fails (not a timing claim)."""


@dataclass
class RunningHub:
    settings: HubSettings
    server: uvicorn.Server
    thread: threading.Thread
    client_context: ssl.SSLContext | None

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.settings.port)

    def connect(self, source: str = "127.0.0.1", *, handshake: bool = True) -> socket.socket:
        """A connection from ``source``; with TLS and ``handshake``, the handshake done (no client certificate)."""
        sock = socket.create_connection(self.address, timeout=CLOSE_BOUND_S, source_address=(source, 0))
        if self.client_context is not None and handshake:
            return self.client_context.wrap_socket(sock, server_hostname="127.0.0.1")
        return sock

    def health(self, source: str = "127.0.0.1") -> int:
        transport = httpx.HTTPTransport(local_address=source, verify=self.client_context or True)
        scheme = "https" if self.client_context else "http"
        with httpx.Client(transport=transport, timeout=CLOSE_BOUND_S) as client:
            return client.get(f"{scheme}://127.0.0.1:{self.settings.port}{API_PREFIX}/health").status_code

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def start_hub(
    tmp: Path, *, tls: bool = False, http: str = "httptools", loop: str = "asyncio", **limits: Any
) -> RunningHub:
    values: dict[str, Any] = {"home": tmp / "hub", "port": free_port(), "admin_token": ADMIN_TOKEN}
    context = None
    if tls:
        ca = CertificateAuthority.init(tmp / "ca", federation="Connections test")
        values["ca_dir"] = ca.hub_dir
        context = ssl.create_default_context(cafile=str(ca.ca_file))
    settings = HubSettings(**values, **limits)
    config = uvicorn_config(
        settings, create_app(settings), http=http, loop=loop, log_level="warning", timeout_graceful_shutdown=1
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the hub did not start"
        time.sleep(0.02)
    return RunningHub(settings, server, thread, context)


@pytest.fixture
def hubs(tmp_path: Path) -> Iterator[Any]:
    """Factory of hubs on ``tmp_path``; all stopped at the end."""
    started: list[RunningHub] = []

    def make(**kwargs: Any) -> RunningHub:
        started.append(start_hub(tmp_path / f"h{len(started)}", **kwargs))
        return started[-1]

    yield make
    for hub in started:
        hub.stop()


@pytest.fixture
def hub_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="laulima")
    return caplog


def read_until_closed(sock: socket.socket) -> bytes:
    """What the hub sent before closing the connection; fails if it is still open after the bound."""
    received = b""
    deadline = time.monotonic() + CLOSE_BOUND_S
    while True:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            raise AssertionError(f"the hub kept the connection open; it sent {received!r}") from None
        except OSError:  # reset, or a TLS connection cut without close_notify
            return received
        if not chunk:
            return received
        received += chunk


def read_response(sock: socket.socket) -> bytes:
    """One whole HTTP response with a Content-Length."""
    data = b""
    for _ in range(100):
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep:
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            if len(body) >= length:
                return data
        chunk = sock.recv(65536)
        assert chunk, f"the hub closed the connection mid-response: {data!r}"
        data += chunk
    raise AssertionError(f"no complete response: {data!r}")


def is_open(sock: socket.socket) -> bool:
    """Still open from the hub's side: nothing to read, no end of stream."""
    sock.settimeout(0.2)
    try:
        return bool(sock.recv(1, socket.MSG_PEEK))
    except TimeoutError:
        return True
    except OSError:
        return False


def refusals(log: pytest.LogCaptureFixture, address: str) -> list[str]:
    return [
        r.getMessage()
        for r in log.records
        if r.name == "laulima.hub.connections" and f"from {address}" in r.getMessage()
    ]


HEALTH_REQUEST = b"GET " + API_PREFIX.encode() + b"/health HTTP/1.1\r\nHost: hub\r\n\r\n"

MODES = [
    pytest.param({"http": "httptools"}, id="plain-httptools"),
    pytest.param({"http": "h11"}, id="plain-h11"),
    pytest.param({"tls": True, "http": "httptools", "loop": "uvloop"}, id="tls-httptools-uvloop"),
    pytest.param({"tls": True, "http": "h11", "loop": "asyncio"}, id="tls-h11-asyncio"),
]


@pytest.mark.parametrize("mode", MODES)
def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout(hubs: Any, hub_log: Any, mode: dict):
    hub = hubs(request_header_timeout_s=1.0, **mode)
    with hub.connect() as idle:  # TLS: handshake completed without a certificate, as the attacker did
        assert read_until_closed(idle) == b""
    assert any("no request within 1 s (request_header_timeout_s)" in m for m in refusals(hub_log, "127.0.0.1"))
    assert hub.health() == 200


@pytest.mark.parametrize("mode", MODES[:2])
def test_a_slowloris_client_is_closed_although_it_keeps_sending(hubs: Any, mode: dict):
    hub = hubs(request_header_timeout_s=1.0, **mode)
    head = HEALTH_REQUEST[:-2] + b"X-Padding: " + b"a" * 200 + b"\r\n\r\n"
    with hub.connect() as slow:
        slow.settimeout(0.25)
        answer = b""
        for byte in head[:40]:  # far from the end of the head: the hub must not wait for it
            try:
                slow.sendall(bytes([byte]))
                answer = slow.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if answer:
                break
        else:
            raise AssertionError("the hub was still waiting for the request head after 40 bytes dripped in")
        answer += read_until_closed(slow)
    assert answer.startswith(b"HTTP/1.1 408") and b"request_header_timeout_s" in answer


def test_the_header_timeout_spares_keep_alive_and_applies_to_each_request(hubs: Any):
    hub = hubs(request_header_timeout_s=1.0)
    with hub.connect() as conn:
        conn.sendall(HEALTH_REQUEST)
        assert read_response(conn).startswith(b"HTTP/1.1 200")
        time.sleep(2.5)  # idle between requests longer than the header timeout: keep-alive's business (30 s)
        assert is_open(conn)
        conn.sendall(HEALTH_REQUEST[:10])  # the next request starts, and stalls
        assert read_until_closed(conn).startswith(b"HTTP/1.1 408")


def test_an_oversized_request_head_is_refused_with_431(hubs: Any):
    hub = hubs(max_request_header_bytes=4096)
    with hub.connect() as conn:
        conn.sendall(HEALTH_REQUEST[:-2] + b"".join(b"X-Filler-%d: %s\r\n" % (i, b"b" * 100) for i in range(60)))
        answer = read_until_closed(conn)
    assert answer.startswith(b"HTTP/1.1 431") and b"max_request_header_bytes" in answer
    assert hub.health() == 200


@pytest.mark.parametrize(("tls", "http"), [(False, "httptools"), (False, "h11"), (True, "httptools")])
def test_the_unread_body_of_an_early_answer_is_not_the_next_requests_head(hubs: Any, tls: bool, http: str):
    """A refused upload is answered before its body is read; the rest of that body must not
    count towards the next request's head on the same kept-alive connection (it did: 431)."""
    hub = hubs(tls=tls, http=http, max_request_header_bytes=4096)
    scheme = "https" if tls else "http"
    with httpx.Client(verify=hub.client_context or True, timeout=CLOSE_BOUND_S) as client:
        base = f"{scheme}://127.0.0.1:{hub.settings.port}{API_PREFIX}"
        for _ in range(3):
            r = client.put(f"{base}/blobs", content=b"\0" * 300_000)  # no token: refused at once
            assert r.status_code == 401
            assert client.get(f"{base}/health").status_code == 200


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_a_tls_handshake_that_never_completes_is_aborted(hubs: Any, loop: str):
    hub = hubs(tls=True, loop=loop, tls_handshake_timeout_s=1.0, request_header_timeout_s=60.0)
    with hub.connect(handshake=False) as raw:
        raw.sendall(b"\x16\x03\x01")  # the start of a ClientHello, and no more
        assert read_until_closed(raw) == b""
    assert hub.health() == 200


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_one_address_cannot_take_every_connection(hubs: Any, hub_log: Any, tls: bool):
    hub = hubs(tls=tls, max_connections_per_address=5, request_header_timeout_s=60.0, tls_handshake_timeout_s=60.0)
    with ExitStack() as flood:
        # TLS: bare TCP connections that never start the handshake count too
        held = [flood.enter_context(hub.connect(handshake=False)) for _ in range(5)]
        with hub.connect(handshake=False) as sixth:
            assert read_until_closed(sixth) == b""
        assert all(is_open(sock) for sock in held)
        assert hub.health(source=OTHER_CLIENT) == 200
        for _ in range(20):  # refused again and again: the log gets one line, not twenty
            with hub.connect(handshake=False) as again:
                read_until_closed(again)
    logged = refusals(hub_log, "127.0.0.1")
    assert logged and "max_connections_per_address (5)" in logged[0]
    assert len(logged) <= 2, logged

    deadline = time.monotonic() + CLOSE_BOUND_S  # the hub notices the closed sockets, then serves again
    while True:
        try:
            if hub.health() == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "127.0.0.1 was not served again after its connections closed"
        time.sleep(0.1)


def test_the_total_cap_applies_across_addresses(hubs: Any, hub_log: Any):
    hub = hubs(max_connections=3, request_header_timeout_s=60.0)
    with ExitStack() as held:
        for _ in range(3):
            held.enter_context(hub.connect())
        with hub.connect(source=OTHER_CLIENT) as fourth:
            assert read_until_closed(fourth) == b""
    assert any("max_connections (3)" in m for m in refusals(hub_log, OTHER_CLIENT))


def test_the_total_cap_fits_the_open_file_limit():
    assert effective_max_connections(1024, None) == 1024
    assert effective_max_connections(1024, 256) == 192  # 64 descriptors kept for the rest of the hub
    assert effective_max_connections(1024, 4096) == 1024
    assert effective_max_connections(5000, 4096) == 4096 - 512
    assert effective_max_connections(1024, 16) == 1


def test_an_ipv6_client_is_counted_by_its_64_prefix():
    assert address_key(("2001:db8:1:2:aaaa::1", 5, 0, 0)) == address_key(("2001:db8:1:2:bbbb::9", 6, 0, 0))
    assert address_key(("2001:db8:1:2::1", 5, 0, 0)) != address_key(("2001:db8:1:3::1", 5, 0, 0))
    assert address_key(("::ffff:10.0.0.1", 5, 0, 0)) == address_key(("10.0.0.1", 7)) == "10.0.0.1"
    assert address_key(None) == "unknown"
