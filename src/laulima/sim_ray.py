"""``laulima sim --engine ray``: the simulation's site agents as Ray actors.

The hub is the same :class:`~laulima.processes.HubProcess` as with the default engine, and
each site keeps its own home (certificate, catalog, policy, approvals, audit trail, state)
and its own ``agent.log``; the datasets are those of :data:`laulima.sim.DEMO_DATASETS`. What
changes is where the agents' loops run. One ``laulima site run`` process per site costs
about 130 MB with its fork server (13 GB for 100 sites); here a few Ray actors each host a
group of agents, one thread per agent, as Flower's simulation pools its clients in a few
actors. By default there is one actor per CPU of the Ray node, the sites dealt out evenly
(``sites_per_actor`` sets the group size instead), and each actor runs at most
:data:`TASK_SLOTS` tasks at a time, its agents taking turns.

Each agent is the one ``laulima site run`` builds (:func:`laulima.site.agent.open_agent`):
the same policy, approvals and audit, and every task still runs in a process of its own,
confined as usual (:mod:`laulima.site.runner`, :mod:`laulima.site.sandbox`). One thing
differs, for memory: a hosted agent starts each task's process afresh (``zygote=False``)
rather than forking it from a fork server of its own. A fork server is an interpreter that
stays resident, about 40 MB for each site (4 GB for 100 sites, 8 GB for 200); a fresh
process costs about 0.3 s of CPU more per tabular task.

Ray runs on a local instance that this module starts and shuts down: loopback only, no
dashboard, no usage statistics, token authentication with a token of this run (nothing
written to ``~/.ray``), nothing downloaded (no runtime environment beyond environment
variables). With ``RAY_ADDRESS`` set, the actors run on that existing cluster instead, on the
node of this machine: the hub listens on loopback and the site homes are local folders. That
cluster is left running.

Ray is an optional dependency (``pip install 'laulima[ray]'``), imported only here and only
when this engine is used.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from laulima.core.protocol import TaskPublic
from laulima.errors import AlgorithmError, ConfigurationError, LaulimaError
from laulima.processes import log_tail
from laulima.site.runner import TaskRunner
from laulima.site.taskdir import RunResult

__all__ = ["RAY_MISSING", "RayEngine", "RaySiteAgent", "SiteAgentGroup", "import_ray", "packing"]

RAY_MISSING = "the Ray engine needs Ray, an optional dependency: pip install 'laulima[ray]'"
OBJECT_STORE_BYTES = 100 * 1024**2
"""The local instance's object store: the actors exchange only a few small status messages."""
START_TIMEOUT_S = 120.0
"""How long the actors may take to be placed and to start their agents."""
TASK_SLOTS = 2
"""Tasks one actor runs at a time (its agents take turns): with an actor per CPU, one task's
process starts while another computes. Measured on 2 cores, 100 tabular sites: one slot per
actor took 56-59 s a round, two 42 s, no limit 40-41 s with some 35 processes at once."""
STATUS_EVERY_S = 1.0
"""How often, at most, the driver asks the actors how their agents are."""
STOP_GRACE_S = 3.0
"""How long an actor may take to stop its agents before it is killed."""
_THREAD_PREFIX = "laulima-site:"
_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_RUNNING = None
_STOPPED = "stopped"
_NOT_STARTED = "not started"


def import_ray() -> ModuleType:
    """``ray``, or a ConfigurationError that says how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise ConfigurationError(RAY_MISSING, field="engine") from exc
    return ray


def packing(names: list[str], cpus: float, sites_per_actor: int | None = None) -> list[list[str]]:
    """The sites' groups, one per actor: one actor per CPU (at most one per site), or groups of
    ``sites_per_actor``; sites are dealt out in turn, so the groups differ by one at most."""
    if not names:
        return []
    if sites_per_actor is not None:
        if sites_per_actor < 1:
            raise ConfigurationError("--sites-per-actor must be at least 1", field="sites_per_actor")
        n_actors = math.ceil(len(names) / sites_per_actor)
    else:
        n_actors = min(len(names), max(1, int(cpus)))
    return [names[i::n_actors] for i in range(n_actors)]


# -- inside an actor ----------------------------------------------------------------------
class _SiteLogs(logging.Handler):
    """Sends each record to the ``agent.log`` of the site whose thread logged it (as a
    ``laulima site run`` process writes it); records of other threads go to the group's log."""

    def __init__(self, group_log: Path) -> None:
        super().__init__()
        self.formatter_ = logging.Formatter(_LOG_FORMAT)
        self.group = self._file(group_log)
        self.sites: dict[str, logging.Handler] = {}

    def _file(self, path: Path) -> logging.Handler:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path, encoding="utf-8")
        handler.setFormatter(self.formatter_)
        return handler

    def add(self, thread_name: str, path: Path) -> None:
        if thread_name not in self.sites:
            self.sites[thread_name] = self._file(path)

    def emit(self, record: logging.LogRecord) -> None:
        self.sites.get(record.threadName or "", self.group).handle(record)


