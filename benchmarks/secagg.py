"""Cost of secure aggregation: round wall time with ``[secure_aggregation]`` vs plain rounds.

A hub and N agents on loopback under the default transport (mutual TLS), the identity
algorithm (returns its input) with models of 5 MB and 76 MB (float32), as in
benchmarks/round_overhead.py. Each configuration (sites, model MB) runs twice on a fresh
federation, one after the other on the same machine: plain, then with
``secure_aggregation = {clip = 1e6}`` (everything else identical; min_sites = sites >= 2).
Under secure aggregation the identity update equals the global model, so every step is zero:
fine for timing, since masking, uploading and unmasking cost the same for any vector.

Measured, per run: the median round wall time (time between two consecutive round
checkpoints at the hub, as in round_overhead.py; round 1 is the warm-up whose checkpoint
starts the clock, so ``--rounds N`` runs N + 1 rounds and yields N durations), the hub's and
the largest agent's peak resident memory (VmHWM), the lowest MemAvailable seen during the
run, the kernel's OOM kills during it (/proc/vmstat), and where a round's time goes: from the
hub log, the median time from the round's opening (or, under secure aggregation, its previous
phase change) to each "secure aggregation at <phase>" line and to "round N aggregated"
(``previous aggregated->opened``: the gap between two rounds); from the agents' logs, the median
download, training and upload times (under secure aggregation "upload" spans the whole
protocol after training: keys, shares, masking, upload and the unmasking answer). Every round
must end ``aggregated`` with an update from every site, or the run is reported as failed
(with the hub's warnings and errors).

Target: secure <= 1.5 x plain median round time at 10 sites, 5 MB.

Prints ONE JSON line: ``configs`` (per sites x MB: plain and secure median round s and the
ratio secure / plain), ``target`` (the target and whether it is met), and ``runs`` (every run's
details).

    python benchmarks/secagg.py [--rounds 4] [--sites 5,10,20] [--sizes 5,76] [--quick]
                                [--workdir DIR] [--force]

``--quick``: 5 and 10 sites at 5 MB only. ``--workdir``: keep every federation's folder (hub
and agent logs) there instead of in a temporary folder removed at the end.

A run that cannot complete is reported with an ``error`` (the rest go on): a hub or agent that
died (its exit code, e.g. -9 from the kernel's OOM killer, and its last log line), rounds not
aggregated from every site, or a secure configuration skipped because it would not fit in
memory: every agent privatises and masks its update at about the same time, at ~200 MB + 5 x
the model each (measured 480 MB at 76 MB), so configurations beyond the machine's memory are
skipped unless ``--force``. The
machine should be otherwise idle: on 2 cores every agent's CPU time adds to the round time.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

from laulima.core.protocol import ExperimentPublic, ExperimentStatus, RoundStatus
from laulima.core.spec import parse_spec
from laulima.sim import LocalFederation

TARGET_RATIO = 1.5
TARGET_CONFIG = (10, 5.0)
CLIP = 1e6
"""The largest L2 bound the spec allows; the identity step is zero anyway."""

AGENT_BASE_MB = 200
SECURE_AGENT_MB_PER_MODEL_MB = 5
"""An agent's peak under secure aggregation is about 200 MB + 5 x the model: privatising the
update (site/update_privacy.py) holds one float64 vector of it and the quantised output, masking
the vector, its mask and one PRG expansion (measured: 480 MB at 76 MB). All agents do this at
about the same time, so 20 sites at 76 MB need ~12 GB."""


def _secure_memory_shortfall(n_sites: int, model_mb: float) -> str | None:
    """Why a secure run would not fit in the memory available now (None if it fits): the kernel's
    OOM killer would otherwise kill an agent (or anything else on the machine) mid-round."""
    need = n_sites * (AGENT_BASE_MB + SECURE_AGENT_MB_PER_MODEL_MB * model_mb)
    have = _mem_available_mb()
    if need <= 0.9 * have:
        return None
    return (
        f"not run: {n_sites} agents privatising a {model_mb:g} MB update at once need ~{need / 1024:.1f} GB, "
        f"{have / 1024:.1f} GB is available (--force runs it anyway)"
    )


def _mem_available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("inf")


_HUB_LINE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO \S+: experiment (\d+): round (\d+) "
    r"(opened|secure aggregation at (\w+)|aggregated)"
)
_SITE_LINE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO \S+: task (\S+) "
    r"(received: train round (\d+)|downloaded: .* in ([\d.]+) s|trained in ([\d.]+) s|uploaded: .* in ([\d.]+) s)"
)


def _peak_rss_mb(pid: int) -> float:
    # Copied from round_overhead.py (private there).
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _stamp(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").timestamp()


class _MemoryWatch:
    """The lowest MemAvailable of the machine while the federation runs (a 0.2 s sampler)."""

    def __init__(self) -> None:
        self.lowest_mb = float("inf")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.lowest_mb = min(self.lowest_mb, _mem_available_mb())
            self._stop.wait(0.2)

    def __enter__(self) -> _MemoryWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def _hub_phases(hub_log: Path, experiment_id: int, measured: set[int]) -> dict[str, float | None]:
    """Median seconds, over the measured rounds, from each hub event to the next one."""
    events: dict[int, list[tuple[str, float]]] = {}
    for line in hub_log.read_text(errors="replace").splitlines():
        m = _HUB_LINE.match(line)
        if m is None or int(m.group(2)) != experiment_id:
            continue
        name = m.group(5) or m.group(4)
        events.setdefault(int(m.group(3)), []).append((name, _stamp(m.group(1))))
    spans: dict[str, list[float]] = {}
    for index, seq in events.items():
        if index not in measured:
            continue
        for (before, t0), (after, t1) in zip(seq, seq[1:], strict=False):
            spans.setdefault(f"{before}->{after}", []).append(t1 - t0)
        previous = events.get(index - 1)
        if previous and previous[-1][0] == "aggregated" and seq[0][0] == "opened":
            spans.setdefault("previous aggregated->opened", []).append(seq[0][1] - previous[-1][1])
    return {span: _median(values) for span, values in spans.items()}


def _site_times(sites_dir: Path, measured: set[int]) -> dict[str, float | None]:
    """Median download, training and upload seconds of the agents' tasks in the measured rounds."""
    out: dict[str, list[float]] = {"download_s": [], "train_s": [], "upload_s": []}
    for log in sorted(sites_dir.glob("*/agent.log")):
        rounds: dict[str, int] = {}
        for line in log.read_text(errors="replace").splitlines():
            m = _SITE_LINE.match(line)
            if m is None:
                continue
            task = m.group(2)
            if m.group(4) is not None:
                rounds[task] = int(m.group(4))
            elif rounds.get(task) in measured:
                for key, group in (("download_s", 5), ("train_s", 6), ("upload_s", 7)):
                    if m.group(group) is not None:
                        out[key].append(float(m.group(group)))
    return {key: _median(values) for key, values in out.items()}


