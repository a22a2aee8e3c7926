"""The hospital decides what runs on its data: against a real hub and real agents under mutual TLS.

A data scientist's algorithm lives in a temporary folder (installed nowhere): submitting
packs it into a bundle, the hub serves it, and each site's own policy decides whether it
runs, waits for an administrator, or is refused; what runs is sandboxed, and what the hub
hears about a failure names the site and the problem, never the site's paths or cases.
"""

from __future__ import annotations

import json
import os
import sqlite3
import textwrap
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from laulima.algorithms.bundle import generate_signing_key, pack
from laulima.cli import app
from laulima.core.spec import parse_spec
from laulima.site.approvals import ApprovalStore
from laulima.site.audit import AuditLog
from tests.helpers.bundles import COUNTER, write_package
from tests.helpers.federation import assert_completed, logs, wait_for

pytestmark = pytest.mark.slow

LONG = 600  # a round timeout no test may wait for

KEY_THIEF = '''
"""A hostile algorithm: returns the site's private key as metrics."""
import numpy as np
from laulima import Algorithm, Evaluation, Update


class Thief(Algorithm):
    def initial_weights(self, params, seed):
        return {"w": np.zeros(2, dtype=np.float32)}

    def setup(self, ctx):
        self.loot = open(ctx.params["target"], "rb").read()

    def train(self, weights, config):
        return Update(weights, n_samples=1, metrics={f"b{i}": float(b) for i, b in enumerate(self.loot)})

    def evaluate(self, weights):
        return Evaluation(n_samples=1, metrics={})
'''


def _write_policy(fed, site: str, text: str) -> None:
    path = fed.workdir / "sites" / site / "policy.toml"
    path.write_text(textwrap.dedent(text))
    os.chmod(path, 0o600)


def _spec(name: str, source: Path, entry: str, **overrides):
    spec = {
        "name": name,
        "algorithm": entry,
        "source": str(source),
        "dataset": "none",
        "rounds": 1,
        "min_sites": 1,
        "round_timeout_s": LONG,
        "evaluation": {"every": 0, "final": True},
    }
    spec.update(overrides)
    return parse_spec(spec)


def _home(fed, site: str) -> Path:
    return fed.workdir / "sites" / site


def test_a_scientists_own_algorithm_runs_where_admitted_and_waits_for_approval_where_not(federation, tmp_path):
    fed = federation(3)
    package = write_package(tmp_path / "scientist", "my_algo", COUNTER)
    key = generate_signing_key()
    key_file = tmp_path / "alice.key"
    key_file.write_text(key.private_pem)
    first = pack(package, "my_algo.model:Counter")
    signer = f'[[algorithms.signers]]\nname = "alice"\npublic_key = """{key.public_pem}"""\n'
    for site in ("site-a", "site-c"):  # admit whatever alice signed
        _write_policy(fed, site, signer)
    _write_policy(fed, "site-b", f'[algorithms]\ndigests = ["{first.digest}"]\n')  # exactly this code

    ready = fed.submit(_spec("own", package, "my_algo.model:Counter", min_sites=3), signing_keys=[key_file])
    done = fed.wait(ready.id, timeout=90)
    assert_completed(done, fed)
    assert done.algorithm_digest == first.digest
    assert {m.site for m in fed.client.metrics(done.id) if m.kind == "evaluate"} == {"site-a", "site-b", "site-c"}

    # One changed byte is another algorithm: site-b, which admitted the old digest only, holds it.
    model = package / "model.py"
    model.write_text(model.read_text().replace('weights["w"] + 1.0', 'weights["w"] + 2.0'))
    second = pack(package, "my_algo.model:Counter")
    assert second.digest != first.digest
    exp = fed.submit(_spec("changed", package, "my_algo.model:Counter", min_sites=3), signing_keys=[key_file])
    wait_for(lambda: "site-b" in fed.client.experiment(exp.id).site_notes, 60, "site-b to say it waits")
    note = fed.client.experiment(exp.id).site_notes["site-b"]
    assert "waiting for approval" in note and second.digest[:12] in note, note
    pending = ApprovalStore(_home(fed, "site-b")).pending()
    assert [(j.experiment_id, j.digest, j.requester) for j in pending] == [(exp.id, second.digest, "sim-scientist")]
    assert fed.client.experiment(exp.id).status == "running"

    result = CliRunner().invoke(
        app, ["site", "approve", str(pending[0].id), "--home", str(_home(fed, "site-b")), "--reason", "reviewed"]
    )
    assert result.exit_code == 0, result.output
    done = fed.wait(exp.id, timeout=90)
    assert_completed(done, fed)
    final = {m.site: m.metrics["mean_w"] for m in fed.client.metrics(exp.id) if m.kind == "evaluate"}
    assert final == {"site-a": 2.0, "site-b": 2.0, "site-c": 2.0}
    events = [e.event for e in AuditLog(_home(fed, "site-b")).entries(experiment=exp.id)]
    assert "approved" in events and events.index("approved") < events.index("started"), events
    assert AuditLog(_home(fed, "site-b")).verify().ok


