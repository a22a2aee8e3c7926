"""The terminal comparison: one row per model, federated first, the numbers the arms hold, the
best value per column marked, the budget in the caption, and a one-line verdict."""

from __future__ import annotations

import math

import pytest
from rich.console import Console
from rich.table import Table

from laulima.core.protocol import MetricRecord, TaskKind
from laulima.report import ArmEvaluation
from laulima.terminal import (
    EPSILON_METRIC,
    ComparisonColumn,
    budget_line,
    compare_arms,
    comparison_table,
    comparison_verdict,
    epsilon_by_site,
    final_epsilon,
    format_epsilon,
    format_metric,
    headline_metrics,
    metric_label,
    ordered_metrics,
    privacy_line,
    privacy_settings,
    privacy_settings_line,
    privacy_table,
)
from tests.helpers import report_data as rd


def render(table: Table) -> str:
    console = Console(record=True, width=250, color_system=None)
    console.print(table)
    return console.export_text()


@pytest.mark.parametrize(
    ("key", "label"),
    [
        ("dice_mean", "mean Dice"),
        ("dice_wt", "Dice whole tumour"),
        ("dice_tc", "Dice tumour core"),
        ("dice_et", "Dice enhancing tumour"),
        ("hd95_wt", "HD95 whole tumour (mm)"),
        ("hd95_et", "HD95 enhancing tumour (mm)"),
        ("hd95_mean", "mean HD95 (mm)"),
        ("dice_non_enhancing_tumor", "Dice non enhancing tumor"),
        ("dice_grey_matter", "Dice grey matter"),
        ("loss", "loss"),
    ],
)
def test_metric_fields_have_readable_names(key, label):
    assert metric_label(key) == label


def test_metrics_are_ordered_for_reading_and_bookkeeping_is_dropped():
    keys = [*rd.tumour_metrics(0.0), "steps", "held_out_test"]
    assert ordered_metrics(keys) == [
        "dice_mean", "dice_wt", "dice_tc", "dice_et", "hd95_mean", "hd95_wt", "hd95_tc", "hd95_et",
        "dice_edema", "dice_enhancing_tumour", "dice_non_enhancing_tumor", "loss",
    ]  # fmt: skip


def test_headline_columns_are_the_brats_regions_or_else_the_labels():
    assert headline_metrics(rd.tumour_metrics(0.0)) == ["dice_mean", "dice_wt", "dice_tc", "dice_et", "hd95_mean"]
    tissue = headline_metrics(rd.tissue_metrics(0.0))
    assert tissue == ["dice_mean", "dice_csf", "dice_grey_matter", "dice_white_matter"]


def test_the_comparison_holds_every_arms_values_federated_first():
    arms = rd.arms()
    comparison = compare_arms(arms, sites=rd.SITES)
    assert [r.name for r in comparison.rows] == [
        "federated", "centralized", "local:site-a", "local:site-b", "local:site-c",
    ]  # fmt: skip
    pooled = ["dice_mean", "dice_wt", "dice_tc", "dice_et", "hd95_mean"]
    assert comparison.columns == (
        *(ComparisonColumn(k) for k in pooled),
        *(ComparisonColumn("dice_mean", s) for s in rd.SITES),
    )
    by_name = {a.name: a for a in arms}
    for row in comparison.rows:
        arm = by_name[row.name]
        expected = [arm.pooled[k] for k in pooled] + [arm.per_site[s]["dice_mean"] for s in rd.SITES]
        assert list(row.values) == expected, row.name
        assert row.steps == arm.steps


def test_best_is_the_highest_dice_and_the_lowest_distance():
    comparison = compare_arms(rd.arms(), sites=rd.SITES)
    columns = [(c.metric, c.site) for c in comparison.columns]
    best_rows = {
        col: [comparison.rows[i].name for i in range(len(comparison.rows)) if comparison.is_best(i, j)]
        for j, col in enumerate(columns)
    }
    assert best_rows[("dice_mean", None)] == ["centralized"]
    assert best_rows[("hd95_mean", None)] == ["centralized"]  # the lowest distance
    assert best_rows[("dice_mean", "site-c")] == ["local:site-c"]  # the site's own model wins on its data
    worst_hd95 = max(r.values[columns.index(("hd95_mean", None))] for r in comparison.rows)
    assert comparison.best(columns.index(("hd95_mean", None))) != worst_hd95


