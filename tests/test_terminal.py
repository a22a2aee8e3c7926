"""The terminal comparison: one row per model, federated first, the numbers the arms hold, the
best value per column marked, the budget in the caption, and a one-line verdict."""

from __future__ import annotations

import math

import pytest
from rich.console import Console
from rich.table import Table

from laulima.report import ArmEvaluation
from laulima.terminal import (
    ComparisonColumn,
    budget_line,
    compare_arms,
    comparison_table,
    comparison_verdict,
    format_metric,
    headline_metrics,
    metric_label,
    ordered_metrics,
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
