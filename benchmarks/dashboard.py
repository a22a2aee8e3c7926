"""What a watched experiment costs the hub: its dashboard page and its live region, per request.

An open experiment page asks every 2 s whether its live region changed (``If-None-Match``), so
the 304 path is what an idle viewer costs; the 200 path is what a viewer pays when a round
closes. Measured in process (the hub app behind Starlette's TestClient, no network), on an
experiment whose metric records are written straight into the hub's database: ``rounds`` x
``sites`` train records (loss, ε) and as many evaluation records (4 Dice / HD95 metrics), as a
long brain-MRI federation would leave them.

Prints one JSON line: per configuration the median milliseconds of the page, the live region
(200) and the unchanged region (304), and the bytes of the page.

    .venv/bin/python benchmarks/dashboard.py [--repeats N] [--quick]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from fastapi.testclient import TestClient

from laulima.core.weights import to_safetensors
from laulima.hub.app import create_app
from laulima.hub.db import Metric
from laulima.hub.settings import HubSettings

ADMIN = "benchmark-operator-token-0123456789"
CONFIGS = {"60x3": (60, 3), "200x10": (200, 10), "500x20": (500, 20)}
TARGET_MS = 1000.0
"""The live region of the largest configuration renders within a second (a viewer sees a
closed round at most a second late; the hub spends at most half of each 2 s poll on it)."""


def build(client: TestClient, rounds: int, sites: int) -> int:
    """An experiment with ``rounds`` x ``sites`` train and evaluation records; its id."""
    headers = {"Authorization": f"Bearer {ADMIN}"}
    names = [f"site-{i:02d}" for i in range(sites)]
    for name in names:
        assert client.post("/api/v1/sites", json={"name": name}, headers=headers).status_code == 201
    weights = to_safetensors({"w": np.zeros(4, dtype=np.float32)})
    digest = client.put("/api/v1/blobs", content=weights, headers=headers).json()["digest"]
    spec = {
        "name": f"bench-{rounds}x{sites}",
        "algorithm": "laulima.algorithms.identity:Identity",
        "dataset": "brains",
        "sites": names,
        "rounds": rounds,
        "min_sites": sites,
        "round_timeout_s": 3600.0,
    }
    exp = client.post("/api/v1/experiments", json={"spec": spec, "initial_weights": digest}, headers=headers)
    assert exp.status_code == 201, exp.text
    exp_id = int(exp.json()["id"])
    hub = client.app.state.hub  # type: ignore[attr-defined]
    rng = np.random.default_rng(0)
    with hub.sessions.begin() as s:
        for r in range(1, rounds + 1):
            for i, name in enumerate(names):
                n = 10 + i
                train = {"loss": float(1 / r + rng.random() * 0.05), "privacy_epsilon": 0.1 * r}
                dice = {
                    k: float(min(1.0, r / rounds + rng.random() * 0.1)) for k in ("dice_mean", "dice_wt", "dice_tc")
                }
                evaluation = {**dice, "hd95_mean": float(20 / r)}
                for kind, values in (("train", train), ("evaluate", evaluation)):
                    s.add(Metric(experiment_id=exp_id, round=r, site=name, kind=kind, n_samples=n,
                                 metrics_json=json.dumps(values)))  # fmt: skip
    return exp_id


def timed(call: Any, repeats: int) -> tuple[float, Any]:
    times, last = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        last = call()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times), last


def measure(rounds: int, sites: int, repeats: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="laulima-bench-dashboard-") as tmp:
        settings = HubSettings(home=Path(tmp) / "hub", admin_token=ADMIN, orchestrator_tick_s=3600.0,
                               requests_per_minute=600_000.0, request_burst=100_000)  # fmt: skip
        with TestClient(create_app(settings), base_url="https://testserver") as client:
            exp_id = build(client, rounds, sites)
            form = client.get("/ui/login").text
            csrf = re.search(r'name="csrf_token" value="([^"]+)"', form).group(1)  # type: ignore[union-attr]
            client.post("/ui/login", data={"csrf_token": csrf, "token": ADMIN, "next": "/ui/"})
            page_ms, page = timed(lambda: client.get(f"/ui/experiments/{exp_id}"), repeats)
            assert page.status_code == 200, page.text[:500]
            live_ms, live = timed(lambda: client.get(f"/ui/experiments/{exp_id}/live"), repeats)
            etag = live.headers["etag"]
            same_ms, same = timed(
                lambda: client.get(f"/ui/experiments/{exp_id}/live", headers={"If-None-Match": etag}), repeats
            )
            assert same.status_code == 304
            return {
                "rounds": rounds,
                "sites": sites,
                "records": 2 * rounds * sites,
                "page_ms": round(page_ms, 1),
                "page_bytes": len(page.content),
                "live_changed_ms": round(live_ms, 1),
                "live_unchanged_ms": round(same_ms, 1),
            }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="only the smallest configuration")
    args = parser.parse_args(argv)
    configs = {"60x3": CONFIGS["60x3"]} if args.quick else CONFIGS
    results = {name: measure(r, s, args.repeats) for name, (r, s) in configs.items()}
    largest = results[list(results)[-1]]
    line = {
        "benchmark": "dashboard",
        "configs": results,
        "target": {
            "target": f"live region of {largest['rounds']} rounds x {largest['sites']} sites within {TARGET_MS:g} ms",
            "live_changed_ms": largest["live_changed_ms"],
            "met": largest["live_changed_ms"] <= TARGET_MS,
        },
    }
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
    sys.exit(main())