def test_a_rejected_job_never_runs_and_the_experiment_says_why(federation, tmp_path):
    fed = federation(1)
    package = write_package(tmp_path / "scientist", "marked", COUNTER)
    markers = tmp_path / "markers"
    markers.mkdir()
    # The default policy holds any bundle for approval; the marker folder is writable, so
    # only the policy, never the sandbox, can keep the algorithm from leaving its mark.
    _write_policy(fed, "site-a", f'[sandbox]\nwritable = ["{markers}"]\n')
    exp = fed.submit(_spec("never", package, "marked.model:Counter", config={"marker": str(markers)}))
    wait_for(lambda: "site-a" in fed.client.experiment(exp.id).site_notes, 60, "site-a to hold the job")
    time.sleep(1.0)
    assert not list(markers.iterdir()), "a job nobody approved ran"
    (job,) = ApprovalStore(_home(fed, "site-a")).pending()
    result = CliRunner().invoke(
        app, ["site", "reject", str(job.id), "--home", str(_home(fed, "site-a")), "--reason", "no external code"]
    )
    assert result.exit_code == 0, result.output
    done = fed.wait(exp.id, timeout=60)
    assert done.status == "failed", logs(fed)
    assert "site-a" in (done.error or "") and "no external code" in (done.error or ""), done.error
    assert not list(markers.iterdir()), "a rejected job ran"


def test_an_algorithm_reading_the_sites_key_fails_naming_the_violation_and_the_site_goes_on(federation, tmp_path):
    fed = federation(1)
    key_path = _home(fed, "site-a") / "tls" / "site.key"
    assert key_path.exists()
    thief = write_package(tmp_path / "scientist", "thief", KEY_THIEF)
    counter = write_package(tmp_path / "scientist", "honest", COUNTER)
    digests = [pack(thief, "thief.model:Thief").digest, pack(counter, "honest.model:Counter").digest]
    _write_policy(fed, "site-a", f"[algorithms]\ndigests = {json.dumps(digests)}\n")

    steal = _spec("steal", thief, "thief.model:Thief", config={"target": str(key_path)})
    stolen = fed.wait(fed.submit(steal).id, timeout=60)
    assert stolen.status == "failed", logs(fed)
    assert "sandbox" in (stolen.error or "").lower() and str(key_path) not in (stolen.error or ""), stolen.error
    assert not [m for m in fed.client.metrics(stolen.id) if m.metrics], "the key left the site as metrics"

    assert_completed(fed.wait(fed.submit(_spec("after", counter, "honest.model:Counter")).id, timeout=60), fed)
    events = [e.event for e in AuditLog(_home(fed, "site-a")).entries(experiment=stolen.id)]
    assert "sandbox_violation" in events, events


def test_a_dataset_problem_reaches_the_experiment_at_once_naming_the_site_and_no_path(federation):
    fed = federation(2, dataset="tabular-demo")
    broken = fed.workdir / "data" / "site-b" / "tabular-demo" / "train.csv"
    lines = broken.read_text().splitlines()
    lines[3] = ",".join(["patient-0042"] * len(lines[3].split(",")))
    broken.write_text("\n".join(lines) + "\n")
    spec = parse_spec(
        {
            "name": "tabular",
            "algorithm": "laulima.algorithms.tabular:LogisticRegression",
            "dataset": "tabular-demo",
            "rounds": 2,
            "min_sites": 1,
            "round_timeout_s": LONG,
            "evaluation": {"every": 0, "final": False},
        }
    )
    started = time.monotonic()
    exp = fed.submit(spec)
    wait_for(lambda: "site-b" in fed.client.experiment(exp.id).site_notes, 60, "site-b's failure to show")
    assert time.monotonic() - started < 60
    note = fed.client.experiment(exp.id).site_notes["site-b"]
    assert "not a finite number" in note and "audit#" in note, note
    assert_completed(fed.wait(exp.id, timeout=120), fed)  # site-a carries the experiment on

    hub_files = [fed.workdir / "hub" / name for name in os.listdir(fed.workdir / "hub")]
    stored = b"".join(p.read_bytes() for p in hub_files if p.is_file())
    with sqlite3.connect(fed.workdir / "hub" / "hub.db") as db:  # the WAL, if any, checkpointed
        db.execute("PRAGMA wal_checkpoint(FULL)")
    stored += (fed.workdir / "hub" / "hub.db").read_bytes()
    for secret in (str(broken.parent).encode(), b"train.csv", b"patient-0042"):
        assert secret not in stored, f"{secret!r} reached the hub"
