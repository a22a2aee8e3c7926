"""Which sites a round selects, what operators see of them, and refusals that end a site's part at once."""

from __future__ import annotations

import json

import numpy as np
import pytest

from laulima.core.protocol import Header

from .conftest import Hub, make_weights, spec, update_bytes


def _sites(hub: Hub) -> dict[str, dict]:
    return {s["name"]: s for s in hub.get("/sites")}


def _refusals(hub: Hub, exp_id: int) -> list[dict]:
    return hub.get(f"/experiments/{exp_id}/refusals")


# -- selection and the site list ------------------------------------------------------
def test_an_offline_site_is_left_out_with_its_reason_instead_of_holding_the_round(make_hub):
    hub = make_hub(site_offline_after_s=60.0)
    hub.register("site-a", "site-b")
    hub.clock.advance(61.0)  # both quiet for longer than the offline threshold ...
    hub.connect("site-a")  # ... and site-a says hello again
    assert {n: s["status"] for n, s in _sites(hub).items()} == {"site-a": "online", "site-b": "offline"}

    exp = hub.submit(spec(sites=[]), make_weights(0))  # every site the hub knows
    task = hub.next_task("site-a")
    assert task is not None
    assert hub.next_task("site-b", wait=0) is None
    rounds = hub.get(f"/experiments/{exp['id']}/rounds")
    assert rounds[0]["sites"] == ["site-a"]
    assert rounds[0]["left_out"] == {"site-b": "offline: last seen 61 s ago"}
    assert hub.upload("site-a", task, update_bytes(make_weights(1))).status_code == 200
    hub.wait_status(exp["id"], "completed")  # no deadline was waited for


def test_an_experiment_waits_for_its_quorum_of_online_sites_and_says_why(make_hub):
    hub = make_hub()
    hub.register("site-a")
    r = hub.client.post(hub.url("/sites"), json={"name": "site-b"}, headers=hub.admin)
    hub.tokens["site-b"] = r.json()["token"]  # registered, never connected
    exp = hub.submit(spec(min_sites=2), make_weights(0))
    waiting = hub.wait_for(lambda: hub.experiment(exp["id"])["waiting"], "the waiting note")
    assert "min_sites = 2" in waiting and "site-b: offline: never connected" in waiting
    assert hub.get(f"/experiments/{exp['id']}/rounds") == []

    hub.connect("site-b")  # its agent starts
    assert hub.next_task("site-b") is not None
    assert hub.experiment(exp["id"])["waiting"] is None


def test_agent_version_and_reported_cohorts_are_listed(hub: Hub):
    h = {**hub.site("site-a"), Header.VERSION.value: "9.8.7"}
    assert hub.client.get(hub.url("/tasks/next"), params={"wait": 0}, headers=h).status_code == 204
    report = {"version": "9.8.7", "datasets": {"brains": 12, "notes": None}}
    r = hub.client.put(hub.url("/sites/self/report"), json=report, headers=hub.site("site-a"))
    assert r.status_code == 204, r.text
    site = _sites(hub)["site-a"]
    assert site["version"] == "9.8.7" and site["datasets"] == {"brains": 12, "notes": None}
    assert site["status"] == "online" and site["last_seen"] is not None

    hostile = {"version": "x" * 65, "datasets": {"brains": 10**30}}
    r = hub.client.put(hub.url("/sites/self/report"), json=hostile, headers=hub.site("site-a"))
    assert r.status_code == 422
    r = hub.client.put(hub.url("/sites/self/report"), json=report, headers=hub.admin)
    assert r.status_code == 403  # a person cannot report for a site


