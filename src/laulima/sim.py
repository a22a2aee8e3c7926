"""A whole federation on one machine: a hub and N site agents as separate processes.

Everything runs for real — one OS process per party, each with its own home folder and
database, and by default the secure path a real federation takes: a throwaway CA under the
workdir, the hub on HTTPS demanding site certificates, each site enrolled and its bundle
installed exactly as ``laulima site enroll`` / ``laulima site init BUNDLE`` do, and the
experiment submitted with a scientist's token. ``tls=False`` runs the loopback token mode.
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
from typing import Any

from laulima.client import Client
from laulima.core.crosssite import round_records
from laulima.core.protocol import ExperimentPublic, ExperimentStatus, MetricRecord, SiteStatus, TaskKind
from laulima.core.spec import ExperimentSpec
from laulima.errors import ConfigurationError, LaulimaError
from laulima.nnunet.workflow import NNUNET_ALGORITHM, needs_plan, plan_in_federation
from laulima.processes import HubProcess, SiteProcess, free_port

__all__ = ["DEMO_DATASETS", "LocalFederation", "SimulationResult", "initial_weights_bytes", "site_names"]

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
    """Hub + N agents under ``workdir``. Use as a context manager; processes stop on exit."""

    workdir: Path
    n_sites: int
    dataset: str
    seed: int = 0
    dataset_writer: DatasetWriter | None = None
    site_env: dict[str, str] = field(default_factory=dict)
    tls: bool = field(default_factory=lambda: os.environ.get("LAULIMA_SIM_TLS", "1") != "0")
    """Mutual TLS with a throwaway CA (the default); False: plain HTTP with tokens on loopback
    (``LAULIMA_SIM_TLS=0`` sets that for whole runs, e.g. to measure what TLS costs)."""
    hub: HubProcess = field(init=False)
    sites: dict[str, SiteProcess] = field(init=False, default_factory=dict)
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
        self.workdir.mkdir(parents=True, exist_ok=True)
        ca_dir = self.ca_dir = self._ca() if self.tls else None
        self.hub = HubProcess(
            self.workdir / "hub", free_port(), secrets.token_urlsafe(24), ca_dir=ca_dir / "hub" if ca_dir else None
        )
        self.hub.start()
        try:
            self.hub.wait_ready()
            self.operator = Client(self.hub.url, self.hub.admin_token, ca_file=self.hub.ca_file)
            scientist = self.operator.create_token("sim-scientist", "scientist").token if self.tls else None
            self.client = Client(self.hub.url, scientist or self.hub.admin_token, ca_file=self.hub.ca_file)
            for index, name in enumerate(site_names(self.n_sites)):
                self._add_site(name, index, writer)
            self.wait_online()
        except BaseException:
            self.close()
            raise
        return self

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

            bundle = enroll_site(self.ca_dir, name, self.hub.url, self.workdir / "bundles" / f"{name}.laulima-site")
            install_bundle(bundle, home)
        else:
            write_site_config(home, name=name, hub_url=self.hub.url, token=created.token)
        Catalog(home).add(self.dataset, data_dir)
        site = SiteProcess(home, name)
        site.env.update(self.site_env)
        site.start()
        self.sites[name] = site

    def wait_online(self, timeout: float = 180.0) -> None:
        """Return once the hub counts every agent online: rounds select only sites it has heard
        from, so an experiment submitted earlier would start without the slower agents."""
        deadline = time.monotonic() + timeout
        while True:
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
        """Poll until the experiment ends; raise with the agents' logs if a process died."""
        deadline = time.monotonic() + timeout
        while True:
            exp = self.client.experiment(experiment_id)
            if on_progress is not None:
                on_progress(exp, self.client.metrics(experiment_id))
            if exp.status != ExperimentStatus.RUNNING:
                return exp
            if not self.hub.alive:
                raise LaulimaError(f"the hub process died:\n{self.hub.log_tail()}")
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
        for site in self.sites.values():
            site.stop()
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
) -> SimulationResult:
    """Run ``spec`` on a fresh local federation of ``n_sites`` and return its metrics."""
    if fresh and workdir.exists():
        shutil.rmtree(workdir)
    started = time.monotonic()
    model_dir: Path | None = None
    with LocalFederation(workdir, n_sites, spec.dataset, seed=spec.seed) as fed:
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