class _TurnTakingRunner(TaskRunner):
    """A :class:`TaskRunner` whose task runs only while it holds one of the actor's task slots,
    shared by the actor's agents: they take turns, as Flower's actors run one client at a time,
    instead of starting fifty interpreters at once on two cores. The wait counts against the
    task's deadline, as a busy hospital machine would."""

    def __init__(self, slots: threading.Semaphore, **options: Any) -> None:
        super().__init__(**options)
        self.slots = slots

    def run(self, task: TaskPublic, task_dir: Path, **options: Any) -> RunResult:
        while not self.slots.acquire(timeout=0.5):
            if self._cancelled.is_set():
                raise AlgorithmError(
                    f"task {task.id}: cancelled (the agent is stopping)", kind="cancelled", task=task.id
                )
        try:
            return super().run(task, task_dir, **options)
        finally:
            self.slots.release()


class _HostedAgent:
    """One site's agent loop on a thread of the actor's process."""

    def __init__(self, name: str, home: Path, zygote: bool, slots: threading.Semaphore) -> None:
        self.name = name
        self.home = home
        self.zygote = zygote
        self.slots = slots
        self.thread: threading.Thread | None = None
        self.stop_event = threading.Event()
        self.agent: Any = None
        self.error: str | None = None

    @property
    def thread_name(self) -> str:
        return _THREAD_PREFIX + self.name

    def start(self) -> None:
        if self.thread is not None and self.thread.is_alive():
            return
        self.stop_event = threading.Event()
        self.error = None
        self.thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        from laulima.site.agent import open_agent
        from laulima.site.settings import SiteSettings

        site_log = logging.getLogger("laulima.site")
        stop = self.stop_event
        try:
            settings = SiteSettings.load(self.home)
            runner = _TurnTakingRunner(self.slots, time_limit_cap_s=settings.task_time_limit_s, zygote=self.zygote)
            with open_agent(settings, stop, runner=runner) as agent:
                self.agent = agent
                if not stop.is_set():
                    agent.runner.warm()
                    agent.run_forever(stop)
        except BaseException as exc:
            if not stop.is_set():
                self.error = f"{type(exc).__name__}: {exc}"
                site_log.error(
                    "site %s: the agent ended: %s", self.name, self.error, exc_info=not isinstance(exc, LaulimaError)
                )
        else:
            if not stop.is_set():
                self.error = "its loop returned without being stopped"
        finally:
            self.agent = None

    def request_stop(self) -> None:
        """As SIGTERM does to ``laulima site run``: stop polling, kill a running task (it resumes
        when the agent starts again); a long poll in progress ends with the actor, or within
        the site's ``poll_wait_s``."""
        self.stop_event.set()
        agent = self.agent
        if agent is not None:
            agent.request_stop()

    def join(self, deadline: float) -> bool:
        """True once the thread has ended (waits until ``deadline``, by ``time.monotonic()``)."""
        if self.thread is None:
            return True
        self.thread.join(max(0.0, deadline - time.monotonic()))
        return not self.thread.is_alive()

    def state(self) -> str | None:
        """None while running; ``stopped`` when stopped on request; else what ended it."""
        if self.thread is None:
            return _NOT_STARTED
        if self.thread.is_alive():
            return _RUNNING
        return f"exited ({self.error})" if self.error else _STOPPED


