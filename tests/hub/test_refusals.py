"""Every bad result is refused with the right status and a useful message, recorded, never counted."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from laulima.core.protocol import Header, MetaKey, TaskPublic
from laulima.core.weights import Weights, from_safetensors, to_safetensors

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

    def finish_and_check_only_good_updates_counted(self, *, a_refused: bool = False) -> None:
        """Both sites send good updates; only those count. ``a_refused``: site-a's result was
        refused for its content, which ended its task: its later upload is too late, and the
        round aggregates site-b's update alone."""
        wa, wb = make_weights(11), make_weights(12)
        for site, task, w, n in (("site-a", self.a, wa, 1), ("site-b", self.b, wb, 3)):
            r = self.hub.upload(site, task, update_bytes(w, n_samples=n))
            if site == "site-a" and a_refused:
                assert r.status_code == 409, r.text
                assert "the hub refused its result" in r.json()["detail"]
                continue
            assert r.status_code == 200, r.text
        self.hub.wait_status(self.exp_id, "completed")
        model = from_safetensors(
            self.hub.client.get(self.hub.url(f"/experiments/{self.exp_id}/model"), headers=self.hub.admin).content
        )
        for key in self.initial:
            expected = wb[key] if a_refused else (wa[key] + 3 * wb[key]) / 4
            np.testing.assert_allclose(model[key], expected, rtol=1e-6)
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
    refusal = rnd.refusals()[0]
    assert (refusal["site"], refusal["task_id"], refusal["status"]) == ("site-a", rnd.a.id, 422)
    assert message in refusal["reason"]
    rnd.finish_and_check_only_good_updates_counted(a_refused=True)


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

    h = {**rnd.hub.site("site-b"), Header.UPLOAD_NONCE.value: rnd.b.upload_nonce}
    r = rnd.hub.client.put(rnd.hub.url(f"/tasks/{rnd.b.id}/update"), content=chunks(), headers=h)
    assert r.status_code == 413
    assert [x["status"] for x in rnd.refusals()] == [413, 413]
    # Both sites' results were refused for their content: the round fails now, naming why.
    failed = rnd.hub.wait_status(rnd.exp_id, "failed")
    assert failed["error"].count("failed (refused)") == 2 and "exceeds the limit" in failed["error"]


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


# --------------------------------------------------------------------------- hostile safetensors headers


def rewritten(change: Any = None, *, extra: str = "") -> bytes:
    """A good update (W, 10 samples) whose JSON header ``change`` edits in place; ``extra``
    is raw JSON text inserted as the header's last member (for what json.dumps cannot write)."""
    good = update_bytes(W)
    n = struct.unpack("<Q", good[:8])[0]
    header, data = json.loads(good[8 : 8 + n]), good[8 + n :]
    if change is not None:
        change(header)
    text = json.dumps(header).encode()
    if extra:
        text = text[:-1] + b"," + extra.encode() + b"}"
    return struct.pack("<Q", len(text)) + text + data


def _set(path: str, value: Any) -> Any:
    def change(header: dict[str, Any]) -> None:
        name, _, field = path.partition("/")
        if field:
            header[name][field] = value
        else:
            header[name] = value

    return change


def _rename(old: str, new: str) -> Any:
    def change(header: dict[str, Any]) -> None:
        header[new] = header.pop(old)

    return change


HOSTILE_HEADERS = {
    "metadata is a list": (rewritten(_set("__metadata__", [1, 2])), "'__metadata__' must be an object of strings"),
    "metadata is a number": (rewritten(_set("__metadata__", 7)), "'__metadata__' must be an object of strings"),
    "header nested 3000 deep": (rewritten(extra='"deep":' + "[" * 3000 + "]" * 3000), "nested too deeply"),
    "dimension beyond int64": (rewritten(_set("conv.bias/shape", [2**64])), "tensor 'conv.bias' has shape"),
    "negative dimension": (rewritten(_set("conv.bias/shape", [-4])), "non-negative 64-bit integers"),
    "17 dimensions": (rewritten(_set("conv.bias/shape", [1] * 17)), "a list of at most 16"),
    "byte size overflows": (rewritten(_set("conv.bias/shape", [2**62, 2**62])), "beyond any file"),
    "dtype not a string": (rewritten(_set("conv.bias/dtype", 7)), "tensor 'conv.bias' has an unsupported dtype 7"),
    "offsets not two ints": (rewritten(_set("conv.bias/data_offsets", [0])), "expected two non-negative integers"),
    "offsets as floats": (
        rewritten(_set("conv.bias/data_offsets", [0.0, 16.0])),
        "expected two non-negative integers",
    ),
    "absurd tensor name": (rewritten(_rename("conv.bias", "c" * 5000)), "at most 1024 are accepted"),
    "header far larger than the global model's": (
        update_bytes(W, pad="x" * (70 * 1024)),
        "bytes of metadata)",
    ),
    "non-finite metric": (update_bytes(W, metrics=None, **{MetaKey.METRICS.value: '{"loss": NaN}'}), "is nan"),
    "n_samples above N_SAMPLES_MAX": (update_bytes(W, n_samples=10**9 + 1), "above 1000000000"),
}


@pytest.mark.parametrize("case", list(HOSTILE_HEADERS))
def test_hostile_header_is_refused_with_422_and_recorded(rnd: Round, case: str) -> None:
    body, message = HOSTILE_HEADERS[case]
    r = rnd.hub.upload("site-a", rnd.a, body)
    assert r.status_code == 422, r.text
    err = r.json()
    assert err["error"] == "invalid_weights"
    assert err["detail"].startswith(f"update for task {rnd.a.id}: ")
    assert message in err["detail"]
    [refusal] = rnd.refusals()
    assert (refusal["site"], refusal["task_id"], refusal["status"]) == ("site-a", rnd.a.id, 422)
    assert message in refusal["reason"]
    assert rnd.hub.get(f"/experiments/{rnd.exp_id}/rounds")[0]["n_updates"] == 0
    assert list((rnd.hub.home / "tmp").iterdir()) == [], "a refused upload must leave no temporary file"


