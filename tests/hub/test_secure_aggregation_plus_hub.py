"""SecAgg+ through the hub's routes: eight sites, each masking with and sharing among only its
two ring neighbours (``[secure_aggregation] neighbours = 2``); the hub checks outboxes and
answers against the same graph and must still return the plain weighted average."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from laulima.core.privacy.graph import communication_graph
from laulima.core.privacy.secagg import Advertised, RoundContext, SecAggClient
from laulima.core.weights import Weights

from .conftest import Hub, make_weights, spec
from .test_secure_aggregation_hub import CLIP, Player, assert_weighted_average

SITES = [f"site-{c}" for c in "abcdefgh"]
WEIGHTS = {site: 5 + 3 * i for i, site in enumerate(SITES)}


class SparsePlayer(Player):
    """A Player whose client knows the round's graph degree, as the site driver does."""

    def __init__(self, hub: Hub, name: str) -> None:
        super().__init__(hub, name)
        config = self.task.secure_aggregation
        assert config is not None and config.neighbours == 2, config
        self.context = RoundContext(self.task.experiment_id, self.task.round, config.threshold, config.neighbours)
        self.secagg = SecAggClient(name, self.context)


def _spec(**overrides: Any) -> dict[str, Any]:
    return spec(
        sites=SITES,
        min_sites=2,
        max_samples_per_site=50,
        secure_aggregation={"clip": CLIP, "phase_timeout_s": 2.0, "neighbours": 2},
        **overrides,
    )


def _models(given: Weights) -> dict[str, Weights]:
    return {
        site: {k: (v + make_weights(i + 10)[k] * 0.1).astype(v.dtype) for k, v in given.items()}
        for i, site in enumerate(SITES)
    }


def _start(hub: Hub) -> tuple[dict[str, Any], Weights, dict[str, SparsePlayer]]:
    hub.register(*SITES)
    given = make_weights(0)
    exp = hub.submit(_spec(), given)
    players = {site: SparsePlayer(hub, site) for site in SITES}
    for p in players.values():
        p.advertise()
    return exp, given, players


@pytest.mark.parametrize("dropout", [None, "site-c"])
def test_a_sparse_round_returns_the_weighted_average(make_hub, dropout):
    hub: Hub = make_hub()
    exp, given, players = _start(hub)
    for p in players.values():
        p.share()
        assert len(p.secagg.neighbourhood) == 3, "two neighbours and itself"
    for p in players.values():
        p.receive()
        assert p.secagg.senders == p.secagg.neighbourhood
    models = _models(given)
    alive = [s for s in SITES if s != dropout]
    for site in alive:
        r = players[site].upload(models[site], given, WEIGHTS[site])
        assert r.status_code == 200, r.text
    if dropout:
        hub.clock.advance(61)  # the masking phase waits for a missing update until the round's deadline
    for site in alive:
        players[site].unmask()
    sent = {s: (models[s], WEIGHTS[s]) for s in alive}
    assert_weighted_average(hub, exp["id"], players["site-a"].task, given, sent)


def test_shares_and_answers_outside_the_neighbourhood_are_refused(make_hub):
    hub: Hub = make_hub()
    exp, given, players = _start(hub)
    a = players["site-a"]
    r = a.get("roster")
    assert r.status_code == 200, r.text
    roster = [
        Advertised(site, base64.b64decode(ad["encryption_key"]), base64.b64decode(ad["masking_key"]))
        for site, ad in r.json()["sites"].items()
    ]
    graph = communication_graph(SITES, a.context)
    assert all(len(n) == 2 for n in graph.values())
    outbox = {k: base64.b64encode(v).decode() for k, v in a.secagg.share(roster).items()}
    assert set(outbox) == graph["site-a"] | {"site-a"}
    stranger = next(s for s in SITES if s not in outbox)
    neighbour = sorted(graph["site-a"])[0]
    wrong = {**{k: v for k, v in outbox.items() if k != neighbour}, stranger: outbox[neighbour]}
    r = a.post("shares", {"ciphertexts": wrong})
    assert r.status_code == 422, r.text
    assert "exactly the site's neighbourhood" in r.json()["detail"] and stranger in r.json()["detail"], r.text
    everyone = {site: outbox["site-a"] for site in SITES}
    r = a.post("shares", {"ciphertexts": everyone})
    assert r.status_code == 422 and "neighbourhood" in r.json()["detail"], r.text
    r = a.post("shares", {"ciphertexts": outbox})
    assert r.status_code == 204, r.text
    for p in players.values():
        if p is not a:
            p.share()
    for p in players.values():
        p.receive()
    models = _models(given)
    for site, p in players.items():
        assert p.upload(models[site], given, WEIGHTS[site]).status_code == 200
    # an answer with shares for every survivor, not only for its neighbourhood: refused
    r = a.get("unmasking")
    assert r.status_code == 200, r.text
    answer = a.secagg.reveal(r.json()["survivors"], r.json()["dropped"])
    share = base64.b64encode(answer["self_mask"]["site-a"]).decode()
    r = a.post("unmasking", {"self_mask": {site: share for site in SITES}, "masking_key": {}})
    assert r.status_code == 422 and "in the site's neighbourhood" in r.json()["detail"], r.text
    for p in players.values():
        p.unmask()
    hub.wait_status(exp["id"], "completed")
