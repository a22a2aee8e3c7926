"""One experiment driven by hand: the hub opens rounds, aggregates, checkpoints and evaluates."""

from __future__ import annotations

import time

import numpy as np
import pytest

from laulima.core.weights import from_safetensors

from .conftest import Hub, make_weights, spec, update_bytes


def test_round_aggregates_to_the_sample_weighted_mean(hub: Hub):
    initial = make_weights(0)
    exp = hub.submit(spec(rounds=1), initial)
    assert exp["status"] == "running" and exp["global_digest"]

    ta = hub.next_task("site-a")
    tb = hub.next_task("site-b")
    assert ta and tb and ta.kind == "train" and ta.round == 1
    assert ta.config["round"] == 1 and ta.config["local_epochs"] == 1 and ta.algorithm.endswith(":Identity")
    assert hub.download("site-a", ta.weights_digest).keys() == initial.keys()
    assert hub.next_task("site-c", wait=0) is None  # not selected

    wa, wb = make_weights(1), make_weights(2)
    ra = hub.upload("site-a", ta, update_bytes(wa, n_samples=10, metrics={"loss": 1.0}))
    assert ra.status_code == 200, ra.text
    assert ra.json()["n_samples"] == 10
    assert hub.upload("site-b", tb, update_bytes(wb, n_samples=30)).status_code == 200

    done = hub.wait_status(exp["id"], "completed")
    assert done["rounds_done"] == 1
    model = from_safetensors(hub.client.get(hub.url(f"/experiments/{exp['id']}/model"), headers=hub.admin).content)
    for key in initial:
        np.testing.assert_allclose(model[key], (10 * wa[key] + 30 * wb[key]) / 40, rtol=1e-6)
        assert model[key].dtype == np.float32
    rounds = hub.get(f"/experiments/{exp['id']}/rounds")
    assert [(r["index"], r["status"], r["n_updates"]) for r in rounds] == [(1, "aggregated", 2)]
    assert rounds[0]["global_digest"] == done["global_digest"]
    metrics = hub.get(f"/experiments/{exp['id']}/metrics")
    assert {(m["site"], m["kind"], m["n_samples"]) for m in metrics} == {
        ("site-a", "train", 10),
        ("site-b", "train", 30),
    }


def test_round_closes_at_its_deadline_when_the_quorum_is_met(hub: Hub):
    exp = hub.submit(spec(sites=["site-a", "site-b", "site-c"], min_sites=2, round_timeout_s=20.0), make_weights(0))
    tasks = {s: hub.next_task(s) for s in ("site-a", "site-b", "site-c")}
    wa, wb = make_weights(1), make_weights(2)
    assert hub.upload("site-a", tasks["site-a"], update_bytes(wa, n_samples=1)).status_code == 200
    assert hub.upload("site-b", tasks["site-b"], update_bytes(wb, n_samples=1)).status_code == 200
    time.sleep(0.3)
    assert hub.experiment(exp["id"])["status"] == "running"  # site-c may still answer
    hub.clock.advance(21.0)
    hub.wait_status(exp["id"], "completed")
    model = from_safetensors(hub.client.get(hub.url(f"/experiments/{exp['id']}/model"), headers=hub.admin).content)
    np.testing.assert_allclose(model["fc.weight"], (wa["fc.weight"] + wb["fc.weight"]) / 2, rtol=1e-6)
    rounds = hub.get(f"/experiments/{exp['id']}/rounds")
    assert rounds[0]["n_updates"] == 2 and rounds[0]["status"] == "aggregated"
    assert hub.next_task("site-c", wait=0) is None  # its task expired


