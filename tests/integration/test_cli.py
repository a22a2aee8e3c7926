"""The `laulima` command as a user runs it: real processes, exit codes, messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def laulima(*args: str, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "laulima.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200"},
    )


@pytest.mark.slow
def test_sim_runs_the_example_spec_and_writes_its_result(tmp_path):
    out = tmp_path / "result.json"
    run = laulima(
        "sim", str(REPO / "examples" / "tiny.toml"), "--sites", "2", "--workdir", str(tmp_path / "w"),
        "--json", str(out), cwd=tmp_path,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "experiment completed after 5 rounds" in run.stdout
    result = json.loads(out.read_text())
    assert result["experiment"]["status"] == "completed"
    evals = [m for m in result["metrics"] if m["kind"] == "evaluate" and m["round"] == 5]
    assert {m["site"] for m in evals} == {"site-a", "site-b"}


def test_a_malformed_spec_exits_2_naming_file_and_field(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\nalgorithm = "a.b:C"\ndataset = "d"\nrounds = "three"\n')
    run = laulima("experiment", "submit", str(bad), "--hub", "http://127.0.0.1:9", "--token", "t", cwd=tmp_path)
    assert run.returncode == 2
    assert "bad.toml" in run.stderr and "rounds" in run.stderr
    assert "Traceback" not in run.stderr


def test_the_plain_http_hub_refuses_a_non_loopback_address(tmp_path):
    run = laulima("hub", "--home", str(tmp_path / "hub"), "--host", "0.0.0.0", cwd=tmp_path, timeout=30)
    assert run.returncode == 2
    assert "refused off loopback" in run.stderr
    assert "Traceback" not in run.stderr


def test_an_unreachable_hub_is_a_clear_transport_error(tmp_path):
    run = laulima("experiment", "list", "--hub", "http://127.0.0.1:9", "--token", "t", cwd=tmp_path, timeout=30)
    assert run.returncode == 5
    assert "unreachable" in run.stderr


@pytest.mark.parametrize("literal", ["inf", "nan"])
def test_a_non_finite_number_in_a_spec_is_one_line_naming_file_and_field(tmp_path, literal):
    bad = tmp_path / "spec.toml"
    bad.write_text(f'name = "x"\nalgorithm = "a.b:C"\ndataset = "d"\nrounds = 1\nround_timeout_s = {literal}\n')
    run = laulima("experiment", "submit", str(bad), "--hub", "http://127.0.0.1:9", "--token", "t", cwd=tmp_path)
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    [line] = run.stderr.strip().splitlines()
    assert line == f"error: {bad}: field 'round_timeout_s': Input should be a finite number"
