"""A hub stopped in the middle of a round continues it after a restart; nothing counts twice."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from laulima.core.weights import from_safetensors

from .conftest import Hub, make_weights, spec, update_bytes


def test_open_round_survives_a_restart_and_counts_each_update_once(make_hub: Callable[..., Hub]):
    first = make_hub()
    first.register("site-a", "site-b")
    initial = make_weights(0)
    exp = first.submit(spec(rounds=2), initial)
    ta, tb = first.next_task("site-a"), first.next_task("site-b")
    assert ta and tb
    wa = make_weights(1)
    accepted = first.upload("site-a", ta, update_bytes(wa, n_samples=2))
    assert accepted.status_code == 200
    first.stop()

    second = make_hub()
    second.tokens = dict(first.tokens)
    assert second.experiment(exp["id"])["status"] == "running"
    again = second.next_task("site-b")  # a delivered task is delivered again after a restart
    assert again and again.id == tb.id and again.upload_nonce == tb.upload_nonce
    assert second.next_task("site-a", wait=0) is None  # site-a's task is completed
    replay = second.upload("site-a", ta, update_bytes(wa, n_samples=2))
    assert replay.status_code == 409
    assert replay.json()["context"]["accepted_digest"] == accepted.json()["digest"]
    wb = make_weights(2)
    assert second.upload("site-b", tb, update_bytes(wb, n_samples=6)).status_code == 200

    second.wait_for(lambda: second.experiment(exp["id"])["rounds_done"] == 1, "round 1 to aggregate")
    rounds = second.get(f"/experiments/{exp['id']}/rounds")
    assert rounds[0]["n_updates"] == 2
    round1 = from_safetensors(
        second.client.get(second.url(f"/blobs/{rounds[0]['global_digest']}"), headers=second.admin).content
    )
    for key in initial:
        np.testing.assert_allclose(round1[key], (2 * wa[key] + 6 * wb[key]) / 8, rtol=1e-6)
    second.stop()

    third = make_hub()
    third.tokens = dict(first.tokens)
    for site in ("site-a", "site-b"):
        task = third.next_task(site)
        assert task and task.round == 2 and task.weights_digest == rounds[0]["global_digest"]
        assert third.upload(site, task, update_bytes(make_weights(3))).status_code == 200
    done = third.wait_status(exp["id"], "completed")
    assert [r["n_updates"] for r in third.get(f"/experiments/{exp['id']}/rounds")] == [2, 2]
    assert done["rounds_done"] == 2


def test_checkpoint_refuses_when_the_round_changed_since_it_was_read(hub: Hub):
    exp = hub.submit(spec(), make_weights(0))
    ta = hub.next_task("site-a")
    assert ta is not None
    assert hub.upload("site-a", ta, update_bytes(make_weights(1))).status_code == 200
    service = hub.client.app.state.hub.service  # type: ignore[attr-defined]
    with service.sessions() as s:
        rnd = service.open_round_of(s, exp["id"])
    assert rnd is not None
    # an aggregation computed before site-a's update arrived must not become the checkpoint
    stale = service.checkpoint_round(
        rnd.id, update_ids=[], global_digest=exp["global_digest"], state_digest=None, evaluation=[]
    )
    assert stale is False
    assert hub.experiment(exp["id"])["rounds_done"] == 0