def test_round_without_quorum_fails_the_experiment_with_a_clear_error(hub: Hub):
    exp = hub.submit(spec(sites=["site-a", "site-b", "site-c"], min_sites=2, round_timeout_s=20.0), make_weights(0))
    ta, tb = hub.next_task("site-a"), hub.next_task("site-b")
    assert ta and tb
    assert hub.upload("site-a", ta, update_bytes(make_weights(1))).status_code == 200
    r = hub.client.post(
        hub.url(f"/tasks/{tb.id}/failure"),
        json={"kind": "rejected", "reason": "policy: algorithm not approved"},
        headers=hub.site("site-b"),
    )
    assert r.status_code == 204, r.text
    hub.clock.advance(21.0)
    failed = hub.wait_status(exp["id"], "failed")
    assert failed["error"] == (
        "round 1: only 1 of 3 selected sites returned results by the deadline (min_sites = 2): "
        "site-b refused: policy: algorithm not approved; site-c: no result before the deadline"
    )
    assert failed["site_notes"] == {"site-b": "refused: policy: algorithm not approved"}
    assert failed["rounds_done"] == 0
    assert hub.get(f"/experiments/{exp['id']}/rounds")[0]["status"] == "failed"


def test_every_site_answering_closes_the_round_at_once_and_evaluation_follows(hub: Hub):
    exp = hub.submit(spec(rounds=2, evaluation={"every": 1, "final": True}, config={"lr": 0.1}), make_weights(0))
    for r in (1, 2):
        for site in ("site-a", "site-b"):
            task = hub.next_task(site)
            assert task and task.kind == "train" and task.round == r and task.config["params"] == {"lr": 0.1}
            assert task.config["progress"] == [(r - 1) / 2, r / 2]  # the part of the training it covers
            assert hub.upload(site, task, update_bytes(make_weights(r), n_samples=5)).status_code == 200
        for site in ("site-a", "site-b"):
            ev = hub.next_task(site)
            assert ev and ev.kind == "evaluate" and ev.round == r  # evaluation comes before training
            assert ev.weights_digest == hub.get(f"/experiments/{exp['id']}/rounds")[r - 1]["global_digest"]
            r2 = hub.client.post(
                hub.url(f"/tasks/{ev.id}/evaluation"),
                json={"n_samples": 7, "metrics": {"dice": 0.5 + r / 10}},
                headers=hub.site(site),
            )
            assert r2.status_code == 204, r2.text
    done = hub.wait_status(exp["id"], "completed")
    assert done["rounds_done"] == 2
    evals = [m for m in hub.get(f"/experiments/{exp['id']}/metrics") if m["kind"] == "evaluate"]
    assert sorted((m["round"], m["site"], m["metrics"]["dice"]) for m in evals) == [
        (1, "site-a", 0.6),
        (1, "site-b", 0.6),
        (2, "site-a", 0.7),
        (2, "site-b", 0.7),
    ]


def test_final_evaluation_keeps_the_experiment_running_until_answered_or_expired(hub: Hub):
    exp = hub.submit(
        spec(sites=["site-a"], evaluation={"every": 0, "final": True}, round_timeout_s=10.0), make_weights()
    )
    task = hub.next_task("site-a")
    assert task and hub.upload("site-a", task, update_bytes(make_weights(1))).status_code == 200
    ev = hub.wait_for(lambda: hub.next_task("site-a", wait=0), "the evaluation task")
    assert ev.kind == "evaluate"
    time.sleep(0.2)
    assert hub.experiment(exp["id"])["status"] == "running"
    hub.clock.advance(11.0)  # nobody answers: the evaluation expires, the experiment completes
    assert hub.wait_status(exp["id"], "completed")["rounds_done"] == 1


