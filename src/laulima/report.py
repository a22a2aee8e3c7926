"""The experiment report: one JSON file, PNG plots and an HTML page that shows them.

Its inputs are plain data (metric records from the hub, baseline evaluations), so the
report can be rebuilt from a finished experiment at any time, and tests can check that
every number in it is the one in the hub's database.

The page opens offline: inline CSS, no scripts, images as files beside ``index.html``.
Its first screen answers the question a reader came with (did federation pay off?): the
headline numbers and the comparison of every model on every site, the same table the
terminal prints (:func:`laulima.terminal.comparison_table`).
"""

from __future__ import annotations

import html
import json
import math
import os
import platform
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from laulima.core.crosssite import round_records
from laulima.core.privacy.messages import INFINITE_EPSILON
from laulima.core.protocol import MetricRecord, TaskKind
from laulima.terminal import (
    Comparison,
    Verdict,
    budget_line,
    compare_arms,
    comparison_verdict,
    epsilon_by_site,
    final_epsilon,
    format_epsilon,
    format_metric,
    headline_metrics,
    metric_label,
    ordered_metrics,
    privacy_settings_line,
    weighted_mean,
)

__all__ = ["ArmEvaluation", "Overlay", "ReportData", "collect_versions", "report_meta", "write_report"]

POOLED = "pooled"
HEADLINE = "dice_mean"

#: Figure size and resolution of the curves and bars: about 1200 px wide, readable when the
#: page scales it to its column; fonts in points at that size.
FIGSIZE = (10.0, 5.5)
DPI = 120
FONT_PT = 12

#: One colour per foreground label, by the label's rank, the same in every overlay panel.
LABEL_COLOURS = ("#2ca02c", "#d62728", "#ffd700", "#1f77b4", "#9467bd", "#ff7f0e", "#17becf", "#e377c2")


@dataclass(frozen=True)
class ArmEvaluation:
    """One trained model evaluated on every site's held-out test subjects."""

    name: str
    """"federated", "centralized" or "local:<site>"."""
    per_site: dict[str, dict[str, float]]
    pooled: dict[str, float]
    steps: int
    wall_time_s: float


@dataclass(frozen=True)
class Overlay:
    """One 2D slice of one test subject, with its ground truth and each model's prediction.

    The demo computes the predictions and picks the slice; the report only draws it. Arrays
    are drawn as given (rows top to bottom), so the caller orients the slice.
    """

    image: NDArray[Any]
    """The intensity slice shown under the labels, e.g. FLAIR."""
    truth: NDArray[Any]
    """Integer labels of the same shape; 0 is background."""
    predictions: dict[str, NDArray[Any]]
    """Model name ("federated", "centralized", "local:<site>") to its predicted label slice."""
    labels: dict[int, str]
    """Label value to name; background (0) may be omitted."""
    caption: str
    """Which subject, site and slice, e.g. "site-b, test subject 3, axial slice 62"."""
    image_name: str = "FLAIR"

    def __post_init__(self) -> None:
        shape = np.shape(self.image)
        if len(shape) != 2:
            raise ValueError(f"the overlay image must be a 2D slice; got shape {shape}")
        named = [("ground truth", self.truth), *((f"prediction of {k!r}", v) for k, v in self.predictions.items())]
        for what, array in named:
            if np.shape(array) != shape:
                raise ValueError(f"the overlay's {what} has shape {np.shape(array)}; its image slice has {shape}")

    def describe(self) -> dict[str, Any]:
        """What report.json records of the figure (not the pixels)."""
        return {
            "caption": self.caption,
            "image_name": self.image_name,
            "shape": list(np.shape(self.image)),
            "models": list(self.predictions),
            "labels": {str(k): v for k, v in self.labels.items()},
        }


