"""A whole federation on one machine: a hub and N site agents as separate processes.

Everything runs for real — one OS process per party, each with its own home folder and
database, and by default the secure path a real federation takes: a throwaway CA under the
workdir, the hub on HTTPS demanding site certificates, each site enrolled and its bundle
installed exactly as ``laulima site enroll`` / ``laulima site init BUNDLE`` do, and the
experiment submitted with a scientist's token. ``tls=False`` runs the loopback token mode.

How the agents run is the federation's *engine*: ``processes`` (the default) starts one
``laulima site run`` process per site; ``ray`` (:mod:`laulima.sim_ray`, for a hundred sites
and more) hosts them in a few Ray actors, several agents to an actor. The hub, the site
homes, and what each agent does with a task are the same either way.
"""

from __future__ import annotations

import os
import secrets
import shutil
import string
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from laulima.client import Client
from laulima.core.crosssite import round_records
from laulima.core.protocol import ExperimentPublic, ExperimentStatus, MetricRecord, SiteStatus, TaskKind
from laulima.core.spec import ExperimentSpec
from laulima.errors import ConfigurationError, LaulimaError
from laulima.nnunet.workflow import NNUNET_ALGORITHM, needs_plan, plan_in_federation
from laulima.processes import HubProcess, SiteProcess, free_port

__all__ = [
    "DEMO_DATASETS",
    "ENGINES",
    "AgentEngine",
    "LocalFederation",
    "ProcessEngine",
    "SimulationResult",
    "SiteAgent",
    "initial_weights_bytes",
    "simulation_hub_settings",
    "site_names",
]

ENGINES = ("processes", "ray")
"""How a simulation runs its site agents: a process each, or Ray actors (:mod:`laulima.sim_ray`)."""

DatasetWriter = Callable[[Path, int, int, int], None]
"""(destination folder, site index, number of sites, seed) -> writes a site's dataset."""


def _write_tabular(dest: Path, index: int, n_sites: int, seed: int) -> None:
    from laulima.algorithms.tabular_data import write_tabular_site

    write_tabular_site(dest, site_index=index, n_sites=n_sites, seed=seed)


def _write_nothing(dest: Path, index: int, n_sites: int, seed: int) -> None:
    dest.mkdir(parents=True, exist_ok=True)


def _brain_writer(task: str) -> DatasetWriter:
    def write(dest: Path, index: int, n_sites: int, seed: int) -> None:
        from laulima.imaging import write_site_dataset

        write_site_dataset(dest, task=task, site_index=index, n_sites=n_sites, seed=seed)

    return write


#: Datasets the simulation can generate for its sites, by the name a spec uses.
DEMO_DATASETS: dict[str, DatasetWriter] = {
    "tabular-demo": _write_tabular,
    "brain-tissue": _brain_writer("brain-tissue"),
    "brain-tumour": _brain_writer("brain-tumour"),
    "none": _write_nothing,
}


def site_names(n: int) -> list[str]:
    """site-a, site-b, ... (then site-27, ... beyond the alphabet)."""
    letters = string.ascii_lowercase
    return [f"site-{letters[i]}" if i < len(letters) else f"site-{i + 1}" for i in range(n)]


def initial_weights_bytes(spec: ExperimentSpec) -> bytes:
    """Build the first global model where the experiment is submitted (no data needed)."""
    from laulima.submission import prepare

    return prepare(spec).initial_weights


def simulation_hub_settings(n_sites: int, environ: dict[str, str] | None = None) -> dict[str, str]:
    """``LAULIMA_HUB_*`` settings for a hub that ``n_sites`` agents on this machine talk to.

    Every agent connects from 127.0.0.1, so the per-address cap (64 by default, meant for one
    client machine) would refuse agents past the 32nd or so: each holds a kept-alive connection
    and may open a second one (a secure-aggregation exchange beside its poll); the operator
    and scientist clients add a few more. The operator registers every site in one go before
    the first agent starts, so the request bucket's burst (120 by default) must cover that too.
    Only limits raised above the hub's defaults are returned (none for a handful of sites);
    variables the caller set in ``environ`` (default: this process's) win.
    """
    environ = dict(os.environ) if environ is None else environ
    wanted = {  # (needed, the hub's default)
        "LAULIMA_HUB_MAX_CONNECTIONS_PER_ADDRESS": (4 * n_sites + 32, 64),
        "LAULIMA_HUB_MAX_CONNECTIONS": (4 * n_sites + 64, 1024),
        "LAULIMA_HUB_REQUEST_BURST": (2 * n_sites, 120),
    }
    return {key: str(need) for key, (need, default) in wanted.items() if need > default and key not in environ}


