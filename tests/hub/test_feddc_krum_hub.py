"""FedDC through the hub: handed-off models, their blobs' lifetime, the norm bound, restarts;
Krum through the hub: the Byzantine update is left out, too few results fail the round."""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from laulima.core.protocol import TaskPublic
from laulima.core.strategies import FedDC, Krum
from laulima.core.weights import Weights, from_safetensors, to_safetensors
from laulima.hub.api.deps import HubContext
from laulima.hub.db import RoundHandoff
from laulima.hub.housekeeping import collect_unused_uploads

from .conftest import Hub, make_weights, spec, update_bytes

SITES = ["site-a", "site-b", "site-c"]
SEED = 7


def _parts(hub: Hub) -> HubContext:
    return hub.client.app.state.hub  # type: ignore[attr-defined,no-any-return]


def feddc_spec(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "sites": SITES,
        "rounds": 3,
        "min_sites": 3,
        "seed": SEED,
        "strategy": {"name": "feddc", "daisy_period": 1, "aggregation_period": 2},
    }
    return spec(**{**base, **overrides})


def plain_digest(weights: Weights) -> str:
    """The digest of ``weights`` stored without metadata: what a handoff blob must be."""
    return hashlib.sha256(to_safetensors(weights)).hexdigest()


def fedavg(updates: dict[str, tuple[Weights, int]]) -> Weights:
    total = sum(n for _, n in updates.values())
    keys = next(iter(updates.values()))[0]
    return {k: sum(np.float64(w[k]) * n for w, n in updates.values()) / total for k in keys}


def play_round(hub: Hub, index: int, seeds: dict[str, int]) -> tuple[dict[str, TaskPublic], dict[str, Weights]]:
    """Every site in ``seeds`` takes its task of round ``index`` and uploads make_weights(seed)."""
    tasks: dict[str, TaskPublic] = {}
    sent: dict[str, Weights] = {}
    for site, seed in seeds.items():
        task = hub.next_task(site)
        assert task and task.kind == "train" and task.round == index, task
        tasks[site] = task
        sent[site] = make_weights(seed)
        r = hub.upload(site, task, update_bytes(sent[site], n_samples=seed, metrics={"loss": seed / 100}))
        assert r.status_code == 200, r.text
    return tasks, sent


def wait_round(hub: Hub, exp_id: int, index: int) -> dict[str, Any]:
    hub.wait_for(lambda: hub.experiment(exp_id)["rounds_done"] >= index, f"round {index} to aggregate")
    return hub.get(f"/experiments/{exp_id}/rounds")[index - 1]