@dataclass
class ReportData:
    title: str
    description: str
    labels: dict[int, str]
    sites: dict[str, dict[str, Any]]
    """Per site: cohort sizes and scanner profile."""
    budget: dict[str, Any]
    rounds: list[MetricRecord]
    """The hub's metric records of the federated experiment (train and evaluate)."""
    arms: list[ArmEvaluation]
    wall_time_s: dict[str, float]
    notes: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    """Shown beside the title: ``strategy``, ``seed``, ``date``, ``versions`` (name to version, see
    :func:`collect_versions`) and ``spec`` (a dict, or TOML or JSON text) in a collapsible block.
    :func:`report_meta` builds it."""
    overlay: Overlay | None = None
    strategy_comparison: list[dict[str, Any]] | None = None
    """Rows of benchmarks/strategies.py: ``strategy``, ``dice_mean_pooled`` ({arm: value}) and any
    numeric fields (rounds, wall_s, ...)."""
    metric_labels: dict[str, str] = field(default_factory=dict)
    """Overrides of the readable metric names (:func:`laulima.terminal.metric_label`)."""
    privacy: dict[str, Any] | None = None
    """The run's privacy settings (:func:`laulima.terminal.privacy_settings` of the hub's spec:
    mode, clip, noise multiplier, δ, secure aggregation on/off); None: neither was used. The ε
    each site spent is read from the train records of :attr:`rounds`."""
    privacy_utility: dict[str, Any] | None = None
    """benchmarks/privacy_utility.py's JSON line: ``runs``, each with ``target_epsilon`` (None: no
    differential privacy), ``noise_multiplier``, ``dice_mean``, ``dice`` (per region), ``wall_s``."""
    absent: dict[str, str] = field(default_factory=dict)
    """Models the comparison usually has and this run does not, with why (e.g. the local-only
    models under differential privacy), so no table or verdict reads as if they lost."""

    def label(self, key: str) -> str:
        return self.metric_labels.get(key) or metric_label(key)

    def site_names(self) -> list[str]:
        """The sites in the comparison: those described, else those the models were tested on."""
        return sorted(self.sites) or sorted({s for a in self.arms for s in a.per_site})

    def comparison(self) -> Comparison:
        return compare_arms(self.arms, sites=self.site_names(), metric=HEADLINE)

    def verdict(self) -> Verdict:
        return comparison_verdict(self.arms, sites=self.site_names(), metric=HEADLINE)

    def federated_curve(self) -> dict[int, dict[str, float]]:
        """Per round, the global model's metrics pooled over all sites' test subjects."""
        by_round: dict[int, list[MetricRecord]] = defaultdict(list)
        for m in round_records(self.rounds):
            if m.kind == TaskKind.EVALUATE:
                by_round[m.round].append(m)
        return {r: weighted_mean(ms) for r, ms in sorted(by_round.items())}

    def summary(self) -> dict[str, Any]:
        arms = {a.name: a for a in self.arms}
        out: dict[str, Any] = {"dice_mean_pooled": {a.name: a.pooled.get("dice_mean") for a in self.arms}}
        fed, central = arms.get("federated"), arms.get("centralized")
        locals_ = [a for a in self.arms if a.name.startswith("local:")]
        if fed and central and central.pooled.get("dice_mean"):
            out["federated_over_centralized"] = fed.pooled["dice_mean"] / central.pooled["dice_mean"]
        if fed and locals_:
            best = max(locals_, key=lambda a: a.pooled.get("dice_mean", 0.0))
            out["best_local"] = best.name
            out["federated_minus_best_local"] = fed.pooled["dice_mean"] - best.pooled.get("dice_mean", 0.0)
        verdict = self.verdict()
        out["sites_where_federated_beats_local"] = list(verdict.sites_won)
        out["verdict"] = verdict.line()
        if self.absent:
            out["absent"] = dict(self.absent)
        if final := final_epsilon(self.rounds):
            out["epsilon_final"] = {site: eps for site, (_, eps) in final.items()}
        return out

    def epsilon(self) -> dict[str, dict[int, float]]:
        """Per site and round, the site-level ε the experiment had cost the site (its own accounting)."""
        return epsilon_by_site(self.rounds)

    def privacy_json(self) -> dict[str, Any] | None:
        """The privacy settings with the ε per site and round, and after each site's last round."""
        epsilons = self.epsilon()
        if self.privacy is None and not epsilons:
            return None
        final = final_epsilon(self.rounds)
        return {
            **(self.privacy or {}),
            "epsilon_per_round": {site: {str(r): v for r, v in rs.items()} for site, rs in epsilons.items()},
            "epsilon_final": {site: {"round": r, "epsilon": v} for site, (r, v) in final.items()},
            "epsilon_note": f"site-level ε (each site's own accounting); {INFINITE_EPSILON:g} stands for ∞",
        }

    def to_json(self) -> dict[str, Any]:
        comparison = self.comparison()
        return {
            "title": self.title,
            "description": self.description,
            "labels": {str(k): v for k, v in self.labels.items()},
            "sites": self.sites,
            "budget": self.budget,
            "federated_rounds": [m.model_dump(mode="json") for m in self.rounds],
            "federated_curve": {str(r): v for r, v in self.federated_curve().items()},
            "arms": [asdict(a) for a in self.arms],
            "comparison": {
                "columns": [
                    {"metric": c.metric, "site": c.site, "label": self.label(c.metric)} for c in comparison.columns
                ],
                "rows": [{"name": r.name, "steps": r.steps, "values": list(r.values)} for r in comparison.rows],
            },
            "summary": self.summary(),
            "wall_time_s": self.wall_time_s,
            "notes": self.notes,
            "meta": self.meta,
            "overlay": self.overlay.describe() if self.overlay else None,
            "strategy_comparison": self.strategy_comparison,
            "privacy": self.privacy_json(),
            "privacy_utility": self.privacy_utility,
        }