class SiteAgent(Protocol):
    """One site's agent as the federation runs it (a :class:`~laulima.processes.SiteProcess`,
    or an agent in a Ray actor)."""

    name: str
    home: Path

    @property
    def alive(self) -> bool: ...

    def start(self) -> None: ...

    def stop(self, timeout: float = 10.0) -> None: ...

    def kill(self) -> None: ...

    def log_tail(self, n: int = 30) -> str: ...


class AgentEngine(Protocol):
    """How a :class:`LocalFederation` runs its site agents."""

    description: str
    """Said to the user: how and where the agents run."""

    def add(self, name: str, home: Path, env: dict[str, str]) -> SiteAgent:
        """Take the site configured in ``home``; its agent may start now or at :meth:`start`."""
        ...

    def start(self) -> None:
        """Every site has been added: start the agents that are not running yet."""
        ...

    def failure(self) -> tuple[str, str] | None:
        """(site, what happened) of an agent that ended without being stopped, if any."""
        ...

    def close(self) -> None:
        """Stop every agent and release what the engine holds."""
        ...


class ProcessEngine:
    """One ``laulima site run`` process per site, started as soon as its home is ready.

    A process that exits is not a :meth:`failure` here: tests stop and kill agents on purpose
    (``LocalFederation.sites``); :meth:`LocalFederation.wait_online` still says when one dies
    while the federation starts."""

    description = "hub and agents as separate processes on loopback"

    def __init__(self) -> None:
        self.sites: list[SiteProcess] = []

    def add(self, name: str, home: Path, env: dict[str, str]) -> SiteAgent:
        site = SiteProcess(home, name)
        site.env.update(env)
        site.start()
        self.sites.append(site)
        return site

    def start(self) -> None:
        pass

    def failure(self) -> tuple[str, str] | None:
        return None

    def close(self) -> None:
        for site in self.sites:
            site.stop()


@dataclass
class SimulationResult:
    experiment: ExperimentPublic
    metrics: list[MetricRecord]
    wall_time_s: float
    workdir: Path
    model_dir: Path | None = None
    """The exported model, where the simulation writes one (nnU-Net: its results folder)."""

    @property
    def final_evaluation(self) -> dict[str, dict[str, float]]:
        """Metrics of the last evaluated round, per site (the cross-site matrix's records,
        labelled by model, are not a round's evaluation)."""
        evals = [m for m in round_records(self.metrics) if m.kind == TaskKind.EVALUATE]
        if not evals:
            return {}
        last = max(m.round for m in evals)
        return {m.site: m.metrics for m in evals if m.round == last}