def test_feddc_hands_models_on_then_aggregates_and_the_blobs_live_exactly_as_long_as_needed(hub: Hub):
    exp = hub.submit(feddc_spec(), make_weights(0))
    parts = _parts(hub)
    plan = FedDC(daisy_period=1, aggregation_period=2, seed=SEED).handoff(1, SITES)
    assert plan is not None and all(r != s for r, s in plan.items())

    seeds1 = {"site-a": 1, "site-b": 2, "site-c": 3}
    tasks1, sent1 = play_round(hub, 1, seeds1)
    assert {t.weights_digest for t in tasks1.values()} == {exp["global_digest"]}
    round1 = wait_round(hub, exp["id"], 1)
    accepted1 = [
        hashlib.sha256(update_bytes(sent1[s], seeds1[s], {"loss": seeds1[s] / 100})).hexdigest() for s in SITES
    ]

    # Round 2: each site continues from another site's round-1 model, not from the aggregate.
    tasks2: dict[str, TaskPublic] = {}
    for site in SITES:
        task = hub.next_task(site)
        assert task and task.round == 2
        tasks2[site] = task
        sender = plan[site]
        assert task.weights_digest == plain_digest(sent1[sender]) != round1["global_digest"]
        got = hub.download(site, task.weights_digest)
        for key, value in sent1[sender].items():
            np.testing.assert_array_equal(got[key], value)
        raw = hub.client.get(hub.url(f"/blobs/{task.weights_digest}"), headers=hub.site(site)).content
        header = json.loads(raw[8 : 8 + struct.unpack("<Q", raw[:8])[0]])
        assert "__metadata__" not in header, "the sender's sample count and metrics stay at the hub"
    with parts.sessions() as s:
        rows = s.query(RoundHandoff).filter_by(experiment_id=exp["id"]).all()
    assert {(r.round, r.site, r.sender, r.digest) for r in rows} == {
        (1, site, plan[site], tasks2[site].weights_digest) for site in SITES
    }
    # The global model is the FedAvg aggregate every round, daisy-chaining or not.
    model1 = from_safetensors(hub.client.get(hub.url(f"/blobs/{round1['global_digest']}"), headers=hub.admin).content)
    expected1 = fedavg({s: (sent1[s], seeds1[s]) for s in SITES})
    for key in model1:
        np.testing.assert_allclose(model1[key], expected1[key], rtol=1e-6)

    # The round-1 updates themselves are spent; the handed-off copies survive every clean-up
    # while round 2 is open.
    hub.wait_for(lambda: not any(hub.stored.exists(d) for d in accepted1), "round-1 updates to go")
    handed = {t.weights_digest for t in tasks2.values()}
    assert parts.orchestrator.discard_spent_updates(exp["id"]) == 0
    far = hub.clock() + 10 * 24 * 3600
    collect_unused_uploads(parts.sessions, parts.blobs, far, 0.0)
    assert all(hub.stored.exists(d) for d in handed)

    seeds2 = {"site-a": 4, "site-b": 5, "site-c": 6}
    sent2: dict[str, Weights] = {}
    for site, seed in seeds2.items():
        sent2[site] = make_weights(seed)
        assert hub.upload(site, tasks2[site], update_bytes(sent2[site], n_samples=seed)).status_code == 200
    round2 = wait_round(hub, exp["id"], 2)
    hub.wait_for(lambda: not any(hub.stored.exists(d) for d in handed), "used handoffs to be deleted")

    # Round 2 was an aggregation round: round 3 starts from the aggregate everywhere.
    seeds3 = {"site-a": 7, "site-b": 8, "site-c": 9}
    tasks3, sent3 = play_round(hub, 3, seeds3)
    assert {t.weights_digest for t in tasks3.values()} == {round2["global_digest"]}
    done = hub.wait_status(exp["id"], "completed")
    final = from_safetensors(hub.client.get(hub.url(f"/experiments/{exp['id']}/model"), headers=hub.admin).content)
    expected3 = fedavg({s: (sent3[s], seeds3[s]) for s in SITES})
    for key in final:
        np.testing.assert_allclose(final[key], expected3[key], rtol=1e-6)
    assert done["global_digest"] == hub.get(f"/experiments/{exp['id']}/rounds")[2]["global_digest"]
    with parts.sessions() as s:
        assert {r.round for r in s.query(RoundHandoff).filter_by(experiment_id=exp["id"])} == {1}, (
            "no handoff after an aggregation round, nor after the last round"
        )


def test_a_site_without_an_update_last_round_continues_from_the_global_model(hub: Hub):
    exp = hub.submit(feddc_spec(min_sites=2, rounds=2), make_weights(0))
    ta, tb, tc = (hub.next_task(s) for s in SITES)
    assert ta and tb and tc
    wa, wb = make_weights(1), make_weights(2)
    assert hub.upload("site-a", ta, update_bytes(wa)).status_code == 200
    assert hub.upload("site-b", tb, update_bytes(wb)).status_code == 200
    r = hub.client.post(
        hub.url(f"/tasks/{tc.id}/failure"),
        json={"kind": "error", "reason": "out of memory"},
        headers=hub.site("site-c"),
    )
    assert r.status_code == 204, r.text
    round1 = wait_round(hub, exp["id"], 1)
    nxt = {s: hub.next_task(s) for s in SITES}
    assert nxt["site-a"] and nxt["site-a"].weights_digest == plain_digest(wb)  # two sites: they swap
    assert nxt["site-b"] and nxt["site-b"].weights_digest == plain_digest(wa)
    assert nxt["site-c"] and nxt["site-c"].weights_digest == round1["global_digest"]
    # A site may read its own task's weights, not the model handed to another site.
    assert hub.client.get(hub.url(f"/blobs/{plain_digest(wa)}"), headers=hub.site("site-a")).status_code == 403