def collect_versions(packages: Sequence[str] = ("laulima", "torch", "monai")) -> dict[str, str]:
    """Versions of what produced the numbers, so a report can be reproduced or explained."""
    versions = {"python": platform.python_version()}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return {k: versions[k] for k in sorted(versions, key=lambda k: (k != "laulima", k != "python"))}


def report_meta(*, strategy: str, seed: int, spec: Mapping[str, Any] | str, date: str | None = None) -> dict[str, Any]:
    """:attr:`ReportData.meta` for a run now: the date (UTC) and :func:`collect_versions` filled in."""
    when = date or datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return {"strategy": strategy, "seed": seed, "date": when, "versions": collect_versions(), "spec": spec}


def write_report(data: ReportData, out_dir: Path) -> Path:
    """Write report.json, the PNG plots and index.html into ``out_dir``; return the HTML path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_text(out_dir / "report.json", json.dumps(data.to_json(), indent=2, default=str))
    figures: dict[str, str] = {}
    for name, alt, plot in _PLOTS:
        if plot(data, out_dir / name):
            figures[name] = alt
    overlay = "overlay.png" if data.overlay and _plot_overlay(data.overlay, out_dir / "overlay.png") else None
    _write_text(out_dir / "index.html", _html(data, figures, overlay))
    return out_dir / "index.html"


# -- plots -------------------------------------------------------------------------------
@contextmanager
def _figure(
    figsize: tuple[float, float] = FIGSIZE, nrows: int = 1, ncols: int = 1, layout: str | None = None
) -> Iterator[tuple[Any, Any]]:
    """A matplotlib figure (Agg: no display needed) with readable fonts, closed afterwards."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with plt.rc_context({"font.size": FONT_PT, "axes.titlesize": FONT_PT + 2, "legend.fontsize": FONT_PT - 1}):
        fig, axes = plt.subplots(nrows, ncols, figsize=figsize, squeeze=False, layout=layout)
        try:
            yield fig, axes
        finally:
            plt.close(fig)


def _finish(fig: Any, ax: Any, path: Path, title: str, ylabel: str, *, dice: bool = True) -> bool:
    """Title, grid, a legend outside the axes (it hides no curve) and the PNG."""
    if dice:
        ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, frameon=False)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return True


