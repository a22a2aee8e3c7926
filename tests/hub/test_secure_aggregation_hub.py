"""Secure aggregation through the hub's routes: sites play the protocol over HTTP against a
real hub app; the hub only ever holds masked vectors and must return the plain average."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import pytest

from laulima.core.privacy.clipping import flatten
from laulima.core.privacy.messages import MASKED_TENSOR
from laulima.core.privacy.quantize import error_bound, quantize, scale_for
from laulima.core.privacy.secagg import Advertised, RoundContext, SecAggClient
from laulima.core.protocol import MetaKey, TaskPublic
from laulima.core.weights import Weights, from_safetensors, to_safetensors

from .conftest import Hub, make_weights, spec

SITES = ["site-a", "site-b", "site-c"]
CLIP = 100.0


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class Player:
    """One site playing secure aggregation by hand, over the hub's HTTP routes."""

    def __init__(self, hub: Hub, name: str) -> None:
        self.hub, self.name = hub, name
        task = hub.next_task(name)
        assert task is not None and task.secure_aggregation is not None, task
        self.task: TaskPublic = task
        config = task.secure_aggregation
        self.secagg = SecAggClient(name, RoundContext(task.experiment_id, task.round, config.threshold))

    def url(self, phase: str) -> str:
        return self.hub.url(f"/tasks/{self.task.id}/secagg/{phase}")

    def post(self, phase: str, body: dict[str, Any]) -> Any:
        return self.hub.client.post(self.url(phase), json=body, headers=self.hub.site(self.name))

    def get(self, phase: str, wait: float = 5.0) -> Any:
        return self.hub.client.get(self.url(phase), params={"wait": wait}, headers=self.hub.site(self.name))

    def advertise(self) -> None:
        ad = self.secagg.advertise()
        r = self.post("keys", {"encryption_key": _b64(ad.encryption_key), "masking_key": _b64(ad.masking_key)})
        assert r.status_code == 204, r.text

    def share(self) -> None:
        r = self.get("roster")
        assert r.status_code == 200, r.text
        roster = [
            Advertised(site, base64.b64decode(a["encryption_key"]), base64.b64decode(a["masking_key"]))
            for site, a in r.json()["sites"].items()
        ]
        outbox = self.secagg.share(roster)
        r = self.post("shares", {"ciphertexts": {k: _b64(v) for k, v in outbox.items()}})
        assert r.status_code == 204, r.text

    def receive(self) -> None:
        r = self.get("shares")
        assert r.status_code == 200, r.text
        self.secagg.receive({k: base64.b64decode(v) for k, v in r.json()["ciphertexts"].items()})

    def upload(self, model: Weights, given: Weights, weight: int) -> Any:
        config = self.task.secure_aggregation
        assert config is not None
        keys = sorted(given)
        step = (flatten(model, keys) - flatten(given, keys)) * weight
        quantized = quantize(step, scale_for(config.bound, config.sites), np.random.default_rng(0))
        masked = self.secagg.mask(quantized).view(np.int32)
        body = to_safetensors({MASKED_TENSOR: masked}, {MetaKey.N_SAMPLES: str(weight), MetaKey.METRICS: "{}"})
        return self.hub.upload(self.name, self.task, body)

    def unmask(self) -> None:
        r = self.get("unmasking")
        assert r.status_code == 200, r.text
        answer = self.secagg.reveal(r.json()["survivors"], r.json()["dropped"])
        body = {kind: {k: _b64(v) for k, v in shares.items()} for kind, shares in answer.items()}
        r = self.post("unmasking", body)
        assert r.status_code == 204, r.text


def secure_spec(phase_timeout_s: float = 2.0, **overrides: Any) -> dict[str, Any]:
    return spec(
        sites=SITES,
        min_sites=2,
        max_samples_per_site=50,
        secure_aggregation={"clip": CLIP, "phase_timeout_s": phase_timeout_s},
        **overrides,
    )


def _models(given: Weights) -> dict[str, Weights]:
    return {
        site: {k: (v + make_weights(i + 10)[k] * 0.1).astype(v.dtype) for k, v in given.items()}
        for i, site in enumerate(SITES)
    }


def ready_to_mask(make_hub: Any, **spec: Any) -> tuple[Hub, dict[str, Any], Weights, dict[str, Player]]:
    """A hub whose three sites have passed round 1's key and share phases: each may now mask."""
    hub: Hub = make_hub()
    hub.register(*SITES)
    given = make_weights(0)
    exp = hub.submit(secure_spec(**spec), given)
    players = {site: Player(hub, site) for site in SITES}
    for step in (Player.advertise, Player.share, Player.receive):
        for p in players.values():
            step(p)
    return hub, exp, given, players


