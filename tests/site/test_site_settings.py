"""Site settings: site.toml + token file, environment overrides, refused insecure setups."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from laulima.errors import ConfigurationError
from laulima.site.settings import SiteSettings, write_site_config

HUB = "http://127.0.0.1:8000"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.upper().startswith("LAULIMA_SITE_"):
            monkeypatch.delenv(key)


def test_written_config_loads_back(tmp_path: Path):
    home = tmp_path / "site-a"
    write_site_config(home, "site-a", HUB + "/", "s3cret", poll_wait_s=5)
    settings = SiteSettings.load(home)
    assert (settings.name, settings.hub_url, settings.token, settings.poll_wait_s) == ("site-a", HUB, "s3cret", 5)
    assert settings.home == home.resolve() and settings.work_dir == home.resolve() / "work"
    assert stat.S_IMODE((home / "token").stat().st_mode) == 0o600
    assert "s3cret" not in (home / "site.toml").read_text()
    assert "s3cret" not in repr(settings)


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    write_site_config(tmp_path, "site-a", HUB, "from-file")
    monkeypatch.setenv("LAULIMA_SITE_TOKEN", "from-env")
    monkeypatch.setenv("LAULIMA_SITE_HUB_URL", "https://hub.example.org")
    settings = SiteSettings.load(tmp_path)
    assert (settings.token, settings.hub_url) == ("from-env", "https://hub.example.org")


def test_missing_token_says_how_to_fix(tmp_path: Path):
    write_site_config(tmp_path, "site-a", HUB, "tok")
    (tmp_path / "token").unlink()
    with pytest.raises(ConfigurationError, match="LAULIMA_SITE_TOKEN or run `laulima site init`"):
        SiteSettings.load(tmp_path)


def test_token_readable_by_others_is_refused(tmp_path: Path):
    write_site_config(tmp_path, "site-a", HUB, "tok")
    (tmp_path / "token").chmod(0o644)
    with pytest.raises(ConfigurationError, match="chmod 600"):
        SiteSettings.load(tmp_path)


def test_plain_http_off_loopback_is_refused(tmp_path: Path):
    with pytest.raises(ConfigurationError, match="use https"):
        write_site_config(tmp_path, "site-a", "http://hub.example.org", "tok")
    assert not (tmp_path / "site.toml").exists()
    write_site_config(tmp_path, "site-a", "http://hub.lan", "tok", allow_insecure_http=True)
    assert SiteSettings.load(tmp_path).allow_insecure_http is True


def test_unknown_setting_names_file_and_field(tmp_path: Path):
    write_site_config(tmp_path, "site-a", HUB, "tok")
    with open(tmp_path / "site.toml", "a") as fh:
        fh.write("pol_wait_s = 3\n")
    with pytest.raises(ConfigurationError, match=r"site\.toml: 'pol_wait_s': unknown setting"):
        SiteSettings.load(tmp_path)


def test_bad_site_name_is_refused(tmp_path: Path):
    with pytest.raises(ConfigurationError, match="'name'"):
        write_site_config(tmp_path, "bad name!", HUB, "tok")