def test_handed_off_models_outlive_a_wait_for_sites_between_the_rounds(hub: Hub):
    exp = hub.submit(feddc_spec(rounds=2, round_timeout_s=600.0), make_weights(0))
    plan = FedDC(daisy_period=1, aggregation_period=2, seed=SEED).handoff(1, SITES)
    assert plan is not None
    tasks = {s: hub.next_task(s) for s in SITES}
    sent = {s: make_weights(30 + i) for i, s in enumerate(SITES)}
    for site in ("site-a", "site-b"):
        assert hub.upload(site, tasks[site], update_bytes(sent[site])).status_code == 200  # type: ignore[arg-type]
    hub.clock.advance(200.0)  # past site_offline_after_s: no site is online when round 2 could open
    assert hub.upload("site-c", tasks["site-c"], update_bytes(sent["site-c"])).status_code == 200  # type: ignore[arg-type]
    hub.wait_for(lambda: (hub.experiment(exp["id"])["waiting"] or "").startswith("waiting to open round 2"), "a wait")
    parts = _parts(hub)
    handed = {plain_digest(sent[plan[s]]) for s in SITES}
    parts.orchestrator.discard_spent_updates(exp["id"])
    collect_unused_uploads(parts.sessions, parts.blobs, hub.clock() + 10 * 24 * 3600, 0.0)
    assert all(hub.stored.exists(d) for d in handed), "only the handoff rows hold them now"
    for site in SITES:
        hub.connect(site)
    parts.orchestrator.wake(sites_changed=True)
    for site in SITES:
        task = hub.next_task(site)
        assert task and task.round == 2 and task.weights_digest == plain_digest(sent[plan[site]])


def test_max_update_norm_measures_the_step_from_the_weights_the_task_was_given(hub: Hub):
    initial = {k: np.zeros_like(v) for k, v in make_weights(0).items()}  # 52 weights
    exp = hub.submit(feddc_spec(sites=["site-a", "site-b"], min_sites=2, rounds=2, max_update_norm=1.0), initial)
    ta, tb = hub.next_task("site-a"), hub.next_task("site-b")
    assert ta and tb

    def shifted(by: float) -> Weights:
        return {k: np.full_like(v, by) for k, v in initial.items()}  # L2 norm |by| * sqrt(52)

    assert hub.upload("site-a", ta, update_bytes(shifted(0.05))).status_code == 200
    assert hub.upload("site-b", tb, update_bytes(shifted(-0.05))).status_code == 200
    wait_round(hub, exp["id"], 1)  # global: 0; site-a now holds site-b's model (-0.05), and back
    ta2, tb2 = hub.next_task("site-a"), hub.next_task("site-b")
    assert ta2 and tb2 and ta2.weights_digest == plain_digest(shifted(-0.05))
    # -0.14 is 1.01 from the global model but 0.65 from what site-a was given: accepted.
    assert hub.upload("site-a", ta2, update_bytes(shifted(-0.14))).status_code == 200
    # -0.10 is 0.72 from the global model but 1.08 from what site-b was given (+0.05): refused.
    refused = hub.upload("site-b", tb2, update_bytes(shifted(-0.10)))
    assert refused.status_code == 422 and "weights the task was given" in refused.json()["detail"], refused.text


