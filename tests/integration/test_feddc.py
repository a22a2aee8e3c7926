"""FedDC over real processes: round 2's tasks start from other sites' round-1 models."""

from __future__ import annotations

import sqlite3

import pytest

from laulima.core.spec import parse_spec
from laulima.core.strategies import FedDC
from tests.helpers.federation import assert_completed, logs

pytestmark = pytest.mark.slow


def test_feddc_hands_models_between_sites_and_ends_on_the_aggregate(federation):
    fed = federation(3, "tabular-demo", seed=5)
    spec = parse_spec(
        {
            "name": "daisy",
            "algorithm": "laulima.algorithms.tabular:LogisticRegression",
            "dataset": "tabular-demo",
            "rounds": 3,
            "min_sites": 3,
            "round_timeout_s": 60,
            "seed": 5,
            "evaluation": {"every": 0, "final": True},
            "strategy": {"name": "feddc", "daisy_period": 1, "aggregation_period": 2},
            "config": {"lr": 0.1},
        }
    )
    exp = fed.wait(fed.submit(spec).id, timeout=120)
    assert_completed(exp, fed)
    rounds = fed.client.rounds(exp.id)
    assert [(r.index, r.status, r.n_updates) for r in rounds] == [(i, "aggregated", 3) for i in (1, 2, 3)], logs(fed)
    assert exp.global_digest == rounds[-1].global_digest, "the final model is the last round's aggregate"

    sites = sorted(fed.sites)
    plan = FedDC(daisy_period=1, aggregation_period=2, seed=5).handoff(1, sites)
    assert plan is not None
    with sqlite3.connect(f"file:{fed.workdir / 'hub' / 'hub.db'}?mode=ro", uri=True) as db:
        handoffs = {
            site: (sender, digest)
            for site, sender, digest in db.execute(
                "SELECT site, sender, digest FROM round_handoffs WHERE experiment_id = ? AND round = 1", (exp.id,)
            )
        }
        tasks = dict(
            db.execute(
                "SELECT s.name, t.weights_digest FROM tasks t JOIN sites s ON s.id = t.site_id "
                "WHERE t.experiment_id = ? AND t.round = ? AND t.kind = 'train'",
                (exp.id, 2),
            ).fetchall()
        )
        round1_senders = {row[0] for row in db.execute("SELECT site FROM updates WHERE round = 1")}
        later = db.execute("SELECT count(*) FROM round_handoffs WHERE round > 1").fetchone()[0]
    assert {site: sender for site, (sender, _) in handoffs.items()} == plan
    assert all(sender != site and sender in round1_senders for site, (sender, _) in handoffs.items())
    for site in sites:
        assert tasks[site] == handoffs[site][1] != rounds[0].global_digest, f"{site} starts round 2 from {plan[site]}"
    assert later == 0, "round 2 aggregates and round 3 is the last: nothing is handed on after them"
