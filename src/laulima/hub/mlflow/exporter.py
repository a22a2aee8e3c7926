"""The thread that talks to MLflow: runs created or found again, parameters and rounds logged, outages ridden out.

Apart from the records so that everything that needs MLflow, a network or a thread is in one
place; MLflow is imported here only, in :meth:`MlflowExporter.open`, and only when the
setting is set.

*Crash safety.* The cursor row is committed after each step: run created, parameters logged,
each batch of rounds logged, run ended. A hub stopped between creating a run and committing
its id finds the run again by ``laulima.run_key``, so there is never a second run. Logging a
parameter again with the same value is a no-op in MLflow. A hub stopped between a batch's
``log_batch`` and the commit of its cursor (or a request that failed after the server took
it) would log that batch again; so an exporter compares every batch it logs to a run it did
not create itself, and every batch after a failed one, with the run's metric history first and
logs only the points that are missing (a point is its key, step, timestamp and value, all
derived from the database). Nothing is logged twice.

*Outages.* Before talking to an ``http(s)`` server, the exporter checks that its port
accepts a connection (skipped behind a proxy), so a server that is down costs a refused
connection, not MLflow's own minutes of retries (``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` still
governs a server that answers with errors). One warning per outage, then silent retries with
a back-off up to :data:`MAX_BACKOFF_S`, and one line when it is back; the export then
catches up. A problem of one experiment (its MLflow experiment deleted, a request refused
with 4xx) holds only that experiment, warned once, retried every :data:`HOLD_S`.

*No global MLflow state.* ``MlflowClient(tracking_uri=...)`` only, never
``mlflow.set_tracking_uri``. The one change to the process is that MLflow's usage telemetry
is off unless ``MLFLOW_DISABLE_TELEMETRY`` is set explicitly: a hub talks only to the
servers it is given.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import urllib.request
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from sqlalchemy import and_, or_, select
from sqlalchemy.exc import SQLAlchemyError

from laulima.core.protocol import ExperimentStatus
from laulima.errors import ConfigurationError
from laulima.hub.db import Experiment, MlflowExport, SessionFactory
from laulima.hub.leases import Leases
from laulima.hub.mlflow.records import (
    MAX_KEY_CHARS,
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_CHARS,
    MAX_PARAMS_PER_BATCH,
    MAX_TAG_CHARS,
    Plan,
    Point,
    batches,
    flatten_spec,
    metric_key,
    ms,
    read_plan,
)
from laulima.hub.mlflow.uri import ENV, credentials_in, public_uri, tracking_target

if TYPE_CHECKING:
    from laulima.hub.settings import HubSettings

__all__ = ["EXTRA_HINT", "MlflowExporter", "open_mlflow_export"]

log = logging.getLogger(__name__)

EXTRA_HINT = "pip install 'laulima[mlflow]'"
POLL_S = 2.0
"""How often the exporter looks at the database (and so the most a finished round waits)."""
MAX_BACKOFF_S = 60.0
"""Longest wait between two attempts while the tracking server is unreachable."""
HOLD_S = 600.0
"""How long an experiment whose export MLflow refused waits before it is tried again."""
PROBE_TIMEOUT_S = 3.0

FINAL_STATUS = {
    ExperimentStatus.COMPLETED: "FINISHED",
    ExperimentStatus.FAILED: "FAILED",
    ExperimentStatus.CANCELLED: "KILLED",
}


def open_mlflow_export(settings: HubSettings) -> MlflowExporter | None:
    """The exporter for ``settings`` (None when MLflow export is off), its client built: a URI
    MLflow cannot use, or MLflow missing, stops the hub's start here with the reason."""
    if settings.mlflow_tracking_uri is None:
        return None
    exporter = MlflowExporter(settings.mlflow_tracking_uri, hub_url=settings.url)
    exporter.open()
    return exporter


class _ExperimentProblem(Exception):
    """Something about one experiment that retrying at once will not fix."""


