"""The HTML report: its comparison table holds exactly the arms' numbers under readable names,
the first screen carries the run's metadata, the overlay is drawn and linked, names are
escaped, and callers that pass only the original fields still get a report."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from laulima.core.protocol import TaskKind
from laulima.report import ArmEvaluation, Overlay, collect_versions, label_colours, report_meta, write_report
from laulima.terminal import format_metric
from tests.helpers import report_data as rd

SPEC = {"name": "brain-tumour-fedavg", "rounds": 8, "strategy": {"name": "fedavg"}}
STRATEGIES = [
    {"strategy": "fedavg", "dice_mean_pooled": {"federated": 0.7123, "centralized": 0.73}, "rounds": 8, "wall_s": 12.5},
    {"strategy": "fedprox", "dice_mean_pooled": {"federated": 0.7234}, "rounds": 8, "mu": 0.01, "ok": True, "x": "y"},
]


class Tables(HTMLParser):
    """Each table's rows as lists of cell texts, keyed by the table's id (or its index)."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.classes: dict[str, list[list[str]]] = {}
        self._table: str | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "table":
            self._table = a.get("id") or str(len(self.tables))
            self.tables[self._table], self.classes[self._table] = [], []
        elif tag == "tr" and self._table is not None:
            self.tables[self._table].append([])
            self.classes[self._table].append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = []
            self.classes[self._table][-1].append(a.get("class") or "")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._table is not None:
            self.tables[self._table][-1].append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def parse(page: str) -> Tables:
    tables = Tables()
    tables.feed(page)
    return tables


@pytest.fixture(scope="module")
def full_report(tmp_path_factory) -> tuple[Path, rd.ReportData]:
    meta = report_meta(strategy="fedavg", seed=7, spec=SPEC, date="2025-01-02 03:04 UTC")
    data = rd.report_data(meta=meta, overlay=rd.overlay(), strategy_comparison=STRATEGIES)
    return write_report(data, tmp_path_factory.mktemp("report")), data


def test_every_number_in_the_comparison_table_is_the_arms_value(full_report):
    path, data = full_report
    tables = parse(path.read_text())
    rows = tables.tables["comparison-table"]
    group, head, body = rows[0], rows[1], rows[2:]
    assert group == ["model", "steps", "all sites' test subjects", "each site's own test subjects: mean Dice"]
    pooled = ["mean Dice", "Dice whole tumour", "Dice tumour core", "Dice enhancing tumour", "mean HD95 (mm)"]
    assert head == [*pooled, *rd.SITES]
    keys = ["dice_mean", "dice_wt", "dice_tc", "dice_et", "hd95_mean"]
    arms = {a.name: a for a in data.arms}
    assert [r[0] for r in body] == ["federated", "centralized", "local:site-a", "local:site-b", "local:site-c"]
    for row in body:
        arm = arms[row[0]]
        expected = [format_metric(k, arm.pooled[k]) for k in keys]
        expected += [format_metric("dice_mean", arm.per_site[s]["dice_mean"]) for s in rd.SITES]
        assert row[1:] == [str(arm.steps), *expected], row[0]


def test_the_best_value_per_column_is_marked(full_report):
    path, _ = full_report
    tables = parse(path.read_text())
    classes = tables.classes["comparison-table"][2:]
    names = [r[0] for r in tables.tables["comparison-table"][2:]]
    best = {j: [names[i] for i, row in enumerate(classes) if row[j] == "best"] for j in range(2, len(classes[0]))}
    # columns: model, steps, 5 pooled, 3 sites
    assert best[2] == ["centralized"] and best[6] == ["centralized"]  # highest Dice, lowest HD95
    assert best[9] == ["local:site-c"]
    assert all(c == "" for row in classes for c in row[:2])