def _problems(log: Path, limit: int = 12) -> list[str]:
    lines = [
        line
        for line in log.read_text(errors="replace").splitlines()
        if " WARNING " in line or " ERROR " in line or "Traceback" in line
    ]
    return lines[:limit]


def _oom_kills() -> int:
    for line in Path("/proc/vmstat").read_text().splitlines():
        if line.startswith("oom_kill "):
            return int(line.split()[1])
    return 0


def _wait(fed: LocalFederation, experiment_id: int, timeout: float) -> ExperimentPublic | str:
    """``fed.wait`` (0.2 s polls), except that a dead hub or agent ends the wait at once, with
    what died and the last line of its log (a round under secure aggregation would otherwise
    wait for a dead agent's keys until the round's deadline)."""
    deadline = time.monotonic() + timeout
    while True:
        exp = fed.client.experiment(experiment_id)
        if exp.status != ExperimentStatus.RUNNING:
            return exp
        dead = [("hub", fed.hub)] if not fed.hub.alive else []
        dead += [(name, site) for name, site in fed.sites.items() if not site.alive]
        if dead:
            return "; ".join(
                f"{name} exited with {proc.popen.returncode} (round {exp.rounds_done + 1}); its log ends: "
                f"{proc.log_tail(1)[-300:]}"
                for name, proc in dead
                if proc.popen is not None
            )
        if time.monotonic() > deadline:
            return f"experiment still running after {timeout:.0f} s (round {exp.rounds_done}/{exp.rounds})"
        time.sleep(0.2)