def test_missing_values_and_nan_are_never_best():
    arms = [
        ArmEvaluation("federated", {}, {"dice_mean": math.nan}, 1, 0.0),
        ArmEvaluation("centralized", {}, {"dice_mean": 0.5}, 1, 0.0),
        ArmEvaluation("local:x", {}, {}, 1, 0.0),
    ]
    comparison = compare_arms(arms, sites=[])
    assert [comparison.is_best(i, 0) for i in range(3)] == [False, True, False]
    assert format_metric("dice_mean", math.nan) == "n/a" and format_metric("dice_mean", None) == "n/a"


def test_the_table_prints_every_number_the_budget_and_marks_the_best():
    arms = rd.arms()
    line = budget_line(rd.report_data().budget)
    table = comparison_table(arms, budget_line=line, sites=rd.SITES)
    text = render(table)
    lines = text.splitlines()
    rows = {name: next(ln for ln in lines if f" {name} " in ln) for name in ("federated", "centralized")}
    assert lines.index(rows["federated"]) < lines.index(rows["centralized"])
    fed = next(a for a in arms if a.name == "federated")
    for key in ("dice_mean", "dice_wt", "dice_tc", "dice_et"):
        assert f"{fed.pooled[key]:.3f}" in rows["federated"]
    assert f"{fed.pooled['hd95_mean']:.2f}" in rows["federated"]
    for site in rd.SITES:
        assert f"{fed.per_site[site]['dice_mean']:.3f}" in rows["federated"]
    assert line in " ".join(text.split())
    assert "Dice whole tumour" in text and "mean HD95 (mm)" in text and "dice_" not in text
    # Best values are styled: the centralized pooled mean Dice is the column's best.
    central = next(a for a in arms if a.name == "centralized")
    cells = [c for col in table.columns for c in col.cells]
    assert f"[bold green]{central.pooled['dice_mean']:.3f}[/]" in cells
    assert f"{fed.pooled['dice_mean']:.3f}" in cells  # not marked: not the best


def test_the_table_fits_an_80_column_terminal_without_cutting_a_number():
    arms = rd.arms()
    table = comparison_table(arms, budget_line=budget_line(rd.report_data().budget), sites=rd.SITES)
    console = Console(width=80, record=True, color_system=None)
    assert console.measure(table).maximum <= 80
    console.print(table)
    text = console.export_text()
    assert "…" not in text
    for arm in arms:
        assert arm.name in text


def test_arm_names_are_not_read_as_markup():
    arms = [ArmEvaluation("local:[red]x", {"[red]x": {"dice_mean": 0.5}}, {"dice_mean": 0.5}, 3, 0.0)]
    text = render(comparison_table(arms, budget_line="budget: [b]3[/b]", sites=["[red]x"]))
    assert "local:[red]x" in text and "[b]3[/b]" in text


def test_the_budget_line_reads_as_a_sentence():
    budget = {
        "rounds": 40, "local_steps": 10, "sites": 3, "optimizer_steps_federated_and_centralized": 1200,
        "optimizer_steps_per_local_model": 400, "batch_size": 2,
    }  # fmt: skip
    assert budget_line(budget) == (
        "budget: 40 rounds x 10 local steps x 3 sites = 1200 optimizer steps for federated and centralized; "
        "400 per local-only model"
    )
    assert budget_line({"steps": 5}) == "budget: steps 5"


