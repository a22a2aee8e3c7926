"""How the hub scales with sites: round time and hub memory for 10 to 200 sites; one JSON line.

Per configuration (sites x backend x hub processes) a fresh hub is started as real
``laulima hub`` processes, N sites are registered through the API, and an experiment of
``--rounds`` rounds (algorithm ``laulima.algorithms.identity:Identity``, FedAvg, a 5 MB
float32 model in 4 tensors, ``min_sites = N``, no evaluation) runs to completion.

Backends: ``sqlite`` (SQLite + blob folder in the hub's home) and ``postgres`` (PostgreSQL
+ S3: a throwaway PostgreSQL cluster and moto's S3 server, both on loopback, as the tests
start them; moto is an in-memory test double, far slower than a real object store, so its
share of the time is reported apart). With 2 hub processes, sites and the operator reach
them through a TCP round-robin balancer (``tests/helpers/balancer.py``, in a process of
its own); on SQLite both processes share one home (``LAULIMA_HUB_PEER_POLL_S=1``), on
PostgreSQL + S3 each has its own home and they share the key and audit folders.

The sites are played by one asyncio process (httpx, one connection pool per site) that
speaks the agent's protocol in token mode over plain HTTP on loopback: long poll
``GET /tasks/next``, download the task's weights, upload an update (the global model plus
a constant: the same tensors from every site, but the site's n_samples, metrics and task id
in the safetensors metadata make each a distinct blob). It hashes nothing and runs no
worker process, so nearly all the work left is the hub's: the numbers measure the hub (and
the machine's cores, shared with the site player and whatever else runs there).

Reported per configuration:
- ``round_s``: each round's wall time by the hub's own records (closed_at - started_at),
  ``median_round_s`` of those, and ``median_checkpoint_interval_s`` (closed_at to the next
  closed_at, which adds the gap before the next round opens);
- ``phases_s`` (medians over rounds), where the round's time goes: from the round's opening
  to the last site holding its task (``to_last_task``), to the last download finished, to
  the last upload answered, then ``aggregate`` (last upload answered to checkpoint: waking
  the orchestrator, FedAvg over every update read back from the store, storing the new
  model, the checkpoint transaction) and ``between_rounds`` (checkpoint to the next opening);
  ``site_request_s``: median download and upload request time seen by a site;
- ``cpu_s_per_round``: CPU seconds per round of each hub process (``hub0``, ``hub1``, summed
  in ``hubs``), the site player (``sites``: this process), the balancer, PostgreSQL and the
  S3 server (from submission to completion, divided by rounds); on a 2-core machine a sum
  near 2 x the checkpoint interval means the rounds are CPU-bound;
- ``hub_health_latency_s``: ``GET /health`` on each hub process directly, every ~0.25 s
  while the experiment runs (median, max): how long a trivial request waits behind the
  round's work (event loop and thread pool);
- ``hub_peak_rss_mb``: each hub process's peak resident memory, sampled every 50 ms (and
  the kernel's VmHWM, which misses no spike), ``hub_rss_before_mb`` just before submission;
- ``bytes_per_round``: weights moved between sites and hub (measured at the sites);
- ``site_errors``: refused or failed site requests by kind (each retried);
  ``hub_log_warnings``: the hub logs' most frequent warnings and errors (numbers masked).

A configuration that fails (say, the experiment ends ``failed``) gets an ``error`` entry
instead of numbers; the others still run, the line is still printed, and the exit status is 1.

    .venv/bin/python benchmarks/scale.py [--sites 10,50,100,200] [--backends sqlite,postgres]
        [--hubs 1,2] [--rounds 3] [--model-mb 5] [--logs DIR]

``--logs DIR`` keeps every configuration's hub (and balancer) logs under ``DIR/<config>/``.

Defaults: the full grid (16 configurations). PostgreSQL (Debian's ``postgresql`` package)
and moto's server (``pip install 'moto[server]'``) are needed for ``--backends postgres``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # tests.helpers (PostgreSQL, S3 server, balancer)
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402

from laulima import __version__  # noqa: E402
from laulima.client import Client  # noqa: E402
from laulima.core.protocol import API_PREFIX, Header, MetaKey, SiteStatus, TaskPublic  # noqa: E402
from laulima.core.weights import from_safetensors, safetensors_chunks, to_safetensors  # noqa: E402
from laulima.processes import HubProcess, free_port  # noqa: E402
from laulima.sim import simulation_hub_settings  # noqa: E402

SITES = (10, 50, 100, 200)
BACKENDS = {"sqlite": "sqlite+folder", "postgres": "postgres+s3"}
HUBS = (1, 2)
N_TENSORS = 4
POLL_S = 20.0
"""The sites' long-poll wait (the hub caps it at its long_poll_max_s, 30 s by default)."""
SAMPLE_S = 0.05
BUCKET = "laulima-scale"
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
RETRIES = 8