class SiteAgentGroup:
    """The body of one Ray actor: the agents of ``sites`` ((name, home) pairs), a thread each,
    running at most ``task_slots`` tasks at a time.

    Logging goes to each site's ``agent.log`` (what the agent thread logs) and to ``group_log``
    (anything else: Ray's and other threads' records). ``zygote``: see the module's note.
    """

    def __init__(
        self, sites: list[tuple[str, str]], group_log: str, *, task_slots: int = TASK_SLOTS, zygote: bool = False
    ) -> None:
        slots = threading.Semaphore(max(1, task_slots))
        self.agents = {name: _HostedAgent(name, Path(home), zygote, slots) for name, home in sites}
        self.logs = _SiteLogs(Path(group_log))
        for hosted in self.agents.values():
            self.logs.add(hosted.thread_name, hosted.home / "agent.log")
        root = logging.getLogger()
        root.addHandler(self.logs)
        root.setLevel(logging.INFO)
        for name in ("httpx", "httpcore"):  # as `laulima site run` does: a line per request is noise
            logging.getLogger(name).setLevel(logging.WARNING)

    def start(self) -> int:
        """Start every agent; returns the actor's process id."""
        for hosted in self.agents.values():
            hosted.start()
        return os.getpid()

    def status(self) -> dict[str, str | None]:
        """Each site's agent: None while running, ``stopped``, or ``exited (why)``."""
        return {name: hosted.state() for name, hosted in self.agents.items()}

    def start_site(self, name: str, timeout: float = 30.0) -> None:
        hosted = self.agents[name]
        if not hosted.join(time.monotonic() + timeout):
            raise LaulimaError(f"site agent {name} is still stopping; try again later", site=name)
        hosted.start()

    def stop_site(self, name: str, timeout: float = 10.0) -> bool:
        """Stop one agent; True if its thread ended within ``timeout``."""
        hosted = self.agents[name]
        hosted.request_stop()
        return hosted.join(time.monotonic() + timeout)

    def stop(self, timeout: float = STOP_GRACE_S) -> list[str]:
        """Stop every agent (running tasks are killed) and wait until each has ended or waits in a
        long poll, where ending the actor loses nothing (as SIGTERM cuts a ``laulima site run``'s
        poll short); returns the sites still running after ``timeout``."""
        for hosted in self.agents.values():
            hosted.request_stop()
        deadline = time.monotonic() + timeout
        busy = list(self.agents.values())
        while busy and time.monotonic() < deadline:
            busy = [h for h in busy if h.state() is _RUNNING and not (h.agent is not None and h.agent.polling)]
            if busy:
                busy[0].join(min(deadline, time.monotonic() + 0.05))
        return [h.name for h in busy]


# -- the driver's side ----------------------------------------------------------------------
class RaySiteAgent:
    """The driver's handle on one site's agent in an actor (what ``LocalFederation.sites`` holds)."""

    def __init__(self, engine: RayEngine, name: str, home: Path) -> None:
        self.engine = engine
        self.name = name
        self.home = home

    @property
    def alive(self) -> bool:
        return self.engine.state(self.name) is _RUNNING

    def start(self) -> None:
        self.engine.call(self.name, "start_site")

    def stop(self, timeout: float = 10.0) -> None:
        self.engine.call(self.name, "stop_site", timeout)

    def kill(self) -> None:
        """As :meth:`stop`: an agent is a thread, not a process to kill; its task's process is killed."""
        self.stop(timeout=0.0)

    def log_tail(self, n: int = 30) -> str:
        return log_tail(self.home / "agent.log", n)


