"""The experiment report: one JSON file, PNG plots and an HTML page that shows them.

Its inputs are plain data (metric records from the hub, baseline evaluations), so the
report can be rebuilt from a finished experiment at any time, and tests can check that
every number in it is the one in the hub's database.
"""

from __future__ import annotations

import html
import json
import os
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from laulima.core.protocol import MetricRecord, TaskKind
from laulima.terminal import weighted_mean

__all__ = ["ArmEvaluation", "ReportData", "write_report"]

POOLED = "pooled"


@dataclass(frozen=True)
class ArmEvaluation:
    """One trained model evaluated on every site's held-out test subjects."""

    name: str
    """"federated", "centralized" or "local:<site>"."""
    per_site: dict[str, dict[str, float]]
    pooled: dict[str, float]
    steps: int
    wall_time_s: float


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

    def federated_curve(self) -> dict[int, dict[str, float]]:
        """Per round, the global model's metrics pooled over all sites' test subjects."""
        by_round: dict[int, list[MetricRecord]] = defaultdict(list)
        for m in self.rounds:
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
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "description": self.description,
            "labels": {str(k): v for k, v in self.labels.items()},
            "sites": self.sites,
            "budget": self.budget,
            "federated_rounds": [m.model_dump(mode="json") for m in self.rounds],
            "federated_curve": {str(r): v for r, v in self.federated_curve().items()},
            "arms": [asdict(a) for a in self.arms],
            "summary": self.summary(),
            "wall_time_s": self.wall_time_s,
            "notes": self.notes,
        }