def test_a_removed_site_is_refused_its_open_tasks_cancelled_and_it_can_come_back(hub: Hub):
    exp = hub.submit(spec(sites=["site-a", "site-b"], min_sites=1, rounds=2), make_weights(0))
    ta, tb = hub.next_task("site-a"), hub.next_task("site-b")
    assert ta and tb
    r = hub.client.delete(hub.url("/sites/site-b"), headers=hub.admin)
    assert r.status_code == 200 and r.json()["status"] == "removed"
    r = hub.client.get(hub.url("/tasks/next"), params={"wait": 0}, headers=hub.site("site-b"))
    assert r.status_code == 403 and "removed" in r.json()["detail"]
    assert hub.client.delete(hub.url("/sites/site-a"), headers=hub.site("site-a")).status_code == 403

    assert hub.upload("site-a", ta, update_bytes(make_weights(1))).status_code == 200
    # Round 1 closes at once (site-b's task was cancelled); round 2 names site-b as left out.
    second = hub.next_task("site-a")
    assert second is not None and second.round == 2
    rounds = hub.get(f"/experiments/{exp['id']}/rounds")
    assert rounds[1]["sites"] == ["site-a"] and "removed" in rounds[1]["left_out"]["site-b"]

    r = hub.client.post(hub.url("/sites"), json={"name": "site-b"}, headers=hub.admin)
    assert r.status_code == 201
    hub.tokens["site-b"] = r.json()["token"]
    hub.connect("site-b")
    assert _sites(hub)["site-b"]["status"] == "online"
    assert hub.client.delete(hub.url("/sites/nobody"), headers=hub.admin).status_code == 404


# -- refusals end the site's part in the round ------------------------------------------
def test_an_update_over_max_update_norm_ends_that_sites_task_and_the_round_goes_on(hub: Hub):
    initial = make_weights(0)
    exp = hub.submit(spec(max_update_norm=1.0, round_timeout_s=600.0), initial)
    ta, tb = hub.next_task("site-a"), hub.next_task("site-b")
    far = {k: v + 100.0 for k, v in initial.items()}
    r = hub.upload("site-b", tb, update_bytes(far))
    assert r.status_code == 422 and "max_update_norm" in r.json()["detail"]
    assert hub.next_task("site-b", wait=0) is None  # not handed out again
    assert hub.upload("site-a", ta, update_bytes(initial)).status_code == 200
    done = hub.wait_status(exp["id"], "completed")  # without waiting 600 s for site-b
    assert done["rounds_done"] == 1
    assert [r["reason"] for r in _refusals(hub, exp["id"])][0].startswith(f"update for task {tb.id}")


def test_a_round_whose_only_site_is_refused_fails_at_once_naming_the_refusal(hub: Hub):
    initial = make_weights(0)
    exp = hub.submit(spec(sites=["site-a"], max_update_norm=1.0, round_timeout_s=600.0), initial)
    task = hub.next_task("site-a")
    bad = {k: v + 100.0 for k, v in initial.items()}
    assert hub.upload("site-a", task, update_bytes(bad)).status_code == 422
    failed = hub.wait_status(exp["id"], "failed")
    assert "site-a: failed (refused)" in failed["error"] and "max_update_norm" in failed["error"]


def test_evaluation_with_non_finite_metrics_is_refused_recorded_and_closes_the_task(hub: Hub):
    exp = hub.submit(spec(sites=["site-a"], evaluation={"every": 1, "final": True}), make_weights(0))
    task = hub.next_task("site-a")
    assert hub.upload("site-a", task, update_bytes(make_weights(1))).status_code == 200
    evaluation = hub.wait_for(lambda: hub.next_task("site-a", wait=0.2), "the evaluation task")
    assert evaluation.kind == "evaluate"
    body = '{"n_samples": 3, "metrics": {"dice": NaN}}'
    h = {**hub.site("site-a"), "Content-Type": "application/json"}
    r = hub.client.post(hub.url(f"/tasks/{evaluation.id}/evaluation"), content=body, headers=h)
    assert r.status_code == 422 and "metrics" in r.json()["detail"]
    assert any(x["task_id"] == evaluation.id and x["status"] == 422 for x in _refusals(hub, exp["id"]))
    assert hub.next_task("site-a", wait=0) is None
    hub.wait_status(exp["id"], "completed")
    assert [m for m in hub.get(f"/experiments/{exp['id']}/metrics") if m["kind"] == "evaluate"] == []