class MlflowExporter:
    """Mirrors the hub's experiments into one MLflow tracking server, from a daemon thread.

    ``open()`` imports MLflow and builds the client (the start-up check), ``start(sessions)``
    runs :meth:`run_once` every ``interval_s`` seconds until ``stop()``. ``run_once`` may also
    be called directly (tests, a one-off catch-up)."""

    def __init__(
        self,
        tracking_uri: str,
        *,
        hub_url: str = "",
        interval_s: float | None = None,
        max_backoff_s: float = MAX_BACKOFF_S,
        hold_s: float = HOLD_S,
    ) -> None:
        self.uri = tracking_uri
        self.shown = public_uri(tracking_uri)
        self.target = tracking_target(tracking_uri)
        self.hub_url = hub_url
        self.interval_s = POLL_S if interval_s is None else interval_s
        self.max_backoff_s = max_backoff_s
        self.hold_s = hold_s
        self.sessions: SessionFactory | None = None
        self.leases: Leases | None = None
        self._client: Any = None
        self._entities: Any = None
        self._secrets = credentials_in(tracking_uri)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._verified: set[int] = set()
        """Experiments whose run this exporter knows to hold exactly what the cursor says (it
        created the run, or compared a batch with the run's history since its last failure)."""
        self._held: dict[int, tuple[float, str]] = {}
        self._notes: set[tuple[int, str]] = set()
        self._mlflow_experiments: dict[str, str] = {}
        self._down_since: float | None = None
        self._retry_at = 0.0
        self._backoff = self.interval_s
        self._reached = False

    # -- lifecycle --------------------------------------------------------------------
    def open(self) -> None:
        """Import MLflow and build the client; ConfigurationError (naming the setting) if
        MLflow is missing or refuses the URI. Contacts no server."""
        if self._client is not None:
            return
        # A hub talks only to the servers it is given: MLflow's usage telemetry stays off
        # unless the operator asked for it explicitly (MLflow reads this variable when imported).
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        try:
            from mlflow.entities import Metric as MlflowMetric
            from mlflow.entities import Param, RunTag
            from mlflow.tracking import MlflowClient
        except ImportError as exc:
            raise ConfigurationError(
                f"{ENV} is set, but MLflow is not installed ({exc.name or exc}): {EXTRA_HINT}, or unset {ENV}",
                field="mlflow_tracking_uri",
            ) from None
        try:
            client = MlflowClient(tracking_uri=self.uri)
        except Exception as exc:
            hint = ""
            if isinstance(exc, ImportError):
                hint = (
                    "; mlflow-skinny (the 'mlflow' extra) serves http(s):// and file: URIs, a database URI "
                    "needs the full `mlflow` package"
                )
            raise ConfigurationError(
                f"{ENV} = {self.shown!r}: MLflow cannot use it: {self._scrub(f'{type(exc).__name__}: {exc}')}{hint}",
                field="mlflow_tracking_uri",
            ) from None
        self._client = client
        self._entities = (MlflowMetric, Param, RunTag)
        log.info("experiments are mirrored into MLflow at %s", self.shown)

    def start(self, sessions: SessionFactory, leases: Leases | None = None) -> None:
        """Export from a thread of its own. ``leases``: with several hub processes, only the
        process holding this tracking server's lease exports (another takes over when it stops;
        the run's history is compared before anything is logged again, as after a restart)."""
        self.open()
        self.sessions = sessions
        self.leases = leases
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="laulima-mlflow-export", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the request in flight (a daemon thread: a server that hangs does not
        hold the hub's exit past ``timeout``)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("MLflow export still waiting for %s after %g s; leaving it behind", self.shown, timeout)
            self._thread = None

    def _run(self) -> None:
        lease = f"mlflow:{self.target[:32]}"
        while not self._stop.is_set():
            try:
                if self.leases is not None and lease not in self.leases.claim([lease]):
                    self._verified.clear()  # another process exports meanwhile: compare before logging again
                else:
                    self.run_once()
            except Exception:  # the hub's database, not MLflow: try again next time
                log.exception("MLflow export: reading the hub's database failed; retrying in %g s", self.interval_s)
            self._stop.wait(self.interval_s)

    # -- one pass ---------------------------------------------------------------------
    def run_once(self) -> None:
        """Export whatever the database holds beyond the cursors, unless backing off."""
        if self.sessions is None:
            raise RuntimeError("MlflowExporter.run_once before start(sessions)")
        now = time.monotonic()
        if now < self._retry_at:
            return
        self._reached = False
        try:
            for experiment_id in self._pending():
                if self._stop.is_set():
                    return
                held = self._held.get(experiment_id)
                if held is not None and held[0] > now:
                    continue
                try:
                    self._export(experiment_id)
                except SQLAlchemyError:
                    raise
                except Exception as exc:
                    self._verified.discard(experiment_id)
                    if not _experiment_problem(exc):
                        raise
                    self._hold(experiment_id, exc)
                else:
                    if self._held.pop(experiment_id, None) is not None:
                        log.info("MLflow export of experiment %s resumed", experiment_id)
        except SQLAlchemyError:
            raise
        except Exception as exc:
            self._outage(exc)
            return
        if self._reached and self._down_since is not None:
            log.info(
                "MLflow at %s answers again after %.0f s; catching up", self.shown, time.monotonic() - self._down_since
            )
            self._down_since = None
            self._backoff = self.interval_s

    def _pending(self) -> list[int]:
        """Experiments whose run is not ended yet, by id."""
        assert self.sessions is not None
        with self.sessions() as s:
            return list(
                s.scalars(
                    select(Experiment.id)
                    .outerjoin(
                        MlflowExport,
                        and_(MlflowExport.experiment_id == Experiment.id, MlflowExport.target == self.target),
                    )
                    .where(or_(MlflowExport.finished.is_(None), MlflowExport.finished.is_(False)))
                    .order_by(Experiment.id)
                )
            )

    def _export(self, experiment_id: int) -> None:
        plan = self._plan(experiment_id)
        if plan is None:
            return
        cursor = plan.cursor
        run_id = cursor.run_id
        if run_id is None:
            run_id = self._ensure_run(plan)
            self._save(experiment_id, run_id=run_id)
        if not cursor.params_done:
            self._log_params(plan, run_id)
            self._save(experiment_id, params_done=True)
        for rounds in batches(plan.rounds):
            points = [p for _, round_points in rounds for p in round_points]
            if experiment_id not in self._verified:
                points = self._missing(run_id, points)
            for start in range(0, len(points), MAX_METRICS_PER_BATCH):
                self._log_batch(run_id, metrics=points[start : start + MAX_METRICS_PER_BATCH])
            self._save(experiment_id, rounds_done=rounds[-1][0])
        self._verified.add(experiment_id)
        status = FINAL_STATUS.get(plan.status)
        if status is not None and plan.all_final:
            self._end(plan, run_id, status)
            self._save(experiment_id, finished=True)

    # -- the database side ------------------------------------------------------------
    def _plan(self, experiment_id: int) -> Plan | None:
        assert self.sessions is not None
        with self.sessions() as s:
            return read_plan(s, experiment_id, target=self.target, hub_url=self.hub_url, note=self._note)

    def _save(self, experiment_id: int, **values: Any) -> None:
        """Advance the cursor, in its own transaction."""
        assert self.sessions is not None
        with self.sessions.begin() as s:
            row = s.get(MlflowExport, (experiment_id, self.target))
            if row is None:
                row = MlflowExport(
                    experiment_id=experiment_id,
                    target=self.target,
                    run_id=None,
                    params_done=False,
                    rounds_done=0,
                    finished=False,
                )
                s.add(row)
            for name, value in values.items():
                setattr(row, name, value)

    # -- the MLflow side --------------------------------------------------------------
    @property
    def client(self) -> Any:
        """The MLflow client, once per pass after checking that an http(s) server is there."""
        if not self._reached:
            self._probe()
            self._reached = True
        return self._client

    def _probe(self) -> None:
        parts = urlsplit(self.uri)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            return
        proxy = urllib.request.getproxies().get(scheme)
        if proxy and not urllib.request.proxy_bypass(parts.hostname):
            return  # reached through a proxy: only MLflow's own request can tell
        port = parts.port or (443 if scheme == "https" else 80)
        try:
            socket.create_connection((parts.hostname, port), timeout=PROBE_TIMEOUT_S).close()
        except OSError as exc:
            raise ConnectionError(f"cannot connect to {parts.hostname}:{port}: {exc.strerror or exc}") from None

    def _ensure_run(self, plan: Plan) -> str:
        """The experiment's run: found again by its ``laulima.run_key`` tag, or created."""
        name = f"laulima/{plan.name}"
        mlflow_id = self._mlflow_experiment(name)
        key = plan.tags["laulima.run_key"]
        found = self.client.search_runs([mlflow_id], filter_string=f"tags.`laulima.run_key` = '{key}'", max_results=1)
        if found:
            return str(found[0].info.run_id)
        run = self.client.create_run(
            mlflow_id,
            start_time=ms(plan.created_at),
            tags={k: v[:MAX_TAG_CHARS] for k, v in plan.tags.items()},
            run_name=f"{plan.name} #{plan.experiment_id}",
        )
        self._verified.add(plan.experiment_id)  # a new run holds nothing yet
        return str(run.info.run_id)

    def _mlflow_experiment(self, name: str) -> str:
        if name in self._mlflow_experiments:
            return self._mlflow_experiments[name]
        found = self.client.get_experiment_by_name(name)
        if found is None:
            try:
                self._mlflow_experiments[name] = str(self.client.create_experiment(name))
                return self._mlflow_experiments[name]
            except Exception as exc:  # created meanwhile by another hub on the same server?
                if getattr(exc, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
                    raise
                found = self.client.get_experiment_by_name(name)
                if found is None:
                    raise
        if found.lifecycle_stage != "active":
            raise _ExperimentProblem(
                f"the MLflow experiment {name!r} is deleted; restore it (`mlflow experiments restore`) or "
                "remove it for good (`mlflow gc`) for the hub to log there"
            )
        self._mlflow_experiments[name] = str(found.experiment_id)
        return self._mlflow_experiments[name]

    def _log_params(self, plan: Plan, run_id: str) -> None:
        _, Param, _ = self._entities
        params = []
        seen: set[str] = set()
        for raw_key, value in flatten_spec(plan.spec):
            key = metric_key(raw_key)
            if key is None:
                self._note(plan.experiment_id, f"parameter {raw_key[:80]}... skipped: key over {MAX_KEY_CHARS} chars")
                continue
            if key in seen:  # two keys that differ only in characters MLflow refuses
                self._note(plan.experiment_id, f"parameter {raw_key} skipped: it would be logged as {key} again")
                continue
            seen.add(key)
            if len(value) > MAX_PARAM_CHARS:
                self._note(plan.experiment_id, f"parameter {key} cut to {MAX_PARAM_CHARS} characters")
                value = value[: MAX_PARAM_CHARS - 3] + "..."
            params.append(Param(key, value))
        for start in range(0, len(params), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(run_id, params=params[start : start + MAX_PARAMS_PER_BATCH], synchronous=True)

    def _log_batch(self, run_id: str, *, metrics: Sequence[Point]) -> None:
        if not metrics:
            return
        MlflowMetric, _, _ = self._entities
        self.client.log_batch(
            run_id,
            metrics=[MlflowMetric(p.key, p.value, p.timestamp, p.step) for p in metrics],
            synchronous=True,
        )

    def _missing(self, run_id: str, points: Sequence[Point]) -> list[Point]:
        """``points`` less those the run already has (after a crash or a failed request)."""
        have: dict[str, set[tuple[int, int, float]]] = {}
        for key in sorted({p.key for p in points}):
            have[key] = {(m.step, m.timestamp, m.value) for m in self.client.get_metric_history(run_id, key)}
        return [p for p in points if (p.step, p.timestamp, p.value) not in have[p.key]]

    def _end(self, plan: Plan, run_id: str, status: str) -> None:
        _, _, RunTag = self._entities
        tags = [RunTag("laulima.status", str(plan.status))]
        if plan.error:
            tags.append(RunTag("laulima.error", plan.error[:MAX_TAG_CHARS]))
        self.client.log_batch(run_id, tags=tags, synchronous=True)
        end = plan.finished_at if plan.finished_at is not None else time.time()
        self.client.set_terminated(run_id, status, end_time=ms(end))

    # -- trouble ----------------------------------------------------------------------
    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _describe(self, exc: BaseException) -> str:
        text = self._scrub(f"{type(exc).__name__}: {exc}")
        return text if len(text) <= 500 else text[:497] + "..."

    def _outage(self, exc: BaseException) -> None:
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = now
            self._backoff = self.interval_s
            log.warning(
                "MLflow export to %s paused: %s; the hub carries on, and the export catches up once the "
                "server answers (retrying with back-off up to %g s)",
                self.shown,
                self._describe(exc),
                self.max_backoff_s,
            )
        else:
            self._backoff = min(self._backoff * 2, self.max_backoff_s)
            log.debug("MLflow at %s still unreachable: %s", self.shown, self._describe(exc))
        self._retry_at = now + self._backoff

    def _hold(self, experiment_id: int, exc: BaseException) -> None:
        reason = self._describe(exc)
        previous = self._held.get(experiment_id)
        if previous is None or previous[1] != reason:
            log.warning("MLflow export of experiment %s held (retried in %g s): %s", experiment_id, self.hold_s, reason)
        self._held[experiment_id] = (time.monotonic() + self.hold_s, reason)

    def _note(self, experiment_id: int, note: str) -> None:
        if (experiment_id, note) not in self._notes:
            self._notes.add((experiment_id, note))
            log.info("MLflow export of experiment %s: %s", experiment_id, note)


def _experiment_problem(exc: BaseException) -> bool:
    """A refusal about this experiment (4xx but authentication, timeouts and rate limits),
    not an outage of the server."""
    if isinstance(exc, _ExperimentProblem):
        return True
    status_of = getattr(exc, "get_http_status_code", None)
    if status_of is None:
        return False
    try:
        status = int(status_of())
    except Exception:
        return False
    return 400 <= status < 500 and status not in (401, 403, 408, 429)
