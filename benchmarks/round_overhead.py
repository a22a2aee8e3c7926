"""Round overhead of the hub/site runtime: a hub and N agents on loopback, an algorithm
that returns its input unchanged, models of 5 MB and 76 MB (float32).

Prints one JSON line. Per configuration: the median round wall time (time between two
consecutive round checkpoints at the hub, so it includes task creation, long-poll wake-up,
weights download, the worker process, upload, validation and aggregation), the effective
transfer rate (model bytes down plus up for every site, divided by that time), and the hub's
peak resident memory (VmHWM).

The same run measures the floor of each configuration on this machine: the bytes the round
moves (every site downloads the global model and uploads its update: ``bytes_moved``) pushed
once through loopback TCP (a local server, 4 MiB sends), once through sha256 and once through
AES-256-GCM (cryptography's AESGCM, 1 MiB pieces), each the median of a few repetitions, and
the ratio round / floor. Nothing a round does can take less than that; a round also needs
TLS on both ends of every transfer, the sites' and the hub's hashing, sealing at rest and
the aggregation, so about 2 x the floor is what a lean round can reach.

Targets: under mutual TLS (the default path) a 3-site round at 76 MB within 2 x its floor,
and at 5 MB under 0.1 s (``targets``, each with ``met``). Also: >= 500 MB/s effective
transfer; hub RSS <= 3 x model size + 300 MB with 20 sites; median round time <= 2 x the
plaintext (token mode) run at 76 MB.

    python benchmarks/round_overhead.py [--rounds 6] [--quick] [--transport both|tls|plain]

``both`` (the default) runs every configuration in plaintext and under mutual TLS, one after
the other on the same machine, and adds the ratio tls / plain per configuration.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from laulima.core.protocol import MetaKey
from laulima.core.spec import ExperimentSpec, parse_spec
from laulima.core.weights import from_safetensors, to_safetensors
from laulima.sim import LocalFederation, initial_weights_bytes

FLOOR_REPEATS = 5
"""Each floor part is the median of this many passes over the round's bytes."""
SEND_BYTES = 4 << 20
"""Size of one loopback send (and receive buffer) when measuring the floor."""
SEAL_BYTES = 1 << 20
"""Size of one AES-GCM call when measuring the floor."""


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _spec(n_sites: int, model_mb: float, rounds: int) -> ExperimentSpec:
    return parse_spec(
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


def bytes_moved(spec: ExperimentSpec, n_sites: int) -> dict[str, int]:
    """What one round moves: each site downloads the global model's file and uploads its
    update, the same tensors plus the worker's metadata (sample count, metrics, task id)."""
    model = initial_weights_bytes(spec)
    metadata = {MetaKey.N_SAMPLES.value: "1", MetaKey.METRICS.value: "{}", MetaKey.TASK.value: "0" * 32}
    update = len(to_safetensors(from_safetensors(model), metadata))
    down, up = n_sites * len(model), n_sites * update
    return {"download_bytes": down, "upload_bytes": up, "bytes_moved": down + up}


def _median_s(fn: Callable[[], None], repeats: int) -> tuple[float, float]:
    """Median wall and CPU seconds (this process) of ``repeats`` calls of ``fn``."""
    wall, cpu = [], []
    for _ in range(repeats):
        started, cpu_started = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - started)
        cpu.append(time.process_time() - cpu_started)
    return statistics.median(wall), statistics.median(cpu)


