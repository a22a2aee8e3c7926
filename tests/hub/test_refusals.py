"""Every bad result is refused with the right status and a useful message, recorded, never counted."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from laulima.core.protocol import Header, MetaKey, TaskPublic
from laulima.core.weights import Weights, from_safetensors

from .conftest import Hub, make_weights, spec, update_bytes


@dataclass
class Round:
    hub: Hub
    exp_id: int
    a: TaskPublic
    b: TaskPublic
    initial: Weights

    def refusals(self) -> list[dict[str, Any]]:
        return self.hub.get(f"/experiments/{self.exp_id}/refusals")

    def finish_and_check_only_good_updates_counted(self) -> None:
        wa, wb = make_weights(11), make_weights(12)
        for site, task, w, n in (("site-a", self.a, wa, 1), ("site-b", self.b, wb, 3)):
            r = self.hub.upload(site, task, update_bytes(w, n_samples=n))
            assert r.status_code == 200, r.text
        self.hub.wait_status(self.exp_id, "completed")
        model = from_safetensors(
            self.hub.client.get(self.hub.url(f"/experiments/{self.exp_id}/model"), headers=self.hub.admin).content
        )
        for key in self.initial:
            np.testing.assert_allclose(model[key], (wa[key] + 3 * wb[key]) / 4, rtol=1e-6)
        leftovers = list((self.hub.home / "tmp").iterdir())
        assert leftovers == [], "refused uploads must not leave temporary files"


@pytest.fixture()
def rnd(hub: Hub) -> Round:
    initial = make_weights(0)
    exp = hub.submit(spec(max_update_norm=1000.0), initial)
    a, b = hub.next_task("site-a"), hub.next_task("site-b")
    assert a and b
    return Round(hub, exp["id"], a, b, initial)


def _with(w: Weights, **changes: Any) -> Weights:
    out = dict(w)
    for k, v in changes.items():
        k = k.replace("__", ".")
        if v is None:
            out.pop(k)
        else:
            out[k] = v
    return out


W = make_weights(5)
NAN = W["conv.bias"].copy()
NAN[1] = np.nan
INF = W["fc.weight"].copy()
INF[0, 0] = -np.inf

BAD_BODIES = {
    "missing key": (update_bytes(_with(W, conv__bias=None)), "keys differ from the global model: missing 'conv.bias'"),
    "extra key": (update_bytes(_with(W, extra=np.zeros(2, np.float32))), "unexpected 'extra'"),
    "wrong shape": (update_bytes(_with(W, conv__bias=np.zeros(5, np.float32))), "has shape [5], expected [4]"),
    "wrong dtype": (update_bytes(_with(W, conv__bias=np.zeros(4, np.float64))), "dtype float64, expected float32"),
    "NaN": (update_bytes(_with(W, conv__bias=NAN)), "tensor 'conv.bias' contains NaN"),
    "Inf": (update_bytes(_with(W, fc__weight=INF)), "tensor 'fc.weight' contains Inf"),
    "no n_samples": (update_bytes(W, n_samples=None), "'laulima.n_samples' is missing"),
    "zero n_samples": (update_bytes(W, n_samples=0), "must be a positive integer"),
    "text n_samples": (update_bytes(W, n_samples="many"), "must be a positive integer"),
    "metrics not numbers": (update_bytes(W, metrics={"loss": "low"}), "JSON object of finite numbers"),
    "not safetensors": (b"\x00" * 64, "safetensors"),
    "truncated": (update_bytes(W)[:-7], "not a valid safetensors file"),
    "too far from global": (update_bytes(_with(W, fc__weight=W["fc.weight"] + 1e4)), "above the experiment's"),
    "bound to another task": (update_bytes(W, **{MetaKey.TASK.value: "0" * 32}), "made for task"),
}


@pytest.mark.parametrize("case", list(BAD_BODIES))
def test_bad_update_is_refused_with_422_recorded_and_not_counted(rnd: Round, case: str):
    body, message = BAD_BODIES[case]
    r = rnd.hub.upload("site-a", rnd.a, body)
    assert r.status_code == 422, r.text
    err = r.json()
    assert err["error"] == "invalid_weights"
    assert message in err["detail"]
    assert f"update for task {rnd.a.id}" in err["detail"]
    [refusal] = rnd.refusals()
    assert (refusal["site"], refusal["task_id"], refusal["status"]) == ("site-a", rnd.a.id, 422)
    assert message in refusal["reason"]
    rnd.finish_and_check_only_good_updates_counted()


def test_another_sites_task_is_forbidden(rnd: Round):
    r = rnd.hub.upload("site-b", rnd.a, update_bytes(W), nonce=rnd.a.upload_nonce)
    assert r.status_code == 403
    assert f"task {rnd.a.id} is assigned to site 'site-a', not 'site-b'" in r.json()["detail"]
    assert rnd.refusals()[0]["site"] == "site-b"
    rnd.finish_and_check_only_good_updates_counted()


@pytest.mark.parametrize("nonce", ["wrong-nonce", ""])
def test_wrong_or_missing_nonce_is_forbidden(rnd: Round, nonce: str):
    h = {**rnd.hub.site("site-a"), Header.UPLOAD_NONCE.value: nonce}
    r = rnd.hub.client.put(rnd.hub.url(f"/tasks/{rnd.a.id}/update"), content=update_bytes(W), headers=h)
    assert r.status_code == 403
    assert "upload nonce does not match" in r.json()["detail"]
    rnd.finish_and_check_only_good_updates_counted()


def test_second_result_for_a_task_is_a_conflict_naming_the_accepted_digest(rnd: Round):
    first = rnd.hub.upload("site-a", rnd.a, update_bytes(make_weights(7), n_samples=4))
    assert first.status_code == 200
    again = rnd.hub.upload("site-a", rnd.a, update_bytes(make_weights(8), n_samples=4))
    assert again.status_code == 409
    assert again.json()["context"]["accepted_digest"] == first.json()["digest"]
    assert "already has an accepted result" in again.json()["detail"]
    rounds = rnd.hub.get(f"/experiments/{rnd.exp_id}/rounds")
    assert rounds[0]["n_updates"] == 1


def test_body_above_the_task_limit_is_413(rnd: Round):
    size = len(update_bytes(W)) + 1024 * 1024 + 10
    r = rnd.hub.upload("site-a", rnd.a, b"\0" * size)  # Content-Length declared
    assert r.status_code == 413
    assert "exceeds the limit" in r.json()["detail"]

    def chunks():  # no Content-Length: the hub counts while reading
        for _ in range(size // 65536 + 1):
            yield b"\0" * 65536

    h = {**rnd.hub.site("site-a"), Header.UPLOAD_NONCE.value: rnd.a.upload_nonce}
    r = rnd.hub.client.put(rnd.hub.url(f"/tasks/{rnd.a.id}/update"), content=chunks(), headers=h)
    assert r.status_code == 413
    assert [x["status"] for x in rnd.refusals()] == [413, 413]
    rnd.finish_and_check_only_good_updates_counted()


def test_damaged_body_is_refused_by_its_announced_digest(rnd: Round):
    r = rnd.hub.upload("site-a", rnd.a, update_bytes(W), **{Header.CONTENT_SHA256.value: "ab" * 32})
    assert r.status_code == 422
    assert "damaged in transit" in r.json()["detail"]


def test_result_for_a_closed_round_is_too_late(hub: Hub):
    exp = hub.submit(spec(min_sites=1, round_timeout_s=30.0), make_weights(0))
    a, b = hub.next_task("site-a"), hub.next_task("site-b")
    assert a and b
    assert hub.upload("site-a", a, update_bytes(W)).status_code == 200
    hub.clock.advance(31.0)  # deadline passes; quorum (1) met -> aggregated without site-b
    hub.wait_status(exp["id"], "completed")
    r = hub.upload("site-b", b, update_bytes(W))
    assert r.status_code == 409
    assert r.json()["detail"] == (
        "round 1 of experiment 'exp' is closed; this result arrived too late and was not counted"
    )
    assert hub.get(f"/experiments/{exp['id']}/rounds")[0]["n_updates"] == 1


def test_evaluation_for_a_train_task_and_unknown_tasks_are_refused(rnd: Round):
    r = rnd.hub.client.post(
        rnd.hub.url(f"/tasks/{rnd.a.id}/evaluation"),
        json={"n_samples": 3, "metrics": {"dice": 0.5}},
        headers=rnd.hub.site("site-a"),
    )
    assert r.status_code == 409 and "is a train task" in r.json()["detail"]
    r = rnd.hub.upload("site-a", rnd.a.model_copy(update={"id": "f" * 32}), update_bytes(W))
    assert r.status_code == 404