def test_the_caption_states_the_budget_and_the_summary_the_pooled_dice(full_report):
    path, data = full_report
    page = path.read_text()
    assert "budget: 8 rounds x 10 local steps x 3 sites = 240 optimizer steps for federated and centralized" in page
    fed = next(a for a in data.arms if a.name == "federated")
    central = next(a for a in data.arms if a.name == "centralized")
    headline = page[page.index('<div class="headline">') : page.index('id="comparison"')]
    assert f"{fed.pooled['dice_mean']:.4f}" in headline
    assert f"{fed.pooled['dice_mean'] / central.pooled['dice_mean']:.2f} ×" in headline
    assert "2 of 3" in headline and "site-a, site-b" in headline and "local:site-c" in headline


def visible_text(page: str) -> str:
    """The page without tags, the spec block (machine text on purpose) and image file names."""
    page = re.sub(r"<pre>.*?</pre>", "", page, flags=re.S)
    page = re.sub(r"<style>.*?</style>", "", page, flags=re.S)
    return re.sub(r"<[^>]+>", " ", page)


def test_no_raw_metric_field_names_are_shown(full_report):
    text = visible_text(full_report[0].read_text())
    assert not re.search(r"\b(dice|hd95)_\w+", text), re.search(r"\b(dice|hd95)_\w+", text)
    for label in ("Dice whole tumour", "HD95 whole tumour (mm)", "Dice non enhancing tumor", "mean Dice"):
        assert label in text


def test_the_first_screen_has_strategy_seed_date_versions_and_the_spec(full_report):
    path, _ = full_report
    page = path.read_text()
    top = page[: page.index("</section>")]
    assert "strategy <b>fedavg</b>" in top and "seed <b>7</b>" in top and "2025-01-02 03:04 UTC" in top
    for name in ("laulima", "python", "torch", "monai"):
        assert f"{name} " in top
    spec = re.search(r"<details><summary>experiment spec</summary><pre>(.*?)</pre></details>", top, flags=re.S)
    assert spec and json.loads(spec.group(1).replace("&quot;", '"')) == SPEC


def test_a_spec_given_as_toml_text_is_shown_as_is(tmp_path):
    toml = 'name = "a<b"\nrounds = 3\n'
    page = write_report(rd.report_data(meta={"spec": toml}), tmp_path).read_text()
    assert "<pre>name = &quot;a&lt;b&quot;\nrounds = 3\n</pre>" in page


def test_versions_name_laulima_python_torch_and_monai():
    versions = collect_versions()
    assert list(versions)[:2] == ["laulima", "python"] and {"torch", "monai"} <= set(versions)
    assert collect_versions(("no-such-package-xyz",))["no-such-package-xyz"] == "not installed"
    meta = report_meta(strategy="fedprox", seed=1, spec={})
    assert meta["versions"] == versions and re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", meta["date"])


def test_the_overlay_is_written_and_referenced(full_report):
    path, data = full_report
    png = path.parent / "overlay.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = path.read_text()
    assert '<img src="overlay.png"' in page and data.overlay is not None and data.overlay.caption in page
    import matplotlib.image

    height, width = matplotlib.image.imread(png).shape[:2]
    assert width >= 1000 and height >= 700  # a 2 x 3 grid of readable panels
    described = json.loads((path.parent / "report.json").read_text())["overlay"]
    assert described["models"] == ["federated", "centralized", "local:site-a"]


def test_the_overlay_rejects_slices_of_different_shapes():
    image = np.zeros((8, 8))
    with pytest.raises(ValueError, match="2D slice"):
        Overlay(np.zeros((2, 8, 8)), image, {}, {}, "x")
    with pytest.raises(ValueError, match="prediction of 'federated' has shape \\(8, 7\\)"):
        Overlay(image, image, {"federated": np.zeros((8, 7))}, {}, "x")


def test_each_label_keeps_one_colour_whatever_the_panel():
    colours = label_colours(rd.TUMOUR_LABELS)
    assert set(colours) == {1, 2, 3} and len(set(colours.values())) == 3
    assert label_colours({3: "c", 1: "a", 2: "b"}) == colours


