"""How close FedAvg comes to this machine's memory bandwidth; prints one JSON line.

Twenty updates of a 76 MB float32 model (the tensors of a 3D U-Net: 4 MRI channels in,
3 classes out, 46 tensors from 12 B to 18 MB) are averaged with ``FedAvg().aggregate``,
timed end to end (checks, allocation of the new model, the fold, the final scaling).

Bytes are counted as the data each side has to move through memory, nothing else:
- FedAvg: the bytes of the updates it reads (20 x model size). Writing the new model
  (1/20 of that) is not counted, so this side is, if anything, undercounted.
- numpy bandwidth: ``np.add(a, b, out=c)`` over 256 MiB arrays (far beyond cache),
  counted as 2 arrays read + 1 written = 3 x 256 MiB (write-allocate traffic not counted).
  FedAvg folds keys on ``WORKERS`` threads, so np.add is measured both on one thread and
  split over ``WORKERS`` threads, and the ratio uses the faster of the two.
All numbers are the best of several interleaved runs, so a noisy neighbour hurts both.

Every update is a distinct array: reusing one array for all sites would let the fold
read it from cache (FedAvg goes key by key through all sites) and flatter the result.
Memory: 20 updates + global + result + 3 x 256 MiB, about 2.5 GB.

    .venv/bin/python benchmarks/aggregate.py [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from laulima.core.strategies import FedAvg, FitResult
from laulima.core.strategies.fedavg import WORKERS

UPDATES = 20
TARGET_RATIO = 0.5


def unet_shapes(channels: tuple[int, ...] = (32, 64, 128, 256, 408)) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a two-conv-per-level 3D U-Net (weights and biases)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name: str, c_in: int, c_out: int, k: int = 3) -> None:
        shapes[f"{name}.weight"] = (c_out, c_in, k, k, k)
        shapes[f"{name}.bias"] = (c_out,)

    c_prev = 4
    for i, c in enumerate(channels):
        conv(f"down{i}.conv0", c_prev, c)
        conv(f"down{i}.conv1", c, c)
        c_prev = c
    for i in range(len(channels) - 2, -1, -1):
        c = channels[i]
        conv(f"up{i}.transpose", c_prev, c, k=2)
        conv(f"up{i}.conv0", 2 * c, c)
        conv(f"up{i}.conv1", c, c)
        c_prev = c
    conv("head", c_prev, 3, k=1)
    return shapes


def make_updates(shapes: dict[str, tuple[int, ...]], n: int) -> list[dict[str, np.ndarray]]:
    """``n`` distinct float32 updates, made from one random draw (cheap to build)."""
    rng = np.random.default_rng(0)
    base = {k: rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()}
    return [{k: a * np.float32(1 + 0.01 * i) for k, a in base.items()} for i in range(n)]


def best_time(fn: Callable[[], object], runs: int) -> float:
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds to run")
    args = parser.parse_args()

    shapes = unet_shapes()
    updates = make_updates(shapes, UPDATES)
    global_weights = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
    # Unequal cohorts, as at real sites: every fold step rescales (no equal-count shortcut).
    results = [FitResult(f"site{i:02d}", u, n_samples=40 + 7 * i) for i, u in enumerate(updates)]
    update_bytes = sum(a.nbytes for a in updates[0].values())
    fold_bytes = UPDATES * update_bytes

    n = 64 << 20  # 256 MiB of float32 per array
    a = np.ones(n, np.float32)
    b = np.full(n, 2.0, np.float32)
    c = np.zeros(n, np.float32)
    strategy = FedAvg()
    strategy.aggregate(global_weights, results)  # warm up: page in, allocator settles

    pool = ThreadPoolExecutor(max_workers=WORKERS)
    bounds = np.linspace(0, n, WORKERS + 1).astype(int)

    def add_threaded() -> None:
        parts = [(a[i:j], b[i:j], c[i:j]) for i, j in zip(bounds[:-1], bounds[1:], strict=True)]
        for f in [pool.submit(np.add, x, y, out=z) for x, y, z in parts]:
            f.result()

    t_fold = t_add1 = t_addn = float("inf")
    for _ in range(args.repeats):
        t_add1 = min(t_add1, best_time(lambda: np.add(a, b, out=c), 2))
        t_addn = min(t_addn, best_time(add_threaded, 2))
        t_fold = min(t_fold, best_time(lambda: strategy.aggregate(global_weights, results), 2))
    pool.shutdown()

    fedavg_gb_s = fold_bytes / t_fold / 1e9
    add1_gb_s = 3 * a.nbytes / t_add1 / 1e9
    addn_gb_s = 3 * a.nbytes / t_addn / 1e9
    numpy_gb_s = max(add1_gb_s, addn_gb_s)
    print(
        json.dumps(
            {
                "benchmark": "aggregate",
                "updates": UPDATES,
                "update_mb": round(update_bytes / 1e6, 1),
                "tensors": len(shapes),
                "threads": WORKERS,
                "fedavg_s": round(t_fold, 4),
                "fedavg_gb_s": round(fedavg_gb_s, 2),
                "numpy_add_1thread_gb_s": round(add1_gb_s, 2),
                f"numpy_add_{WORKERS}threads_gb_s": round(addn_gb_s, 2),
                "numpy_bandwidth_gb_s": round(numpy_gb_s, 2),
                "ratio": round(fedavg_gb_s / numpy_gb_s, 3),
                "target_ratio": TARGET_RATIO,
            }
        )
    )


if __name__ == "__main__":
    main()
