"""Experiments belong to who submitted them: alice, bob and an operator on one real hub.

A person who may not read an experiment gets the very 404 of an id that does not exist;
sharing grants reading (not cancelling or re-sharing); unsharing takes it back. Blobs: a
person reads what they uploaded and the models of experiments they may read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from laulima.core.weights import to_safetensors

from .conftest import Hub, make_weights, spec

READS = ["", "/rounds", "/metrics", "/refusals", "/model"]
UNKNOWN_ID = 10**9


@dataclass
class People:
    hub: Hub
    alice: dict[str, str]
    bob: dict[str, str]
    carol: dict[str, str]
    olga: dict[str, str]
    """An operator who is not the bootstrap 'admin'."""

    def upload(self, who: dict[str, str], data: bytes) -> str:
        r = self.hub.client.put(self.hub.url("/blobs"), content=data, headers=who)
        assert r.status_code == 201, r.text
        return str(r.json()["digest"])

    def submit(self, who: dict[str, str], seed: int = 0, **changes: Any) -> dict[str, Any]:
        digest = self.upload(who, to_safetensors(make_weights(seed)))
        return self.submit_from(who, digest, **changes)

    def submit_from(self, who: dict[str, str], digest: str, **changes: Any) -> dict[str, Any]:
        body = {"spec": spec(sites=["site-a"], **changes), "initial_weights": digest}
        r = self.hub.client.post(self.hub.url("/experiments"), json=body, headers=who)
        assert r.status_code == 201, r.text
        return dict(r.json())

    def get(self, who: dict[str, str], path: str) -> Any:
        return self.hub.client.get(self.hub.url(path), headers=who)

    def post(self, who: dict[str, str], path: str, **kwargs: Any) -> Any:
        return self.hub.client.post(self.hub.url(path), headers=who, **kwargs)

    def share(self, who: dict[str, str], exp_id: int, name: str) -> Any:
        return self.post(who, f"/experiments/{exp_id}/shares", json={"name": name})

    def unshare(self, who: dict[str, str], exp_id: int, name: str) -> Any:
        return self.hub.client.delete(self.hub.url(f"/experiments/{exp_id}/shares/{name}"), headers=who)

    def listed(self, who: dict[str, str]) -> list[int]:
        r = self.get(who, "/experiments")
        assert r.status_code == 200, r.text
        return [e["id"] for e in r.json()]


@pytest.fixture()
def people(hub: Hub) -> People:
    return People(hub, hub.person("alice"), hub.person("bob"), hub.person("carol"), hub.person("olga", "operator"))


def _hidden(response: Any, exp_id: int) -> None:
    """Exactly what an id that does not exist gets: nothing says the experiment is there."""
    assert response.status_code == 404, response.text
    assert response.json() == {
        "error": "not_found",
        "detail": f"no experiment with id {exp_id}",
        "context": {"experiment": exp_id},
    }


def test_an_experiment_belongs_to_its_submitter_and_is_hidden_from_other_scientists(people: People):
    exp = people.submit(people.alice)
    eid = exp["id"]
    assert exp["owner"] == "alice" and exp["shared_with"] == []
    bobs = people.submit(people.bob, seed=1)
    assert bobs["owner"] == "bob"

    for path in READS:
        assert people.get(people.alice, f"/experiments/{eid}{path}").status_code == 200, path
        _hidden(people.get(people.bob, f"/experiments/{eid}{path}"), eid)
        _hidden(people.get(people.bob, f"/experiments/{UNKNOWN_ID}{path}"), UNKNOWN_ID)
        for operator in (people.olga, people.hub.admin):
            assert people.get(operator, f"/experiments/{eid}{path}").status_code == 200, path
    assert people.listed(people.alice) == [eid]
    assert people.listed(people.bob) == [bobs["id"]]
    assert people.listed(people.olga) == people.listed(people.hub.admin) == [eid, bobs["id"]]

    _hidden(people.post(people.bob, f"/experiments/{eid}/cancel"), eid)
    _hidden(people.share(people.bob, eid, "bob"), eid)
    assert people.get(people.alice, f"/experiments/{eid}").json()["status"] == "running"
    cancelled = people.post(people.alice, f"/experiments/{eid}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    r = people.post(people.olga, f"/experiments/{bobs['id']}/cancel")  # operators act on all
    assert r.status_code == 200 and r.json()["owner"] == "bob"


def test_sharing_grants_reading_but_not_cancelling_and_unsharing_revokes_it(people: People):
    eid = people.submit(people.alice)["id"]
    shared = people.share(people.alice, eid, "bob")
    assert shared.status_code == 200, shared.text
    assert shared.json()["shared_with"] == ["bob"]
    assert people.share(people.alice, eid, "bob").json()["shared_with"] == ["bob"]  # twice: no error

    assert people.listed(people.bob) == [eid]
    for path in READS:
        assert people.get(people.bob, f"/experiments/{eid}{path}").status_code == 200, path
    _hidden(people.get(people.carol, f"/experiments/{eid}"), eid)

    r = people.post(people.bob, f"/experiments/{eid}/cancel")
    assert r.status_code == 403 and "belongs to 'alice'" in r.json()["detail"]
    assert "only its owner or an operator may cancel" in r.json()["detail"]
    r = people.share(people.bob, eid, "carol")
    assert r.status_code == 403 and "may share" in r.json()["detail"]
    assert people.unshare(people.bob, eid, "bob").status_code == 403

    assert people.share(people.olga, eid, "carol").status_code == 200  # an operator may share anything
    assert people.get(people.carol, f"/experiments/{eid}").json()["shared_with"] == ["bob", "carol"]

    r = people.unshare(people.alice, eid, "bob")
    assert r.status_code == 200 and r.json()["shared_with"] == ["carol"]
    assert people.listed(people.bob) == []
    for path in READS:
        _hidden(people.get(people.bob, f"/experiments/{eid}{path}"), eid)
    r = people.unshare(people.alice, eid, "bob")
    assert r.status_code == 404 and "is not shared with 'bob'" in r.json()["detail"]
    assert people.post(people.alice, f"/experiments/{eid}/cancel").status_code == 200


def test_sharing_refuses_unknown_people_and_the_owner(people: People, hub: Hub):
    eid = people.submit(people.alice)["id"]
    r = people.share(people.alice, eid, "bobb")
    assert r.status_code == 422 and r.json()["error"] == "invalid_share"
    assert "no person named 'bobb'" in r.json()["detail"] and "laulima token list" in r.json()["detail"]
    r = people.share(people.alice, eid, "alice")
    assert r.status_code == 422 and "owns experiment" in r.json()["detail"]
    assert people.share(people.alice, eid, "not a name").status_code == 422
    assert people.unshare(people.alice, eid, "-bob").status_code == 422
    revoked = [t for t in hub.get("/tokens") if t["name"] == "carol"][0]
    assert hub.client.post(hub.url(f"/tokens/{revoked['id']}/revoke"), headers=hub.admin).status_code == 200
    r = people.share(people.alice, eid, "carol")
    assert r.status_code == 422 and "no person named 'carol'" in r.json()["detail"]
    assert people.get(people.alice, f"/experiments/{eid}").json()["shared_with"] == []


def test_a_person_reads_only_their_uploads_and_the_models_of_experiments_they_may_read(people: People):
    hub = people.hub
    exp = people.submit(people.alice)
    initial = exp["global_digest"]
    mine = people.upload(people.alice, b"alice's notes, not weights")
    nowhere = "3" * 64

    def read(who: dict[str, str], digest: str) -> Any:
        return hub.client.get(hub.url(f"/blobs/{digest}"), headers=who)

    assert read(people.alice, mine).status_code == 200
    assert read(people.alice, initial).status_code == 200
    for digest in (mine, initial, nowhere):  # all alike: existing or not, nothing is revealed
        r = read(people.bob, digest)
        assert r.status_code == 404 and r.json()["detail"].startswith(f"no blob {digest} that you may read")
    assert read(people.olga, mine).status_code == 200

    assert people.share(people.alice, exp["id"], "bob").status_code == 200
    assert read(people.bob, initial).status_code == 200  # a shared experiment's model
    assert read(people.bob, mine).status_code == 404  # but not alice's other uploads
    people.upload(people.bob, b"alice's notes, not weights")  # the same bytes, uploaded by bob himself
    assert read(people.bob, mine).status_code == 200


def test_an_experiment_starts_only_from_weights_the_submitter_may_read(people: People):
    hub = people.hub
    weights = to_safetensors(make_weights(5))
    alices = people.upload(people.alice, weights)

    def submit(who: dict[str, str], digest: str) -> Any:
        body = {"spec": spec(sites=["site-a"]), "initial_weights": digest}
        return hub.client.post(hub.url("/experiments"), json=body, headers=who)

    for digest in (alices, "4" * 64):  # someone else's upload reads like one that does not exist
        r = submit(people.bob, digest)
        assert r.status_code == 422 and r.json()["context"]["field"] == "initial_weights"
        assert f"no blob {digest} on this hub that you uploaded or may read" in r.json()["detail"]
    exp = people.submit_from(people.alice, alices)
    assert submit(people.bob, alices).status_code == 422
    assert people.share(people.alice, exp["id"], "bob").status_code == 200
    assert submit(people.bob, alices).json()["owner"] == "bob"  # the model of a shared experiment
    assert submit(people.olga, alices).json()["owner"] == "olga"  # an operator may use any blob


def test_experiments_from_before_ownership_belong_to_the_bootstrap_operator(people: People):
    from laulima.hub.db import Experiment

    eid = people.submit(people.alice)["id"]
    sessions = people.hub.client.app.state.hub.sessions  # type: ignore[attr-defined]
    with sessions.begin() as s:  # what a row of an older hub looks like after the column is added
        s.get(Experiment, eid).owner = None
    assert people.get(people.hub.admin, f"/experiments/{eid}").json()["owner"] == "admin"
    assert people.listed(people.hub.admin) == [eid]
    _hidden(people.get(people.alice, f"/experiments/{eid}"), eid)
    assert people.listed(people.alice) == []