def test_plots_are_large_enough_to_read(full_report):
    import matplotlib.image

    directory = full_report[0].parent
    for name in ("comparison.png", "comparison_sites.png", "comparison_hd95.png", "federated_rounds.png"):
        height, width = matplotlib.image.imread(directory / name).shape[:2]
        assert width >= 1100 and height >= 550, name  # 10 x 5.5 in at 120 dpi, less trimmed margins
        assert f'<img src="{name}"' in full_report[0].read_text()


def test_strategy_rows_render_generically(full_report):
    rows = parse(full_report[0].read_text()).tables["strategies-table"]
    assert rows[0] == ["strategy", "federated mean Dice (pooled)", "rounds", "wall (s)", "mu"]
    assert rows[1] == ["fedavg", "0.7123", "8", "12.5", ""]
    assert rows[2] == ["fedprox", "0.7234", "8", "", "0.01"]


def test_the_site_table_lists_sites_as_columns(full_report):
    path, data = full_report
    rows = parse(path.read_text()).tables["sites-table"]
    assert rows[0] == ["site", *rd.SITES]
    assert rows[1] == ["train subjects", "6", "12", "18"]
    assert len(rows) == 1 + len(data.sites["site-a"])


def test_callers_with_only_the_original_fields_still_get_a_report(tmp_path):
    data = rd.report_data(tumour=False)
    page = write_report(data, tmp_path).read_text()
    assert not (tmp_path / "overlay.png").exists() and "overlay.png" not in page
    assert "strategies-table" not in page and "<details>" not in page
    head = parse(page).tables["comparison-table"][1]
    assert head == ["mean Dice", "Dice csf", "Dice grey matter", "Dice white matter", *rd.SITES]
    assert not (tmp_path / "comparison_hd95.png").exists()
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["meta"] == {} and report["overlay"] is None and report["strategy_comparison"] is None
    assert report["summary"]["dice_mean_pooled"]["federated"] == data.arms[2].pooled["dice_mean"]


def test_a_report_of_the_federated_model_alone_renders(tmp_path):
    data = rd.report_data(tumour=False)
    data.arms = [a for a in data.arms if a.name == "federated"]
    page = write_report(data, tmp_path).read_text()
    assert parse(page).tables["comparison-table"][2][0] == "federated"


def test_report_json_records_the_comparison_as_shown(full_report):
    path, data = full_report
    report = json.loads((path.parent / "report.json").read_text())
    first = report["comparison"]["rows"][0]
    fed = next(a for a in data.arms if a.name == "federated")
    assert first["name"] == "federated" and first["values"][0] == fed.pooled["dice_mean"]
    assert report["comparison"]["columns"][1] == {"metric": "dice_wt", "site": None, "label": "Dice whole tumour"}
    assert report["meta"]["spec"] == SPEC
    assert report["summary"]["sites_where_federated_beats_local"] == ["site-a", "site-b"]


def test_names_are_escaped(tmp_path):
    evil = "<script>alert(1)</script>"
    data = rd.report_data(
        meta={"strategy": evil, "seed": 1, "versions": {evil: evil}},
        overlay=rd.overlay([f"local:{evil}"]),
        strategy_comparison=[{"strategy": evil, "dice_mean_pooled": {"federated": 0.5}, "n&m": 1}],
    )
    data.title = f"A & B {evil}"
    data.sites[f"site {evil}"] = {"scanner": evil}
    data.arms.append(ArmEvaluation(f"local:{evil}", {"site-a": {"dice_mean": 0.1}}, {"dice_mean": 0.1}, 1, 0.0))
    data.notes.append(evil)
    page = write_report(data, tmp_path).read_text()
    assert "<script" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "A &amp; B" in page and "n&amp;m" in page


def test_the_page_needs_nothing_from_the_network(full_report):
    page = full_report[0].read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "<script" not in page and "<link" not in page and "@import" not in page
    for src in re.findall(r'src="([^"]+)"', page):
        assert (full_report[0].parent / src).is_file(), src


