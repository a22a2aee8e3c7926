"""The operator's and the site admin's commands: ca init/revoke/renew/list, enroll, init BUNDLE, tokens."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import typer
from typer.testing import CliRunner

from laulima.cli_security import ca_app, site_enroll, site_init, token_app
from laulima.pki.bundle import read_bundle
from laulima.site.settings import SiteSettings

from .conftest import ADMIN_TOKEN, TLSHub

app = typer.Typer()
app.add_typer(ca_app, name="ca")
app.add_typer(token_app, name="token")
site = typer.Typer()
site.command("enroll")(site_enroll)
site.command("init")(site_init)
app.add_typer(site, name="site")
runner = CliRunner()


def run(*args: str) -> str:
    result = runner.invoke(app, list(args), catch_exceptions=False, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result.output


def test_enroll_a_remote_site_in_a_few_commands(tmp_path: Path):
    ca = tmp_path / "ca"
    run("ca", "init", "--dir", str(ca), "--hub-name", "hub.example.org", "--hub-name", "10.0.0.5")
    assert stat.S_IMODE((ca / "ca.key").stat().st_mode) == 0o600
    bundle = tmp_path / "site-a.laulima-site"
    run(
        "site",
        "enroll",
        "site-a",
        "--ca-dir",
        str(ca),
        "--hub-url",
        "https://hub.example.org:8780",
        "--out",
        str(bundle),
    )
    assert stat.S_IMODE(bundle.stat().st_mode) == 0o600
    assert json.loads(bundle.read_text())["format"] == "laulima-site-bundle/1"
    home = tmp_path / "hospital"
    out = run("site", "init", str(bundle), "--home", str(home))
    assert "site-a" in out and "valid until" in out
    settings = SiteSettings.load(home)
    assert settings.name == "site-a" and settings.hub_url == "https://hub.example.org:8780"
    assert settings.uses_certificate and settings.token is None and not (home / "token").exists()
    assert stat.S_IMODE((home / "tls" / "site.key").stat().st_mode) == 0o600
    assert settings.ssl_context() is not None
    listed = run("ca", "list", "--dir", str(ca))
    assert "site-a" in listed and "hub" in listed
    run("ca", "revoke", "site-a", "--dir", str(ca))
    assert "yes" in run("ca", "list", "--dir", str(ca))
    renewed = tmp_path / "renewed.laulima-site"
    run("ca", "renew", "site-a", "--dir", str(ca), "--hub-url", "https://hub.example.org:8780", "--out", str(renewed))
    assert read_bundle(renewed).cert_pem != read_bundle(bundle).cert_pem
    assert "hub certificate renewed" in run("ca", "renew", "--hub", "--dir", str(ca))


def test_a_second_ca_in_the_same_folder_is_refused(tmp_path: Path):
    run("ca", "init", "--dir", str(tmp_path / "ca"))
    result = runner.invoke(app, ["ca", "init", "--dir", str(tmp_path / "ca")])
    assert result.exit_code != 0 and "already holds a CA" in str(result.exception)


def test_tampered_bundles_are_refused(tmp_path: Path):
    run("ca", "init", "--dir", str(tmp_path / "ca"))
    run("ca", "init", "--dir", str(tmp_path / "other"))
    bundle = tmp_path / "b.json"
    run("site", "enroll", "site-a", "--ca-dir", str(tmp_path / "ca"), "--hub-url", "https://h:1", "--out", str(bundle))
    data = json.loads(bundle.read_text())
    data["ca_pem"] = (tmp_path / "other" / "ca.pem").read_text()
    bundle.write_text(json.dumps(data))
    result = runner.invoke(app, ["site", "init", str(bundle), "--home", str(tmp_path / "h")])
    assert "not signed by the bundle's CA" in str(result.exception)


def test_people_tokens_from_the_command_line(tls_hub: TLSHub):
    hub = ["--hub", f"https://127.0.0.1:{tls_hub.settings.port}", "--ca", str(tls_hub.ca.ca_file)]
    out = run("token", "create", "alice", "--role", "scientist", "--token", ADMIN_TOKEN, *hub)
    token = out.strip().splitlines()[-1]
    with tls_hub.client(token=token) as alice:
        assert alice.get("/experiments").status_code == 200
        assert alice.get("/sites").status_code == 403
    assert "alice" in run("token", "list", "--token", ADMIN_TOKEN, *hub)
    run("token", "revoke", "1", "--token", ADMIN_TOKEN, *hub)
    with tls_hub.client(token=token) as alice:
        assert alice.get("/experiments").status_code == 401