# -- the model ---------------------------------------------------------------------------
def initial_weights(model_mb: float) -> dict[str, np.ndarray]:
    """``model_mb`` MB (10^6 bytes) of float32 in N_TENSORS tensors, as Identity makes them."""
    total = round(model_mb * 1e6 / 4)
    sizes = [total // N_TENSORS + (1 if i < total % N_TENSORS else 0) for i in range(N_TENSORS)]
    rng = np.random.default_rng(0)
    return {f"layer{i}.weight": rng.random(size, dtype=np.float32) for i, size in enumerate(sizes)}


def spec(n_sites: int, rounds: int, model_mb: float, name: str) -> dict[str, Any]:
    return {
        "name": name,
        "algorithm": "laulima.algorithms.identity:Identity",
        "dataset": "none",
        "rounds": rounds,
        "min_sites": n_sites,
        "round_timeout_s": 1800,
        "strategy": {"name": "fedavg"},
        "evaluation": {"every": 0, "final": False},
        "config": {"model_mb": model_mb, "n_tensors": N_TENSORS},
    }


# -- the sites, played in one asyncio loop (a thread of this process) --------------------
@dataclass
class TaskRecord:
    round: int
    site: str
    got_task: float
    """time.time() when the poll answered with the task."""
    downloaded: float
    uploaded: float
    download_s: float
    upload_s: float
    down_bytes: int
    up_bytes: int


class SitePlayer:
    """N sites in one event loop: poll, download the task's weights, upload an update, repeat."""

    def __init__(self, url: str, tokens: Mapping[str, str]) -> None:
        self.url = url
        self.tokens = dict(tokens)
        self.records: list[TaskRecord] = []
        self.errors: Counter[str] = Counter()
        self._updates: dict[str, dict[str, np.ndarray]] = {}
        """Per global model digest: the weights every site sends back (model + a constant)."""
        self._building: dict[str, asyncio.Event] = {}
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="site-player", daemon=True)
        self._failure: BaseException | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(lambda: self._stop.set() if self._stop else None)
            self._thread.join(60)

    def check(self) -> None:
        if self._failure is not None:
            raise RuntimeError(f"the site player failed: {self._failure!r}") from self._failure

    def _run(self) -> None:
        try:
            self._loop.run_until_complete(self._main())
        except BaseException as exc:  # reported by check()
            self._failure = exc
        finally:
            self._loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        tasks = [asyncio.create_task(self._site(name, token)) for name, token in self.tokens.items()]
        stop = asyncio.create_task(self._stop.wait())
        await asyncio.wait([stop, *tasks], return_when=asyncio.FIRST_COMPLETED)
        for t in tasks:
            t.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        crashed = [r for r in results if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError)]
        if crashed:
            raise crashed[0]

    async def _site(self, name: str, token: str) -> None:
        headers = {"Authorization": f"Bearer {token}", Header.VERSION.value: __version__}
        limits = httpx.Limits(max_connections=2, max_keepalive_connections=2)
        timeout = httpx.Timeout(600.0, connect=30.0)
        async with httpx.AsyncClient(
            base_url=self.url + API_PREFIX, headers=headers, limits=limits, timeout=timeout
        ) as http:
            index = int.from_bytes(name.encode(), "little") % 97
            while True:
                try:
                    r = await http.get("/tasks/next", params={"wait": f"{POLL_S:g}"}, timeout=POLL_S + 60)
                except httpx.HTTPError as exc:
                    await self._pause(f"poll: {type(exc).__name__}", 1.0)
                    continue
                if r.status_code == 204:
                    continue
                if r.status_code != 200:
                    await self._pause(f"poll: {r.status_code}", _retry_after(r))
                    continue
                got = time.time()
                task = TaskPublic.model_validate_json(r.content)
                await self._do_task(http, name, task, got, n_samples=10 + index)

    async def _pause(self, what: str, seconds: float) -> None:
        self.errors[what] += 1
        await asyncio.sleep(seconds)

    async def _do_task(self, http: httpx.AsyncClient, name: str, task: TaskPublic, got: float, n_samples: int) -> None:
        digest = task.weights_digest
        keep = digest not in self._building
        if keep:
            self._building[digest] = asyncio.Event()
        t0 = time.monotonic()
        data = await self._download(http, digest, keep)
        downloaded, download_s = time.time(), time.monotonic() - t0
        if keep:
            weights = from_safetensors(b"".join(data))
            self._updates[digest] = {k: v + np.float32(1e-3) for k, v in weights.items()}
            self._building[digest].set()
        await self._building[digest].wait()
        meta = {
            MetaKey.N_SAMPLES.value: str(n_samples),
            MetaKey.METRICS.value: json.dumps({"loss": 0.5}),
            MetaKey.TASK.value: task.id,
        }
        chunks = list(safetensors_chunks(self._updates[digest], meta))
        size = sum(len(c) for c in chunks)
        headers = {
            "Content-Type": "application/octet-stream",
            "Content-Length": str(size),
            Header.UPLOAD_NONCE.value: task.upload_nonce,
        }
        t0 = time.monotonic()
        for _ in range(RETRIES):
            try:
                r = await http.put(f"/tasks/{task.id}/update", content=_stream(chunks), headers=headers)
            except httpx.HTTPError as exc:
                await self._pause(f"upload: {type(exc).__name__}", 1.0)
                continue
            if r.status_code == 200:
                break
            if r.status_code == 429 or r.status_code >= 500:
                await self._pause(f"upload: {r.status_code}", _retry_after(r))
                continue
            self.errors[f"upload: {r.status_code} {r.text[:200]}"] += 1
            return
        else:
            return
        self.records.append(
            TaskRecord(
                task.round,
                name,
                got,
                downloaded,
                time.time(),
                download_s,
                time.monotonic() - t0,
                task.weights_size,
                size,
            )
        )

    async def _download(self, http: httpx.AsyncClient, digest: str, keep: bool) -> list[bytes]:
        for _ in range(RETRIES):
            parts: list[bytes] = []
            try:
                async with http.stream("GET", f"/blobs/{digest}") as r:
                    if r.status_code != 200:
                        await r.aread()
                        await self._pause(f"download: {r.status_code}", _retry_after(r))
                        continue
                    async for chunk in r.aiter_raw():
                        if keep:
                            parts.append(chunk)
                return parts
            except httpx.HTTPError as exc:
                await self._pause(f"download: {type(exc).__name__}", 1.0)
        raise RuntimeError(f"could not download blob {digest[:12]} after {RETRIES} tries: {dict(self.errors)}")


