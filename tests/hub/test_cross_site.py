"""Evaluation the way a federation must do it: evaluate-mode experiments, and the cross-site
matrix (final global model and local-only models at every participating site) after training."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from laulima.core.protocol import TaskKind, TaskPublic
from laulima.core.weights import from_safetensors, to_safetensors
from laulima.hub.housekeeping import collect_unused_uploads

from .conftest import Hub, make_weights, spec, update_bytes

CROSS = {"every": 0, "final": False, "cross_site": True, "local_models": True}


def evaluate_spec(**overrides: Any) -> dict[str, Any]:
    base = {k: v for k, v in spec().items() if k not in ("rounds", "evaluation")}
    return {**base, "mode": "evaluate", **overrides}


def answer(hub: Hub, site: str, task: TaskPublic, n: int, **metrics: float) -> None:
    r = hub.client.post(
        hub.url(f"/tasks/{task.id}/evaluation"), json={"n_samples": n, "metrics": metrics}, headers=hub.site(site)
    )
    assert r.status_code == 204, r.text


def fail(hub: Hub, site: str, task: TaskPublic, reason: str, kind: str = "error") -> None:
    r = hub.client.post(
        hub.url(f"/tasks/{task.id}/failure"), json={"kind": kind, "reason": reason}, headers=hub.site(site)
    )
    assert r.status_code == 204, r.text


def tasks_of(hub: Hub, site: str, n: int) -> list[TaskPublic]:
    """The site's next ``n`` tasks (a delivered task is delivered again until answered, so
    this is for one task, or for tasks answered by ``evaluate_all``)."""
    out = []
    for _ in range(n):
        task = hub.next_task(site)
        assert task is not None, f"{site} expected {n} tasks, got {len(out)}"
        out.append(task)
    return out


def evaluate_all(hub: Hub, site: str, n: int, score: Callable[[TaskPublic], tuple[int, float]]) -> list[TaskPublic]:
    """Answer the site's next ``n`` evaluation tasks, one after the other; then there are none."""
    seen = []
    for _ in range(n):
        task = hub.next_task(site)
        assert task is not None and task.kind == TaskKind.EVALUATE, f"{site}: expected {n} evaluations"
        n_samples, dice = score(task)
        answer(hub, site, task, n_samples, dice_mean=dice)
        seen.append(task)
    assert hub.next_task(site, wait=0) is None
    return seen


def train_round(hub: Hub, exp_id: int, sites: dict[str, int]) -> None:
    for site, n in sites.items():
        (task,) = tasks_of(hub, site, 1)
        assert task.kind == TaskKind.TRAIN and task.round == 1
        assert task.config["progress"] == [0.0, 1.0]  # round 1 of 1: the whole training
        assert hub.upload(site, task, update_bytes(make_weights(n), n_samples=n)).status_code == 200
    hub.wait_for(lambda: hub.experiment(exp_id)["rounds_done"] == 1, "round 1 to aggregate")


# -- evaluate mode -----------------------------------------------------------------------
def test_evaluate_mode_scores_the_given_model_at_each_site_and_completes(hub: Hub):
    model = make_weights(7)
    exp = hub.submit(evaluate_spec(), model)
    assert exp["mode"] == "evaluate" and exp["rounds"] == 0 and exp["phase"] == "evaluation"
    ta, tb = hub.next_task("site-a"), hub.next_task("site-b")
    assert ta and tb and hub.next_task("site-c", wait=0) is None  # only the listed sites
    for task in (ta, tb):
        assert task.kind == TaskKind.EVALUATE and task.round == 1 and task.rounds == 1
        assert task.weights_digest == exp["initial_weights"] if "initial_weights" in exp else exp["global_digest"]
        assert "model" not in task.config
    answer(hub, "site-a", ta, 10, dice_mean=0.5, loss=1.0)
    assert hub.experiment(exp["id"])["status"] == "running"
    answer(hub, "site-b", tb, 30, dice_mean=0.9, loss=2.0)
    done = hub.wait_status(exp["id"], "completed")
    assert done["phase"] is None and done["error"] is None
    metrics = hub.get(f"/experiments/{exp['id']}/metrics")
    assert {(m["site"], m["model"], m["round"]) for m in metrics} == {("site-a", "model", 1), ("site-b", "model", 1)}
    matrix = hub.get(f"/experiments/{exp['id']}/cross-site")
    assert matrix["models"] == ["model"] and matrix["sites"] == ["site-a", "site-b"] and matrix["complete"]
    assert matrix["pooled"]["model"]["n_samples"] == 40
    assert matrix["pooled"]["model"]["metrics"]["dice_mean"] == pytest.approx((0.5 * 10 + 0.9 * 30) / 40)
    r = hub.client.get(hub.url(f"/experiments/{exp['id']}/model"), params={"model": "model"}, headers=hub.admin)
    assert r.status_code == 200 and from_safetensors(r.content).keys() == model.keys()


