"""Algorithm bundles at the hub, and sites that hold a task for their administrator's approval.

A spec names a built-in or a bundle the scientist uploaded; the hub checks the bundle (digest,
manifest, every file, its entry point) before any site hears of it, hands its digest and
size to the sites, and lets only them and the experiment's readers download it. A site whose
policy holds a job for its administrator says so: the task is not handed out again, the round
waits for it until the experiment's approval deadline, and the scientist sees why at once.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from laulima.algorithms.bundle import PackedBundle, generate_signing_key, pack, sign
from laulima.core.bundle import builtin_digest
from laulima.core.protocol import TaskPublic
from laulima.core.rounds import NO_APPROVAL
from laulima.core.weights import to_safetensors
from laulima.errors import Conflict
from laulima.hub.housekeeping import collect_unused_uploads

from .conftest import Hub, make_weights, spec, update_bytes

ENTRY = "mymodel:Algo"
MODULE_SOURCE = b'"""A test algorithm: only packed and checked here, never run."""\n\n\nclass Algo:\n    pass\n'


@pytest.fixture()
def bundle(tmp_path: Path) -> PackedBundle:
    source = tmp_path / "mymodel.py"
    source.write_bytes(MODULE_SOURCE)
    return pack(source, ENTRY)


def _parts(hub: Hub) -> Any:
    return hub.client.app.state.hub  # type: ignore[attr-defined]


def _post_experiment(hub: Hub, who: dict[str, str], spec_: dict[str, Any], weights_digest: str) -> httpx.Response:
    return hub.client.post(
        hub.url("/experiments"), json={"spec": spec_, "initial_weights": weights_digest}, headers=who
    )


def _put(hub: Hub, who: dict[str, str], data: bytes) -> str:
    r = hub.client.put(hub.url("/blobs"), content=data, headers=who)
    assert r.status_code == 201, r.text
    return str(r.json()["digest"])


def _wait(hub: Hub, site: str, task_id: str, reason: Any = "held for the administrator: unknown requester") -> Any:
    return hub.client.put(hub.url(f"/tasks/{task_id}/waiting"), json={"reason": reason}, headers=hub.site(site))


def _resume(hub: Hub, site: str, task_id: str) -> httpx.Response:
    return hub.client.post(hub.url(f"/tasks/{task_id}/resume"), headers=hub.site(site))


def _ticks(hub: Hub) -> None:
    """Give the orchestrator (tick 0.05 s) time for several passes."""
    time.sleep(0.4)


def _refusal(r: httpx.Response, status: int = 422) -> tuple[str, dict[str, Any]]:
    assert r.status_code == status, r.text
    body = r.json()
    return body["detail"], body["context"]


# -- bundles ------------------------------------------------------------------------------
def test_an_experiment_with_a_bundle_hands_its_sites_the_bundle_and_who_asks(hub: Hub, bundle: PackedBundle):
    digest = hub.upload_blob(bundle.data)
    signature = sign(digest, generate_signing_key().private_pem)
    exp = hub.submit(spec(algorithm=ENTRY, bundle=digest, signatures=[signature], rounds=3), make_weights(0))
    assert exp["algorithm_digest"] == digest
    assert exp["spec"]["bundle"] == digest and "source" not in exp["spec"] and "requirements" not in exp["spec"]

    task = hub.next_task("site-a")
    assert task is not None
    assert (task.bundle_digest, task.bundle_size, task.signatures) == (digest, len(bundle.data), [signature])
    assert (task.requester, task.rounds, task.algorithm) == ("admin", 3, ENTRY)
    assert 86400 - 60 < task.approval_seconds_left <= 86400

    got = hub.client.get(hub.url(f"/blobs/{digest}"), headers=hub.site("site-a"))
    assert got.status_code == 200 and got.content == bundle.data
    other = hub.client.get(hub.url(f"/blobs/{digest}"), headers=hub.site("site-c"))  # no task of this experiment
    assert other.status_code in (403, 404), other.text


def test_a_built_in_has_its_well_known_digest_and_no_bundle(hub: Hub):
    exp = hub.submit(spec(), make_weights(0))
    assert exp["algorithm_digest"] == builtin_digest("laulima.algorithms.identity:Identity")
    task = hub.next_task("site-a")
    assert task is not None
    assert (task.bundle_digest, task.bundle_size, task.signatures) == (None, None, [])


def test_people_an_experiment_is_shared_with_may_read_its_bundle(hub: Hub, bundle: PackedBundle):
    alice, bob, carol = hub.person("alice"), hub.person("bob"), hub.person("carol")
    digest = _put(hub, alice, bundle.data)
    exp = _post_experiment(
        hub, alice, spec(algorithm=ENTRY, bundle=digest), _put(hub, alice, to_safetensors(make_weights()))
    )
    assert exp.status_code == 201, exp.text
    assert hub.client.get(hub.url(f"/blobs/{digest}"), headers=bob).status_code == 404
    r = hub.client.post(hub.url(f"/experiments/{exp.json()['id']}/shares"), json={"name": "bob"}, headers=alice)
    assert r.status_code == 200, r.text
    assert hub.client.get(hub.url(f"/blobs/{digest}"), headers=bob).content == bundle.data
    assert hub.client.get(hub.url(f"/blobs/{digest}"), headers=carol).status_code == 404


def _edited(data: bytes, old: bytes, new: bytes) -> bytes:
    assert data.count(old) == 1 and len(old) == len(new)
    return data.replace(old, new)


@pytest.mark.parametrize(
    ("case", "field", "detail"),
    [
        ("missing", "bundle", "no blob"),
        ("source edited", "bundle", "mymodel.py: its sha256 differs from the one in manifest.json"),
        ("manifest edited", "bundle", "mymodel.py: its sha256 differs from the one in manifest.json"),
        ("not a bundle", "bundle", "not an uncompressed tar archive"),
        ("other entry point", "algorithm", "'mymodel:Other' is not the entry point of bundle"),
    ],
)
def test_a_bundle_that_does_not_hold_what_the_spec_names_is_refused(
    hub: Hub, bundle: PackedBundle, case: str, field: str, detail: str
):
    data, algorithm = bundle.data, ENTRY
    if case == "source edited":
        data = _edited(data, b"class Algo:", b"class Algx:")
    elif case == "manifest edited":
        file_sha = hashlib.sha256(MODULE_SOURCE).hexdigest()
        data = _edited(data, file_sha.encode(), ("0" if file_sha[0] != "0" else "1").encode() + file_sha[1:].encode())
    elif case == "not a bundle":
        data = to_safetensors(make_weights(3))
    elif case == "other entry point":
        algorithm = "mymodel:Other"
    digest = hashlib.sha256(b"never uploaded").hexdigest() if case == "missing" else hub.upload_blob(data)
    weights = hub.upload_blob(to_safetensors(make_weights(0)))
    message, context = _refusal(_post_experiment(hub, hub.admin, spec(algorithm=algorithm, bundle=digest), weights))
    assert message.startswith(f"field '{field}': "), message
    assert detail in message
    assert context["field"] == field
    assert hub.get("/experiments") == []


def test_a_bundle_someone_else_uploaded_is_refused_like_a_missing_one(hub: Hub, bundle: PackedBundle):
    digest = hub.upload_blob(bundle.data)  # the operator's upload
    alice = hub.person("alice")
    weights = _put(hub, alice, to_safetensors(make_weights(0)))
    message, context = _refusal(_post_experiment(hub, alice, spec(algorithm=ENTRY, bundle=digest), weights))
    assert message.startswith(f"field 'bundle': no blob {digest} on this hub that you uploaded or may read")
    assert context["field"] == "bundle"


def test_a_blob_too_large_for_a_bundle_is_refused_before_it_is_read(
    hub: Hub, bundle: PackedBundle, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr("laulima.hub.service.MAX_ARCHIVE_BYTES", len(bundle.data) - 1)
    digest, weights = hub.upload_blob(bundle.data), hub.upload_blob(to_safetensors(make_weights(0)))
    message, _ = _refusal(_post_experiment(hub, hub.admin, spec(algorithm=ENTRY, bundle=digest), weights))
    assert message.startswith(f"field 'bundle': blob {digest[:12]} holds {len(bundle.data)} bytes, more than")


@pytest.mark.parametrize("algorithm", ["os:system", "antigravity:X"])
def test_an_algorithm_neither_built_in_nor_bundled_is_refused(hub: Hub, algorithm: str):
    weights = hub.upload_blob(to_safetensors(make_weights(0)))
    message, context = _refusal(_post_experiment(hub, hub.admin, spec(algorithm=algorithm), weights))
    assert message == (
        f"experiment spec: field 'algorithm': {algorithm!r} is neither a built-in (laulima.algorithms.*, "
        "laulima.nnunet) nor packed: name a `source` folder or file to pack, or a `bundle` digest"
    )
    assert context["field"] == "algorithm"


@pytest.mark.parametrize(
    ("fields", "field", "detail"),
    [
        ({"source": "/home/me/mymodel.py"}, "source", "is a local path the hub cannot read; submit with `laulima"),
        ({"source": "x.py", "requirements": ["numpy>=1"]}, "source", "local path"),
        ({"bundle": "ab" * 32, "requirements": ["numpy>=1"]}, "requirements", "laulima experiment submit"),
    ],
)
def test_a_spec_that_still_names_local_files_is_refused(hub: Hub, fields: dict[str, Any], field: str, detail: str):
    weights = hub.upload_blob(to_safetensors(make_weights(0)))
    message, context = _refusal(_post_experiment(hub, hub.admin, spec(algorithm=ENTRY, **fields), weights))
    assert message.startswith(f"field '{field}': ") and detail in message
    assert context["field"] == field


def test_a_bundle_an_experiment_uses_survives_the_clean_up(make_hub: Callable[..., Hub], bundle: PackedBundle):
    ttl = 3600.0
    hub = make_hub(unused_upload_ttl_s=ttl)
    hub.register("site-a")
    alice = hub.person("alice")
    digest = _put(hub, alice, bundle.data)
    weights = _put(hub, alice, to_safetensors(make_weights(0)))
    assert (
        _post_experiment(hub, alice, spec(sites=["site-a"], algorithm=ENTRY, bundle=digest), weights).status_code == 201
    )
    unused = _put(hub, alice, b"never used")
    parts = _parts(hub)
    assert parts.service.pending_uploads("alice") == (1, len(b"never used"))  # the bundle counts as used
    collected = collect_unused_uploads(parts.sessions, parts.blobs, hub.clock() + 100 * ttl, ttl)
    assert collected.blobs == 1 and not hub.stored.exists(unused)
    assert hub.stored.exists(digest)
    assert hub.client.get(hub.url(f"/blobs/{digest}"), headers=alice).content == bundle.data


# -- waiting for approval --------------------------------------------------------------------
def _two_site_round(hub: Hub, **changes: Any) -> tuple[dict[str, Any], TaskPublic, TaskPublic]:
    """An experiment on site-a and site-b (quorum 2, 20 s rounds, 100 s to approve), both tasks fetched."""
    values: dict[str, Any] = {"min_sites": 2, "round_timeout_s": 20.0, "approval_timeout_s": 100.0, **changes}
    exp = hub.submit(spec(**values), make_weights(0))
    ta, tb = hub.next_task("site-a"), hub.next_task("site-b")
    assert ta is not None and tb is not None
    return exp, ta, tb


def test_a_task_waiting_for_approval_is_not_handed_out_and_keeps_the_round_open_until_the_approval_deadline(hub: Hub):
    exp, ta, tb = _two_site_round(hub)
    assert hub.upload("site-a", ta, update_bytes(make_weights(1))).status_code == 200
    assert _wait(hub, "site-b", tb.id).status_code == 204
    assert hub.next_task("site-b", wait=0) is None  # fetched but held: not delivered again
    assert hub.experiment(exp["id"])["site_notes"] == {
        "site-b": "waiting for approval at the site: held for the administrator: unknown requester"
    }

    hub.clock.advance(50.0)  # past the round's deadline (20 s), before the approval deadline (100 s)
    _ticks(hub)
    assert hub.experiment(exp["id"])["status"] == "running"
    assert hub.get(f"/experiments/{exp['id']}/rounds")[0]["status"] == "open"

    hub.clock.advance(51.0)
    failed = hub.wait_status(exp["id"], "failed")
    assert f"site-b: {NO_APPROVAL}" in failed["error"]


def test_resuming_an_approved_task_gives_it_a_fresh_time_budget(hub: Hub):
    exp, ta, tb = _two_site_round(hub)
    assert hub.upload("site-a", ta, update_bytes(make_weights(1))).status_code == 200
    assert _wait(hub, "site-b", tb.id).status_code == 204
    hub.clock.advance(50.0)  # the administrator takes longer than the round's deadline
    _ticks(hub)

    r = _resume(hub, "site-b", tb.id)
    assert r.status_code == 200, r.text
    resumed = TaskPublic.model_validate(r.json())
    assert resumed.id == tb.id and 19.0 < resumed.seconds_left <= 20.0
    assert resumed.deadline > tb.deadline + 49.0
    assert hub.experiment(exp["id"])["site_notes"] == {}
    again = hub.next_task("site-b", wait=0)  # handed out again like any open task
    assert again is not None and again.id == tb.id

    again_resumed = _resume(hub, "site-b", tb.id)  # a retried request extends nothing more
    assert again_resumed.status_code == 200 and again_resumed.json()["deadline"] == resumed.deadline

    assert hub.upload("site-b", resumed, update_bytes(make_weights(2))).status_code == 200
    done = hub.wait_status(exp["id"], "completed")
    assert done["rounds_done"] == 1


def test_a_site_may_report_its_administrators_refusal_while_waiting(hub: Hub):
    exp, ta, tb = _two_site_round(hub, min_sites=1)
    assert _wait(hub, "site-b", tb.id).status_code == 204
    hub.clock.advance(50.0)  # past the task's own deadline: not late while it waits
    r = hub.client.post(
        hub.url(f"/tasks/{tb.id}/failure"),
        json={"kind": "rejected", "reason": "the administrator declined: not our study"},
        headers=hub.site("site-b"),
    )
    assert r.status_code == 204, r.text
    assert hub.experiment(exp["id"])["site_notes"]["site-b"] == "refused: the administrator declined: not our study"


def test_resuming_a_task_of_a_cancelled_experiment_is_a_conflict(hub: Hub):
    exp, _, tb = _two_site_round(hub)
    assert _wait(hub, "site-b", tb.id).status_code == 204
    r = hub.client.post(hub.url(f"/experiments/{exp['id']}/cancel"), headers=hub.admin)
    assert r.status_code == 200, r.text
    message, _ = _refusal(_resume(hub, "site-b", tb.id), 409)
    assert "cancelled" in message and "cannot resume" in message
    assert _wait(hub, "site-b", tb.id).status_code == 409


def test_resuming_after_the_approval_deadline_is_a_conflict(hub: Hub):
    exp, _, tb = _two_site_round(hub)
    assert _wait(hub, "site-b", tb.id).status_code == 204
    hub.clock.advance(101.0)
    assert _resume(hub, "site-b", tb.id).status_code == 409
    hub.wait_status(exp["id"], "failed")


def test_only_the_tasks_own_site_may_hold_or_resume_it(hub: Hub):
    _, ta, tb = _two_site_round(hub)
    assert _wait(hub, "site-a", tb.id).status_code == 403
    assert _resume(hub, "site-a", tb.id).status_code == 403
    assert _wait(hub, "site-a", "0" * 32).status_code == 404
    assert _resume(hub, "site-a", "0" * 32).status_code == 404
    r = hub.client.put(hub.url(f"/tasks/{ta.id}/waiting"), json={"reason": "x"}, headers=hub.admin)
    assert r.status_code in (401, 403), r.text


@pytest.mark.parametrize("reason", ["", "r" * 501, "two\nlines", None, 7])
def test_a_waiting_reason_is_one_line_of_text(hub: Hub, reason: Any):
    _, ta, _ = _two_site_round(hub)
    message, _ = _refusal(_wait(hub, "site-a", ta.id, reason))
    assert message.startswith("body.reason: ")
    assert hub.next_task("site-a", wait=0) is not None  # nothing recorded


def test_a_late_task_cannot_start_waiting(hub: Hub):
    _, ta, _ = _two_site_round(hub, min_sites=1)
    hub.clock.advance(21.0)
    assert _wait(hub, "site-a", ta.id).status_code == 409


def test_an_evaluation_waiting_for_approval_expires_only_at_the_approval_deadline(hub: Hub):
    exp, ta, tb = _two_site_round(hub, evaluation={"every": 1, "final": True})
    for site, task, seed in (("site-a", ta, 1), ("site-b", tb, 2)):
        assert hub.upload(site, task, update_bytes(make_weights(seed))).status_code == 200
    ea = hub.wait_for(lambda: hub.next_task("site-a", wait=0), "site-a's evaluation task")
    eb = hub.next_task("site-b", wait=5)
    assert ea.kind == eb.kind == "evaluate"
    r = hub.client.post(
        hub.url(f"/tasks/{ea.id}/evaluation"),
        json={"n_samples": 3, "metrics": {"dice": 0.5}},
        headers=hub.site("site-a"),
    )
    assert r.status_code == 204, r.text
    assert _wait(hub, "site-b", eb.id).status_code == 204

    hub.clock.advance(50.0)  # past the evaluation's deadline, before the approval deadline
    _ticks(hub)
    assert hub.experiment(exp["id"])["status"] == "running"
    assert hub.experiment(exp["id"])["site_notes"] == {
        "site-b": "waiting for approval at the site: held for the administrator: unknown requester"
    }
    hub.clock.advance(51.0)
    hub.wait_status(exp["id"], "completed")


def test_the_experiment_says_which_site_failed_and_how(hub: Hub):
    exp, ta, tb = _two_site_round(hub, min_sites=1)
    r = hub.client.post(
        hub.url(f"/tasks/{ta.id}/failure"),
        json={"kind": "error", "reason": "out of memory"},
        headers=hub.site("site-a"),
    )
    assert r.status_code == 204, r.text
    assert _wait(hub, "site-b", tb.id, "policy: bundles need approval").status_code == 204
    listed = {e["id"]: e for e in hub.get("/experiments")}
    assert listed[exp["id"]]["site_notes"] == {
        "site-a": "failed (error): out of memory",
        "site-b": "waiting for approval at the site: policy: bundles need approval",
    }


def test_stored_specs_say_nothing_of_the_scientists_files(hub: Hub):
    exp = hub.submit(spec(), make_weights(0))
    stored = json.loads(json.dumps(hub.experiment(exp["id"])["spec"]))
    assert "source" not in stored and "requirements" not in stored
    assert stored["approval_timeout_s"] == 86400.0


# -- the clients ------------------------------------------------------------------------------
def test_the_clients_submit_a_bundle_and_hold_and_resume_a_task(hub: Hub, bundle: PackedBundle):
    from fastapi.testclient import TestClient

    from laulima.client import Client
    from laulima.site.client import HubClient

    http = TestClient(hub.client.app)  # the same running app; these clients set their own auth
    scientist = Client("http://testserver", hub.admin["Authorization"].split()[1], client=http)
    spec_ = spec(algorithm=ENTRY, round_timeout_s=20.0, approval_timeout_s=100.0, min_sites=2)
    exp = scientist.submit(spec_, to_safetensors(make_weights(0)), bundle=bundle.data)
    assert exp.spec["bundle"] == bundle.digest == exp.algorithm_digest and "bundle" not in spec_

    site_b = HubClient("http://testserver", hub.tokens["site-b"], client=TestClient(hub.client.app), attempts=1)
    task = site_b.next_task(5)  # the round opens as soon as the orchestrator sees the experiment
    assert task is not None and task.bundle_digest == bundle.digest
    site_b.set_waiting(task.id, "held for the administrator:\nunknown requester " + "x" * 600)
    note = scientist.experiment(exp.id).site_notes["site-b"]
    assert note.startswith("waiting for approval at the site: held for the administrator: unknown requester xx")
    assert len(note) == len("waiting for approval at the site: ") + 500
    assert site_b.next_task(0) is None

    resumed = site_b.resume_task(task.id)
    assert resumed is not None and resumed.id == task.id
    scientist.cancel(exp.id)
    assert site_b.resume_task(task.id) is None  # the task is over
    with pytest.raises(Conflict):
        site_b.set_waiting(task.id, "again")
