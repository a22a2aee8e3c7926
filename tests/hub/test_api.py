"""The hub's API surface: health, who may call what, experiment submission, long polls, blobs."""

from __future__ import annotations

import time

import pytest

from laulima.core.weights import to_safetensors

from .conftest import Hub, make_weights, spec, update_bytes


def test_health_needs_no_token_and_openapi_is_served(hub: Hub):
    r = hub.client.get(hub.url("/health"))
    assert r.status_code == 200 and r.json()["status"] == "ok"
    assert hub.client.get("/docs").status_code == 200
    assert hub.client.get("/openapi.json").json()["info"]["title"] == "Laulima hub"


def test_operator_endpoints_need_the_operator_token(hub: Hub):
    r = hub.client.get(hub.url("/sites"))
    assert r.status_code == 401 and r.json()["error"] == "unauthorized"
    assert r.headers["www-authenticate"] == "Bearer"
    assert hub.client.get(hub.url("/sites"), headers={"Authorization": "Bearer nope"}).status_code == 401
    r = hub.client.get(hub.url("/sites"), headers=hub.site("site-a"))
    assert r.status_code == 403 and "operator" in r.json()["detail"]
    assert [s["name"] for s in hub.get("/sites")] == ["site-a", "site-b", "site-c"]


def test_site_endpoints_need_a_site_token(hub: Hub):
    assert hub.client.get(hub.url("/tasks/next")).status_code == 401
    assert hub.client.get(hub.url("/tasks/next"), headers=hub.admin).status_code == 403


def test_site_names_are_unique_and_validated(hub: Hub):
    r = hub.client.post(hub.url("/sites"), json={"name": "site-a"}, headers=hub.admin)
    assert r.status_code == 409 and "already registered" in r.json()["detail"]
    r = hub.client.post(hub.url("/sites"), json={"name": "bad name!"}, headers=hub.admin)
    assert r.status_code == 422 and r.json()["error"] == "invalid_request"
    assert r.json()["detail"].startswith("body.name:")


def _submit_raw(hub: Hub, spec_: dict, digest: str):
    return hub.client.post(hub.url("/experiments"), json={"spec": spec_, "initial_weights": digest}, headers=hub.admin)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"rounds": 0}, "rounds"),
        ({"strategy": {"name": "magic"}}, "strategy.name"),
        ({"roundz": 3}, "roundz"),
        ({"min_sites": 3}, "(top level)"),
    ],
)
def test_malformed_spec_is_refused_naming_the_field(hub: Hub, changes: dict, field: str):
    digest = hub.upload_blob(to_safetensors(make_weights()))
    r = _submit_raw(hub, spec(**changes), digest)
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "invalid_spec"
    assert f"field '{field}'" in r.json()["detail"]


def test_unknown_site_and_bad_initial_weights_are_refused(hub: Hub):
    digest = hub.upload_blob(to_safetensors(make_weights()))
    r = _submit_raw(hub, spec(sites=["site-a", "site-x"]), digest)
    assert r.status_code == 422 and "unknown site(s) 'site-x'" in r.json()["detail"]
    assert r.json()["context"]["field"] == "sites"
    r = _submit_raw(hub, spec(), "0" * 64)
    assert r.status_code == 422 and "field 'initial_weights'" in r.json()["detail"]
    r = _submit_raw(hub, spec(), hub.upload_blob(b"not safetensors at all"))
    assert r.status_code == 422 and r.json()["error"] == "invalid_weights"
    assert hub.get("/experiments") == []


def test_long_poll_returns_204_after_wait(hub: Hub):
    t0 = time.monotonic()
    assert hub.next_task("site-a", wait=0.4) is None
    assert 0.35 <= time.monotonic() - t0 < 3.0
    r = hub.client.get(hub.url("/tasks/next"), params={"wait": -1}, headers=hub.site("site-a"))
    assert r.status_code == 422


def test_long_poll_wakes_when_a_round_opens(hub: Hub):
    import threading

    got: list = []
    poller = threading.Thread(target=lambda: got.append(hub.next_task("site-a", wait=5.0)))
    t0 = time.monotonic()
    poller.start()
    time.sleep(0.2)
    hub.submit(spec(), make_weights())
    poller.join()
    assert got and got[0] is not None and got[0].kind == "train"
    assert time.monotonic() - t0 < 3.0


def test_sites_download_only_their_tasks_blobs(hub: Hub):
    exp = hub.submit(spec(sites=["site-a"]), make_weights())
    other = hub.upload_blob(to_safetensors(make_weights(9)))
    task = hub.next_task("site-a")
    assert task and task.weights_digest == exp["global_digest"]
    r = hub.client.get(hub.url(f"/blobs/{task.weights_digest}"), headers=hub.site("site-a"))
    assert r.status_code == 200
    assert r.headers["laulima-content-sha256"] == task.weights_digest
    assert int(r.headers["content-length"]) == task.weights_size == len(r.content)
    assert hub.client.get(hub.url(f"/blobs/{other}"), headers=hub.site("site-a")).status_code == 403
    assert hub.client.get(hub.url(f"/blobs/{task.weights_digest}"), headers=hub.site("site-b")).status_code == 403
    assert hub.client.get(hub.url(f"/blobs/{other}"), headers=hub.admin).status_code == 200
    assert hub.client.get(hub.url(f"/blobs/{'1' * 64}"), headers=hub.admin).status_code == 404
    r = hub.client.get(hub.url("/blobs/..%2F..%2Fhub.db"), headers=hub.admin)
    assert r.status_code in (400, 404)


def test_unknown_experiment_is_404_in_error_body(hub: Hub):
    r = hub.client.get(hub.url("/experiments/999"), headers=hub.admin)
    assert r.status_code == 404
    assert r.json() == {"error": "not_found", "detail": "no experiment with id 999", "context": {"experiment": 999}}


def test_cancel_cancels_open_tasks(hub: Hub):
    exp = hub.submit(spec(), make_weights())
    task = hub.next_task("site-a")
    assert task is not None
    r = hub.client.post(hub.url(f"/experiments/{exp['id']}/cancel"), headers=hub.admin)
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert hub.next_task("site-b", wait=0) is None
    late = hub.upload("site-a", task, update_bytes(make_weights(3)))
    assert late.status_code == 409 and "cancelled" in late.json()["detail"]
    again = hub.client.post(hub.url(f"/experiments/{exp['id']}/cancel"), headers=hub.admin)
    assert again.status_code == 409
    assert hub.get(f"/experiments/{exp['id']}/rounds")[0]["status"] == "failed"


def test_unexpected_errors_become_a_500_without_internals(hub: Hub, monkeypatch: pytest.MonkeyPatch):
    from fastapi.testclient import TestClient

    def boom() -> None:
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(hub.client.app.state.hub.service, "list_sites", boom)  # type: ignore[attr-defined]
    client = TestClient(hub.client.app, raise_server_exceptions=False)
    r = client.get(hub.url("/sites"), headers=hub.admin)
    assert r.status_code == 500
    assert r.json()["error"] == "internal_error" and "secret" not in r.text
