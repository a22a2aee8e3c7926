"""Round overhead of the hub/site runtime: a hub and N agents on loopback, an algorithm
that returns its input unchanged, models of 5 MB and 76 MB (float32).

Prints one JSON line. Per configuration: the median round wall time (time between two
consecutive round checkpoints at the hub, so it includes task creation, long-poll wake-up,
weights download, the worker process, upload, validation and aggregation), the effective
transfer rate (model bytes down plus up for every site, divided by that time), and the hub's
peak resident memory (VmHWM).

Targets: <= 1 s per round at 76 MB with 3 sites, <= 0.2 s at 5 MB; >= 500 MB/s effective
transfer; hub RSS <= 3 x model size + 300 MB with 20 sites.

    python benchmarks/round_overhead.py [--rounds 6] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from laulima.core.spec import parse_spec
from laulima.sim import LocalFederation


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run(n_sites: int, model_mb: float, rounds: int, workdir: Path) -> dict[str, float | int]:
    spec = parse_spec(
        {
            "name": f"overhead-{n_sites}x{model_mb:g}",
            "algorithm": "laulima.algorithms.identity:Identity",
            "dataset": "none",
            "rounds": rounds,
            "min_sites": n_sites,
            "round_timeout_s": 600,
            "evaluation": {"every": 0, "final": False},
            "config": {"model_mb": model_mb},
        }
    )
    with LocalFederation(workdir, n_sites, "none") as fed:
        t0 = time.monotonic()
        exp = fed.wait(fed.submit(spec).id, timeout=1800, poll_s=0.2)
        total = time.monotonic() - t0
        if exp.status != "completed":
            raise SystemExit(f"benchmark experiment {exp.status}: {exp.error}")
        closed = [r.closed_at for r in fed.client.rounds(exp.id)]
        peak = _peak_rss_mb(fed.hub.popen.pid)
    durations = [b - a for a, b in zip(closed, closed[1:], strict=False) if a is not None and b is not None]
    median = statistics.median(durations)
    model_bytes = model_mb * 1e6
    return {
        "sites": n_sites,
        "model_mb": model_mb,
        "rounds": rounds,
        "median_round_s": round(median, 4),
        "min_round_s": round(min(durations), 4),
        "transfer_mb_s": round(2 * n_sites * model_bytes / median / 1e6, 1),
        "hub_peak_rss_mb": round(peak, 1),
        "rss_target_mb": round(3 * model_mb + 300, 1),
        "experiment_wall_s": round(total, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--quick", action="store_true", help="3 sites only")
    args = parser.parse_args()
    configs = [(3, 5.0), (3, 76.0)] + ([] if args.quick else [(20, 5.0), (20, 76.0)])
    results = []
    with tempfile.TemporaryDirectory(prefix="laulima-bench-") as tmp:
        for i, (n_sites, mb) in enumerate(configs):
            rounds = args.rounds if n_sites <= 3 else max(3, args.rounds // 2)
            results.append(run(n_sites, mb, rounds, Path(tmp) / f"run{i}"))
    print(
        json.dumps(
            {
                "benchmark": "round_overhead",
                "transport": "http-loopback",
                "runs": results,
                "targets": {"round_s_3x76mb": 1.0, "round_s_3x5mb": 0.2, "transfer_mb_s": 500, "rss": "3*model+300MB"},
            }
        )
    )


if __name__ == "__main__":
    main()
