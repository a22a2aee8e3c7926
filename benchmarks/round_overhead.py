"""Round overhead of the hub/site runtime: a hub and N agents on loopback, an algorithm
that returns its input unchanged, models of 5 MB and 76 MB (float32).

Prints one JSON line. Per configuration: the median round wall time (time between two
consecutive round checkpoints at the hub, so it includes task creation, long-poll wake-up,
weights download, the worker process, upload, validation and aggregation), the effective
transfer rate (model bytes down plus up for every site, divided by that time), and the hub's
peak resident memory (VmHWM).

Targets: <= 1 s per round at 76 MB with 3 sites, <= 0.2 s at 5 MB; >= 500 MB/s effective
transfer; hub RSS <= 3 x model size + 300 MB with 20 sites. Under mutual TLS (the default
path): median round time <= 2 x the plaintext (token mode) run at 76 MB.

    python benchmarks/round_overhead.py [--rounds 6] [--quick] [--transport both|tls|plain]

``both`` (the default) runs every configuration in plaintext and under mutual TLS, one after
the other on the same machine, and adds the ratio tls / plain per configuration.
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


def run(n_sites: int, model_mb: float, rounds: int, workdir: Path, tls: bool = True) -> dict[str, float | int | str]:
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
    with LocalFederation(workdir, n_sites, "none", tls=tls) as fed:
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
        "transport": "mtls" if tls else "plain",
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
    parser.add_argument("--transport", choices=["both", "tls", "plain"], default="both")
    args = parser.parse_args()
    configs = [(3, 5.0), (3, 76.0)] + ([] if args.quick else [(20, 5.0), (20, 76.0)])
    modes = {"both": [False, True], "tls": [True], "plain": [False]}[args.transport]
    results = []
    ratios = {}
    with tempfile.TemporaryDirectory(prefix="laulima-bench-") as tmp:
        for i, (n_sites, mb) in enumerate(configs):
            rounds = args.rounds if n_sites <= 3 else max(3, args.rounds // 2)
            pair = [run(n_sites, mb, rounds, Path(tmp) / f"run{i}-{int(tls)}", tls=tls) for tls in modes]
            results.extend(pair)
            if len(pair) == 2:
                ratios[f"{n_sites}x{mb:g}mb"] = {
                    "median_round": round(float(pair[1]["median_round_s"]) / float(pair[0]["median_round_s"]), 3),
                    "experiment_wall": round(
                        float(pair[1]["experiment_wall_s"]) / float(pair[0]["experiment_wall_s"]), 3
                    ),
                }
    print(
        json.dumps(
            {
                "benchmark": "round_overhead",
                "transport": "loopback: " + " and ".join("mtls" if t else "plain" for t in modes),
                "runs": results,
                "mtls_over_plain": ratios,
                "targets": {
                    "round_s_3x76mb": 1.0,
                    "round_s_3x5mb": 0.2,
                    "transfer_mb_s": 500,
                    "rss": "3*model+300MB",
                    "mtls_over_plain_76mb": 2.0,
                },
            }
        )
    )


if __name__ == "__main__":
    main()