def test_stateful_strategy_carries_its_state_across_rounds(hub: Hub):
    exp = hub.submit(spec(rounds=2, sites=["site-a"], strategy={"name": "fedadam", "server_lr": 0.5}), make_weights(0))
    digests = []
    for _ in range(2):
        task = hub.next_task("site-a")
        assert task is not None
        w = hub.download("site-a", task.weights_digest)
        digests.append(task.weights_digest)
        step = {k: v + 1.0 for k, v in w.items()}
        assert hub.upload("site-a", task, update_bytes(step)).status_code == 200
        hub.wait_for(lambda r=task.round: hub.experiment(exp["id"])["rounds_done"] >= r, "the round to aggregate")
    done = hub.wait_status(exp["id"], "completed")
    assert len(set(digests + [done["global_digest"]])) == 3


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedadam", "fedyogi", "fedmedian", "trimmed_mean"])
def test_every_strategy_runs_two_rounds_through_the_hub(hub: Hub, name: str):
    sites = ["site-a", "site-b", "site-c"]
    exp = hub.submit(spec(rounds=2, sites=sites, strategy={"name": name}), make_weights(0))
    for r in (1, 2):
        for i, site in enumerate(sites):
            task = hub.next_task(site)
            assert task and task.round == r
            if name == "fedprox":
                assert task.config["proximal_mu"] == pytest.approx(0.01)
            w = hub.download(site, task.weights_digest)
            body = update_bytes({k: v + i for k, v in w.items()}, n_samples=i + 1)
            assert hub.upload(site, task, body).status_code == 200
    done = hub.wait_status(exp["id"], "completed")
    model = from_safetensors(hub.client.get(hub.url(f"/experiments/{exp['id']}/model"), headers=hub.admin).content)
    assert {k: (v.shape, v.dtype) for k, v in model.items()} == {
        k: (v.shape, v.dtype) for k, v in make_weights(0).items()
    }
    assert done["rounds_done"] == 2


def test_an_orchestrator_error_fails_only_that_experiment(hub: Hub):
    broken = hub.submit(spec(name="broken", sites=["site-a", "site-b"]), make_weights(0))
    healthy = hub.submit(spec(name="healthy", sites=["site-c"]), make_weights(1))
    ta, tb = hub.next_task("site-a"), hub.next_task("site-b")
    assert ta and tb
    accepted = hub.upload("site-a", ta, update_bytes(make_weights(2))).json()["digest"]
    hub.stored.delete(accepted)  # the disk (or bucket) lost an accepted update
    assert hub.upload("site-b", tb, update_bytes(make_weights(3))).status_code == 200
    failed = hub.wait_status(broken["id"], "failed")
    assert failed["error"].startswith("hub error: NotFound: no blob with digest")
    tc = hub.next_task("site-c")
    assert tc and tc.experiment_name == "healthy"
    assert hub.upload("site-c", tc, update_bytes(make_weights(4))).status_code == 200
    hub.wait_status(healthy["id"], "completed")


def _two_site_round(hub: Hub) -> tuple[dict, list[str]]:
    exp = hub.submit(spec(rounds=1), make_weights(0))
    ta, tb = hub.next_task("site-a"), hub.next_task("site-b")
    digests = []
    for site, task, seed in (("site-a", ta, 1), ("site-b", tb, 2)):
        r = hub.upload(site, task, update_bytes(make_weights(seed), n_samples=seed))
        assert r.status_code == 200, r.text
        digests.append(r.json()["digest"])
    return hub.wait_status(exp["id"], "completed"), digests


def test_update_blobs_are_discarded_once_their_round_is_checkpointed(hub: Hub):
    done, digests = _two_site_round(hub)
    hub.wait_for(lambda: not any(hub.stored.exists(d) for d in digests), "update blobs to be removed")
    assert hub.stored.exists(done["global_digest"]), "the checkpoint itself must stay"
    metrics = hub.get(f"/experiments/{done['id']}/metrics")
    assert sorted(m["n_samples"] for m in metrics if m["kind"] == "train") == [1, 2]


def test_update_blobs_are_kept_when_the_hub_is_told_to(make_hub):
    hub = make_hub(keep_updates=True)
    hub.register("site-a", "site-b")
    _, digests = _two_site_round(hub)
    assert all(hub.stored.exists(d) for d in digests)
