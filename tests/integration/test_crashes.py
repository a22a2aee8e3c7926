"""Kill -9 the hub or a site in the middle of a round: nothing is lost or counted twice."""

from __future__ import annotations

import pytest

from laulima.core.spec import parse_spec
from tests.helpers.federation import assert_completed, logs, wait_for

pytestmark = pytest.mark.slow


def _counter_spec(**overrides):
    spec = {
        "name": "crash",
        "algorithm": "tests.helpers.algorithms:SlowCounter",
        "dataset": "none",
        "rounds": 3,
        "min_sites": 2,
        "round_timeout_s": 30,
        "evaluation": {"every": 0, "final": True},
        "config": {"size": 16, "sleep_s": 0.7},
    }
    spec.update(overrides)
    return parse_spec(spec)


def _train_records(fed, exp_id, round_index):
    return [m for m in fed.client.metrics(exp_id) if m.kind == "train" and m.round == round_index]


def test_hub_killed_mid_round_resumes_from_its_checkpoint(federation):
    fed = federation(3)
    exp = fed.submit(_counter_spec(rounds=4))
    # Mid-round 2: at least one update of round 2 stored, the round not yet aggregated.
    wait_for(lambda: len(_train_records(fed, exp.id, 2)) >= 1, 60, "a first update of round 2")
    assert fed.client.experiment(exp.id).rounds_done == 1
    fed.hub.kill()
    fed.hub.start()
    fed.hub.wait_ready()

    exp = fed.wait(exp.id, timeout=120)
    assert_completed(exp, fed)
    rounds = fed.client.rounds(exp.id)
    assert [r.n_updates for r in rounds] == [3, 3, 3, 3], logs(fed)
    train = [m for m in fed.client.metrics(exp.id) if m.kind == "train"]
    pairs = [(m.round, m.site) for m in train]
    assert len(pairs) == len(set(pairs)) == 12, "an update was counted twice or lost"
    # Every update added exactly 1 to every weight: any loss or double count would show here.
    final = [m for m in fed.client.metrics(exp.id) if m.kind == "evaluate"]
    assert final and all(m.metrics["mean_w"] == pytest.approx(4.0) for m in final)


def test_site_killed_mid_round_round_closes_on_quorum_and_site_rejoins(federation):
    fed = federation(3)
    exp = fed.submit(_counter_spec(rounds=3, round_timeout_s=8, config={"size": 16, "sleep_s": 1.0}))
    wait_for(lambda: fed.client.experiment(exp.id).rounds_done >= 1, 60, "round 1 to finish")
    fed.sites["site-c"].kill()  # round 2 is open; site-c is training or about to
    wait_for(lambda: fed.client.experiment(exp.id).rounds_done >= 2, 60, "round 2 to close at its deadline")
    fed.sites["site-c"].start()

    exp = fed.wait(exp.id, timeout=120)
    assert_completed(exp, fed)
    rounds = fed.client.rounds(exp.id)
    assert rounds[0].n_updates == 3
    assert rounds[1].n_updates == 2, "round 2 should close on quorum without the killed site"
    assert rounds[2].n_updates == 3, f"the restarted site did not rejoin in round 3\n{logs(fed)}"
    assert {m.site for m in _train_records(fed, exp.id, 3)} == {"site-a", "site-b", "site-c"}
