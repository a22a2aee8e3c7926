"""The demo's default configuration, measured: federated vs centralized vs local-only Dice.

Runs ``laulima demo`` (brain tumour, default preset unless --task / --preset) and prints one
JSON line with the mean Dice of every model on the pooled held-out test phantoms and per
site (for tumours the BraTS mean of whole tumour, tumour core and enhancing tumour), all
computed by the sites through the hub; the ratio federated / centralized, the margin over
the best local-only model, the sites where federated beats the site's own local-only model
on that site's test subjects, per-region Dice and HD95 of the federated model, and the
wall time.

Targets on the default tumour preset (2 cores, at most 20 minutes): federated >= 0.97 x
centralized; federated >= every local-only model + 0.05 on the pooled test set; at every
site federated beats that site's own local-only model.

    python benchmarks/brain_federated.py [--task brain-tumour] [--preset default] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from rich.console import Console

from laulima.demo import TASKS, presets, run_demo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="brain-tumour", choices=TASKS)
    parser.add_argument("--preset", default="default", choices=("quick", "default", "test"))
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="laulima-brain-") as tmp:
        workdir = args.workdir or Path(tmp) / "demo"
        outcome = run_demo(presets(args.task)[args.preset], workdir, Console(stderr=True))
        report = json.loads(outcome.report_json.read_text())
    arms = {a["name"]: a for a in report["arms"]}
    fed, central = arms["federated"], arms.get("centralized")
    locals_ = {n: a for n, a in arms.items() if n.startswith("local:")}
    pooled = {n: round(a["pooled"]["dice_mean"], 4) for n, a in arms.items()}
    best_local = max((a["pooled"]["dice_mean"] for a in locals_.values()), default=None)
    per_site = {n: {s: round(m["dice_mean"], 4) for s, m in a["per_site"].items()} for n, a in arms.items()}
    own_site = {
        site: round(fed["per_site"][site]["dice_mean"] - arm["per_site"][site]["dice_mean"], 4)
        for name, arm in locals_.items()
        for site in [name.removeprefix("local:")]
        if site in fed["per_site"] and site in arm["per_site"]
    }
    result = {
        "benchmark": "brain_federated",
        "task": args.task,
        "preset": args.preset,
        "budget": report["budget"],
        "dice_mean_pooled": pooled,
        "dice_mean_per_site": per_site,
        "federated_per_class_pooled": {
            k: round(v, 4) for k, v in fed["pooled"].items() if k.startswith(("dice_", "hd95_"))
        },
        "federated_over_centralized": round(fed["pooled"]["dice_mean"] / central["pooled"]["dice_mean"], 4)
        if central
        else None,
        "federated_minus_best_local": round(fed["pooled"]["dice_mean"] - best_local, 4)
        if best_local is not None
        else None,
        "federated_minus_own_local_per_site": own_site,
        "wall_time_s": {k: round(v, 1) for k, v in report["wall_time_s"].items()},
        "benchmark_wall_s": round(time.monotonic() - started, 1),
        "targets": {
            "federated_over_centralized": 0.97,
            "federated_minus_best_local": 0.05,
            "federated_minus_own_local_per_site": "> 0 at every site",
            "benchmark_wall_s": 1200,
        },
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