def test_the_verdict_compares_with_centralized_the_best_local_model_and_each_sites_own_model():
    arms = rd.arms()
    verdict = comparison_verdict(arms, sites=rd.SITES)
    pooled = {a.name: a.pooled["dice_mean"] for a in arms}
    assert verdict.ratio_to_centralized == pytest.approx(pooled["federated"] / pooled["centralized"])
    assert verdict.best_local == "local:site-c"
    assert verdict.margin_over_best_local == pytest.approx(pooled["federated"] - pooled["local:site-c"])
    assert verdict.sites_won == ("site-a", "site-b") and verdict.sites_compared == tuple(rd.SITES)
    line = verdict.line()
    assert f"{pooled['federated'] / pooled['centralized']:.2f} x centralized" in line
    assert "local:site-c" in line and "2 of 3 sites (site-a, site-b)" in line


def test_the_verdict_on_a_distance_counts_lower_as_better():
    arms = rd.arms()
    verdict = comparison_verdict(arms, sites=rd.SITES, metric="hd95_mean")
    pooled = {a.name: a.pooled["hd95_mean"] for a in arms}
    best = min((n for n in pooled if n.startswith("local:")), key=pooled.__getitem__)
    assert verdict.best_local == best
    assert verdict.margin_over_best_local == pytest.approx(pooled[best] - pooled["federated"])
    assert verdict.margin_over_best_local > 0  # federated has the shorter distance


def test_the_verdict_without_baselines_says_so_without_failing():
    only = [a for a in rd.arms() if a.name == "federated"]
    verdict = comparison_verdict(only, sites=rd.SITES)
    assert verdict.ratio_to_centralized is None and verdict.margin_over_best_local is None
    assert verdict.line().startswith("federated mean Dice")
    assert comparison_verdict([], sites=[]).line() == "no federated mean Dice to compare"


# -- differential privacy ------------------------------------------------------------------
def _private_records() -> list[MetricRecord]:
    """Two sites' train records with ε (site-b one round behind), an evaluation and a cross-site record."""
    records = [
        MetricRecord(round=r, site=s, kind=TaskKind.TRAIN, n_samples=4, metrics={"loss": 0.5, EPSILON_METRIC: e})
        for s, rounds in {"site-a": {1: 2.5, 2: 3.75}, "site-b": {1: 2.5}}.items()
        for r, e in rounds.items()
    ]
    records.append(
        MetricRecord(round=2, site="site-a", kind=TaskKind.EVALUATE, n_samples=2, metrics={"dice_mean": 0.5})
    )
    records.append(
        MetricRecord(
            round=3, site="site-a", kind=TaskKind.EVALUATE, n_samples=2, metrics={"dice_mean": 0.5}, model="global"
        )
    )
    return records


def test_the_epsilon_metric_is_the_one_the_sites_report():
    from laulima.site.update_privacy import EPSILON_METRIC as SITE_METRIC

    assert EPSILON_METRIC == SITE_METRIC


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (7.98123, "7.98"),
        (0.9999984, "1.00"),
        (0.5, "0.50"),
        (0.0123, "0.012"),
        (1e15, "∞"),
        (math.inf, "∞"),
        (None, "n/a"),
        (math.nan, "n/a"),
    ],
)
def test_epsilon_is_readable(value, text):
    assert format_epsilon(value) == text


def test_epsilon_per_site_and_round_comes_from_the_train_records():
    records = _private_records()
    assert epsilon_by_site(records) == {"site-a": {1: 2.5, 2: 3.75}, "site-b": {1: 2.5}}
    assert final_epsilon(records) == {"site-a": (2, 3.75), "site-b": (1, 2.5)}
    assert epsilon_by_site([r for r in records if EPSILON_METRIC not in r.metrics]) == {}


def test_the_privacy_line_names_each_sites_epsilon_and_delta():
    line = privacy_line(_private_records(), delta=1e-5)
    assert line == (
        "differential privacy: ε after each site's last round (each site's own accounting, δ 1e-05): "
        "site-a 3.75 (round 2), site-b 2.50 (round 1)"
    )
    same = [r for r in _private_records() if r.site == "site-a"]
    assert privacy_line(same) == "differential privacy: ε after round 2 (each site's own accounting): site-a 3.75"
    assert privacy_line(rd.rounds()) is None


