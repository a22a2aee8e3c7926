"""A site's privacy budget against a real hub and a real agent: an experiment whose differential
privacy costs more than the site allows is refused before anything runs, the site's ledger
stays as it was, and the scientist reads the site's reason in `laulima experiment status`."""

from __future__ import annotations

import os

import pytest
from typer.testing import CliRunner

from laulima.cli import app
from laulima.core.privacy.accountant import GaussianRelease, epsilon
from laulima.core.spec import parse_spec
from laulima.site.audit import AuditEvent, AuditLog
from laulima.site.privacy_ledger import PrivacyLedger
from tests.helpers.federation import logs, wait_for

pytestmark = pytest.mark.slow

LONG = 600  # a round timeout no test may wait for
ROUNDS, NOISE, DELTA = 3, 0.8, 1e-5


def test_an_experiment_over_the_sites_privacy_budget_is_refused_and_the_scientist_sees_why(federation):
    fed = federation(1, "tabular-demo", seed=3)
    home = fed.workdir / "sites" / "site-a"
    policy = home / "policy.toml"
    policy.write_text(policy.read_text() + "\n[privacy]\nmax_epsilon = 1.0\n")
    os.chmod(policy, 0o600)
    would = epsilon([GaussianRelease(NOISE, count=ROUNDS)], DELTA)
    assert would > 1.0
    before = PrivacyLedger(home).reservations()

    spec = parse_spec(
        {
            "name": "private",
            "algorithm": "laulima.algorithms.tabular:LogisticRegression",
            "dataset": "tabular-demo",
            "rounds": ROUNDS,
            "min_sites": 1,
            "round_timeout_s": LONG,
            "seed": 3,
            "config": {"lr": 0.1},
            "evaluation": {"every": 0, "final": False},
            "privacy": {"clip": 1.0, "noise_multiplier": NOISE, "delta": DELTA},
        }
    )
    exp = fed.submit(spec)
    wait_for(lambda: "site-a" in fed.client.experiment(exp.id).site_notes, 60, "site-a's refusal to show")
    reason = (
        f"privacy budget: this experiment would bring dataset 'tabular-demo' to ε = {would:.2f} ({ROUNDS} rounds, "
        f"noise multiplier {NOISE:g}, δ = 1e-05); the site allows ε = 1.00 and has spent 0.00 "
        "(ask for more noise or fewer rounds)"
    )
    note = fed.client.experiment(exp.id).site_notes["site-a"]
    assert reason in note, f"{note}\n{logs(fed)}"

    scientist = fed.client._http.headers["Authorization"].removeprefix("Bearer ")
    env = {"COLUMNS": "1000", "LAULIMA_HUB_URL": fed.hub.url, "LAULIMA_TOKEN": scientist}
    if fed.hub.ca_file:
        env["LAULIMA_CA_FILE"] = str(fed.hub.ca_file)
    status = CliRunner().invoke(app, ["experiment", "status", str(exp.id)], env=env)
    assert status.exit_code == 0, status.output
    assert reason in status.output, status.output

    done = fed.wait(exp.id, timeout=120)
    assert done.status == "failed", logs(fed)
    assert PrivacyLedger(home).reservations() == before == []
    events = [e.event for e in AuditLog(home).entries(experiment=exp.id)]
    assert AuditEvent.REFUSED in events and AuditEvent.PRIVACY_RESERVED not in events
    assert AuditEvent.STARTED not in events, events