def _integer_rounds(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _plot_rounds(data: ReportData, path: Path) -> bool:
    curve = data.federated_curve()
    if not curve:
        return False
    rounds = list(curve)
    keys = [k for k in headline_metrics(curve[rounds[-1]]) if k.startswith("dice_")]
    with _figure() as (fig, axes):
        ax = axes[0][0]
        for key in keys:
            style = {"color": "k", "lw": 2.5} if key == HEADLINE else {"marker": "."}
            ax.plot(rounds, [curve[r].get(key, math.nan) for r in rounds], label=data.label(key), **style)
        by_name = {a.name: a for a in data.arms}
        central = by_name.get("centralized")
        if central and HEADLINE in central.pooled:
            ax.axhline(central.pooled[HEADLINE], color="tab:gray", ls="--", label="centralized, mean Dice")
        verdict = data.verdict()
        if verdict.best_local_value is not None:
            ax.axhline(verdict.best_local_value, color="tab:red", ls=":", label=f"best {verdict.best_local}, mean Dice")
        _integer_rounds(ax)
        title = "Federated global model per round, pooled over all sites' test subjects"
        return _finish(fig, ax, path, title, "Dice")


def _plot_sites(data: ReportData, path: Path) -> bool:
    evals = [m for m in round_records(data.rounds) if m.kind == TaskKind.EVALUATE and HEADLINE in m.metrics]
    if not evals:
        return False
    with _figure() as (fig, axes):
        ax = axes[0][0]
        for site in sorted({m.site for m in evals}):
            ms = sorted((m for m in evals if m.site == site), key=lambda m: m.round)
            ax.plot([m.round for m in ms], [m.metrics[HEADLINE] for m in ms], marker=".", label=site)
        curve = data.federated_curve()
        ax.plot(list(curve), [v.get(HEADLINE, math.nan) for v in curve.values()], "k-", lw=2.5, label="pooled")
        _integer_rounds(ax)
        return _finish(fig, ax, path, "Federated global model per round, on each site's test subjects", "mean Dice")


Group = tuple[str, Callable[[ArmEvaluation], "float | None"]]
"""A group of bars: its label and how to read an arm's value."""


def _bars(data: ReportData, path: Path, groups: list[Group], *, title: str, ylabel: str, dice: bool = True) -> bool:
    """Grouped bars: one group per entry of ``groups`` (label, value of an arm), one bar per model."""
    by_name = {a.name: a for a in data.arms}
    ordered = [by_name[row.name] for row in data.comparison().rows]  # federated first, as in the table
    arms = [a for a in ordered if any(value(a) is not None for _, value in groups)]
    if not arms or not groups:
        return False
    with _figure() as (fig, axes):
        ax = axes[0][0]
        width = 0.8 / len(arms)
        for i, arm in enumerate(arms):
            values = [value(arm) for _, value in groups]
            xs = [x + i * width for x in range(len(groups))]
            ax.bar(xs, [math.nan if v is None else v for v in values], width, label=arm.name)
        ax.set_xticks([x + width * (len(arms) - 1) / 2 for x in range(len(groups))], [g for g, _ in groups])
        return _finish(fig, ax, path, title, ylabel, dice=dice)


def _pooled(key: str) -> Callable[[ArmEvaluation], float | None]:
    return lambda arm: arm.pooled.get(key)


def _on_site(site: str, key: str) -> Callable[[ArmEvaluation], float | None]:
    return lambda arm: arm.per_site.get(site, {}).get(key)


def _plot_comparison(data: ReportData, path: Path) -> bool:
    keys = [k for k in headline_metrics(k for a in data.arms for k in a.pooled) if k.startswith("dice_")]
    groups = [(data.label(k), _pooled(k)) for k in keys]
    title = "Same optimizer-step budget: every model on all sites' test subjects, per region"
    return _bars(data, path, groups, title=title, ylabel="Dice (pooled)")


def _plot_comparison_hd95(data: ReportData, path: Path) -> bool:
    keys = [k for k in ordered_metrics(k for a in data.arms for k in a.pooled) if k.startswith("hd95_")]
    groups = [(data.label(k).removesuffix(" (mm)"), _pooled(k)) for k in keys]
    title = "95th-percentile Hausdorff distance per region (lower is better)"
    return _bars(data, path, groups, title=title, ylabel="HD95 (mm), pooled", dice=False)


def _plot_comparison_sites(data: ReportData, path: Path) -> bool:
    groups = [(f"test: {s}", _on_site(s, HEADLINE)) for s in data.site_names()]
    title = "Same optimizer-step budget: every model on each site's own test subjects"
    return _bars(data, path, groups, title=title, ylabel="mean Dice")


def _plot_epsilon(data: ReportData, path: Path) -> bool:
    """ε spent per round at each site (sites with equal noise and rounds coincide)."""
    finite = {
        site: {r: v for r, v in rounds.items() if math.isfinite(v) and v < INFINITE_EPSILON}
        for site, rounds in data.epsilon().items()
    }
    if not any(finite.values()):
        return False
    settings = data.privacy or {}
    markers = "os^Dvp*"
    with _figure() as (fig, axes):
        ax = axes[0][0]
        for i, (site, rounds) in enumerate(finite.items()):
            ax.plot(list(rounds), list(rounds.values()), marker=markers[i % len(markers)], ms=4, label=site, alpha=0.8)
        if (target := settings.get("target_epsilon")) is not None:
            ax.axhline(float(target), color="tab:red", ls="--", label=f"target ε {float(target):g}")
        ax.set_ylim(bottom=0)
        _integer_rounds(ax)
        delta = settings.get("delta")
        at = _delta_text(delta, " at δ = {}")
        title = f"Site-level ε spent after each round{at}, as each site accounted it"
        return _finish(fig, ax, path, title, "ε", dice=False)


def utility_runs(data: ReportData) -> list[dict[str, Any]]:
    """The privacy-utility runs that carry a Dice, finite ε in increasing order, then ∞ (no privacy)."""
    runs = [r for r in (data.privacy_utility or {}).get("runs") or [] if _number(r.get("dice_mean")) is not None]
    return sorted(runs, key=lambda r: _number(r.get("target_epsilon")) or math.inf)


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _delta_text(value: object, template: str) -> str:
    """``template`` with δ filled in, or nothing when δ is unknown."""
    number = _number(value)
    return "" if number is None else template.format(f"{number:g}")


def _plot_privacy_utility(data: ReportData, path: Path) -> bool:
    """Federated Dice against the target ε (log scale); no differential privacy (ε = ∞) as a line."""
    runs = utility_runs(data)
    if not runs:
        return False
    finite = [r for r in runs if _number(r.get("target_epsilon")) is not None]
    unbounded = [r for r in runs if _number(r.get("target_epsilon")) is None]
    regions = list(dict.fromkeys(k for r in runs for k in (r.get("dice") or {}) if k != HEADLINE))
    delta = (data.privacy_utility or {}).get("delta")
    with _figure() as (fig, axes):
        ax = axes[0][0]
        if finite:
            xs = [float(r["target_epsilon"]) for r in finite]
            ax.plot(xs, [float(r["dice_mean"]) for r in finite], "k-o", lw=2.5, label=data.label(HEADLINE))
            for key in regions:
                ys = [_number((r.get("dice") or {}).get(key)) for r in finite]
                ax.plot(xs, [math.nan if y is None else y for y in ys], marker=".", label=data.label(key))
            ax.set_xscale("log")
            ax.set_xticks(xs, [f"{x:g}" for x in xs])
            ax.minorticks_off()
        for run in unbounded:
            ax.axhline(float(run["dice_mean"]), color="tab:gray", ls="--", label="no differential privacy (ε = ∞)")
        at = _delta_text(delta, " (δ = {})")
        ax.set_xlabel(f"target ε over all rounds{at}; smaller is more private")
        title = "Privacy against utility: the federated model's Dice at each ε (benchmarks/privacy_utility.py)"
        return _finish(fig, ax, path, title, "Dice (pooled)")


_PLOTS: tuple[tuple[str, str, Callable[[ReportData, Path], bool]], ...] = (
    ("comparison.png", "Dice per region, every model, pooled over all sites", _plot_comparison),
    ("comparison_sites.png", "mean Dice of every model on each site's test subjects", _plot_comparison_sites),
    ("comparison_hd95.png", "HD95 per region, every model, pooled over all sites", _plot_comparison_hd95),
    ("federated_rounds.png", "federated model per round, pooled", _plot_rounds),
    ("sites_rounds.png", "federated model per round, on each site", _plot_sites),
    ("privacy_epsilon.png", "site-level ε spent per round, at each site", _plot_epsilon),
    ("privacy_utility.png", "federated Dice against the privacy budget ε", _plot_privacy_utility),
)


def label_colours(labels: Mapping[int, str]) -> dict[int, str]:
    """A fixed colour per foreground label (by rank), so every panel of the overlay agrees."""
    foreground = sorted(k for k in labels if k != 0)
    return {k: LABEL_COLOURS[i % len(LABEL_COLOURS)] for i, k in enumerate(foreground)}


def _label_rgba(segmentation: NDArray[Any], colours: Mapping[int, str]) -> NDArray[np.float64]:
    from matplotlib.colors import to_rgba

    rgba = np.zeros((*np.shape(segmentation), 4))
    for value, colour in colours.items():
        rgba[np.asarray(segmentation) == value] = to_rgba(colour, alpha=0.55)
    return rgba


def _plot_overlay(overlay: Overlay, path: Path) -> bool:
    """The image with the ground truth, then the image with each model's prediction."""
    from matplotlib.patches import Patch

    panels = [(f"{overlay.image_name} + ground truth", overlay.truth), *overlay.predictions.items()]
    ncols = min(len(panels), 3)
    nrows = math.ceil(len(panels) / ncols)
    colours = label_colours(overlay.labels)
    with _figure((3.8 * ncols, 4.0 * nrows + 0.6), nrows, ncols, layout="constrained") as (fig, axes):
        flat = [ax for row in axes for ax in row]
        for ax, (title, segmentation) in zip(flat, panels, strict=False):
            ax.imshow(np.asarray(overlay.image, dtype=float), cmap="gray", interpolation="nearest")
            ax.imshow(_label_rgba(segmentation, colours), interpolation="nearest")
            ax.set_title(title)
        for ax in flat:
            ax.set_axis_off()
        handles = [Patch(facecolor=colours[k], label=overlay.labels[k].replace("_", " ")) for k in colours]
        fig.legend(handles=handles, loc="outside lower center", ncol=max(1, len(handles)), frameon=False)
        fig.suptitle(overlay.caption)
        fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return True


# -- html --------------------------------------------------------------------------------
_e = html.escape

_CSS = """
*, *::before, *::after { box-sizing: border-box; }
body { font: 15px/1.4 system-ui, sans-serif; max-width: 1160px; margin: 0 auto; padding: 10px 16px; color: #222; }
h1 { font-size: 1.45rem; margin: 0.1em 0 0.2em; }
h2 { font-size: 1.2rem; margin: 1.4em 0 0.4em; }
.meta, .note { font-size: 0.88rem; margin: 0.2em 0; }
.meta { color: #555; }
.note { background: #fff6e0; padding: 0.25em 0.8em; border-left: 4px solid #e0a000; }
.headline { display: flex; flex-wrap: wrap; gap: 8px; margin: 8px 0; }
.card { flex: 1 1 200px; border: 1px solid #ddd; border-radius: 6px; padding: 4px 10px; min-width: 0; }
.card .value { font-size: 1.4rem; font-weight: 650; }
.card .what { font-size: 0.8rem; color: #555; overflow-wrap: anywhere; }
.table-wrap { max-width: 100%; overflow-x: auto; }
table { border-collapse: collapse; margin: 0.4em 0; max-width: 100%; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
td { white-space: nowrap; }  /* numbers stay whole; headers and names wrap instead */
th { background: #f4f4f4; font-weight: 600; overflow-wrap: break-word; }
thead th { vertical-align: bottom; overflow-wrap: anywhere; }  /* many long site names may break */
#sites-table td { white-space: normal; overflow-wrap: anywhere; }
tbody th { text-align: left; }
th.group { text-align: center; }
td.best { background: #d9f2d9; font-weight: 700; }
tr.federated th { background: #e8f0fb; }
caption { caption-side: bottom; text-align: left; color: #555; font-size: 0.85rem; padding-top: 3px; }
figure { margin: 1em 0; max-width: 100%; }
figcaption { color: #555; font-size: 0.88rem; }
img { display: block; max-width: 100%; height: auto; }
details { margin: 0.4em 0; }
pre { max-width: 100%; overflow-x: auto; background: #f8f8f8; padding: 8px; font-size: 0.8rem; }
"""


def _html(data: ReportData, figures: Mapping[str, str], overlay: str | None) -> str:
    sections = [
        _plots_html(figures),
        _overlay_html(data, overlay),
        _all_metrics_html(data),
        _sites_html(data),
        _strategies_html(data),
        _privacy_utility_html(data),
        _list_html("Budget", [f"{k.replace('_', ' ')}: {v}" for k, v in data.budget.items()]),
        _list_html("Wall time", [f"{k.replace('_', ' ')}: {v:.1f} s" for k, v in data.wall_time_s.items()]),
        _list_html("Notes", data.notes),
    ]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(data.title)}</title>