def test_a_restarted_hub_hands_on_the_same_models(make_hub: Callable[..., Hub]):
    first = make_hub()
    first.register(*SITES)
    exp = first.submit(feddc_spec(rounds=2), make_weights(0))
    plan = FedDC(daisy_period=1, aggregation_period=2, seed=SEED).handoff(1, SITES)
    assert plan is not None
    sent = {s: make_weights(10 + i) for i, s in enumerate(SITES)}
    tasks = {s: first.next_task(s) for s in SITES}
    assert first.upload("site-a", tasks["site-a"], update_bytes(sent["site-a"])).status_code == 200
    first.stop()  # round 1 open, one update in

    second = make_hub()
    second.tokens = dict(first.tokens)
    for site in ("site-b", "site-c"):
        task = tasks[site]
        assert task and second.upload(site, task, update_bytes(sent[site])).status_code == 200
    wait_round(second, exp["id"], 1)
    round2 = {s: second.next_task(s) for s in SITES}
    for site, task in round2.items():
        assert task and task.round == 2 and task.weights_digest == plain_digest(sent[plan[site]])
    second.stop()  # round 2 open: its handed-off models must survive the restart's clean-up

    third = make_hub()
    third.tokens = dict(first.tokens)
    for site in SITES:
        again = third.next_task(site)
        assert again and again.id == round2[site].id and third.stored.exists(again.weights_digest)
        got = third.download(site, again.weights_digest)
        np.testing.assert_array_equal(got["fc.weight"], sent[plan[site]]["fc.weight"])
        assert third.upload(site, again, update_bytes(make_weights(20))).status_code == 200
    assert third.wait_status(exp["id"], "completed")["rounds_done"] == 2


# --------------------------------------------------------------------------- Krum


def test_krum_leaves_the_byzantine_update_out(hub: Hub):
    hub.register("site-d", "site-e")
    sites = [*SITES, "site-d", "site-e"]
    exp = hub.submit(
        spec(sites=sites, min_sites=5, strategy={"name": "krum", "krum_f": 1, "krum_m": 3}), make_weights(0)
    )
    sent: dict[str, Weights] = {}
    for i, site in enumerate(sites):
        task = hub.next_task(site)
        assert task
        base = make_weights(0)
        if site == "site-c":
            sent[site] = {k: np.full_like(v, 1e6) for k, v in base.items()}  # poisoned, huge
        else:
            sent[site] = {k: v + 0.01 * i for k, v in base.items()}
        assert (
            hub.upload(site, task, update_bytes(sent[site], n_samples=1000 if site == "site-c" else 1)).status_code
            == 200
        )
    hub.wait_status(exp["id"], "completed")
    final = from_safetensors(hub.client.get(hub.url(f"/experiments/{exp['id']}/model"), headers=hub.admin).content)
    assert all(np.abs(v).max() < 10 for v in final.values()), "the poisoned update was averaged in"


def test_too_few_results_for_krum_fail_the_round_with_the_reason(hub: Hub, monkeypatch: pytest.MonkeyPatch):
    hub.register("site-d", "site-e")
    sites = [*SITES, "site-d", "site-e"]
    exp = hub.submit(spec(sites=sites, min_sites=5, strategy={"name": "krum", "krum_f": 1}), make_weights(0))
    monkeypatch.setattr(Krum, "min_results", lambda self: 6)  # as if a site had dropped below 2f + 3
    for i, site in enumerate(sites):
        task = hub.next_task(site)
        assert task and hub.upload(site, task, update_bytes(make_weights(i))).status_code == 200
    failed = hub.wait_status(exp["id"], "failed")
    assert failed["error"].startswith("round 1: krum: 5 result(s)"), failed["error"]
    assert "raise min_sites" in failed["error"] and "previous global model is kept" in failed["error"]
    assert hub.get(f"/experiments/{exp['id']}/rounds")[0]["status"] == "failed"