def run(n_sites: int, model_mb: float, rounds: int, workdir: Path, secure: bool) -> dict[str, object]:
    """One federation, ``rounds`` measured rounds after a warm-up round; plain or secure."""
    extra: dict[str, object] = {"secure_aggregation": {"clip": CLIP}} if secure else {}
    spec = parse_spec(
        {  # round_overhead.py's spec, plus [secure_aggregation] for the secure run
            "name": f"secagg-{n_sites}x{model_mb:g}-{'secure' if secure else 'plain'}",
            "algorithm": "laulima.algorithms.identity:Identity",
            "dataset": "none",
            "rounds": rounds + 1,
            "min_sites": n_sites,
            "round_timeout_s": 600,
            "evaluation": {"every": 0, "final": False},
            "config": {"model_mb": model_mb},
            **extra,
        }
    )
    result: dict[str, object] = {
        "mode": "secure" if secure else "plain",
        "sites": n_sites,
        "model_mb": model_mb,
        "rounds": rounds + 1,
    }
    hub_log = workdir / "hub" / "hub.log"
    oom_before = _oom_kills()
    with _MemoryWatch() as memory, LocalFederation(workdir, n_sites, "none", tls=True) as fed:
        t0 = time.monotonic()
        exp = _wait(fed, fed.submit(spec).id, timeout=3600)
        if isinstance(exp, str):  # a process died: stop here, or the round waits for it until its deadline
            result.update(
                {
                    "error": exp,
                    "after_s": round(time.monotonic() - t0, 1),
                    "kernel_oom_kills": _oom_kills() - oom_before,
                    "min_mem_available_mb": round(memory.lowest_mb, 1),
                    "hub_problems": _problems(hub_log),
                }
            )
            return result
        total = time.monotonic() - t0
        round_list = fed.client.rounds(exp.id)
        hub_peak = _peak_rss_mb(fed.hub.popen.pid)
        site_peak = max(_peak_rss_mb(site.popen.pid) for site in fed.sites.values())
    bad = [r for r in round_list if r.status != RoundStatus.AGGREGATED or r.n_updates != n_sites]
    result.update(
        {
            "experiment_status": str(exp.status),
            "experiment_wall_s": round(total, 2),
            "hub_peak_rss_mb": round(hub_peak, 1),
            "max_agent_peak_rss_mb": round(site_peak, 1),
            "min_mem_available_mb": round(memory.lowest_mb, 1),
            "kernel_oom_kills": _oom_kills() - oom_before,
        }
    )
    if exp.status != ExperimentStatus.COMPLETED or bad or len(round_list) != rounds + 1:
        result["error"] = exp.error or "rounds not all aggregated from every site"
        result["round_states"] = [(r.index, str(r.status), r.n_updates, r.note) for r in round_list]
        result["hub_problems"] = _problems(hub_log)
        return result
    closed = [r.closed_at for r in round_list]
    durations = [b - a for a, b in zip(closed, closed[1:], strict=False) if a is not None and b is not None]
    measured = {r.index for r in round_list[1:]}
    result.update(
        {
            "median_round_s": round(statistics.median(durations), 4),
            "min_round_s": round(min(durations), 4),
            "max_round_s": round(max(durations), 4),
            "hub_phase_median_s": _hub_phases(hub_log, exp.id, measured),
            "agent_median_s": _site_times(workdir / "sites", measured),
        }
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4, help="measured rounds (one warm-up round is added)")
    parser.add_argument("--sites", default="5,10,20", help="comma-separated site counts (each >= 2)")
    parser.add_argument("--sizes", default="5,76", help="comma-separated model sizes in MB")
    parser.add_argument("--quick", action="store_true", help="5 and 10 sites at 5 MB only")
    parser.add_argument("--workdir", type=Path, help="keep the federations' folders (logs) here")
    parser.add_argument("--force", action="store_true", help="run secure configurations that may not fit in memory")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    sites = [5, 10] if args.quick else [int(s) for s in args.sites.split(",")]
    sizes = [5.0] if args.quick else [float(s) for s in args.sizes.split(",")]
    if min(sites) < 2:
        parser.error("secure aggregation needs at least 2 sites")
    configs = [(n, mb) for mb in sizes for n in sites]

    runs: list[dict[str, object]] = []
    table: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory(prefix="laulima-secagg-") as tmp:
        base = args.workdir or Path(tmp)
        for n_sites, mb in configs:
            pair = {}
            for secure in (False, True):
                mode = "secure" if secure else "plain"
                workdir = base / f"{n_sites}x{mb:g}mb-{mode}"
                shortfall = _secure_memory_shortfall(n_sites, mb) if secure and not args.force else None
                try:
                    if shortfall is not None:
                        pair[mode] = {"mode": mode, "sites": n_sites, "model_mb": mb, "error": shortfall}
                    else:
                        pair[mode] = run(n_sites, mb, args.rounds, workdir, secure)
                except Exception as exc:  # a federation that did not start or hung: report, go on
                    pair[mode] = {
                        "mode": mode,
                        "sites": n_sites,
                        "model_mb": mb,
                        "error": f"{type(exc).__name__}: {exc}",
                    }
                runs.append(pair[mode])
            plain, masked = (pair[m].get("median_round_s") for m in ("plain", "secure"))
            table[f"{n_sites}x{mb:g}mb"] = {
                "sites": n_sites,
                "model_mb": mb,
                "plain_median_round_s": plain,
                "secure_median_round_s": masked,
                "secure_over_plain": round(float(masked) / float(plain), 3) if plain and masked else None,
                **{f"{m}_error": pair[m]["error"] for m in ("plain", "secure") if "error" in pair[m]},
            }
    key = f"{TARGET_CONFIG[0]}x{TARGET_CONFIG[1]:g}mb"
    ratio = table.get(key, {}).get("secure_over_plain")
    target = f"secure <= {TARGET_RATIO:g} x plain at {TARGET_CONFIG[0]} sites, {TARGET_CONFIG[1]:g} MB"
    print(
        json.dumps(
            {
                "benchmark": "secagg",
                "transport": "loopback: mtls",
                "measured_rounds": args.rounds,
                "configs": table,
                "target": {
                    "target": target,
                    "ratio": ratio,
                    "met": None if ratio is None else ratio <= TARGET_RATIO,
                },
                "runs": runs,
            }
        )
    )


if __name__ == "__main__":
    main()
