"""A fingerprint-mode experiment with real processes, for an algorithm that computes no
fingerprint: every site's reason (the algorithm's refusal, a policy's min_cohort) reaches
the scientist through `laulima experiment fingerprint`, which fails saying so."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.federation import logs

pytestmark = pytest.mark.slow

SPEC = """\
name = "tabular"
algorithm = "laulima.algorithms.tabular:LogisticRegression"
dataset = "tabular-demo"
rounds = 3
local_steps = 5
round_timeout_s = 60
seed = 3

[config]
lr = 0.1
"""


def test_sites_reasons_reach_the_scientist_when_no_fingerprint_arrives(federation, tmp_path: Path):
    fed = federation(2, "tabular-demo", seed=3)
    policy = fed.workdir / "sites" / "site-b" / "policy.toml"
    policy.write_text("min_cohort = 100000\n" + policy.read_text())
    spec_file = tmp_path / "train.toml"
    spec_file.write_text(SPEC)
    scientist = fed.client._http.headers["Authorization"].removeprefix("Bearer ")
    env = {**os.environ, "COLUMNS": "300", "LAULIMA_HUB_URL": fed.hub.url, "LAULIMA_TOKEN": scientist}
    if fed.hub.ca_file:
        env["LAULIMA_CA_FILE"] = str(fed.hub.ca_file)
    cmd = [sys.executable, "-m", "laulima.cli", "experiment", "fingerprint", str(spec_file), "--out", "out"]
    run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=180, env=env)
    assert run.returncode == 1, f"{run.stdout}\n{run.stderr}\n{logs(fed)}"
    assert "left out" in run.stdout and "rounds" in run.stdout
    assert "no site computed its dataset fingerprint" in run.stderr
    assert "computes no dataset fingerprint" in run.stderr and "min_cohort is 100000" in run.stderr
    assert not (tmp_path / "out").exists()
    [exp] = fed.client.experiments()
    assert exp.mode == "fingerprint" and exp.status == "failed" and exp.name == "tabular-fingerprint"
    assert "min_cohort is 100000" in exp.site_notes["site-b"]
    assert "computes no dataset fingerprint" in exp.site_notes["site-a"]