async def _stream(chunks: list[bytes | memoryview]) -> AsyncIterator[bytes]:
    """The body in 1 MiB pieces, as views of the arrays (httpx sends any buffer; no copies)."""
    step = 1 << 20
    for chunk in chunks:
        for i in range(0, len(chunk), step):
            yield cast(bytes, chunk[i : i + step])


def _retry_after(r: httpx.Response) -> float:
    try:
        return min(10.0, max(0.2, float(r.headers.get("Retry-After", "1"))))
    except ValueError:
        return 1.0


# -- measuring the processes --------------------------------------------------------------
class MemorySampler:
    """Resident memory of each hub process (with any children) every SAMPLE_S, in a thread."""

    def __init__(self, pids: list[int]) -> None:
        self.procs = [psutil.Process(pid) for pid in pids]
        self.peak = [0] * len(pids)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def current(self) -> list[int]:
        return [_tree_rss(p) for p in self.procs]

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            for i, rss in enumerate(self.current()):
                self.peak[i] = max(self.peak[i], rss)


def _tree_rss(proc: psutil.Process) -> int:
    try:
        return int(proc.memory_info().rss) + sum(_rss(c) for c in proc.children(recursive=True))
    except psutil.Error:
        return 0


def _rss(proc: psutil.Process) -> int:
    try:
        return int(proc.memory_info().rss)
    except psutil.Error:
        return 0


def _vm_hwm_mb(pid: int) -> float:
    with suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e6
    return float("nan")


