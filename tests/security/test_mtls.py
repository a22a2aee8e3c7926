"""Mutual TLS on a real uvicorn hub: who gets in, who is refused, and what each side is told."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from laulima.errors import ConfigurationError, Forbidden
from laulima.hub.settings import HubSettings
from laulima.hub.tls import H11TLSProtocol
from laulima.pki.ca import CertificateAuthority
from laulima.site.client import HubClient

from .conftest import TLSHub, expired, start_tls_hub


def _refused(client: httpx.Client) -> None:
    """TLS 1.3: the handshake completes at the client, then the hub closes the connection."""
    with pytest.raises(httpx.TransportError), client:
        client.get("/tasks/next")


def test_a_site_with_its_certificate_gets_in(tls_hub: TLSHub):
    with tls_hub.site("site-a") as site:
        assert site.get("/tasks/next").status_code == 204
    with tls_hub.operator() as op:
        assert [s["name"] for s in op.get("/sites").json()] == ["site-a"]  # known from its first request


def test_a_client_without_a_certificate_is_refused(tls_hub: TLSHub):
    with tls_hub.client() as anonymous:
        r = anonymous.get("/tasks/next")
        assert r.status_code == 401 and "no client certificate" in r.json()["detail"]
        assert anonymous.get("/experiments").status_code == 401
        assert anonymous.get("/health").status_code == 200  # liveness only


def test_a_certificate_from_another_ca_is_refused_and_logged(tls_hub: TLSHub, tmp_path: Path, hub_log):
    other = CertificateAuthority.init(tmp_path / "other-ca")
    _refused(tls_hub.client(other.issue_site("site-a")))
    assert "TLS handshake refused" in hub_log.text and "unable to get local issuer certificate" in hub_log.text


def test_an_expired_certificate_is_refused_and_logged(tls_hub: TLSHub, hub_log):
    _refused(tls_hub.client(expired(tls_hub.ca, "site-a")))
    assert "certificate has expired" in hub_log.text


def test_revocation_takes_effect_without_a_restart(tls_hub: TLSHub, hub_log):
    with tls_hub.site("site-a") as site:
        assert site.get("/tasks/next").status_code == 204
        tls_hub.ca.revoke("site-a")
        r = site.get("/tasks/next")  # same keep-alive connection
    assert r.status_code == 403 and "revoked" in r.json()["detail"]
    assert "revoked" in hub_log.text
    with tls_hub.client(tls_hub.ca.issue_site("site-a")) as renewed:  # a new certificate works again
        assert renewed.get("/tasks/next").status_code == 204


def test_a_server_certificate_cannot_act_as_a_site(tls_hub: TLSHub, tmp_path: Path):
    hub_cert = tls_hub.ca.issue_hub(["hub.example.org"])
    # TLS refuses it (no clientAuth usage) before the app sees it
    _refused(tls_hub.client(hub_cert))


def test_the_site_agent_says_certificate_refused(tls_hub: TLSHub, tmp_path: Path):
    bad = expired(tls_hub.ca, "site-a")
    client = HubClient(
        f"https://127.0.0.1:{tls_hub.settings.port}",
        None,
        client=httpx.Client(verify=tls_hub.context(bad)),
        probe_verify=tls_hub.context(),
        attempts=2,
        backoff_base_s=0.01,
    )
    with pytest.raises(Forbidden, match="certificate refused by the hub"), client:
        client.next_task(0, attempts=2)
    tls_hub.certs["site-b"] = tls_hub.ca.issue_site("site-b")
    tls_hub.ca.revoke("site-b")
    revoked = HubClient(
        f"https://127.0.0.1:{tls_hub.settings.port}",
        None,
        client=httpx.Client(verify=tls_hub.context(tls_hub.certs["site-b"])),
        attempts=1,
    )
    with pytest.raises(Forbidden, match="certificate refused by the hub.*revoked"), revoked:
        revoked.next_task(0, attempts=1)


def test_the_site_refuses_a_hub_signed_by_another_ca(tls_hub: TLSHub, tmp_path: Path):
    other = CertificateAuthority.init(tmp_path / "other-ca")
    client = HubClient(
        f"https://127.0.0.1:{tls_hub.settings.port}",
        None,
        client=httpx.Client(verify=tls_hub.context(ca_file=other.ca_file)),
        attempts=1,
    )
    with pytest.raises(Forbidden, match="not signed by the federation CA"), client:
        client.next_task(0, attempts=1)


def test_the_h11_implementation_carries_the_certificate_too(tmp_path: Path):
    hub = start_tls_hub(tmp_path, http="h11")
    try:
        assert issubclass(hub.server.config.http, H11TLSProtocol)  # type: ignore[arg-type]
        with hub.site("site-a") as site:
            assert site.get("/tasks/next").status_code == 204
        with hub.client() as anonymous:
            assert anonymous.get("/tasks/next").status_code == 401
    finally:
        hub.stop()


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "hub.example.org"])
def test_token_mode_refuses_a_non_loopback_bind_but_tls_mode_accepts_it(tmp_path: Path, host: str):
    with pytest.raises(ConfigurationError, match="plaintext is refused off loopback"):
        HubSettings(home=tmp_path / "hub", host=host)
    ca = CertificateAuthority.init(tmp_path / "ca")
    settings = HubSettings(home=tmp_path / "hub", host=host, ca_dir=ca.hub_dir)
    assert settings.tls and settings.url.startswith("https://")