def test_evaluate_mode_fails_with_every_site_s_reason_when_no_site_evaluates(hub: Hub):
    exp = hub.submit(evaluate_spec(), make_weights(0))
    ta, tb = hub.next_task("site-a"), hub.next_task("site-b")
    assert ta and tb
    fail(hub, "site-a", ta, "dataset 'brains' has 3 cases, policy min_cohort is 10", kind="rejected")
    fail(hub, "site-b", tb, "out of memory")
    failed = hub.wait_status(exp["id"], "failed")
    assert "no site evaluated the model" in failed["error"]
    assert "site-a" in failed["error"] and "min_cohort is 10" in failed["error"] and "out of memory" in failed["error"]


def test_evaluate_mode_with_one_failure_completes_and_says_which_site(hub: Hub):
    exp = hub.submit(evaluate_spec(), make_weights(0))
    ta, tb = hub.next_task("site-a"), hub.next_task("site-b")
    assert ta and tb
    answer(hub, "site-a", ta, 5, dice_mean=0.7)
    fail(hub, "site-b", tb, "out of memory")
    done = hub.wait_status(exp["id"], "completed")
    assert "out of memory" in done["site_notes"]["site-b"]
    matrix = hub.get(f"/experiments/{exp['id']}/cross-site")
    assert list(matrix["cells"]["model"]) == ["site-a"]
    assert [(f["model"], f["site"], f["kind"]) for f in matrix["failures"]] == [("model", "site-b", "evaluate")]


def test_evaluate_mode_waits_for_min_sites(make_hub: Callable[..., Hub]):
    hub = make_hub()
    hub.register("site-a", "site-b")
    hub.clock.advance(600)  # both go quiet...
    hub.connect("site-a")  # ...and only site-a comes back
    exp = hub.submit(evaluate_spec(min_sites=2), make_weights(0))
    waiting = hub.wait_for(lambda: hub.experiment(exp["id"])["waiting"], "the experiment to say it waits")
    assert "waiting to evaluate the model: 1 site(s) online" in waiting and "site-b: offline" in waiting
    hub.connect("site-b")
    tasks = [hub.next_task("site-a"), hub.next_task("site-b")]
    assert all(t is not None and t.kind == TaskKind.EVALUATE for t in tasks)
    assert hub.experiment(exp["id"])["waiting"] is None


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"rounds": 3}, "rounds"),
        ({"local_steps": 5}, "local_steps"),
        ({"strategy": {"name": "fedprox"}}, "strategy"),
        ({"evaluation": {"cross_site": True}}, "evaluation"),
    ],
)
def test_evaluate_mode_refuses_training_fields_with_422(hub: Hub, changes: dict[str, Any], field: str):
    digest = hub.upload_blob(to_safetensors(make_weights(0)))
    body = {"spec": evaluate_spec(**changes), "initial_weights": digest}
    r = hub.client.post(hub.url("/experiments"), json=body, headers=hub.admin)
    assert r.status_code == 422, r.text
    assert f"field '{field}'" in r.json()["detail"] and "evaluate" in r.json()["detail"]


def test_local_models_without_cross_site_is_a_422(hub: Hub):
    digest = hub.upload_blob(to_safetensors(make_weights(0)))
    body = {"spec": spec(evaluation={"local_models": True}), "initial_weights": digest}
    r = hub.client.post(hub.url("/experiments"), json=body, headers=hub.admin)
    assert r.status_code == 422 and "cross_site = true" in r.json()["detail"]


