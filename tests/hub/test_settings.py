"""Hub settings: plaintext only on loopback, defaults under home, one admin token kept across restarts."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from laulima.errors import ConfigurationError
from laulima.hub.settings import HubSettings


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "::", "hub.example.org", "192.168.0.1"])
def test_plaintext_is_refused_off_loopback(tmp_path: Path, host: str):
    with pytest.raises(ConfigurationError, match="plaintext is refused off loopback"):
        HubSettings(home=tmp_path, host=host)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.3.2.1", "::1", "localhost", "LOCALHOST"])
def test_loopback_hosts_are_accepted(tmp_path: Path, host: str):
    assert HubSettings(home=tmp_path, host=host).host == host


def test_environment_and_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("LAULIMA_HUB_DATABASE_URL", raising=False)  # set under --hub-backend=postgres-s3
    monkeypatch.setenv("LAULIMA_HUB_HOME", str(tmp_path / "h"))
    monkeypatch.setenv("LAULIMA_HUB_PORT", "9999")
    s = HubSettings()
    assert s.home == (tmp_path / "h").resolve() and s.port == 9999
    assert s.database_url == f"sqlite:///{tmp_path / 'h' / 'hub.db'}"
    assert s.max_upload_bytes == 2 * 1024**3 and s.long_poll_max_s == 30 and s.url == "http://127.0.0.1:9999"
    monkeypatch.setenv("LAULIMA_HUB_HOST", "0.0.0.0")
    with pytest.raises(ConfigurationError):
        HubSettings()


def test_admin_token_is_generated_once_private_and_reused(tmp_path: Path):
    s = HubSettings(home=tmp_path / "hub")
    token = s.resolve_admin_token()
    assert len(token) >= 32
    mode = stat.S_IMODE(s.admin_token_file.stat().st_mode)
    assert mode == 0o600
    assert HubSettings(home=tmp_path / "hub").resolve_admin_token() == token
    assert HubSettings(home=tmp_path / "hub", admin_token="x" * 20).resolve_admin_token() == "x" * 20
    with pytest.raises(ConfigurationError, match="shorter than 16"):
        HubSettings(home=tmp_path / "hub", admin_token="short").resolve_admin_token()
