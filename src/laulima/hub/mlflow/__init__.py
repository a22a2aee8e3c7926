"""The hub's record mirrored into MLflow: one run per experiment, its parameters and per-round metrics.

With ``LAULIMA_MLFLOW_TRACKING_URI`` set (``HubSettings.mlflow_tracking_uri``), the hub also
copies what its database says about each experiment into that MLflow tracking server. It is
a mirror, never a source: nothing the hub decides reads it back.

*Derived from the database, like the orchestrator.* A daemon thread, started by the app's
lifespan only when the setting is set, looks every ``POLL_S`` seconds at the experiments,
rounds and metric records, compares them with how far the table ``mlflow_exports`` says each
experiment is already in MLflow, and logs the difference. No round waits for it: a slow or
unreachable server delays the mirror, never the federation.

*Where runs go.* One MLflow experiment per Laulima experiment *name*, ``laulima/<name>``, and
one run per submitted experiment in it, named ``<name> #<id>``. Re-submissions of one study
(another seed, strategy or site list) are what MLflow compares side by side as runs of one
experiment; a single MLflow experiment per hub would mix unrelated studies in one table. The
run's tags say where it came from: ``laulima.experiment_id``, ``laulima.owner``,
``laulima.mode``, ``laulima.hub`` (the hub's URL) and ``laulima.algorithm_digest``;
``laulima.run_key`` (id and submission time, unique even across hubs sharing a server) finds
the run again.

The parts: :mod:`.uri` (the setting: validated, shown without credentials),
:mod:`.records` (what is logged, from the database alone) and :mod:`.exporter` (the thread
that talks to MLflow). MLflow itself is imported only by the exporter, and only when the
setting is set.
"""

from __future__ import annotations

from laulima.hub.mlflow.exporter import EXTRA_HINT, MlflowExporter, open_mlflow_export
from laulima.hub.mlflow.records import flatten_spec, metric_key
from laulima.hub.mlflow.uri import ENV, check_tracking_uri, public_uri, tracking_target

__all__ = [
    "ENV",
    "EXTRA_HINT",
    "MlflowExporter",
    "check_tracking_uri",
    "flatten_spec",
    "metric_key",
    "open_mlflow_export",
    "public_uri",
    "tracking_target",
]