def write_report(data: ReportData, out_dir: Path) -> Path:
    """Write report.json, the PNG plots and index.html into ``out_dir``; return the HTML path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_text(out_dir / "report.json", json.dumps(data.to_json(), indent=2))
    plots = {
        "federated_rounds.png": _plot_rounds(data, out_dir / "federated_rounds.png"),
        "sites_rounds.png": _plot_sites(data, out_dir / "sites_rounds.png"),
        "comparison.png": _plot_comparison(data, out_dir / "comparison.png"),
    }
    page = _html(data, [name for name, ok in plots.items() if ok])
    _write_text(out_dir / "index.html", page)
    return out_dir / "index.html"


# -- plots -------------------------------------------------------------------------------
def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, ax: Any, path: Path, title: str, *, legend_columns: int = 1) -> bool:
    """Common finish of the Dice plots: 0..1 scale, grid, legend, PNG."""
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.grid(axis="y" if legend_columns > 1 else "both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right", ncol=legend_columns)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _integer_rounds(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _dice_keys(metrics: Mapping[str, float]) -> list[str]:
    return sorted(k for k in metrics if k.startswith("dice_") and k != "dice_mean")


def _plot_rounds(data: ReportData, path: Path) -> bool:
    curve = data.federated_curve()
    if not curve:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    rounds = list(curve)
    first = curve[rounds[0]]
    for key in _dice_keys(first):
        ax.plot(rounds, [curve[r].get(key, float("nan")) for r in rounds], marker=".", label=key[5:].replace("_", " "))
    ax.plot(rounds, [curve[r].get("dice_mean", float("nan")) for r in rounds], "k-", lw=2.5, label="mean foreground")
    central = [a for a in data.arms if a.name == "centralized" and "dice_mean" in a.pooled]
    if central:
        ax.axhline(central[0].pooled["dice_mean"], color="tab:gray", ls="--", label="centralized (same budget)")
    locals_ = [a for a in data.arms if a.name.startswith("local:") and "dice_mean" in a.pooled]
    if locals_:
        best = max(locals_, key=lambda a: a.pooled["dice_mean"])
        ax.axhline(best.pooled["dice_mean"], color="tab:red", ls=":", label=f"best {best.name} (same budget)")
    _integer_rounds(ax)
    ax.set_ylabel("Dice on all sites' test phantoms")
    return _save(plt, fig, ax, path, "Federated global model, per round")


def _plot_sites(data: ReportData, path: Path) -> bool:
    evals = [m for m in data.rounds if m.kind == TaskKind.EVALUATE and "dice_mean" in m.metrics]
    if not evals:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for site in sorted({m.site for m in evals}):
        ms = sorted((m for m in evals if m.site == site), key=lambda m: m.round)
        ax.plot([m.round for m in ms], [m.metrics["dice_mean"] for m in ms], marker=".", label=site)
    _integer_rounds(ax)
    ax.set_ylabel("mean foreground Dice")
    return _save(plt, fig, ax, path, "Federated global model on each site's test phantoms")


def _plot_comparison(data: ReportData, path: Path) -> bool:
    if not data.arms:
        return False
    plt = _pyplot()
    sets = [*sorted(data.sites), POOLED]
    fig, ax = plt.subplots(figsize=(8, 4.2))
    width = 0.8 / len(data.arms)
    for i, arm in enumerate(data.arms):
        values = [(arm.pooled if s == POOLED else arm.per_site.get(s, {})).get("dice_mean", 0.0) for s in sets]
        ax.bar([x + i * width for x in range(len(sets))], values, width, label=arm.name)
    ax.set_xticks([x + width * (len(data.arms) - 1) / 2 for x in range(len(sets))], [f"test: {s}" for s in sets])
    ax.set_ylabel("mean foreground Dice")
    title = "Same optimizer-step budget: federated vs centralized vs local-only"
    return _save(plt, fig, ax, path, title, legend_columns=2)


# -- html --------------------------------------------------------------------------------
def _html(data: ReportData, images: list[str]) -> str:
    e = html.escape
    sets = [*sorted(data.sites), POOLED]
    keys = ["dice_mean", *_dice_keys(data.arms[0].pooled if data.arms else {})]
    rows = []
    for s in sets:
        for key in keys:
            cells = "".join(
                f"<td>{_num((a.pooled if s == POOLED else a.per_site.get(s, {})).get(key))}</td>" for a in data.arms
            )
            label = "mean foreground" if key == "dice_mean" else key[5:].replace("_", " ")
            rows.append(f"<tr><th>{e(s)}</th><th>{e(label)}</th>{cells}</tr>")
    head = "".join(f"<th>{e(a.name)}<br><small>{a.steps} steps</small></th>" for a in data.arms)
    site_rows = "".join(
        f"<tr><th>{e(name)}</th>{''.join(f'<td>{e(str(v))}</td>' for v in info.values())}</tr>"
        for name, info in sorted(data.sites.items())
    )
    site_head = "".join(f"<th>{e(k)}</th>" for k in next(iter(data.sites.values()), {}))
    summary = data.summary()
    summary_items = "".join(
        f"<li>{e(k)}: {_num(v) if isinstance(v, float) else e(str(v))}</li>"
        for k, v in summary.items()
        if not isinstance(v, dict)
    )
    imgs = "".join(f'<figure><img src="{e(name)}" alt="{e(name)}"></figure>' for name in images)
    notes = "".join(f"<li>{e(n)}</li>" for n in data.notes)
    times = "".join(f"<li>{e(k)}: {v:.1f} s</li>" for k, v in data.wall_time_s.items())
    budget = "".join(f"<li>{e(k)}: {e(str(v))}</li>" for k, v in data.budget.items())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{e(data.title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1000px; margin: 2em auto; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
th {{ background: #f4f4f4; }} figure {{ display: inline-block; margin: 0.5em; }} img {{ max-width: 480px; }}
.note {{ background: #fff6e0; padding: 0.6em 1em; border-left: 4px solid #e0a000; }}
</style></head><body>
<h1>{e(data.title)}</h1>
<p class="note">{e(data.description)}</p>
<h2>Summary</h2><ul>{summary_items}</ul>
<h2>Dice on held-out test phantoms</h2>
<p>Every model is evaluated on each site's held-out test subjects and on all of them pooled.</p>
<table><tr><th>test set</th><th>class</th>{head}</tr>{''.join(rows)}</table>
{imgs}
<h2>Sites</h2><table><tr><th>site</th>{site_head}</tr>{site_rows}</table>
<h2>Budget</h2><ul>{budget}</ul>
<h2>Wall time</h2><ul>{times}</ul>
<h2>Notes</h2><ul>{notes}</ul>
<p>Machine-readable: <a href="report.json">report.json</a>.</p>
</body></html>
"""


def _num(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, float) else ("" if value is None else html.escape(str(value)))


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
