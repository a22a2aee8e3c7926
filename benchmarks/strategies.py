"""Aggregation strategies compared on the demo's tumour experiment: one JSON line per strategy.

Each strategy trains the same federated experiment — the demo preset's phantoms, sites,
U-Net, rounds and local steps, so the same optimizer-step budget — through a real hub and
real site agents, and the sites score the final global model on their own test phantoms.
Only the ``[strategy]`` table differs. The lines carry the pooled mean Dice (the BraTS mean
of whole tumour, tumour core and enhancing tumour for the tumour task), per-region pooled
Dice, mean Dice per site and the wall time.

    python benchmarks/strategies.py [--preset default] [--strategies fedavg,fedprox,fedadam,feddc]
        [--output lines.jsonl]

``laulima demo --strategy-comparison lines.jsonl`` puts the lines into the demo's report.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from laulima.demo import PRESETS, run_demo

STRATEGIES: dict[str, dict[str, Any]] = {
    "fedavg": {"name": "fedavg"},
    "fedprox": {"name": "fedprox", "proximal_mu": 0.01},
    "fedadam": {"name": "fedadam", "server_lr": 0.02, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3},
    "feddc": {"name": "feddc", "daisy_period": 1, "aggregation_period": 4},
    "krum": {"name": "krum", "krum_f": 0, "krum_m": 3},
}


def run_one(preset_name: str, strategy: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Train the preset's federated experiment with ``strategy``; the sites' scores of its final model."""
    preset = dataclasses.replace(PRESETS[preset_name], strategy=strategy)
    started = time.monotonic()
    outcome = run_demo(preset, workdir, Console(stderr=True), baselines=False)
    federated = next(arm for arm in outcome.arms if arm.name == "federated")
    return {
        "benchmark": "strategies",
        "task": preset.task,
        "preset": preset_name,
        "strategy": strategy["name"],
        "params": {k: v for k, v in strategy.items() if k != "name"},
        "rounds": preset.rounds,
        "local_steps": preset.local_steps,
        "optimizer_steps": preset.steps_per_arm,
        "dice_mean_pooled": round(federated.pooled["dice_mean"], 4),
        "pooled": {k: round(v, 4) for k, v in federated.pooled.items() if k.startswith(("dice_", "hd95_"))},
        "dice_mean_per_site": {site: round(m["dice_mean"], 4) for site, m in federated.per_site.items()},
        "wall_s": round(time.monotonic() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="default", choices=sorted(PRESETS))
    parser.add_argument(
        "--strategies", default="fedavg,fedprox,fedadam,feddc", help="comma-separated, of: " + ", ".join(STRATEGIES)
    )
    parser.add_argument("--output", type=Path, default=None, help="also append the lines to this file")
    args = parser.parse_args()
    names = [n.strip() for n in args.strategies.split(",") if n.strip()]
    unknown = sorted(set(names) - set(STRATEGIES))
    if unknown:
        parser.error(f"unknown strategies {unknown}; choose from {sorted(STRATEGIES)}")
    for name in names:
        with tempfile.TemporaryDirectory(prefix=f"laulima-{name}-") as tmp:
            line = json.dumps(run_one(args.preset, STRATEGIES[name], Path(tmp) / "demo"))
        print(line, flush=True)
        if args.output is not None:
            with args.output.open("a", encoding="utf-8") as out:
                out.write(line + "\n")


if __name__ == "__main__":
    main()
