"""Whether an experiment's live region changed, without drawing it.

An open experiment page asks every 2 s; drawing the region to compare it costs as much as
sending it (a second for 500 rounds x 20 sites). What the region shows is a function of the
experiment's public record, its rounds, its metric records, its tasks' states and its
refusals, so a digest of those (counts and newest ids for the append-only tables) is its
version: equal digests, equal regions, and the hub answers 304 after a few small queries.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

from sqlalchemy import func, select

from laulima import __version__
from laulima.core.protocol import ExperimentPublic, RoundPublic
from laulima.hub.api.deps import HubContext
from laulima.hub.db import Metric, Refusal, Task
from laulima.web import ASSETS_VERSION

__all__ = ["experiment_version"]


def experiment_version(hub: HubContext, experiment: ExperimentPublic, rounds: Sequence[RoundPublic]) -> str:
    """A digest that changes whenever anything the experiment's live region shows changes,
    given the experiment and its rounds as the reader may see them (read by the caller, who
    has checked that they may)."""
    experiment_id = experiment.id
    with hub.sessions() as s:
        metrics = s.execute(
            select(func.count(Metric.id), func.max(Metric.id)).where(Metric.experiment_id == experiment_id)
        ).one()
        tasks = s.execute(
            select(Task.status, func.count(Task.id)).where(Task.experiment_id == experiment_id).group_by(Task.status)
        ).all()
        refusals = s.execute(
            select(func.count(Refusal.id), func.max(Refusal.id)).where(
                Refusal.task_id.in_(select(Task.id).where(Task.experiment_id == experiment_id))
            )
        ).one()
    state = [
        __version__,
        ASSETS_VERSION,
        experiment.model_dump(mode="json"),
        [r.model_dump(mode="json") for r in rounds],
        list(metrics),
        sorted([str(status), n] for status, n in tasks),
        list(refusals),
    ]
    return hashlib.sha256(json.dumps(state, sort_keys=True, default=str).encode()).hexdigest()[:32]