def test_the_privacy_table_has_a_row_per_round_and_a_column_per_site():
    table = privacy_table(_private_records(), delta=1e-5)
    assert table is not None
    text = render(table)
    assert "differential privacy: site-level ε spent so far at δ = 1e-05" in " ".join(text.split())
    assert [line.split() for line in text.splitlines() if "round" in line] == [
        ["┃", "round", "┃", "site-a", "┃", "site-b", "┃"]
    ]
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in text.splitlines() if line.startswith("│")]
    assert rows == [["1", "2.50", "2.50"], ["2", "3.75", ""]]
    assert privacy_table(rd.rounds()) is None


def test_privacy_settings_are_read_from_the_hubs_spec():
    spec = {
        "privacy": {
            "mode": "distributed",
            "clip": 1.5,
            "noise_multiplier": 3.125,
            "target_epsilon": 8.0,
            "delta": 1e-5,
        },
        "secure_aggregation": {"clip": None, "phase_timeout_s": 120.0},
    }
    settings = privacy_settings(spec)
    assert settings == {
        "differential_privacy": True, "mode": "distributed", "clip": 1.5, "noise_multiplier": 3.125,
        "target_epsilon": 8.0, "delta": 1e-5, "secure_aggregation": True,
    }  # fmt: skip
    assert privacy_settings_line(settings) == (
        "differential privacy: distributed, clip 1.5, noise multiplier 3.125 (calibrated for ε 8), δ 1e-05; "
        "secure aggregation on"
    )
    assert privacy_settings({"name": "x"}) is None
    only_secagg = privacy_settings({"secure_aggregation": {"clip": 2.0}})
    assert privacy_settings_line(only_secagg) == "no differential privacy (updates clipped to 2); secure aggregation on"
    local = privacy_settings({"privacy": {"clip": 1.0, "noise_multiplier": 2.0, "delta": 1e-5}})
    assert local is not None and local["mode"] == "local" and not local["secure_aggregation"]


def test_the_settings_line_before_the_hub_calibrated_the_noise():
    settings = privacy_settings({"privacy": {"mode": "local", "clip": 1.35, "target_epsilon": 8.0, "delta": 1e-5}})
    assert privacy_settings_line(settings) == (
        "differential privacy: local, clip 1.35, noise multiplier to be calibrated by the hub for ε 8, δ 1e-05; "
        "secure aggregation off"
    )


def test_experiment_status_shows_the_privacy_settings_and_epsilon_per_round(monkeypatch):
    from typer.testing import CliRunner

    import laulima.client
    from laulima.cli import app
    from laulima.core.protocol import ExperimentPublic, ExperimentStatus

    spec = {
        "name": "private",
        "privacy": {"mode": "distributed", "clip": 1.35, "noise_multiplier": 3.1, "target_epsilon": 8.0, "delta": 1e-5},
        "secure_aggregation": {"clip": 1.35},
    }
    experiment = ExperimentPublic(
        id=7, name="private", status=ExperimentStatus.RUNNING, rounds_done=2, rounds=20, created_at=0.0,
        finished_at=None, global_digest="0" * 64, error=None, spec=spec, owner="me",
    )  # fmt: skip

    class FakeClient:
        def __init__(self, *args, **kwargs) -> None: ...
        def __enter__(self) -> FakeClient:
            return self

        def __exit__(self, *exc) -> None: ...
        def experiment(self, experiment_id):
            return experiment

        def rounds(self, experiment_id):
            return []

        def metrics(self, experiment_id):
            return _private_records()

        def refusals(self, experiment_id):
            return []

    monkeypatch.setattr(laulima.client, "Client", FakeClient)
    result = CliRunner().invoke(app, ["experiment", "status", "7", "--hub", "http://hub", "--token", "t"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "differential privacy: distributed, clip 1.35, noise multiplier 3.1 (calibrated for ε 8)" in text
    assert "secure aggregation on" in text
    assert "differential privacy: site-level ε spent so far at δ = 1e-05" in text
    assert "│ 2 │ 3.75 │ │" in text