def _loopback(total: int, block: bytes) -> None:
    """``total`` bytes from a client to a local TCP server, ``len(block)`` bytes per send."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        sender = socket.create_connection(server.getsockname()[:2])
        receiver, _ = server.accept()
        received = [0]

        def drain() -> None:
            buf = memoryview(bytearray(len(block)))
            while received[0] < total:
                n = receiver.recv_into(buf)
                if not n:
                    break
                received[0] += n

        reader = threading.Thread(target=drain)
        reader.start()
        view, sent = memoryview(block), 0
        while sent < total:
            n = min(len(view), total - sent)
            sender.sendall(view[:n])
            sent += n
        reader.join()
        sender.close()
        receiver.close()
    if received[0] != total:
        raise RuntimeError(f"loopback floor: received {received[0]} of {total} bytes")


def _sha256(total: int, block: bytes) -> None:
    h, view, done = hashlib.sha256(), memoryview(block), 0
    while done < total:
        n = min(len(view), total - done)
        h.update(view[:n])
        done += n


def _aes_gcm(total: int, block: bytes) -> None:
    aead, nonce, done = AESGCM(os.urandom(32)), os.urandom(12), 0
    piece = memoryview(block)[:SEAL_BYTES]
    while done < total:
        n = min(len(piece), total - done)
        aead.encrypt(nonce, piece[:n], None)
        done += n


def floor(total: int, repeats: int = FLOOR_REPEATS) -> dict[str, float]:
    """Seconds to push ``total`` bytes once through loopback TCP, sha256 and AES-256-GCM on
    this machine (each the median of ``repeats`` passes), and their sum (``floor_s``, wall
    clock, what the round is compared with); ``floor_cpu_s``: the CPU seconds of the same
    passes (both ends of the loopback), less disturbed by other work on the machine."""
    block = os.urandom(SEND_BYTES)
    parts = {
        "loopback": _median_s(lambda: _loopback(total, block), repeats),
        "sha256": _median_s(lambda: _sha256(total, block), repeats),
        "aes_gcm": _median_s(lambda: _aes_gcm(total, block), repeats),
    }
    out = {f"{name}_s": round(wall, 4) for name, (wall, _) in parts.items()}
    out["floor_s"] = round(sum(wall for wall, _ in parts.values()), 4)
    out["floor_cpu_s"] = round(sum(cpu for _, cpu in parts.values()), 4)
    return out


def run(n_sites: int, model_mb: float, rounds: int, workdir: Path, tls: bool = True) -> dict[str, Any]:
    spec = _spec(n_sites, model_mb, rounds)
    with LocalFederation(workdir, n_sites, "none", tls=tls) as fed:
        t0 = time.monotonic()
        # Round times come from the hub's checkpoint times; polling only notices the end
        # (every poll costs the hub a request, so not more often than this).
        exp = fed.wait(fed.submit(spec).id, timeout=1800, poll_s=1.0)
        total = time.monotonic() - t0
        if exp.status != "completed":
            raise SystemExit(f"benchmark experiment {exp.status}: {exp.error}")
        closed = [r.closed_at for r in fed.client.rounds(exp.id)]
        assert fed.hub.popen is not None
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


def _targets(results: list[dict[str, Any]], floors: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The issue's targets, each with the measured value and whether it is met."""

    def round_s(transport: str, sites: int, mb: float) -> float | None:
        for r in results:
            if r["transport"] == transport and r["sites"] == sites and r["model_mb"] == mb:
                return float(r["median_round_s"])
        return None

    targets: dict[str, dict[str, Any]] = {}
    big, small = round_s("mtls", 3, 76.0), round_s("mtls", 3, 5.0)
    if big is not None:
        limit = 2 * float(floors["3x76mb"]["floor_s"])
        targets["mtls_round_3x76mb_within_2x_floor"] = {
            "round_s": big,
            "limit_s": round(limit, 4),
            "ratio": round(big / (limit / 2), 3),
            "met": big <= limit,
        }
    if small is not None:
        targets["mtls_round_3x5mb_under_0.1s"] = {"round_s": small, "limit_s": 0.1, "met": small < 0.1}
    plain, tls = round_s("plain", 3, 76.0), big
    if plain is not None and tls is not None:
        ratio = round(tls / plain, 3)
        targets["mtls_over_plain_76mb_at_most_2"] = {"ratio": ratio, "limit": 2.0, "met": tls <= 2 * plain}
    return targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--quick", action="store_true", help="3 sites only")
    parser.add_argument("--transport", choices=["both", "tls", "plain"], default="both")
    args = parser.parse_args()
    configs = [(3, 5.0), (3, 76.0)] + ([] if args.quick else [(20, 5.0), (20, 76.0)])
    modes = {"both": [False, True], "tls": [True], "plain": [False]}[args.transport]
    results: list[dict[str, Any]] = []
    ratios = {}
    floors: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="laulima-bench-") as tmp:
        for i, (n_sites, mb) in enumerate(configs):
            key = f"{n_sites}x{mb:g}mb"
            moved = bytes_moved(_spec(n_sites, mb, 1), n_sites)
            floors[key] = {**moved, **floor(moved["bytes_moved"])}
            rounds = args.rounds if n_sites <= 3 else max(3, args.rounds // 2)
            pair = [run(n_sites, mb, rounds, Path(tmp) / f"run{i}-{int(tls)}", tls=tls) for tls in modes]
            for r in pair:
                r["floor_s"] = floors[key]["floor_s"]
                r["round_over_floor"] = round(r["median_round_s"] / floors[key]["floor_s"], 3)
            results.extend(pair)
            if len(pair) == 2:
                ratios[key] = {
                    "median_round": round(pair[1]["median_round_s"] / pair[0]["median_round_s"], 3),
                    "experiment_wall": round(pair[1]["experiment_wall_s"] / pair[0]["experiment_wall_s"], 3),
                }
    print(
        json.dumps(
            {
                "benchmark": "round_overhead",
                "transport": "loopback: " + " and ".join("mtls" if t else "plain" for t in modes),
                "cpus": os.cpu_count(),
                "runs": results,
                "floor": floors,
                "mtls_over_plain": ratios,
                "targets": _targets(results, floors),
                "other_targets": {
                    "transfer_mb_s": 500,
                    "rss": "3*model+300MB",
                    "mtls_over_plain_76mb": 2.0,
                },
            }
        )
    )


if __name__ == "__main__":
    main()