<style>{_CSS}</style></head><body>
<header>
<h1>{_e(data.title)}</h1>
{_meta_html(data.meta)}
<p class="note">{_e(data.description)}</p>
{_headline_html(data)}
</header>
<section id="comparison">
{_comparison_html(data)}
{_absent_html(data)}
{_spec_html(data.meta)}
</section>
{_privacy_html(data)}
{"".join(sections)}
<p>Machine-readable: <a href="report.json">report.json</a>.</p>
</body></html>
"""


def _meta_html(meta: Mapping[str, Any]) -> str:
    """Strategy, seed, date and versions on one line under the title."""
    items = [f"{k} <b>{_e(str(meta[k]))}</b>" for k in ("strategy", "seed", "date") if meta.get(k) is not None]
    versions = meta.get("versions") or {}
    items += [f"{_e(str(k))} {_e(str(v))}" for k, v in versions.items()]
    return f'<p class="meta">{" · ".join(items)}</p>' if items else ""


def _spec_html(meta: Mapping[str, Any]) -> str:
    spec = meta.get("spec")
    if spec is None:
        return ""
    text = spec if isinstance(spec, str) else json.dumps(spec, indent=2, default=str)
    return f"<details><summary>experiment spec</summary><pre>{_e(text)}</pre></details>"


def _headline_html(data: ReportData) -> str:
    """Three or four big numbers: federated mean Dice and how it stands against the baselines."""
    v = data.verdict()
    if v.federated is None:
        return ""
    cards = [(format_metric(HEADLINE, v.federated), f"federated {data.label(HEADLINE)}, all sites' test subjects")]
    if (ratio := v.ratio_to_centralized) is not None:
        cards.append((f"{ratio:.2f} ×", f"of centralized ({format_metric(HEADLINE, v.centralized)})"))
    if (margin := v.margin_over_best_local) is not None:
        cards.append((f"{margin:+.4f}", f"over the best local-only model ({v.best_local})"))
    if v.sites_compared:
        won = f": {', '.join(v.sites_won)}" if v.sites_won else ""
        cards.append(
            (f"{len(v.sites_won)} of {len(v.sites_compared)}", f"sites where federated beats the site's own model{won}")
        )
    if final := final_epsilon(data.rounds):
        largest = max(eps for _, eps in final.values())
        delta = (data.privacy or {}).get("delta")
        at = _delta_text(delta, " at δ = {}")
        cards.append(
            (f"ε = {format_epsilon(largest)}", f"site-level differential privacy{at}, the most any site spent")
        )
    body = "".join(
        f'<div class="card"><div class="value">{_e(value)}</div><div class="what">{_e(what)}</div></div>'
        for value, what in cards
    )
    return f'<div class="headline">{body}</div>'


def _comparison_html(data: ReportData) -> str:
    """The terminal's comparison table: pooled metrics, then mean Dice per site; best per column marked."""
    comparison = data.comparison()
    if not comparison.rows:
        return ""
    pooled, per_site = comparison.pooled_columns(), comparison.site_columns()
    groups = ['<th rowspan="2" scope="col">model</th><th rowspan="2" scope="col">steps</th>']
    if pooled:
        groups.append(f'<th colspan="{len(pooled)}" class="group" scope="colgroup">all sites\' test subjects</th>')
    if per_site:
        what = f"each site's own test subjects: {data.label(HEADLINE)}"
        groups.append(f'<th colspan="{len(per_site)}" class="group" scope="colgroup">{_e(what)}</th>')
    heads = [data.label(c.metric) for c in pooled] + [str(c.site) for c in per_site]
    head = "".join(f'<th scope="col">{_e(h)}</th>' for h in heads)
    rows = []
    for i, row in enumerate(comparison.rows):
        cells = "".join(
            f'<td class="best">{_e(format_metric(c.metric, v))}</td>'
            if comparison.is_best(i, j)
            else f"<td>{_e(format_metric(c.metric, v))}</td>"
            for j, (c, v) in enumerate(zip(comparison.columns, row.values, strict=True))
        )
        css = ' class="federated"' if row.name == "federated" else ""
        rows.append(f'<tr{css}><th scope="row">{_e(row.name)}</th><td>{row.steps}</td>{cells}</tr>')
    caption = f"{budget_line(data.budget)}. Best value per column highlighted."
    return (
        '<div class="table-wrap"><table id="comparison-table">'
        f"<caption>{_e(caption)}</caption>"
        f"<thead><tr>{''.join(groups)}</tr><tr>{head}</tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )


def _absent_html(data: ReportData) -> str:
    """What the comparison lacks and why, right under it (e.g. no local-only models under privacy)."""
    return "".join(f'<p class="note absent">No {_e(what)}: {_e(why)}</p>' for what, why in data.absent.items())


def _privacy_html(data: ReportData) -> str:
    """The privacy settings and the ε each site spent: after its last round, then per round."""
    block = data.privacy_json()
    if block is None:
        return ""
    settings = f'<p id="privacy-settings">{_e(privacy_settings_line(data.privacy))}</p>'
    epsilons = data.epsilon()
    if not epsilons:
        return f'<section id="privacy"><h2>Privacy</h2>{settings}<p>No site reported an ε.</p></section>'
    sites = list(epsilons)
    rounds = sorted({r for by_round in epsilons.values() for r in by_round})
    head = "".join(f'<th scope="col">{_e(s)}</th>' for s in sites)
    final = final_epsilon(data.rounds)
    last = "".join(f"<td>{_e(format_epsilon(final[s][1]))}</td>" for s in sites)
    last_rounds = "".join(f"<td>{final[s][0]}</td>" for s in sites)
    per_round = "".join(
        f'<tr><th scope="row">{r}</th>'
        + "".join(f"<td>{_e(format_epsilon(epsilons[s][r]))}</td>" if r in epsilons[s] else "<td></td>" for s in sites)
        + "</tr>"
        for r in rounds
    )
    delta = (data.privacy or {}).get("delta")
    at = _delta_text(delta, " at δ = {}")
    return (
        '<section id="privacy"><h2>Privacy</h2>'
        f"{settings}"
        f"<p>Site-level ε{at}: what this experiment cost each site's dataset, as the site itself accounted it "
        "(Rényi-DP accountant, reported with each update as the train metric privacy_epsilon).</p>"
        '<div class="table-wrap"><table id="epsilon-table">'
        f'<thead><tr><th scope="col"></th>{head}</tr></thead><tbody>'
        f'<tr><th scope="row">ε after the last round</th>{last}</tr>'
        f'<tr><th scope="row">last round</th>{last_rounds}</tr></tbody></table></div>'
        "<details><summary>ε per round</summary>"
        '<div class="table-wrap"><table id="epsilon-rounds-table">'
        f'<thead><tr><th scope="col">round</th>{head}</tr></thead><tbody>{per_round}</tbody></table></div>'
        "</details></section>"
    )


def _privacy_utility_html(data: ReportData) -> str:
    """benchmarks/privacy_utility.py's runs: ε, noise multiplier, Dice (mean and per region), wall time."""
    runs = utility_runs(data)
    if not runs:
        return ""
    line = data.privacy_utility or {}
    regions = list(dict.fromkeys(k for r in runs for k in (r.get("dice") or {}) if k != HEADLINE))
    heads = ["target ε", "noise multiplier", data.label(HEADLINE), *map(data.label, regions), "wall (s)"]
    head = "".join(f'<th scope="col">{_e(h)}</th>' for h in heads)
    body = "".join(
        f'<tr><th scope="row">{_e(_epsilon_label(r.get("target_epsilon")))}</th>'
        f"<td>{_e(_plain(r.get('noise_multiplier')) or '—')}</td>"
        f"<td>{_e(format_metric(HEADLINE, _number(r.get('dice_mean'))))}</td>"
        + "".join(f"<td>{_e(format_metric(k, _number((r.get('dice') or {}).get(k))))}</td>" for k in regions)
        + f"<td>{_e(_plain(r.get('wall_s')))}</td></tr>"
        for r in runs
    )
    setting = ", ".join(
        f"{_field_label(k)} {_plain(line[k])}"
        for k in ("preset", "mode", "secure_aggregation", "clip", "delta", "rounds", "local_steps", "sites")
        if k in line
    )
    return (
        '<section id="privacy-utility"><h2>Privacy against utility</h2>'
        f"<p>The federated model's pooled Dice at each target ε (benchmarks/privacy_utility.py: {_e(setting)}).</p>"
        '<div class="table-wrap"><table id="privacy-utility-table">'
        f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div></section>"
    )


def _epsilon_label(value: object) -> str:
    number = _number(value)
    return "∞ (no differential privacy)" if number is None else f"{number:g}"


def _plots_html(figures: Mapping[str, str]) -> str:
    if not figures:
        return ""
    body = "".join(f'<figure><img src="{_e(name)}" alt="{_e(alt)}"></figure>' for name, alt in figures.items())
    return f"<h2>Plots</h2>{body}"


def _overlay_html(data: ReportData, overlay: str | None) -> str:
    if not overlay or data.overlay is None:
        return ""
    caption = f"{data.overlay.caption}: ground truth and each model's prediction over the {data.overlay.image_name}"
    return (
        f'<h2>Segmentations</h2><figure><img src="{_e(overlay)}" alt="{_e(caption)}">'
        f"<figcaption>{_e(caption)}</figcaption></figure>"
    )


def _all_metrics_html(data: ReportData) -> str:
    """Every metric of every model, pooled and per test site."""
    if not data.arms:
        return ""
    keys = ordered_metrics(k for a in data.arms for k in a.pooled)
    head = "".join(f'<th scope="col">{_e(a.name)}<br><small>{a.steps} steps</small></th>' for a in data.arms)
    rows = []
    for s in [POOLED, *data.site_names()]:
        for key in keys:
            values = [(a.pooled if s == POOLED else a.per_site.get(s, {})).get(key) for a in data.arms]
            cells = "".join(f"<td>{_e(format_metric(key, v))}</td>" for v in values)
            rows.append(f'<tr><th scope="row">{_e(s)}</th><th scope="row">{_e(data.label(key))}</th>{cells}</tr>')
    return (
        "<h2>All metrics on the held-out test subjects</h2>"
        "<p>Every model is evaluated on each site's held-out test subjects and on all of them pooled.</p>"
        '<div class="table-wrap"><table><thead><tr><th scope="col">test set</th><th scope="col">metric</th>'
        f"{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>"
    )


def _sites_html(data: ReportData) -> str:
    """Sites as columns and their properties as rows: a scanner profile has more fields than a
    page has room for columns, while a federation has a handful of sites."""
    if not data.sites:
        return ""
    names = sorted(data.sites)
    fields = list(dict.fromkeys(k for n in names for k in data.sites[n]))
    head = "".join(f'<th scope="col">{_e(n)}</th>' for n in names)
    rows = "".join(
        f'<tr><th scope="row">{_e(f.replace("_", " "))}</th>'
        + "".join(f"<td>{_e(_plain(data.sites[n].get(f)))}</td>" for n in names)
        + "</tr>"
        for f in fields
    )
    return (
        '<h2>Sites</h2><div class="table-wrap"><table id="sites-table">'
        f'<thead><tr><th scope="col">site</th>{head}</tr></thead><tbody>{rows}</tbody></table></div>'
    )


def _strategies_html(data: ReportData) -> str:
    """benchmarks/strategies.py's rows, rendered generically: strategy, pooled federated mean Dice and
    every other numeric field, so new fields appear without a change here."""
    rows = data.strategy_comparison
    if not rows:
        return ""
    numeric = list(
        dict.fromkeys(
            k
            for r in rows
            for k, v in r.items()
            if k not in ("strategy", "dice_mean_pooled") and isinstance(v, int | float) and not isinstance(v, bool)
        )
    )
    heads = ["strategy", "federated mean Dice (pooled)", *map(_field_label, numeric)]
    head = "".join(f'<th scope="col">{_e(h)}</th>' for h in heads)
    body = "".join(
        f'<tr><th scope="row">{_e(str(r.get("strategy", "")))}</th>'
        f"<td>{_e(format_metric(HEADLINE, _federated_dice(r)))}</td>"
        + "".join(f"<td>{_e(_plain(r.get(k)))}</td>" for k in numeric)
        + "</tr>"
        for r in rows
    )
    return (
        '<h2>Aggregation strategies</h2><div class="table-wrap"><table id="strategies-table">'
        f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"
    )


def _field_label(key: str) -> str:
    """``wall_s`` -> "wall (s)", ``local_steps`` -> "local steps"."""
    return f"{key[:-2].replace('_', ' ')} (s)" if key.endswith("_s") else key.replace("_", " ")


def _federated_dice(row: Mapping[str, Any]) -> float | None:
    value = row.get("dice_mean_pooled")
    if isinstance(value, Mapping):
        value = value.get("federated")
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _list_html(title: str, items: Sequence[str]) -> str:
    if not items:
        return ""
    return f"<h2>{_e(title)}</h2><ul>{''.join(f'<li>{_e(i)}</li>' for i in items)}</ul>"


def _plain(value: object) -> str:
    """A table cell's text: floats to 4 significant digits, nothing for a missing value."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