# -- the cross-site matrix after training ---------------------------------------------------
def test_cross_site_with_local_models_builds_the_matrix_and_keeps_the_local_models(hub: Hub):
    initial = make_weights(0)
    exp = hub.submit(spec(rounds=1, local_epochs=3, evaluation=CROSS), initial)
    train_round(hub, exp["id"], {"site-a": 2, "site-b": 6})
    hub.wait_for(lambda: hub.experiment(exp["id"])["phase"] == "local models", "the local-models phase")

    (la,) = tasks_of(hub, "site-a", 1)
    (lb,) = tasks_of(hub, "site-b", 1)
    for task in (la, lb):
        assert task.kind == TaskKind.TRAIN and task.round == 2
        assert task.config["local_model"] is True and task.config["local_epochs"] == 3  # 1 round x 3 epochs
        assert task.config["progress"] == [0.0, 1.0]  # a whole training in one task: schedules run in full
        assert task.weights_digest == exp["global_digest"]  # the initial weights, not the federated model
    local_a = make_weights(11)
    r = hub.upload("site-a", la, update_bytes(local_a, n_samples=2))
    assert r.status_code == 200, r.text
    fail(hub, "site-b", lb, 'the site\'s policy (local_models = "refuse") does not let ...', kind="rejected")

    hub.wait_for(lambda: hub.experiment(exp["id"])["phase"] == "cross-site evaluation", "the evaluation phase")
    done = hub.experiment(exp["id"])
    local_digest = r.json()["digest"]
    for site in ("site-a", "site-b"):
        n = 10 if site == "site-a" else 30
        evals = evaluate_all(hub, site, 2, lambda t, n=n: (n, 0.2 if t.weights_digest == local_digest else 0.8))
        assert {t.round for t in evals} == {2}
        assert {t.weights_digest for t in evals} == {done["global_digest"], local_digest}
        for t in evals:  # nothing tells a site whose local model it is evaluating
            assert "site-a" not in json.dumps(t.config) and "local" not in json.dumps(t.config)
    completed = hub.wait_status(exp["id"], "completed")
    assert completed["phase"] is None

    matrix = hub.get(f"/experiments/{exp['id']}/cross-site")
    assert matrix["models"] == ["global", "local:site-a"] and matrix["sites"] == ["site-a", "site-b"]
    assert matrix["round"] == 2 and matrix["complete"] is True
    assert matrix["cells"]["local:site-a"]["site-b"] == {"n_samples": 30, "metrics": {"dice_mean": 0.2}}
    assert matrix["pooled"]["global"] == {"n_samples": 40, "metrics": {"dice_mean": pytest.approx(0.8)}}
    assert [(f["model"], f["site"], f["kind"]) for f in matrix["failures"]] == [("local:site-b", "site-b", "train")]
    assert "local_models" in matrix["failures"][0]["reason"]
    labels = {(m["kind"], m["model"]) for m in hub.get(f"/experiments/{exp['id']}/metrics") if m["round"] == 2}
    assert labels == {("train", "local:site-a"), ("evaluate", "global"), ("evaluate", "local:site-a")}

    url = hub.url(f"/experiments/{exp['id']}/model")
    got = hub.client.get(url, params={"model": "local:site-a"}, headers=hub.admin)
    assert (
        got.status_code == 200 and from_safetensors(got.content)["fc.weight"].tolist() == local_a["fc.weight"].tolist()
    )
    missing = hub.client.get(url, params={"model": "local:site-b"}, headers=hub.admin)
    assert missing.status_code == 404 and "global, local:site-a" in missing.json()["detail"]
    assert hub.client.get(url, params={"model": "local:../x"}, headers=hub.admin).status_code == 422
    stranger = hub.person("mallory")
    assert hub.client.get(url, params={"model": "local:site-a"}, headers=stranger).status_code == 404

    # The local model is a result, not a spent update: kept through every clean-up.
    parts = hub.client.app.state.hub  # type: ignore[attr-defined]
    parts.orchestrator.discard_spent_updates(exp["id"])
    collect_unused_uploads(parts.sessions, parts.blobs, hub.clock() + 100 * 86400, 3600.0)
    assert hub.stored.exists(r.json()["digest"])


