"""The operator's view of the sites through the `laulima` command, on a real hub with mutual TLS."""

from __future__ import annotations

from click.testing import Result
from typer.testing import CliRunner

from laulima.cli import app
from laulima.core.protocol import Header, SiteReport

from .conftest import ADMIN_TOKEN, TLSHub

runner = CliRunner()


def test_site_list_shows_status_version_and_cohorts_and_site_remove_shuts_a_site_out(tls_hub: TLSHub):
    url = f"https://127.0.0.1:{tls_hub.settings.port}"

    def laulima(*args: str) -> Result:
        env = {"COLUMNS": "200", "LAULIMA_CA_FILE": str(tls_hub.ca.ca_file)}
        return runner.invoke(app, [*args, "--hub", url, "--token", ADMIN_TOKEN], env=env)

    site_a, site_b = tls_hub.site("site-a"), tls_hub.site("site-b")
    r = site_a.get("/tasks/next", params={"wait": 0}, headers={Header.VERSION.value: "0.1.0"})
    assert r.status_code == 204
    report = SiteReport(version="0.1.0", datasets={"brains": 24})
    assert site_a.put("/sites/self/report", json=report.model_dump()).status_code == 204
    assert site_b.get("/tasks/next", params={"wait": 0}).status_code == 204
    tls_hub.ca.revoke("site-b")

    listed = laulima("site", "list")
    assert listed.exit_code == 0, listed.output
    rows = {line.split()[1]: line for line in listed.output.splitlines() if "site-" in line}
    assert "online" in rows["site-a"] and "0.1.0" in rows["site-a"] and "brains (24)" in rows["site-a"]
    assert "revoked" in rows["site-b"]

    removed = laulima("site", "remove", "site-a")
    assert removed.exit_code == 0 and "site-a" in removed.output and "removed" in removed.output, removed.output
    r = site_a.get("/tasks/next", params={"wait": 0})
    assert r.status_code == 403 and "removed from this federation" in r.json()["detail"]
    listed = laulima("site", "list")
    assert any("site-a" in line and "removed" in line for line in listed.output.splitlines()), listed.output
    missing = laulima("site", "remove", "nobody")
    assert missing.exit_code != 0
