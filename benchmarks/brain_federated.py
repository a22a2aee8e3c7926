"""The demo's default configuration, measured: federated vs centralized vs local-only Dice.

Runs ``laulima demo`` (default preset unless --preset) and prints one JSON line with the
mean foreground Dice of every model on the pooled held-out test phantoms and per site,
the ratio federated / centralized, the margin over the best local-only model, per-class
Dice of the federated model, and the wall time.

Targets on the default preset: federated >= 0.97 x centralized; federated above every
local-only model on the pooled test set by >= 0.03; grey- and white-matter Dice >= 0.75.

    python benchmarks/brain_federated.py [--preset default] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from rich.console import Console

from laulima.demo import PRESETS, run_demo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="default", choices=sorted(PRESETS))
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="laulima-brain-") as tmp:
        workdir = args.workdir or Path(tmp) / "demo"
        outcome = run_demo(PRESETS[args.preset], workdir, Console(stderr=True))
        report = json.loads(outcome.report_json.read_text())
    arms = {a["name"]: a for a in report["arms"]}
    fed, central = arms["federated"], arms.get("centralized")
    locals_ = {n: a for n, a in arms.items() if n.startswith("local:")}
    pooled = {n: round(a["pooled"]["dice_mean"], 4) for n, a in arms.items()}
    best_local = max((a["pooled"]["dice_mean"] for a in locals_.values()), default=None)
    per_site = {n: {s: round(m["dice_mean"], 4) for s, m in a["per_site"].items()} for n, a in arms.items()}
    result = {
        "benchmark": "brain_federated",
        "preset": args.preset,
        "budget": report["budget"],
        "dice_mean_pooled": pooled,
        "dice_mean_per_site": per_site,
        "federated_per_class_pooled": {k: round(v, 4) for k, v in fed["pooled"].items() if k.startswith("dice_")},
        "federated_over_centralized": round(fed["pooled"]["dice_mean"] / central["pooled"]["dice_mean"], 4)
        if central
        else None,
        "federated_minus_best_local": round(fed["pooled"]["dice_mean"] - best_local, 4)
        if best_local is not None
        else None,
        "wall_time_s": {k: round(v, 1) for k, v in report["wall_time_s"].items()},
        "benchmark_wall_s": round(time.monotonic() - started, 1),
        "targets": {"federated_over_centralized": 0.97, "federated_minus_best_local": 0.03, "gm_wm_dice": 0.75},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