def cpu_by_party(hub_pids: list[int], balancer_pid: int | None) -> dict[str, float]:
    """CPU seconds (user + system) so far of each party among this process and its descendants."""
    totals: dict[str, float] = defaultdict(float)
    me = psutil.Process()
    for proc in [me, *me.children(recursive=True)]:
        try:
            with proc.oneshot():
                times = proc.cpu_times()
                name, cmdline = proc.name(), " ".join(proc.cmdline())
                ancestors = {p.pid for p in proc.parents()}
        except psutil.Error:
            continue
        if proc.pid == me.pid:
            party = "sites"  # the site player, the operator's polls, the samplers
        elif proc.pid in hub_pids or ancestors & set(hub_pids):
            index = hub_pids.index(proc.pid) if proc.pid in hub_pids else hub_pids.index(min(ancestors & set(hub_pids)))
            party = f"hub{index}"
        elif balancer_pid is not None and (proc.pid == balancer_pid or balancer_pid in ancestors):
            party = "balancer"
        elif "moto.server" in cmdline:
            party = "s3"
        elif name.startswith("postgres") or "postgres" in cmdline.split(" ")[0]:
            party = "postgres"
        else:
            party = "other"
        totals[party] += times.user + times.system
    totals["hubs"] = sum(v for k, v in totals.items() if k.startswith("hub") and k != "hubs")
    return dict(totals)


# -- infrastructure: PostgreSQL + S3 server, balancer --------------------------------------
@dataclass
class Services:
    """PostgreSQL and the S3 server, started once for every postgres+s3 configuration."""

    postgres: Any = None
    s3_endpoint: str | None = None
    _stack: ExitStack = field(default_factory=ExitStack)

    def start(self) -> None:
        from tests.helpers.postgres import PostgresUnavailable, postgres_server
        from tests.helpers.s3 import S3Unavailable, s3_server

        try:
            self.postgres = self._stack.enter_context(postgres_server())
            self.s3_endpoint = self._stack.enter_context(s3_server())
            import boto3

            s3 = boto3.client("s3", endpoint_url=self.s3_endpoint, region_name=S3_CREDENTIALS["AWS_DEFAULT_REGION"],
                              aws_access_key_id=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"])  # fmt: skip
            s3.create_bucket(Bucket=BUCKET)
        except (PostgresUnavailable, S3Unavailable, ImportError) as exc:
            self.close()
            raise SystemExit(
                f"scale: the postgres+s3 configurations need a PostgreSQL server and moto's S3 server: {exc}\n"
                "(run `--backends sqlite` to leave them out)"
            ) from exc

    def close(self) -> None:
        self._stack.close()


@contextmanager
def balancer_process(backends: list[tuple[str, int]], log: Path) -> Iterator[tuple[int, subprocess.Popen[str]]]:
    """tests/helpers/balancer.py in a process of its own (so its byte pumping does not share
    the site player's interpreter lock); yields (port, process). Its stderr goes to ``log``."""
    where = ",".join(f"{h}:{p}" for h, p in backends)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with log.open("ab") as err:
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--serve-balancer", where],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True, env=env,
        )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.strip().isdigit():
            raise RuntimeError(f"the balancer did not start (said {line!r}, exit status {proc.poll()})")
        yield int(line), proc
    finally:
        with suppress(OSError):
            if proc.stdin is not None:
                proc.stdin.close()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def serve_balancer(where: str) -> None:
    """Hidden mode: run the balancer until stdin closes, then print its connection counts."""
    from tests.helpers.balancer import balancer

    backends = [(h, int(p)) for h, p in (item.rsplit(":", 1) for item in where.split(","))]
    with balancer(backends) as lb:
        print(lb.port, flush=True)
        sys.stdin.read()
        counts = dict(lb.connections)
    print(json.dumps(counts), flush=True)


# -- one configuration ----------------------------------------------------------------------
def hub_settings(
    n_sites: int, backend: str, n_hubs: int, services: Services, workdir: Path, tag: str
) -> dict[str, str]:
    settings = simulation_hub_settings(n_sites)
    if backend == "sqlite" and n_hubs > 1:
        settings["LAULIMA_HUB_PEER_POLL_S"] = "1"
    if backend == "postgres":
        settings["LAULIMA_HUB_DATABASE_URL"] = services.postgres.create_database(tag)
        settings["LAULIMA_HUB_BLOB_STORE_URL"] = f"s3://{BUCKET}/{tag}/"
        settings["LAULIMA_HUB_S3_ENDPOINT_URL"] = str(services.s3_endpoint)
        settings["LAULIMA_HUB_KEY_DIR"] = str(workdir / "keys")
        settings["LAULIMA_HUB_AUDIT_DIR"] = str(workdir / "audit")
        settings.update(S3_CREDENTIALS)
    return settings


