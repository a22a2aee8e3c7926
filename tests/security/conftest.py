"""A real hub under uvicorn with mutual TLS on a free loopback port (TestClient cannot do TLS)."""

from __future__ import annotations

import datetime as dt
import logging
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from laulima.core.protocol import API_PREFIX
from laulima.hub.app import create_app
from laulima.hub.server import uvicorn_config
from laulima.hub.settings import HubSettings
from laulima.pki.ca import CertificateAuthority, IssuedCert
from laulima.processes import free_port

LOOP = "asyncio"
ADMIN_TOKEN = "security-test-operator-token-0123"


@dataclass
class TLSHub:
    """The hub, its CA, and a way to make clients with any credentials."""

    ca: CertificateAuthority
    settings: HubSettings
    server: uvicorn.Server
    thread: threading.Thread
    tmp: Path
    certs: dict[str, IssuedCert] = field(default_factory=dict)
    clients: list[httpx.Client] = field(default_factory=list)

    def stop(self) -> None:
        for client in self.clients:
            client.close()
        self.server.should_exit = True
        self.thread.join(10)

    @property
    def base(self) -> str:
        return f"https://127.0.0.1:{self.settings.port}{API_PREFIX}"

    def context(self, issued: IssuedCert | None = None, *, ca_file: Path | None = None) -> ssl.SSLContext:
        """Trusts the federation CA; presents ``issued`` (a site certificate) if given."""
        ctx = ssl.create_default_context(cafile=str(ca_file or self.ca.ca_file))
        if issued is not None:
            cert = self.tmp / f"{issued.name}-{issued.serial:x}.pem"
            key = cert.with_suffix(".key")
            cert.write_bytes(issued.cert_pem)
            key.write_bytes(issued.key_pem)
            ctx.load_cert_chain(str(cert), str(key))
        return ctx

    def client(self, issued: IssuedCert | None = None, token: str | None = None, **kw: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        client = httpx.Client(base_url=self.base, verify=self.context(issued), headers=headers, timeout=30, **kw)
        self.clients.append(client)
        return client

    def site(self, name: str) -> httpx.Client:
        if name not in self.certs:
            self.certs[name] = self.ca.issue_site(name)
        return self.client(self.certs[name])

    def operator(self) -> httpx.Client:
        return self.client(token=ADMIN_TOKEN)


def start_tls_hub(tmp: Path, *, http: str | None = None, **overrides: Any) -> TLSHub:
    ca = CertificateAuthority.init(tmp / "ca", federation="Test federation")
    values: dict[str, Any] = {
        "home": tmp / "hub",
        "port": free_port(),
        "ca_dir": ca.hub_dir,
        "admin_token": ADMIN_TOKEN,
        "orchestrator_tick_s": 0.05,
        "long_poll_max_s": 2.0,
    }
    values.update(overrides)
    settings = HubSettings(**values)
    extra = {"http": http} if http else {}
    config = uvicorn_config(
        settings, create_app(settings), log_level="warning", loop=LOOP, timeout_graceful_shutdown=1, **extra
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise AssertionError("TLS hub did not start")
        time.sleep(0.02)
    return TLSHub(ca=ca, settings=settings, server=server, thread=thread, tmp=tmp)


@pytest.fixture
def tls_hub(tmp_path: Path) -> Iterator[TLSHub]:
    hub = start_tls_hub(tmp_path)
    yield hub
    hub.stop()


def expired(ca: CertificateAuthority, name: str) -> IssuedCert:
    """A certificate of ``name`` whose validity ended yesterday."""
    start = dt.datetime.now(dt.UTC) - dt.timedelta(days=3)
    return ca.issue_site(name, days=2, not_before=start)


@pytest.fixture
def hub_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="laulima")
    return caplog


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    from tests.security.fuzz_counter import CASES, OUTCOMES, STEPS

    if STEPS:
        rules = ", ".join(f"{name} {n}" for name, n in STEPS.most_common())
        outcomes = ", ".join(f"{name} {n}" for name, n in sorted(OUTCOMES.items()))
        terminalreporter.write_line(
            f"stateful fuzzing: {sum(STEPS.values())} steps run against a mutual-TLS hub ({rules}); results: {outcomes}"
        )
    if CASES:
        total = sum(CASES.values())
        over_tls = sum(n for label, n in CASES.items() if label.endswith("(mTLS)"))
        operations = {label.removesuffix(" (mTLS)") for label in CASES}
        terminalreporter.write_line(
            f"schemathesis: {total} generated cases ({over_tls} over mutual TLS) against {len(operations)} operations "
            "of the hub's OpenAPI document"
        )
