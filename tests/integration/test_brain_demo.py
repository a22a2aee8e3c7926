"""The brain tumour demo end to end, at smoke-test size: phantoms, a real hub and agents
training a small 3D U-Net, local-only models and the cross-site evaluation at the sites,
the centralized model scored through an evaluation-only experiment, the model,
TensorBoard logs and the report."""

from __future__ import annotations

import json
import sqlite3

import pytest
from rich.console import Console

from laulima.demo import PRESETS, TISSUE_PRESETS, run_demo

pytestmark = pytest.mark.slow

BRATS = {"dice_mean", "dice_wt", "dice_tc", "dice_et", "hd95_wt", "hd95_tc", "hd95_et", "hd95_mean"}


@pytest.fixture(scope="module")
def outcome(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo")
    return run_demo(PRESETS["test"], workdir, Console(quiet=True)), workdir


def hub_rows(workdir, where: str = "1") -> list[tuple]:
    db = sqlite3.connect(workdir / "hub" / "hub.db")
    try:
        return db.execute(
            f"SELECT experiment_id, round, site, kind, n_samples, metrics_json, model FROM metrics WHERE {where}"
        ).fetchall()
    finally:
        db.close()


def test_one_federated_round_of_a_small_unet_is_scored_in_the_brats_convention(outcome):
    result, _ = outcome
    evals = [m for m in result.metrics if m.kind == "evaluate"]
    assert {m.site for m in evals} == {"site-a", "site-b"}
    for m in evals:
        assert BRATS <= set(m.metrics), m.metrics
        assert all(0.0 <= v <= 1.0 for k, v in m.metrics.items() if k.startswith("dice_"))
        assert all(v >= 0.0 for k, v in m.metrics.items() if k.startswith("hd95_"))
    train = [m for m in result.metrics if m.kind == "train"]
    assert sorted(m.n_samples for m in train) == [2, 3]


def test_every_number_in_the_comparison_was_reported_by_a_site_through_the_hub(outcome):
    result, workdir = outcome
    arms = {a.name: a for a in result.arms}
    assert list(arms) == ["federated", "centralized", "local:site-a", "local:site-b"]
    by_model = {}
    evaluations = hub_rows(workdir, "model IS NOT NULL AND kind = 'evaluate'")
    for _experiment, _round, site, _kind, n, metrics, model in evaluations:
        name = {"global": "federated", "model": "centralized"}.get(model, model)
        by_model[(name, site)] = (n, json.loads(metrics))
    assert set(by_model) == {(arm, site) for arm in arms for site in ("site-a", "site-b")}
    for (name, site), (n, metrics) in by_model.items():
        shown = arms[name].per_site[site]
        assert shown["n"] == n
        assert {k: v for k, v in shown.items() if k != "n"} == metrics
    for arm in arms.values():  # pooled: weighted by each site's test subjects
        n = {s: arm.per_site[s]["n"] for s in arm.per_site}
        expected = sum(arm.per_site[s]["dice_mean"] * n[s] for s in n) / sum(n.values())
        assert arm.pooled["dice_mean"] == pytest.approx(expected)


def test_the_report_files_exist_and_agree_with_the_hub_database(outcome):
    result, workdir = outcome
    report_dir = result.report_html.parent
    for name in ("index.html", "report.json", "federated_rounds.png", "comparison.png", "overlay.png"):
        assert (report_dir / name).stat().st_size > 0, name
    report = json.loads(result.report_json.read_text())

    rows = hub_rows(workdir, f"model IS NULL AND experiment_id = {result.experiment_id}")
    in_db = {(r, s, k): (n, json.loads(m)) for _, r, s, k, n, m, _ in rows}
    in_report = {(m["round"], m["site"], m["kind"]): (m["n_samples"], m["metrics"]) for m in report["federated_rounds"]}
    assert in_report == in_db

    arms = {a["name"]: a for a in report["arms"]}
    budget = report["budget"]
    assert budget["optimizer_steps_federated_and_centralized"] == 1 * 2 * 2 == arms["centralized"]["steps"]
    assert budget["optimizer_steps_per_local_model"] == 1 * 2 == arms["local:site-a"]["steps"]
    html = (report_dir / "index.html").read_text()
    assert "phantoms" in html and "not patients" in html
    assert "Dice whole tumour" in html


def test_the_model_and_tensorboard_logs_are_written(outcome):
    result, _ = outcome
    assert {p.name for p in result.model_dir.iterdir()} >= {"model.safetensors", "model.torchscript.pt", "model.json"}
    card = json.loads((result.model_dir / "model.json").read_text())
    assert card["training"]["rounds"] == 1 and card["training"]["sites"] == ["site-a", "site-b"]
    assert list(result.tensorboard_dir.glob("events.out.tfevents.*"))


def test_the_brain_tissue_demo_still_runs_without_baselines(tmp_path):
    result = run_demo(TISSUE_PRESETS["test"], tmp_path / "demo", Console(quiet=True), baselines=False)
    assert [a.name for a in result.arms] == ["federated"]
    federated = result.arms[0]
    assert set(federated.per_site) == {"site-a", "site-b"}
    assert {"dice_csf", "dice_grey_matter", "dice_white_matter"} <= set(federated.pooled)