def test_cross_site_without_local_models_evaluates_the_global_model_at_every_participant(hub: Hub):
    exp = hub.submit(spec(rounds=1, evaluation={"every": 0, "final": False, "cross_site": True}), make_weights(0))
    train_round(hub, exp["id"], {"site-a": 1, "site-b": 1})
    for site in ("site-a", "site-b"):
        (task,) = tasks_of(hub, site, 1)
        assert task.kind == TaskKind.EVALUATE and task.round == 2
        answer(hub, site, task, 4, dice_mean=0.5)
    hub.wait_status(exp["id"], "completed")
    assert hub.next_task("site-c", wait=0) is None  # site-c took no part
    matrix = hub.get(f"/experiments/{exp['id']}/cross-site")
    assert matrix["models"] == ["global"] and matrix["failures"] == []


def test_the_matrix_is_a_404_for_an_experiment_without_one(hub: Hub):
    exp = hub.submit(spec(), make_weights(0))
    r = hub.client.get(hub.url(f"/experiments/{exp['id']}/cross-site"), headers=hub.admin)
    assert r.status_code == 404 and "cross_site = true" in r.json()["detail"]
    r = hub.client.get(hub.url(f"/experiments/{exp['id']}/model"), params={"model": "local:site-a"}, headers=hub.admin)
    assert r.status_code == 404 and "its models are global" in r.json()["detail"]


def test_a_restart_mid_phase_creates_no_task_twice_and_finishes(make_hub: Callable[..., Hub]):
    first = make_hub()
    first.register("site-a", "site-b")
    exp = first.submit(spec(rounds=1, evaluation=CROSS), make_weights(0))
    train_round(first, exp["id"], {"site-a": 1, "site-b": 1})
    (la,) = tasks_of(first, "site-a", 1)
    assert la.config.get("local_model") is True
    first.stop()

    second = make_hub()
    second.tokens = dict(first.tokens)
    again = second.next_task("site-a")  # the delivered local task comes back, not a new one
    assert again is not None and again.id == la.id
    (lb,) = tasks_of(second, "site-b", 1)
    assert second.upload("site-a", la, update_bytes(make_weights(3))).status_code == 200
    assert second.upload("site-b", lb, update_bytes(make_weights(4))).status_code == 200
    second.wait_for(lambda: second.experiment(exp["id"])["phase"] == "cross-site evaluation", "the evaluation phase")
    second.stop()

    third = make_hub()
    third.tokens = dict(first.tokens)
    for site in ("site-a", "site-b"):  # global + two local models, each once
        evaluate_all(third, site, 3, lambda t: (1, 0.5))
    third.wait_status(exp["id"], "completed")
    matrix = third.get(f"/experiments/{exp['id']}/cross-site")
    assert matrix["models"] == ["global", "local:site-a", "local:site-b"]
    assert all(len(row) == 2 for row in matrix["cells"].values())


def test_a_local_model_past_its_scaled_deadline_expires_and_the_matrix_goes_on(hub: Hub):
    exp = hub.submit(spec(rounds=1, round_timeout_s=60.0, evaluation=CROSS), make_weights(0))
    train_round(hub, exp["id"], {"site-a": 1, "site-b": 1})
    (la,) = tasks_of(hub, "site-a", 1)
    (lb,) = tasks_of(hub, "site-b", 1)
    assert la.time_limit_s == 60.0 and 55 < la.seconds_left <= 60  # 1 round's budget
    assert hub.upload("site-a", la, update_bytes(make_weights(3))).status_code == 200
    hub.clock.advance(61)
    hub.wait_for(lambda: hub.experiment(exp["id"])["phase"] == "cross-site evaluation", "site-b's task to expire")
    late = hub.upload("site-b", lb, update_bytes(make_weights(4)))
    assert late.status_code == 409
    for site in ("site-a", "site-b"):
        evaluate_all(hub, site, 2, lambda t: (1, 0.5))
    hub.wait_status(exp["id"], "completed")
    matrix = hub.get(f"/experiments/{exp['id']}/cross-site")
    assert matrix["models"] == ["global", "local:site-a"]
    assert [f["model"] for f in matrix["failures"]] == ["local:site-b"]
