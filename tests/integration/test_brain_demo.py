"""The brain MRI demo end to end, at smoke-test size: phantoms, a real hub and agents
training a small 3D U-Net, both baselines, the model, TensorBoard logs and the report."""

from __future__ import annotations

import json
import sqlite3

import pytest
from rich.console import Console

from laulima.demo import PRESETS, run_demo

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def outcome(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo")
    return run_demo(PRESETS["test"], workdir, Console(quiet=True)), workdir


def test_one_federated_round_of_a_small_unet_runs_through_hub_and_agents(outcome):
    result, workdir = outcome
    evals = [m for m in result.metrics if m.kind == "evaluate"]
    assert {m.site for m in evals} == {"site-a", "site-b"}
    for m in evals:
        assert {"dice_mean", "dice_csf", "dice_grey_matter", "dice_white_matter"} <= set(m.metrics), m.metrics
        assert all(0.0 <= v <= 1.0 for k, v in m.metrics.items() if k.startswith("dice_"))
    train = [m for m in result.metrics if m.kind == "train"]
    assert sorted(m.n_samples for m in train) == [2, 3]


def test_the_report_files_exist_and_agree_with_the_hub_database(outcome):
    result, workdir = outcome
    report_dir = result.report_html.parent
    for name in ("index.html", "report.json", "federated_rounds.png", "sites_rounds.png", "comparison.png"):
        assert (report_dir / name).stat().st_size > 0, name
    report = json.loads(result.report_json.read_text())

    db = sqlite3.connect(workdir / "hub" / "hub.db")
    rows = db.execute("SELECT round, site, kind, n_samples, metrics_json FROM metrics").fetchall()
    in_db = {(r, s, k): (n, json.loads(m)) for r, s, k, n, m in rows}
    in_report = {(m["round"], m["site"], m["kind"]): (m["n_samples"], m["metrics"]) for m in report["federated_rounds"]}
    assert in_report == in_db

    arms = {a["name"]: a for a in report["arms"]}
    assert set(arms) == {"federated", "centralized", "local:site-a", "local:site-b"}
    budget = report["budget"]
    assert budget["optimizer_steps_federated_and_centralized"] == 1 * 2 * 2 == arms["centralized"]["steps"]
    assert budget["optimizer_steps_per_local_model"] == 1 * 2 == arms["local:site-a"]["steps"]
    for arm in arms.values():
        assert set(arm["per_site"]) == {"site-a", "site-b"}
        assert 0.0 <= arm["pooled"]["dice_mean"] <= 1.0
    html = (report_dir / "index.html").read_text()
    assert "phantoms" in html and "not patients" in html
    assert f"{arms['federated']['pooled']['dice_mean']:.4f}" in html


def test_the_model_and_tensorboard_logs_are_written(outcome):
    result, _ = outcome
    assert {p.name for p in result.model_dir.iterdir()} >= {"model.safetensors", "model.torchscript.pt", "model.json"}
    card = json.loads((result.model_dir / "model.json").read_text())
    assert card["training"]["rounds"] == 1 and card["training"]["sites"] == ["site-a", "site-b"]
    assert list(result.tensorboard_dir.glob("events.out.tfevents.*"))