def test_n_samples_above_the_experiments_max_samples_per_site_is_refused(hub: Hub) -> None:
    exp = hub.submit(spec(max_samples_per_site=5), make_weights(0))
    a = hub.next_task("site-a")
    assert a
    r = hub.upload("site-a", a, update_bytes(W, n_samples=6))
    assert r.status_code == 422, r.text
    assert "'laulima.n_samples' is 6, above 5" in r.json()["detail"]
    assert "max_samples_per_site" in r.json()["detail"]
    [refusal] = hub.get(f"/experiments/{exp['id']}/refusals")
    assert refusal["status"] == 422 and "above 5" in refusal["reason"]


# --------------------------------------------------------------------------- hostile specs


def submit_raw(hub: Hub, spec_json: str) -> Any:
    digest = hub.upload_blob(to_safetensors(make_weights(0)))
    body = '{"spec": ' + spec_json + ', "initial_weights": "' + digest + '"}'
    return hub.client.post(
        hub.url("/experiments"), content=body, headers={**hub.admin, "Content-Type": "application/json"}
    )


def spec_with(raw_member: str) -> str:
    """The test spec as JSON text with ``raw_member`` (e.g. ``"seed": NaN``) added."""
    return json.dumps(spec())[:-1] + ", " + raw_member + "}"


@pytest.mark.parametrize(
    ("member", "field"),
    [
        ('"round_timeout_s": Infinity', "round_timeout_s"),
        ('"task_timeout_s": -Infinity', "task_timeout_s"),
        ('"max_update_norm": NaN', "max_update_norm"),
        ('"seed": Infinity', "seed"),
        ('"strategy": {"name": "fedadam", "server_lr": NaN}', "strategy.server_lr"),
        ('"config": {"lr": NaN}', "config.lr"),
        ('"config": {"layers": [1, {"scale": Infinity}]}', "config.layers[1].scale"),
    ],
)
def test_non_finite_spec_numbers_are_422_naming_the_field(hub: Hub, member: str, field: str) -> None:
    r = submit_raw(hub, spec_with(member))
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "invalid_spec"
    assert r.json()["detail"].startswith(f"experiment spec: field '{field}': ")
    assert hub.get("/experiments") == []


def test_config_nested_900_deep_is_422_naming_the_path(hub: Hub) -> None:
    r = submit_raw(hub, spec_with('"config": ' + '{"a": ' * 900 + "1" + "}" * 900))
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith("experiment spec: field 'config" + ".a" * 32 + "': nested deeper than 32")
    assert hub.get("/experiments") == []


def test_body_nested_3000_deep_is_a_client_error(hub: Hub) -> None:
    # Too deep for the JSON parser itself: refused before the spec is looked at.
    r = submit_raw(hub, spec_with('"config": ' + '{"a": ' * 3000 + "1" + "}" * 3000))
    assert r.status_code in (400, 422), r.text
    assert hub.get("/experiments") == []


def test_thirty_thousand_sites_are_refused_by_their_number(hub: Hub) -> None:
    sites = [f"site-{i}" for i in range(30_000)]
    r = submit_raw(hub, json.dumps(spec(sites=sites, min_sites=1)))
    assert r.status_code == 422, r.text
    assert "field 'sites': List should have at most 1000 items" in r.json()["detail"]


# --------------------------------------------------------------------------- hostile evaluations


@pytest.fixture()
def evaluation_task(hub: Hub) -> tuple[Hub, TaskPublic, int]:
    exp = hub.submit(spec(evaluation={"every": 0, "final": True}), make_weights(0))
    for site in ("site-a", "site-b"):
        task = hub.next_task(site)
        assert task
        assert hub.upload(site, task, update_bytes(make_weights(3))).status_code == 200
    task = hub.wait_for(lambda: hub.next_task("site-a", wait=0.2), "an evaluation task for site-a")
    assert task.kind == "evaluate"
    return hub, task, exp["id"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('{"n_samples": 1' + "0" * 30 + ', "metrics": {}}', "less than or equal to 1000000000"),
        ('{"n_samples": 3, "metrics": {"dice": NaN}}', "metric 'dice' is nan"),
        ('{"n_samples": 3, "metrics": {"dice": Infinity}}', "metric 'dice' is inf"),
        ('{"n_samples": 3, "metrics": {"dice": 1e300}}', "above 1e+15 in magnitude"),
        ('{"n_samples": 3, "metrics": {"' + "d" * 200 + '": 0.5}}', "names are 1 to 128 printable characters"),
    ],
)
def test_hostile_evaluation_is_422_and_not_stored(
    evaluation_task: tuple[Hub, TaskPublic, int], body: str, message: str
) -> None:
    hub, task, exp_id = evaluation_task
    r = hub.client.post(
        hub.url(f"/tasks/{task.id}/evaluation"),
        content=body,
        headers={**hub.site("site-a"), "Content-Type": "application/json"},
    )
    assert r.status_code == 422, r.text
    assert message in r.json()["detail"]
    assert [m for m in hub.get(f"/experiments/{exp_id}/metrics") if m["kind"] == "evaluate"] == []
    assert [x["status"] for x in hub.get(f"/experiments/{exp_id}/refusals")] == [422]