def closed_first_round(hub: Hub, exp: dict[str, Any]) -> dict[str, Any]:
    """Round 1 once it is no longer open."""

    def first_round() -> dict[str, Any] | None:
        rounds = hub.get(f"/experiments/{exp['id']}/rounds")
        return rounds[0] if rounds and rounds[0]["status"] != "open" else None

    return hub.wait_for(first_round, "round 1 to close")  # type: ignore[no-any-return]


@pytest.mark.parametrize("dropout", [None, "site-c"])
def test_the_hub_returns_the_weighted_average_of_what_it_only_saw_masked(make_hub, dropout):
    hub, exp, given, players = ready_to_mask(make_hub)
    models, weights = _models(given), {"site-a": 10, "site-b": 30, "site-c": 5}
    alive = [s for s in SITES if s != dropout]
    for site in alive:
        r = players[site].upload(models[site], given, weights[site])
        assert r.status_code == 200, r.text
    if dropout:
        hub.clock.advance(61)  # the masking phase waits for a missing update until the round's deadline
    for site in alive:
        players[site].unmask()
    assert_weighted_average(hub, exp["id"], players["site-a"].task, given, {s: (models[s], weights[s]) for s in alive})


def assert_weighted_average(
    hub: Hub, exp_id: int, task: TaskPublic, given: Weights, sent: dict[str, tuple[Weights, int]]
) -> None:
    """The experiment completes with the weighted mean of ``sent`` (site -> model, weight),
    within the round's quantisation bound."""
    done = hub.wait_status(exp_id, "completed")
    r = hub.client.get(hub.url(f"/blobs/{done['global_digest']}"), headers=hub.admin)
    assert r.status_code == 200, r.text
    got = from_safetensors(r.content)
    total = sum(weight for _, weight in sent.values())
    config = task.secure_aggregation
    assert config is not None
    bound = error_bound(scale_for(config.bound, config.sites), config.sites) / total
    for key in given:
        expected = sum(np.float64(model[key]) * weight for model, weight in sent.values()) / total
        np.testing.assert_allclose(got[key], expected, rtol=0, atol=bound + 1e-6, err_msg=key)
    assert not np.allclose(got["fc.weight"], given["fc.weight"])


def test_the_hub_refuses_what_breaks_the_protocol(make_hub):
    hub: Hub = make_hub()
    hub.register(*SITES)
    given = make_weights(0)
    hub.submit(secure_spec(), given)
    players = {site: Player(hub, site) for site in SITES}
    a = players["site-a"]
    assert a.get("roster", wait=0).status_code == 202, "the key phase is open"
    # An unmasked model where a masked one is due: refused, and it says why.
    plain = to_safetensors(given, {MetaKey.N_SAMPLES: "10", MetaKey.METRICS: "{}"})
    r = hub.upload("site-a", a.task, plain)
    assert r.status_code == 409 and "masking phase is not open" in r.json()["detail"], r.text
    a.advertise()
    other = SecAggClient("site-a", RoundContext(a.task.experiment_id, 1, 2)).advertise()
    r = a.post("keys", {"encryption_key": _b64(other.encryption_key), "masking_key": _b64(other.masking_key)})
    assert r.status_code == 409 and "other keys" in r.json()["detail"]
    r = a.post("keys", {"encryption_key": "not base64", "masking_key": "x"})
    assert r.status_code == 422
    for p in (players["site-b"], players["site-c"]):
        p.advertise()
    a.share()
    r = players["site-b"].post("shares", {"ciphertexts": {"site-a": _b64(b"x" * 40)}})
    assert r.status_code == 422 and "exactly the roster" in r.json()["detail"], r.text


def test_secure_aggregation_is_refused_with_strategies_that_need_each_update(make_hub):
    hub: Hub = make_hub()
    hub.register(*SITES)
    digest = hub.upload_blob(to_safetensors(make_weights(0)))
    body = {"spec": secure_spec(strategy={"name": "fedmedian"}), "initial_weights": digest}
    r = hub.client.post(hub.url("/experiments"), json=body, headers=hub.admin)
    assert r.status_code == 422 and "needs each site's update" in r.json()["detail"], r.text


def test_a_key_phase_that_closes_at_the_round_deadline_still_lets_the_roster_upload(make_hub):
    hub: Hub = make_hub()
    hub.register(*SITES)
    given = make_weights(0)
    exp = hub.submit(secure_spec(), given)
    players = {site: Player(hub, site) for site in SITES[:2]}  # site-c never comes back with keys
    for p in players.values():
        p.advertise()
    hub.clock.advance(61)  # past the round's deadline: the key phase closes with site-a and site-b
    for p in players.values():
        p.share()
    for p in players.values():
        p.receive()
    models = _models(given)
    for site, p in players.items():
        r = p.upload(models[site], given, 10)
        assert r.status_code == 200, r.text
    for p in players.values():
        p.unmask()
    done = hub.wait_status(exp["id"], "completed")
    [rnd] = hub.get(f"/experiments/{exp['id']}/rounds")
    assert (rnd["status"], rnd["n_updates"]) == ("aggregated", 2)
    assert done["global_digest"] != exp["global_digest"]