def test_tables_are_wrapped_so_they_scroll_inside_the_page(full_report):
    page = full_report[0].read_text()
    assert page.count('<div class="table-wrap"><table') == page.count("<table")
    assert ".table-wrap { max-width: 100%; overflow-x: auto; }" in page


# -- differential privacy and secure aggregation ---------------------------------------------
PRIVACY = {
    "differential_privacy": True,
    "mode": "distributed",
    "clip": 1.5,
    "noise_multiplier": 3.125,
    "target_epsilon": 8.0,
    "delta": 1e-5,
    "secure_aggregation": True,
}
NO_LOCAL = "under differential privacy no site trains a local-only model"
UTILITY = {
    "benchmark": "privacy_utility",
    "preset": "quick",
    "mode": "distributed",
    "secure_aggregation": True,
    "clip": 1.5,
    "delta": 1e-5,
    "rounds": 20,
    "runs": [
        {"target_epsilon": None, "noise_multiplier": None, "dice_mean": 0.7111,
         "dice": {"dice_wt": 0.81, "dice_tc": 0.7, "dice_et": 0.62}, "wall_s": 300.0},
        {"target_epsilon": 8.0, "noise_multiplier": 3.1, "dice_mean": 0.4222,
         "dice": {"dice_wt": 0.5, "dice_tc": 0.42, "dice_et": 0.35}, "wall_s": 320.5},
        {"target_epsilon": 1.0, "noise_multiplier": 14.2, "dice_mean": 0.0333,
         "dice": {"dice_wt": 0.05, "dice_tc": 0.03, "dice_et": 0.02}, "wall_s": 330.0},
        {"target_epsilon": 3.0, "noise_multiplier": 6.0, "dice_mean": 0.1444,
         "dice": {"dice_wt": 0.2, "dice_tc": 0.13, "dice_et": 0.1}, "wall_s": 310.0},
    ],
}  # fmt: skip


def site_epsilon(site: str, rnd: int) -> float:
    """Distinct per site and round, so a misplaced cell shows."""
    return round(2.0 * rnd + 0.01 * rd.SITES.index(site), 4)


def private_data(**extra) -> rd.ReportData:
    """A run under distributed DP and secure aggregation: no local-only models, ε with every update."""
    data = rd.report_data(privacy=dict(PRIVACY), absent={"local-only models": NO_LOCAL}, **extra)
    data.arms = [a for a in data.arms if not a.name.startswith("local:")]
    data.rounds = [
        r.model_copy(update={"metrics": {**r.metrics, "privacy_epsilon": site_epsilon(r.site, r.round)}})
        if r.kind == TaskKind.TRAIN
        else r
        for r in data.rounds
    ]
    return data


@pytest.fixture(scope="module")
def private_report(tmp_path_factory) -> tuple[Path, rd.ReportData]:
    data = private_data(privacy_utility=UTILITY)
    return write_report(data, tmp_path_factory.mktemp("private")), data


def test_the_epsilon_of_every_site_and_round_is_in_report_json(private_report):
    path, _ = private_report
    privacy = json.loads((path.parent / "report.json").read_text())["privacy"]
    n_rounds = 4  # rd.rounds()
    assert privacy["epsilon_per_round"] == {
        s: {str(r): site_epsilon(s, r) for r in range(1, n_rounds + 1)} for s in rd.SITES
    }
    assert privacy["epsilon_final"] == {s: {"round": n_rounds, "epsilon": site_epsilon(s, n_rounds)} for s in rd.SITES}
    assert {k: privacy[k] for k in PRIVACY} == PRIVACY  # mode, clip, noise multiplier, δ, secure aggregation
    summary = json.loads((path.parent / "report.json").read_text())["summary"]
    assert summary["epsilon_final"] == {s: site_epsilon(s, n_rounds) for s in rd.SITES}