@dataclass
class LocalFederation:
    """Hub + N agents under ``workdir``, run by ``engine``. Use as a context manager; the agents
    and the hub stop on exit (and a Ray instance the Ray engine started)."""

    workdir: Path
    n_sites: int
    dataset: str
    seed: int = 0
    dataset_writer: DatasetWriter | None = None
    site_env: dict[str, str] = field(default_factory=dict)
    tls: bool = field(default_factory=lambda: os.environ.get("LAULIMA_SIM_TLS", "1") != "0")
    """Mutual TLS with a throwaway CA (the default); False: plain HTTP with tokens on loopback
    (``LAULIMA_SIM_TLS=0`` sets that for whole runs, e.g. to measure what TLS costs)."""
    engine: str = "processes"
    """How the agents run: ``processes`` (one each) or ``ray`` (Ray actors, :mod:`laulima.sim_ray`)."""
    sites_per_actor: int | None = None
    """Ray engine: agents per actor (default: one actor per CPU of the node, the sites spread evenly)."""
    hub_port: int | None = None
    """The hub process's port (default: a free one)."""
    public_url: str | None = None
    """Where sites and people reach the hub, when that is not the hub process itself: a load
    balancer in front of several hub processes (tests/integration/test_hub_processes.py)."""
    hub_env: dict[str, str] = field(default_factory=dict)
    """Further ``LAULIMA_HUB_*`` settings of the hub process."""
    hub: HubProcess = field(init=False)
    agents: AgentEngine = field(init=False)
    sites: dict[str, SiteAgent] = field(init=False, default_factory=dict)
    client: Client = field(init=False)
    """The data scientist's client (a scientist token under TLS)."""
    operator: Client = field(init=False)

    def __enter__(self) -> LocalFederation:
        writer = self.dataset_writer or DEMO_DATASETS.get(self.dataset)
        if writer is None:
            raise ConfigurationError(
                f"the simulation can generate the datasets {sorted(DEMO_DATASETS)}, not {self.dataset!r}; "
                "for your own data, run a hub and agents with `laulima hub` and `laulima site`",
                field="dataset",
            )
        if self.n_sites < 1:
            raise ConfigurationError("--sites must be at least 1", field="sites")
        if self.engine not in ENGINES:
            raise ConfigurationError(f"engine {self.engine!r}: choose one of {', '.join(ENGINES)}", field="engine")
        if self.sites_per_actor is not None and (self.engine != "ray" or self.sites_per_actor < 1):
            raise ConfigurationError("--sites-per-actor needs --engine ray and at least 1", field="sites_per_actor")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = self.workdir.resolve()  # agents in Ray actors need the folders by absolute path
        self.agents = self._engine()
        try:
            ca_dir = self.ca_dir = self._ca() if self.tls else None
            self.hub = HubProcess(
                self.workdir / "hub",
                self.hub_port or free_port(),
                secrets.token_urlsafe(24),
                ca_dir=ca_dir / "hub" if ca_dir else None,
                settings={**simulation_hub_settings(self.n_sites), **self.hub_env},
            )
            self.hub.start()
            self.hub.wait_ready()
            self.operator = Client(self.url, self.hub.admin_token, ca_file=self.hub.ca_file)
            scientist = self.operator.create_token("sim-scientist", "scientist").token if self.tls else None
            self.client = Client(self.url, scientist or self.hub.admin_token, ca_file=self.hub.ca_file)
            for index, name in enumerate(site_names(self.n_sites)):
                self._add_site(name, index, writer)
            self.agents.start()
            self.wait_online()
        except BaseException:
            self.close()
            raise
        return self

    @property
    def url(self) -> str:
        """Where sites and people reach the hub (``public_url``, or the hub process)."""
        return self.public_url or self.hub.url

    def _engine(self) -> AgentEngine:
        if self.engine == "ray":
            from laulima.sim_ray import RayEngine

            return RayEngine(self.workdir, self.n_sites, sites_per_actor=self.sites_per_actor)
        return ProcessEngine()

    def _add_site(self, name: str, index: int, writer: DatasetWriter) -> None:
        from laulima.site.catalog import Catalog
        from laulima.site.settings import write_site_config

        home = self.workdir / "sites" / name
        data_dir = self.workdir / "data" / name / self.dataset
        if not data_dir.exists():
            writer(data_dir, index, self.n_sites, self.seed)
        created = self.operator.register_site(name)  # so "every registered site" includes it at once
        if self.ca_dir is not None:
            from laulima.pki.bundle import enroll_site, install_bundle

            bundle = enroll_site(self.ca_dir, name, self.url, self.workdir / "bundles" / f"{name}.laulima-site")
            install_bundle(bundle, home)
        else:
            write_site_config(home, name=name, hub_url=self.url, token=created.token)
        Catalog(home).add(self.dataset, data_dir)
        self.sites[name] = self.agents.add(name, home, self.site_env)

    def wait_online(self, timeout: float = 180.0) -> None:
        """Return once the hub counts every agent online: rounds select only sites it has heard
        from, so an experiment submitted earlier would start without the slower agents."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_agents()
            offline = sorted(s.name for s in self.operator.list_sites() if s.status != SiteStatus.ONLINE)
            if not offline:
                return
            dead = [name for name in offline if name in self.sites and not self.sites[name].alive]
            if dead or time.monotonic() > deadline:
                name = (dead or offline)[0]
                why = "exited" if dead else f"did not connect within {timeout:.0f} s"
                tail = self.sites[name].log_tail() if name in self.sites else ""
                raise LaulimaError(f"site agent {name} {why}:\n{tail}")
            time.sleep(0.1)

    def check_agents(self) -> None:
        """Raise with its log if an agent ended without being stopped (the Ray engine's agents;
        a process engine's agent that exits is left to the caller, who may have stopped it)."""
        failed = self.agents.failure()
        if failed is not None:
            name, why = failed
            tail = self.sites[name].log_tail() if name in self.sites else ""
            raise LaulimaError(f"site agent {name} {why}:\n{tail}", site=name)

    def _ca(self) -> Path:
        """The federation CA of this simulation (created on first use, kept with the workdir)."""
        from laulima.pki.ca import CertificateAuthority

        ca_dir = self.workdir / "ca"
        if not (ca_dir / "ca.pem").exists():
            CertificateAuthority.init(ca_dir, federation="Laulima simulation")
        return ca_dir

    def submit(
        self, spec: ExperimentSpec, *, base_dir: Path | None = None, signing_keys: Sequence[Path] = ()
    ) -> ExperimentPublic:
        """Submit as ``laulima experiment submit`` does: a local ``source`` is packed, signed
        with ``signing_keys`` and uploaded."""
        from laulima.submission import prepare

        ready = prepare(spec, base_dir=base_dir, signing_keys=signing_keys)
        bundle = ready.bundle.data if ready.bundle is not None else None
        return self.client.submit(ready.spec, ready.initial_weights, bundle=bundle)

    def wait(
        self,
        experiment_id: int,
        *,
        timeout: float,
        on_progress: Callable[[ExperimentPublic, list[MetricRecord]], None] | None = None,
        poll_s: float = 0.5,
    ) -> ExperimentPublic:
        """Poll until the experiment ends; raise with the hub's log if it died, or with an agent's
        if it ended on its own (:meth:`check_agents`)."""
        deadline = time.monotonic() + timeout
        while True:
            exp = self.client.experiment(experiment_id)
            if on_progress is not None:
                on_progress(exp, self.client.metrics(experiment_id))
            if exp.status != ExperimentStatus.RUNNING:
                return exp
            if not self.hub.alive:
                raise LaulimaError(f"the hub process died:\n{self.hub.log_tail()}")
            self.check_agents()
            if time.monotonic() > deadline:
                raise LaulimaError(
                    f"experiment {experiment_id} still running after {timeout:.0f} s "
                    f"(round {exp.rounds_done}/{exp.rounds}); logs are under {self.workdir}"
                )
            time.sleep(poll_s)

    def close(self) -> None:
        for attr in ("client", "operator"):  # first: an open keep-alive connection delays the hub's exit
            client = getattr(self, attr, None)
            if client is not None:
                client.close()
        if getattr(self, "agents", None) is not None:
            self.agents.close()
        if getattr(self, "hub", None) is not None:
            self.hub.stop()

    def __exit__(self, *exc: Any) -> None:
        self.close()


def run_simulation(
    spec: ExperimentSpec,
    n_sites: int,
    workdir: Path,
    *,
    timeout: float = 3600.0,
    on_progress: Callable[[ExperimentPublic, list[MetricRecord]], None] | None = None,
    fresh: bool = True,
    engine: str = "processes",
    sites_per_actor: int | None = None,
    on_start: Callable[[LocalFederation], None] | None = None,
) -> SimulationResult:
    """Run ``spec`` on a fresh local federation of ``n_sites`` and return its metrics.

    ``engine`` and ``sites_per_actor``: how the agents run (:class:`LocalFederation`);
    ``on_start`` is called once every agent is online (``fed.agents.description`` says how).
    """
    if fresh and workdir.exists():
        shutil.rmtree(workdir)
    started = time.monotonic()
    model_dir: Path | None = None
    federation = LocalFederation(
        workdir, n_sites, spec.dataset, seed=spec.seed, engine=engine, sites_per_actor=sites_per_actor
    )
    with federation as fed:
        if on_start is not None:
            on_start(fed)
        if needs_plan(spec):  # nnU-Net without a plan: the federation's fingerprint, then nnU-Net's planner
            wait = partial(fed.wait, timeout=timeout)
            spec = plan_in_federation(spec, fed.submit, wait, fed.client.fingerprint, workdir / "nnunet")
        exp = fed.submit(spec)
        exp = fed.wait(exp.id, timeout=timeout, on_progress=on_progress)
        metrics = fed.client.metrics(exp.id)
        if spec.algorithm == NNUNET_ALGORITHM and exp.status == ExperimentStatus.COMPLETED:
            from laulima.export import export_experiment

            model_dir = export_experiment(fed.client, exp.id, workdir / "nnunet" / "results")
    return SimulationResult(exp, metrics, time.monotonic() - started, workdir, model_dir)