def test_a_hub_restarted_between_phases_answers_every_site_the_same(make_hub):
    hub: Hub = make_hub()
    hub.register(*SITES)
    given = make_weights(0)
    exp = hub.submit(secure_spec(phase_timeout_s=30.0), given)  # restarts must not outlast a phase
    players = {site: Player(hub, site) for site in SITES}
    for p in players.values():
        p.advertise()
    for p in players.values():
        p.share()
    hub.stop()  # the hub dies with the share phase closed or closing; its state is in the database
    again: Hub = make_hub()
    again.tokens = hub.tokens
    for p in players.values():
        p.hub = again
        p.receive()
    models = _models(given)
    for site, p in players.items():
        assert p.upload(models[site], given, 10).status_code == 200
    again.stop()
    last: Hub = make_hub()
    last.tokens = hub.tokens
    for p in players.values():
        p.hub = last
        p.unmask()
    done = last.wait_status(exp["id"], "completed")
    r = last.client.get(last.url(f"/blobs/{done['global_digest']}"), headers=last.admin)
    got = from_safetensors(r.content)
    for key in given:
        expected = sum(np.float64(models[s][key]) for s in SITES) / 3
        np.testing.assert_allclose(got[key], expected, rtol=0, atol=1e-4)


def test_a_site_that_masks_a_vector_outside_its_bound_gets_the_round_aborted(make_hub):
    hub, exp, given, players = ready_to_mask(make_hub, rounds=2)
    models = _models(given)
    hostile = {k: (given[k] + (models["site-c"][k] - given[k]) * 5000).astype(np.float32) for k in given}
    for site, p in players.items():
        r = p.upload(hostile if site == "site-c" else models[site], given, 1)
        assert r.status_code == 200, r.text
    for p in players.values():
        p.unmask()

    rnd = closed_first_round(hub, exp)
    assert rnd["status"] == "aborted" and "above the clip bound" in rnd["note"], rnd
    assert hub.experiment(exp["id"])["global_digest"] == exp["global_digest"], "the global model is kept"


def test_fedadam_steps_along_the_securely_aggregated_mean(make_hub):
    from laulima.core.strategies import FedAdam, FitResult

    hub, exp, given, players = ready_to_mask(make_hub, strategy={"name": "fedadam", "server_lr": 0.05})
    models, weights = _models(given), {"site-a": 10, "site-b": 30, "site-c": 5}
    for site, p in players.items():
        assert p.upload(models[site], given, weights[site]).status_code == 200
    for p in players.values():
        p.unmask()
    done = hub.wait_status(exp["id"], "completed")
    r = hub.client.get(hub.url(f"/blobs/{done['global_digest']}"), headers=hub.admin)
    got = from_safetensors(r.content)
    plain = [FitResult(site, models[site], weights[site]) for site in SITES]
    expected = FedAdam(server_lr=0.05).aggregate(given, plain)
    for key in given:
        np.testing.assert_allclose(got[key], expected[key], rtol=0, atol=1e-5, err_msg=key)
    assert not np.allclose(got["fc.weight"], given["fc.weight"])


def test_a_malformed_unmasking_answer_is_refused_and_a_wrong_share_only_aborts_the_round(make_hub):
    hub, exp, given, players = ready_to_mask(make_hub, rounds=2)
    models = _models(given)
    for site, p in players.items():
        assert p.upload(models[site], given, 1).status_code == 200
    a = players["site-a"]
    assert a.get("unmasking").status_code == 200
    short = {"self_mask": {s: _b64(b"x" * 10) for s in SITES}, "masking_key": {}}
    assert a.post("unmasking", short).status_code == 422, "a share is 66 bytes"
    # Well-formed but wrong shares from two sites: the sum cannot be unmasked correctly.
    for name in ("site-a", "site-b"):
        r = players[name].get("unmasking")
        wrong = {"self_mask": {s: _b64(bytes([7]) * 66) for s in r.json()["survivors"]}, "masking_key": {}}
        assert players[name].post("unmasking", wrong).status_code == 204
    players["site-c"].unmask()

    rnd = closed_first_round(hub, exp)
    assert rnd["status"] == "aborted", rnd
    assert hub.experiment(exp["id"])["status"] == "running", "one round is lost, not the experiment"