@dataclass
class Measured:
    """What one configuration's run leaves behind, for :func:`_summary`."""

    n_sites: int
    backend: str
    n_hubs: int
    rounds: int
    load_start: float
    setup_s: float = 0.0
    wall_s: float = 0.0
    rounds_public: list[Any] = field(default_factory=list)
    records: list[TaskRecord] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)
    rss_before: list[int] = field(default_factory=list)
    rss_peak: list[int] = field(default_factory=list)
    vm_hwm_mb: list[float] = field(default_factory=list)
    health_s: list[list[float]] = field(default_factory=list)
    balancer_counts: list[int] | None = None
    opened: list[int] = field(default_factory=list)
    warnings: dict[str, int] = field(default_factory=dict)


def run_config(
    n_sites: int,
    backend: str,
    n_hubs: int,
    rounds: int,
    model_mb: float,
    services: Services,
    workdir: Path,
    tag: str,
    logs: Path | None = None,
) -> dict[str, Any]:
    token = secrets.token_urlsafe(24)
    settings = hub_settings(n_sites, backend, n_hubs, services, workdir, tag)
    hubs: list[HubProcess] = []
    m = Measured(n_sites, backend, n_hubs, rounds, os.getloadavg()[0])
    t_setup = time.monotonic()
    try:
        with ExitStack() as stack:
            for i in range(n_hubs):
                home = workdir / ("hub" if backend == "sqlite" else f"hub{i}")
                hub = HubProcess(home, free_port(), token, settings=settings)
                hub.log_path = workdir / f"hub{i}.log"
                hubs.append(hub)
                stack.callback(hub.stop)
                hub.start()
                hub.wait_ready(timeout=120)
            hub_pids = [h.popen.pid for h in hubs if h.popen]
            url, balancer = hubs[0].url, None
            if n_hubs > 1:
                backends = [(h.host, h.port) for h in hubs]
                port, balancer = stack.enter_context(balancer_process(backends, workdir / "balancer.log"))
                url = f"http://127.0.0.1:{port}"
            operator = stack.enter_context(Client(url, token, timeout=120))
            memory = stack.enter_context(MemorySampler(hub_pids))
            names = [f"site-{i:03d}" for i in range(n_sites)]
            player = SitePlayer(url, {name: str(operator.register_site(name).token) for name in names})
            player.start()
            stack.callback(player.stop)
            _wait_online(operator, player, hubs, n_sites)
            m.setup_s = time.monotonic() - t_setup
            m.rss_before = memory.current()

            bal_pid = balancer.pid if balancer else None
            cpu0 = cpu_by_party(hub_pids, bal_pid)
            t0 = time.monotonic()
            exp = operator.submit(spec(n_sites, rounds, model_mb, tag), to_safetensors(initial_weights(model_mb)))
            deadline = t0 + 600 + 10 * n_sites * rounds
            m.health_s = [[] for _ in hubs]
            probes = [stack.enter_context(httpx.Client(base_url=h.url, timeout=120)) for h in hubs]
            while (exp := operator.experiment(exp.id)).status == "running":
                for probe, latencies in zip(probes, m.health_s, strict=True):
                    p0 = time.monotonic()
                    with suppress(httpx.HTTPError):
                        probe.get(f"{API_PREFIX}/health").raise_for_status()
                        latencies.append(time.monotonic() - p0)
                player.check()
                for hub in hubs:
                    if not hub.alive:
                        raise RuntimeError(f"hub process {hub.log_path.name} died:\n{hub.log_tail()}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"experiment still running after {deadline - t0:.0f} s ({exp.rounds_done} done)")
                time.sleep(0.25)
            m.wall_s = time.monotonic() - t0
            cpu1 = cpu_by_party(hub_pids, bal_pid)
            m.cpu = {k: v - cpu0.get(k, 0.0) for k, v in cpu1.items()}
            if exp.status != "completed":
                raise RuntimeError(f"experiment {exp.status}: {exp.error}")
            m.rounds_public = operator.rounds(exp.id)
            m.vm_hwm_mb = [_vm_hwm_mb(pid) for pid in hub_pids]
            m.rss_peak = list(memory.peak)
            m.records, m.errors = player.records, dict(player.errors)
        # every process has stopped here; the balancer has printed its counts
        m.balancer_counts = _balancer_counts(balancer)
        m.opened = [_count(h.log_path, "opened for") for h in hubs]
        m.warnings = _warnings([h.log_path for h in hubs])
    except BaseException:
        for hub in hubs:
            print(f"--- {hub.log_path.name} ---\n{hub.log_tail(40)}", file=sys.stderr)
        raise
    finally:
        if backend == "postgres" and services.postgres is not None:
            with suppress(Exception):
                services.postgres.drop_database(tag)
        if logs is not None:
            (logs / tag).mkdir(parents=True, exist_ok=True)
            for path in [*workdir.glob("hub*.log"), *workdir.glob("balancer.log")]:
                shutil.copy(path, logs / tag / path.name)
    return _summary(m)


def _wait_online(operator: Client, player: SitePlayer, hubs: list[HubProcess], n_sites: int) -> None:
    deadline = time.monotonic() + 120 + n_sites
    while True:
        player.check()
        online = sum(s.status == SiteStatus.ONLINE for s in operator.list_sites())
        if online == n_sites:
            return
        if time.monotonic() > deadline or not all(h.alive for h in hubs):
            raise RuntimeError(f"only {online} of {n_sites} sites online; site errors: {dict(player.errors)}")
        time.sleep(0.2)


def _balancer_counts(proc: subprocess.Popen[str] | None) -> list[int] | None:
    if proc is None or proc.stdout is None:
        return None
    with suppress(ValueError, OSError):
        counts = json.loads(proc.stdout.read() or "{}")
        return [counts[k] for k in sorted(counts, key=int)]
    return None


_NUMBERS = re.compile(r"\b([0-9a-f]{12,}|[0-9]+)\b")


def _warnings(paths: list[Path], top: int = 8) -> dict[str, int]:
    """The hub logs' most frequent warnings and errors, numbers and digests masked."""
    counts: Counter[str] = Counter()
    for path in paths:
        with suppress(OSError):
            for line in path.read_text(errors="replace").splitlines():
                match = re.search(r"\b(WARNING|ERROR|CRITICAL)\b:?\s+(.*)", line)
                if match:
                    masked = _NUMBERS.sub("#", match[2])[:160]
                    counts[f"{match[1]} {masked}"] += 1
    return dict(counts.most_common(top))


def _count(path: Path, needle: str) -> int:
    try:
        return sum(needle in line for line in path.read_text(errors="replace").splitlines())
    except OSError:
        return 0


def _median(values: list[float], digits: int = 3) -> float | None:
    return round(statistics.median(values), digits) if values else None


def _summary(m: Measured) -> dict[str, Any]:
    by_round: dict[int, list[TaskRecord]] = defaultdict(list)
    for rec in m.records:
        by_round[rec.round].append(rec)
    durations, phases = [], defaultdict(list)
    for r in m.rounds_public:
        if r.closed_at is None:
            continue
        durations.append(r.closed_at - r.started_at)
        recs = by_round.get(r.index, [])
        if len(recs) == m.n_sites:
            phases["to_last_task"].append(max(x.got_task for x in recs) - r.started_at)
            phases["to_last_download"].append(max(x.downloaded for x in recs) - r.started_at)
            phases["to_last_upload"].append(max(x.uploaded for x in recs) - r.started_at)
            phases["aggregate"].append(r.closed_at - max(x.uploaded for x in recs))
    closed = [r.closed_at for r in m.rounds_public if r.closed_at is not None]
    starts = [r.started_at for r in m.rounds_public]
    phases["between_rounds"] = [b - a for a, b in zip(closed, starts[1:], strict=False)]
    intervals = [b - a for a, b in zip(closed, closed[1:], strict=False)]
    n_rounds = max(1, len(by_round))
    down = sum(x.down_bytes for x in m.records) / n_rounds
    up = sum(x.up_bytes for x in m.records) / n_rounds
    median_round = statistics.median(durations)
    out: dict[str, Any] = {
        "sites": m.n_sites,
        "backend": BACKENDS[m.backend],
        "hubs": m.n_hubs,
        "rounds": len(durations),
        "median_round_s": round(median_round, 3),
        "round_s": [round(d, 3) for d in durations],
        "median_checkpoint_interval_s": _median(intervals),
        "phases_s": {k: _median(v) for k, v in phases.items()},
        "site_request_s": {
            "download_median": _median([x.download_s for x in m.records]),
            "upload_median": _median([x.upload_s for x in m.records]),
        },
        "cpu_s_per_round": {k: round(v / m.rounds, 2) for k, v in sorted(m.cpu.items()) if round(v / m.rounds, 2)},
        "hub_health_latency_s": [{"median": _median(h, 4), "max": round(max(h), 3) if h else None} for h in m.health_s],
        "hub_peak_rss_mb": [round(b / 1e6, 1) for b in m.rss_peak],
        "hub_vm_hwm_mb": [round(x, 1) for x in m.vm_hwm_mb],
        "hub_rss_before_mb": [round(b / 1e6, 1) for b in m.rss_before],
        "bytes_per_round": {
            "site_download_mb": round(down / 1e6, 1),
            "site_upload_mb": round(up / 1e6, 1),
            "total_mb": round((down + up) / 1e6, 1),
            "effective_mb_s": round((down + up) / 1e6 / median_round, 1),
        },
        "site_errors": m.errors,
        "hub_log_warnings": m.warnings,
        "setup_s": round(m.setup_s, 1),
        "experiment_wall_s": round(m.wall_s, 2),
        "load_avg_1min_start_end": [round(m.load_start, 2), round(os.getloadavg()[0], 2)],
    }
    if m.n_hubs > 1:
        out["balancer_connections_per_hub"] = m.balancer_counts
        out["rounds_opened_per_hub"] = m.opened
    return out


# -- main ------------------------------------------------------------------------------
def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=_int_list, default=list(SITES), help="comma-separated (default 10,50,100,200)")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="sqlite,postgres (default both)")
    parser.add_argument("--hubs", type=_int_list, default=list(HUBS), help="hub processes: 1,2 (default both)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model-mb", type=float, default=5.0)
    parser.add_argument("--logs", type=Path, help="copy each configuration's hub and balancer logs into this folder")
    parser.add_argument("--serve-balancer", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_balancer:
        serve_balancer(args.serve_balancer)
        return
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown or not backends:
        parser.error(f"--backends: choose from {', '.join(BACKENDS)} (got {args.backends!r})")
    if any(h not in (1, 2) for h in args.hubs) or any(n < 1 for n in args.sites) or args.rounds < 2:
        parser.error("--hubs takes 1 and/or 2, --sites positive numbers, --rounds at least 2")

    started = time.monotonic()
    load_start = os.getloadavg()
    results = []
    failed = False
    services = Services()
    try:
        if "postgres" in backends:
            services.start()
        with tempfile.TemporaryDirectory(prefix="laulima-scale-") as tmp:
            for backend in backends:
                for n_hubs in args.hubs:
                    for n_sites in args.sites:
                        tag = f"scale_{backend}_{n_hubs}h_{n_sites}s"
                        workdir = Path(tmp) / tag
                        workdir.mkdir()
                        print(f"scale: {n_sites} sites, {BACKENDS[backend]}, {n_hubs} hub(s)...", file=sys.stderr)
                        try:
                            result = run_config(
                                n_sites, backend, n_hubs, args.rounds, args.model_mb, services, workdir, tag, args.logs
                            )
                        except Exception as exc:  # reported in the line; the other configurations still run
                            failed = True
                            result = {"sites": n_sites, "backend": BACKENDS[backend], "hubs": n_hubs}
                            result["error"] = f"{type(exc).__name__}: {exc}"[:2000]
                        results.append(result)
                        print(f"scale:   {json.dumps(results[-1])}", file=sys.stderr)
                        shutil.rmtree(workdir, ignore_errors=True)
    finally:
        services.close()
    print(
        json.dumps(
            {
                "benchmark": "scale",
                "model_mb": args.model_mb,
                "rounds": args.rounds,
                "transport": "plain HTTP with bearer tokens on loopback (token mode); sites played by one asyncio "
                "process, no hashing or worker at the sites",
                "hub_defaults": "orchestrator tick 0.5 s, lease 15 s, long poll <= 30 s; connection and request "
                "limits from laulima.sim.simulation_hub_settings",
                "machine": {
                    "cpus": os.cpu_count(),
                    "load_avg_1min_start": round(load_start[0], 2),
                    "load_avg_1min_end": round(os.getloadavg()[0], 2),
                },
                "runs": results,
                "wall_s": round(time.monotonic() - started, 1),
            }
        )
    )
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