def test_sample_counts_are_bounded_by_the_cases_a_site_reported(hub: Hub):
    report = {"version": "1", "datasets": {"brains": 8}}
    assert hub.client.put(hub.url("/sites/self/report"), json=report, headers=hub.site("site-a")).status_code == 204
    exp = hub.submit(spec(sites=["site-a", "site-b"], max_samples_per_site=1000), make_weights(0))
    ta, tb = hub.next_task("site-a"), hub.next_task("site-b")
    r = hub.upload("site-a", ta, update_bytes(make_weights(1), n_samples=10**6))
    assert r.status_code == 422
    assert "8 cases site 'site-a' reported for dataset 'brains'" in r.json()["detail"]
    r = hub.upload("site-b", tb, update_bytes(make_weights(2), n_samples=1001))
    assert r.status_code == 422 and "max_samples_per_site" in r.json()["detail"]
    hub.wait_status(exp["id"], "failed")


# -- bounded request streams ------------------------------------------------------------
def test_a_site_flooding_polls_gets_429_with_retry_after(make_hub):
    hub = make_hub(requests_per_minute=60.0, request_burst=5)
    hub.register("site-a")  # one poll already spent
    codes = [
        hub.client.get(hub.url("/tasks/next"), params={"wait": 0}, headers=hub.site("site-a")).status_code
        for _ in range(6)
    ]
    assert codes[:4] == [204] * 4 and codes[4:] == [429, 429]
    r = hub.client.get(hub.url("/tasks/next"), params={"wait": 0}, headers=hub.site("site-a"))
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1


def test_malformed_task_ids_are_refused_before_anything_is_stored(hub: Hub):
    exp = hub.submit(spec(), make_weights(0))
    long_id = "a" * 20_000
    for task_id in (long_id, "../etc", "A" * 32):
        r = hub.client.post(
            hub.url(f"/tasks/{task_id}/failure"), json={"reason": "x"}, headers=hub.site("site-a")
        )
        assert r.status_code in (404, 422), r.text
    assert _refusals(hub, exp["id"]) == []


def test_refusals_stored_per_task_are_capped(make_hub):
    from laulima.hub.service import MAX_REFUSALS_PER_TASK

    hub = make_hub(site_upload_burst=200, site_uploads_per_minute=6000.0)
    hub.register("site-a")
    exp = hub.submit(spec(sites=["site-a"]), make_weights(0))
    task = hub.next_task("site-a")
    for _ in range(MAX_REFUSALS_PER_TASK + 5):
        assert hub.upload("site-a", task, b"x" * 64, nonce="wrong").status_code == 403
    assert len(_refusals(hub, exp["id"])) == MAX_REFUSALS_PER_TASK


def test_a_trailing_newline_in_a_digest_is_not_a_digest(hub: Hub):
    digest = hub.upload_blob(b"hello")
    r = hub.client.get(hub.url(f"/blobs/{digest}%0A"), headers=hub.admin)
    assert r.status_code == 400 and "digest" in r.json()["detail"]


@pytest.mark.local_backend
def test_the_hub_home_and_database_are_private(hub: Hub):
    assert hub.home.stat().st_mode & 0o077 == 0
    assert (hub.home / "hub.db").stat().st_mode & 0o077 == 0


def test_stale_failure_decision_does_not_fail_a_round_that_got_an_update(hub: Hub):
    exp = hub.submit(spec(sites=["site-a"]), make_weights(0))
    task = hub.next_task("site-a")
    parts = hub.client.app.state.hub  # type: ignore[attr-defined]
    parts.orchestrator.stop()  # decide by hand, as a slow orchestrator would
    assert hub.upload("site-a", task, update_bytes(make_weights(1))).status_code == 200
    with parts.sessions() as session:
        (update_id,) = [u.id for u in parts.service.round_updates(session, exp["id"], 1)]
    # A decision taken before the update arrived (it saw none) must not fail the round ...
    assert parts.service.fail_round(1, "stale: no update", update_ids=[]) is False
    assert hub.experiment(exp["id"])["status"] == "running"
    # ... while one that saw the same updates still may.
    assert parts.service.fail_round(1, "current", update_ids=[update_id]) is True
    assert hub.experiment(exp["id"])["error"] == "current"


