"""Evaluation as a real federation does it, with a real hub and real agents: the cross-site
matrix after training (one site's policy refusing its local-only model), then the trained
model scored by `laulima experiment evaluate` and read back with `experiment cross-site`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from laulima.core.crosssite import cross_site_matrix
from laulima.core.spec import parse_spec
from tests.helpers.federation import assert_completed, logs

pytestmark = pytest.mark.slow

TABULAR = {
    "algorithm": "laulima.algorithms.tabular:LogisticRegression",
    "dataset": "tabular-demo",
    "round_timeout_s": 60,
    "seed": 3,
    "config": {"lr": 0.1},
}


def test_cross_site_matrix_then_evaluate_the_model_from_the_command_line(federation, tmp_path: Path):
    fed = federation(2, "tabular-demo", seed=3)
    policy = fed.workdir / "sites" / "site-b" / "policy.toml"  # site-b keeps its data-only model home
    policy.write_text('local_models = "refuse"\n' + policy.read_text())
    spec = parse_spec(
        {
            "name": "matrix",
            **TABULAR,
            "rounds": 2,
            "local_steps": 5,
            "min_sites": 2,
            "evaluation": {"every": 0, "final": False, "cross_site": True, "local_models": True},
        }
    )
    exp = fed.wait(fed.submit(spec).id, timeout=180)
    assert_completed(exp, fed)

    matrix = fed.client.cross_site(exp.id)
    assert matrix.complete and matrix.round == 3, logs(fed)
    assert matrix.models == ["global", "local:site-a"] and matrix.sites == ["site-a", "site-b"]
    assert all(set(matrix.cells[m]) == {"site-a", "site-b"} for m in matrix.models)
    (refused,) = matrix.failures
    assert (refused.model, refused.site, refused.kind) == ("local:site-b", "site-b", "train")
    assert "local_models" in refused.reason
    records = fed.client.metrics(exp.id)
    assert cross_site_matrix(exp.id, 3, records).pooled == matrix.pooled  # the client computes the same
    assert matrix.pooled["global"].metrics["accuracy"] > 0.6
    local = fed.client.download_model(exp.id, tmp_path / "local-a.safetensors", model="local:site-a")
    assert local.stat().st_size > 0

    # The federated model, scored again as an evaluate-only experiment, from the command line.
    model = fed.client.download_model(exp.id, tmp_path / "global.safetensors")
    spec_file = tmp_path / "eval.toml"
    spec_file.write_text(
        'algorithm = "laulima.algorithms.tabular:LogisticRegression"\ndataset = "tabular-demo"\nseed = 3\n'
        "round_timeout_s = 60\n[config]\nlr = 0.1\n"
    )
    scientist = fed.client._http.headers["Authorization"].removeprefix("Bearer ")  # the same person
    env = {**os.environ, "COLUMNS": "200", "LAULIMA_HUB_URL": fed.hub.url, "LAULIMA_TOKEN": scientist}
    if fed.hub.ca_file:
        env["LAULIMA_CA_FILE"] = str(fed.hub.ca_file)

    def laulima(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "laulima.cli", *args]
        return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)

    run = laulima("experiment", "evaluate", str(model), "--spec", str(spec_file), "--sites", "site-a,site-b")
    assert run.returncode == 0, run.stdout + run.stderr
    evaluated = next(e for e in fed.client.experiments() if e.mode == "evaluate")
    assert evaluated.name == "global-evaluation" and evaluated.rounds == 0
    done = fed.wait(evaluated.id, timeout=120)
    assert_completed(done, fed)
    scored = fed.client.cross_site(done.id)
    assert scored.models == ["model"] and scored.sites == ["site-a", "site-b"] and not scored.failures
    assert scored.pooled["model"] == matrix.pooled["global"]  # the same model on the same data

    table = laulima("experiment", "cross-site", str(exp.id), "--metric", "accuracy")
    assert table.returncode == 0, table.stdout + table.stderr
    assert "local:site-a" in table.stdout and "pooled" in table.stdout and "site-b" in table.stdout
    assert "refuse" in table.stdout  # the missing local model says why

    bad = laulima("experiment", "evaluate", str(model), "--sites", "site-a")  # bare weights, no spec
    assert bad.returncode == 2 and "--spec" in bad.stderr
