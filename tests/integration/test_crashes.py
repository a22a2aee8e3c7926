"""Kill -9 the hub or a site in the middle of a round: nothing is lost or counted twice.

The algorithm (``SiteLedger``) makes every site's contribution visible in the model itself:
each round's global model is checked against the FedAvg of exactly the updates the hub
says it accepted, so a lost update, one counted twice or a round folded twice fails here.
"""

from __future__ import annotations

import pytest

from tests.helpers.algorithms import LEDGER_SITES
from tests.helpers.federation import assert_completed, logs, wait_for
from tests.helpers.ledger import assert_every_update_counted_once, ledger_spec, train_records

pytestmark = pytest.mark.slow


def test_hub_killed_mid_round_resumes_from_its_checkpoint(federation):
    fed = federation(3)
    exp = fed.submit(ledger_spec(rounds=4))
    # Mid-round 2: at least one update of round 2 stored, the round not yet aggregated.
    wait_for(lambda: len(train_records(fed, exp.id, 2)) >= 1, 60, "a first update of round 2")
    assert fed.client.experiment(exp.id).rounds_done == 1
    fed.hub.kill()
    fed.hub.start()
    fed.hub.wait_ready()

    exp = fed.wait(exp.id, timeout=120)
    assert_completed(exp, fed)
    assert [r.n_updates for r in fed.client.rounds(exp.id)] == [3, 3, 3, 3], logs(fed)
    participants = assert_every_update_counted_once(fed, exp.id)
    assert participants == [sorted(LEDGER_SITES)] * 4


def test_site_killed_mid_round_round_closes_on_quorum_and_site_rejoins(federation):
    fed = federation(3)
    exp = fed.submit(ledger_spec(rounds=3, round_timeout_s=8, config={"sleep_s": 1.0}))
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
    participants = assert_every_update_counted_once(fed, exp.id)
    assert participants[1] == ["site-a", "site-b"], participants