def test_a_non_finite_aggregate_is_refused_and_the_previous_model_kept():
    import pytest

    from laulima.hub.orchestrator import NonFiniteAggregate, _check_finite_aggregate

    _check_finite_aggregate({"w": np.ones(3, np.float32)}, ["site-a"])
    with pytest.raises(NonFiniteAggregate, match="tensor 'w'"):
        _check_finite_aggregate({"w": np.array([1.0, np.inf], np.float32)}, ["site-a", "site-b"])


def test_many_experiments_that_cannot_start_cost_the_orchestrator_no_queries_each_tick(make_hub):
    from sqlalchemy import event

    hub = make_hub(orchestrator_tick_s=600.0, person_max_running_experiments=100)
    hub.register("site-a")
    hub.client.post(hub.url("/sites"), json={"name": "site-b"}, headers=hub.admin)  # never connects
    orchestrator = hub.client.app.state.hub.orchestrator  # type: ignore[attr-defined]
    orchestrator.recheck_waiting_s = 600.0
    digest = hub.upload_blob(update_bytes(make_weights(0)))
    for i in range(40):
        stuck = spec(name=f"stuck-{i}", sites=["site-a", "site-b"], min_sites=2)
        r = hub.client.post(hub.url("/experiments"), json={"spec": stuck, "initial_weights": digest}, headers=hub.admin)
        assert r.status_code == 201, r.text
    hub.wait_for(lambda: len(orchestrator._waiting) == 40, "every stuck experiment to be parked")
    statements: list[str] = []
    engine = hub.client.app.state.hub.engine  # type: ignore[attr-defined]

    def count(*args: object) -> None:
        statements.append(json.dumps(str(args[2]))[:40])

    event.listen(engine, "before_cursor_execute", count)
    try:
        orchestrator.tick()
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert len(statements) < 10, statements


def test_a_task_the_hub_cannot_serve_is_failed_and_never_blocks_the_sites_queue(hub: Hub):
    from sqlalchemy import update

    from laulima.hub.db import Task

    first = hub.submit(spec(name="broken", sites=["site-a"]), make_weights(0))
    second = hub.submit(spec(name="fine", sites=["site-a"]), make_weights(1))
    parts = hub.client.app.state.hub  # type: ignore[attr-defined]
    hub.wait_for(lambda: len(hub.get(f"/experiments/{second['id']}/rounds")) == 1, "both rounds to open")
    with parts.sessions.begin() as session:  # a row an older, laxer hub could have written
        session.execute(update(Task).where(Task.experiment_id == first["id"]).values(deadline=float("inf")))
    task = hub.next_task("site-a")
    assert task is not None and task.experiment_id == second["id"]
    failed = hub.wait_status(first["id"], "failed")
    assert "the hub cannot serve this task" in failed["error"]


def test_a_malformed_evaluation_sent_to_a_train_task_does_not_end_that_task(hub: Hub):
    exp = hub.submit(spec(sites=["site-a"]), make_weights(0))
    task = hub.next_task("site-a")
    h = {**hub.site("site-a"), "Content-Type": "application/json"}
    r = hub.client.post(hub.url(f"/tasks/{task.id}/evaluation"), content=b'{"n_samples": NaN}', headers=h)
    assert r.status_code == 409 and "is a train task" in r.json()["detail"]
    assert hub.upload("site-a", task, update_bytes(make_weights(1))).status_code == 200
    hub.wait_status(exp["id"], "completed")
    r = hub.client.post(hub.url(f"/tasks/{task.id}/failure"), json={"reason": "late"}, headers=hub.site("site-a"))
    assert r.status_code == 409 and r.content and "content-type" in r.headers