class RayEngine:
    """Runs a simulation's agents in Ray actors (see the module's note); an ``AgentEngine``.

    Connects to Ray when constructed, so that a missing Ray or an unreachable ``RAY_ADDRESS``
    fails before the hub starts. :meth:`close` kills the actors, shuts down a local instance it
    started, and disconnects from a cluster it connected to (``ray.shutdown()`` in a process
    connected to a cluster stops nothing there); a process already connected to Ray stays so.
    """

    def __init__(
        self,
        workdir: Path,
        n_sites: int,
        *,
        sites_per_actor: int | None = None,
        task_slots: int = TASK_SLOTS,
        zygote: bool = False,
    ) -> None:
        self.ray = import_ray()
        self.workdir = workdir
        self.n_sites = n_sites
        self.sites_per_actor = sites_per_actor
        self.task_slots = task_slots
        self.zygote = zygote
        self.homes: dict[str, Path] = {}
        self.env: dict[str, str] = {}
        self.actors: list[Any] = []
        self.groups: list[list[str]] = []
        self.actor_of: dict[str, int] = {}
        self.pids: list[int | None] = []
        self._states: dict[str, str | None] = {}
        self._checked_at = -math.inf
        self._restore_env: dict[str, str | None] = {}
        self.started_ray = False
        """This engine started the local Ray instance: :meth:`close` shuts it down."""
        self.connected = False
        """This engine connected to the cluster at RAY_ADDRESS: :meth:`close` disconnects (the
        cluster runs on)."""
        self.target = self._connect()
        try:
            self.node_id: str = self.ray.get_runtime_context().get_node_id()
            self.cpus = self._node_cpus()
            self.description = self._describe()
        except BaseException:
            self.close()
            raise

    # -- Ray itself ---------------------------------------------------------------------
    def _connect(self) -> str:
        ray = self.ray
        address = os.environ.get("RAY_ADDRESS", "").strip()
        if ray.is_initialized():
            return "the Ray instance this process is already connected to"
        if address.startswith("ray://"):
            raise ConfigurationError(
                f"RAY_ADDRESS={address}: the Ray engine cannot run through Ray Client (ray://): its actors must "
                "run on this machine's Ray node, where the hub listens on loopback and the site folders are; "
                "run `laulima sim` on a node of the cluster with RAY_ADDRESS=HOST:PORT (the head's GCS address)",
                field="RAY_ADDRESS",
            )
        try:
            if address:
                ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING, namespace="laulima-sim")
                self.connected = True
                return f"the Ray cluster at {address} (RAY_ADDRESS), on this machine's node"
            self._start_local()
        except ConfigurationError:
            raise
        except Exception as exc:  # Ray's own errors: ConnectionError, RuntimeError, ...
            self._restore()
            where = f"the Ray cluster at RAY_ADDRESS={address}" if address else "a local Ray instance"
            raise LaulimaError(f"could not start or reach {where}: {type(exc).__name__}: {exc}") from exc
        return "a local Ray instance (loopback only)"

    def _start_local(self) -> None:
        """A fresh single-node instance of this run (``address="local"``: never another user's
        instance found in /tmp/ray), bound to 127.0.0.1, quiet and offline."""
        ray = self.ray
        self._set_env(
            RAY_USAGE_STATS_ENABLED="0",  # no usage report sent to Ray's servers
            RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # Ray's processes bind to loopback (its laptop mode)
        )
        if not any(os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")):
            # Token authentication with this run's token, passed to Ray's processes by environment:
            # Ray's default would write ~/.ray/auth_token. Ray's cached config must see the mode.
            self._set_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
            config = getattr(getattr(ray, "_raylet", None), "Config", None)
            if config is not None:
                config.initialize("")
        with _loopback_node(ray):
            ray.init(
                address="local",
                include_dashboard=False,
                log_to_driver=False,
                logging_level=logging.WARNING,
                object_store_memory=OBJECT_STORE_BYTES,
                namespace="laulima-sim",
                _node_ip_address="127.0.0.1",
            )
        self.started_ray = True

    def _set_env(self, **values: str) -> None:
        for key, value in values.items():
            self._restore_env.setdefault(key, os.environ.get(key))
            os.environ[key] = value

    def _restore(self) -> None:
        for key, value in self._restore_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._restore_env = {}

    def _node_cpus(self) -> float:
        for node in self.ray.nodes():
            if node.get("NodeID") == self.node_id:
                return float(node.get("Resources", {}).get("CPU", 1.0))
        return float(self.ray.cluster_resources().get("CPU", 1.0))

    def _describe(self) -> str:
        names = [f"s{i}" for i in range(self.n_sites)]
        groups = packing(names, self.cpus, self.sites_per_actor)
        sizes = sorted({len(g) for g in groups})
        each = "-".join(str(s) for s in (sizes[0], sizes[-1])) if len(sizes) > 1 else str(sizes[0])
        return (
            f"site agents in {len(groups)} Ray actor{'s' if len(groups) != 1 else ''} "
            f"({each} site{'' if each == '1' else 's'} each) on "
            f"{self.target}, {self.cpus:g} CPUs; Ray {self.ray.__version__}"
        )

    # -- the AgentEngine protocol ---------------------------------------------------------
    def add(self, name: str, home: Path, env: dict[str, str]) -> RaySiteAgent:
        if self.actors:
            raise LaulimaError("the Ray engine's agents have started; it takes no more sites")
        self.homes[name] = Path(home).resolve()
        self.env.update(env)
        return RaySiteAgent(self, name, self.homes[name])

    def start(self) -> None:
        ray = self.ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self.groups = packing(list(self.homes), self.cpus, self.sites_per_actor)
        share = min(1.0, math.floor(self.cpus / max(1, len(self.groups)) * 1000) / 1000) or 0.001
        options: dict[str, Any] = {
            "num_cpus": share,  # the node's CPUs, shared out: the algorithms run in the agents' child processes
            "max_restarts": 0,  # an agent that dies is reported, not silently restarted
            "scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=self.node_id, soft=False),
        }
        if self.env:
            options["runtime_env"] = {"env_vars": dict(self.env)}  # variables only: nothing to download
        actor_class = ray.remote(SiteAgentGroup)
        logs = self.workdir / "ray"
        for index, group in enumerate(self.groups):
            sites = [(name, str(self.homes[name])) for name in group]
            actor = actor_class.options(**options).remote(
                sites, str(logs / f"actor-{index}.log"), task_slots=self.task_slots, zygote=self.zygote
            )
            self.actors.append(actor)
            for name in group:
                self.actor_of[name] = index
        refs = [actor.start.remote() for actor in self.actors]
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=START_TIMEOUT_S)
        if pending:
            raise LaulimaError(
                f"{len(pending)} of {len(refs)} Ray actors did not start within {START_TIMEOUT_S:.0f} s "
                f"(each asks for {share:g} CPU on this machine's node; Ray has "
                f"{self.ray.available_resources().get('CPU', 0):g} free); Ray's logs are under its session folder"
            )
        self.pids = [None] * len(self.actors)
        for index, ref in enumerate(refs):
            try:
                self.pids[index] = ray.get(ref)
            except Exception as exc:  # the actor could not be created (its constructor failed)
                raise LaulimaError(
                    f"the Ray actor for sites {', '.join(self.groups[index])} failed to start: {_first_lines(exc)}"
                ) from exc

    def failure(self) -> tuple[str, str] | None:
        states = self._refresh()
        for name, state in states.items():
            if state not in (_RUNNING, _STOPPED, _NOT_STARTED):
                return name, str(state)
        return None

    def close(self) -> None:
        ray = self.ray
        try:
            if self.actors:
                refs = [actor.stop.remote() for actor in self.actors]
                with contextlib.suppress(Exception):
                    ray.wait(refs, num_returns=len(refs), timeout=STOP_GRACE_S + 5.0)
                for actor in self.actors:  # the process goes, with any agent still in a long poll
                    with contextlib.suppress(Exception):
                        ray.kill(actor, no_restart=True)
                self.actors = []
        finally:
            if self.started_ray or self.connected:  # a cluster we only connected to is left running
                self.started_ray = self.connected = False
                with contextlib.suppress(Exception):
                    ray.shutdown()
            self._restore()

    # -- for the handles ------------------------------------------------------------------
    def state(self, name: str) -> str | None:
        if not self.actors:
            return _NOT_STARTED
        return self._refresh().get(name, _NOT_STARTED)

    def call(self, name: str, method: str, *args: Any) -> Any:
        if not self.actors:
            raise LaulimaError("the Ray engine's agents have not started")
        actor = self.actors[self.actor_of[name]]
        result = self.ray.get(getattr(actor, method).remote(name, *args))
        self._checked_at = -math.inf  # the next state() asks again
        return result

    def _refresh(self) -> dict[str, str | None]:
        """Every agent's state, asked of the actors at most every STATUS_EVERY_S."""
        if not self.actors or time.monotonic() - self._checked_at < STATUS_EVERY_S:
            return self._states
        ray = self.ray
        refs = [actor.status.remote() for actor in self.actors]
        ray.wait(refs, num_returns=len(refs), timeout=30.0)
        for index, ref in enumerate(refs):
            try:
                self._states.update(ray.get(ref, timeout=0))
            except (ray.exceptions.GetTimeoutError, ray.exceptions.ActorUnavailableError):
                continue  # busy (stopping or starting an agent) or briefly unreachable: asked again next time
            except ray.exceptions.RayActorError as exc:
                pid = self.pids[index] if index < len(self.pids) else None
                why = f"died with its Ray actor (pid {pid}): {_first_lines(exc)}"
                self._states.update(dict.fromkeys(self.groups[index], why))
        self._checked_at = time.monotonic()
        return self._states


@contextlib.contextmanager
def _loopback_node(ray: ModuleType) -> Iterator[None]:
    """Have Ray take 127.0.0.1 as this node's address while it starts (what it does on macOS and
    Windows), instead of the address of the interface with a default route."""
    constants: Any = getattr(getattr(ray, "_private", None), "ray_constants", None)
    previous = getattr(constants, "ENABLE_RAY_CLUSTER", None)
    if constants is not None and previous is not None:
        constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        if constants is not None and previous is not None:
            constants.ENABLE_RAY_CLUSTER = previous


def _first_lines(exc: BaseException, n: int = 3) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return " ".join(lines[:n]) or type(exc).__name__