def test_the_page_shows_the_privacy_settings_and_epsilon_per_site_and_round(private_report):
    path, _ = private_report
    page = path.read_text()
    tables = parse(page).tables
    assert tables["epsilon-table"][0] == ["", *rd.SITES]
    assert tables["epsilon-table"][1] == ["ε after the last round", "8.00", "8.01", "8.02"]
    assert tables["epsilon-table"][2] == ["last round", "4", "4", "4"]
    assert tables["epsilon-rounds-table"][1] == ["1", "2.00", "2.01", "2.02"]
    assert len(tables["epsilon-rounds-table"]) == 1 + 4
    settings = re.search(r'<p id="privacy-settings">(.*?)</p>', page).group(1)
    for part in ("distributed", "clip 1.5", "noise multiplier 3.125", "ε 8", "δ 1e-05", "secure aggregation on"):
        assert part in settings, (part, settings)
    assert "ε = 8.02" in page  # the headline card: the most any site spent
    assert (path.parent / "privacy_epsilon.png").is_file() and '<img src="privacy_epsilon.png"' in page


def test_a_private_run_says_why_it_has_no_local_only_models(private_report):
    path, _ = private_report
    page = path.read_text()
    assert f'<p class="note absent">No local-only models: {NO_LOCAL}</p>' in page
    assert [row[0] for row in parse(page).tables["comparison-table"][2:]] == ["federated", "centralized"]
    assert "best local-only" not in page and "sites where federated beats" not in page
    report = json.loads((path.parent / "report.json").read_text())
    assert report["summary"]["absent"] == {"local-only models": NO_LOCAL}
    assert "best_local" not in report["summary"] and report["summary"]["sites_where_federated_beats_local"] == []
    assert "x centralized" in report["summary"]["verdict"]


def test_the_privacy_utility_line_is_tabled_by_epsilon_and_plotted(private_report):
    path, _ = private_report
    page = path.read_text()
    rows = parse(page).tables["privacy-utility-table"]
    assert rows[0] == [
        "target ε", "noise multiplier", "mean Dice", "Dice whole tumour", "Dice tumour core", "Dice enhancing tumour",
        "wall (s)",
    ]  # fmt: skip
    assert [r[0] for r in rows[1:]] == ["1", "3", "8", "∞ (no differential privacy)"]
    assert rows[1] == ["1", "14.2", "0.0333", "0.0500", "0.0300", "0.0200", "330"]
    assert rows[4][1:3] == ["—", "0.7111"]
    assert (path.parent / "privacy_utility.png").is_file() and '<img src="privacy_utility.png"' in page
    assert json.loads((path.parent / "report.json").read_text())["privacy_utility"] == UTILITY


def test_a_report_without_privacy_has_no_privacy_section(full_report):
    path, _ = full_report
    page = path.read_text()
    assert 'id="privacy"' not in page and "epsilon-table" not in page
    assert not (path.parent / "privacy_epsilon.png").exists() and not (path.parent / "privacy_utility.png").exists()
    report = json.loads((path.parent / "report.json").read_text())
    assert report["privacy"] is None and report["privacy_utility"] is None and "epsilon_final" not in report["summary"]


def test_secure_aggregation_alone_shows_its_settings_and_no_epsilon(tmp_path):
    settings = {"differential_privacy": False, "mode": None, "clip": 1.5, "noise_multiplier": None,
                "target_epsilon": None, "delta": None, "secure_aggregation": True}  # fmt: skip
    data = rd.report_data(privacy=settings)
    page = write_report(data, tmp_path).read_text()
    assert "no differential privacy (updates clipped to 1.5); secure aggregation on" in page
    assert "No site reported an ε" in page and not (tmp_path / "privacy_epsilon.png").exists()


def test_an_epsilon_without_noise_reads_infinite_and_is_not_plotted(tmp_path):
    data = private_data()
    data.rounds = [
        r.model_copy(update={"metrics": {**r.metrics, "privacy_epsilon": 1e15}}) if r.kind == TaskKind.TRAIN else r
        for r in data.rounds
    ]
    page = write_report(data, tmp_path).read_text()
    assert parse(page).tables["epsilon-table"][1] == ["ε after the last round", "∞", "∞", "∞"]
    assert not (tmp_path / "privacy_epsilon.png").exists()
