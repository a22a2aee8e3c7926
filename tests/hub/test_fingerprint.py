"""Fingerprint-mode experiments at the hub: one FINGERPRINT task per site, the sites' posted
fingerprints validated, stored, merged into nnU-Net's dataset_fingerprint.json."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from laulima.core.fingerprint import SiteFingerprint, channel_summary, geometry_table, size_histogram
from laulima.core.protocol import TaskKind, TaskPublic
from laulima.core.weights import to_safetensors

from .conftest import Hub, make_weights, spec

EMPTY = to_safetensors({})


def fingerprint_spec(**overrides: Any) -> dict[str, Any]:
    base = {k: v for k, v in spec().items() if k not in ("rounds", "evaluation")}
    return {**base, "name": "fp", "mode": "fingerprint", **overrides}


def site_fingerprint(
    n_cases: int, *, seed: int = 0, channels: tuple[str, ...] = ("T1", "T2"), spacing: float = 1.0
) -> SiteFingerprint:
    rng = np.random.default_rng(seed)
    pairs = [((spacing, 1.0, 1.0), (40 + i % 2, 50, 60)) for i in range(n_cases)]
    return SiteFingerprint(
        n_cases=n_cases,
        channel_names=list(channels),
        labels={"background": 0, "tumour": 1},
        geometry=geometry_table(pairs),
        channels=[channel_summary(rng.normal(100.0 * (c + 1), 10.0, 500)) for c in range(len(channels))],
        relative_size=size_histogram([0.8] * n_cases),
    )


def submit(hub: Hub, **overrides: Any) -> dict[str, Any]:
    digest = hub.upload_blob(EMPTY)
    r = hub.client.post(
        hub.url("/experiments"),
        json={"spec": fingerprint_spec(**overrides), "initial_weights": digest},
        headers=hub.admin,
    )
    assert r.status_code == 201, r.text
    return r.json()


def post(hub: Hub, site: str, task: TaskPublic, body: Any, *, raw: bytes | None = None) -> Any:
    url = hub.url(f"/tasks/{task.id}/fingerprint")
    headers = {**hub.site(site), "Content-Type": "application/json"}
    if raw is not None:
        return hub.client.post(url, content=raw, headers=headers)
    if isinstance(body, SiteFingerprint):
        body = body.model_dump(mode="json")
    return hub.client.post(url, content=json.dumps(body), headers=headers)


def fail(hub: Hub, site: str, task: TaskPublic, reason: str, kind: str = "rejected") -> None:
    r = hub.client.post(
        hub.url(f"/tasks/{task.id}/failure"), json={"kind": kind, "reason": reason}, headers=hub.site(site)
    )
    assert r.status_code == 204, r.text


def task_of(hub: Hub, site: str) -> TaskPublic:
    task = hub.next_task(site)
    assert task is not None and task.kind == TaskKind.FINGERPRINT, task
    return task


def test_one_fingerprint_task_per_site_merged_on_completion(hub: Hub):
    exp = submit(hub)
    assert exp["mode"] == "fingerprint" and exp["rounds"] == 0 and exp["phase"] == "fingerprint"
    ta, tb = task_of(hub, "site-a"), task_of(hub, "site-b")
    assert hub.next_task("site-c", wait=0) is None  # not listed in the spec
    assert ta.round == tb.round == 1 and ta.weights_size == len(EMPTY)
    assert hub.download("site-a", ta.weights_digest) == {}  # the empty model: nothing to run
    r = hub.client.get(hub.url(f"/experiments/{exp['id']}/fingerprint"), headers=hub.admin)
    assert r.status_code == 409 and "still running" in r.json()["detail"]

    assert post(hub, "site-a", ta, site_fingerprint(3, seed=1)).status_code == 204
    assert hub.experiment(exp["id"])["status"] == "running"  # site-b's is still out
    assert post(hub, "site-b", tb, site_fingerprint(5, seed=2, spacing=2.0)).status_code == 204
    done = hub.wait_status(exp["id"], "completed")
    assert done["phase"] is None and done["error"] is None

    merged = hub.get(f"/experiments/{exp['id']}/fingerprint")
    assert merged["n_cases"] == 8 and merged["sites"] == ["site-a", "site-b"] and merged["failures"] == {}
    fp = merged["fingerprint"]
    assert len(fp["spacings"]) == len(fp["shapes_after_crop"]) == 8
    assert sorted(s[0] for s in fp["spacings"]) == [1.0] * 3 + [2.0] * 5
    assert set(fp["foreground_intensity_properties_per_channel"]) == {"0", "1"}
    assert merged["dataset_json"]["channel_names"] == {"0": "T1", "1": "T2"}
    assert merged["dataset_json"]["numTraining"] == 8
    # no per-round metrics or models come of it
    assert hub.get(f"/experiments/{exp['id']}/metrics") == []


def test_the_fingerprint_is_readable_by_those_the_experiment_is_shared_with_only(hub: Hub):
    exp = submit(hub, sites=["site-a"])
    assert post(hub, "site-a", task_of(hub, "site-a"), site_fingerprint(2)).status_code == 204
    hub.wait_status(exp["id"], "completed")
    stranger = hub.person("mallory")
    r = hub.client.get(hub.url(f"/experiments/{exp['id']}/fingerprint"), headers=stranger)
    assert r.status_code == 404
    bob = hub.person("bob")
    assert hub.client.post(hub.url(f"/experiments/{exp['id']}/shares"), json={"name": "bob"}, headers=hub.admin)
    r = hub.client.get(hub.url(f"/experiments/{exp['id']}/fingerprint"), headers=bob)
    assert r.status_code == 200 and r.json()["n_cases"] == 2


def _nan_quantile(body: dict[str, Any]) -> None:
    body["channels"][0]["quantiles"][5] = float("nan")


def _wrong_sum(body: dict[str, Any]) -> None:
    body["n_cases"] += 1


def _extra_field(body: dict[str, Any]) -> None:
    body["patient_ids"] = ["p1", "p2", "p3"]


def _too_many_channels(body: dict[str, Any]) -> None:
    body["channel_names"] = [f"c{i}" for i in range(40)]


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (_nan_quantile, "channels.0.quantiles"),
        (_wrong_sum, "n_cases"),
        (_extra_field, "patient_ids"),
        (_too_many_channels, "channel_names"),
    ],
)
def test_malformed_fingerprints_are_422_recorded_and_end_the_task(hub: Hub, mutate: Any, expected: str):
    exp = submit(hub, sites=["site-a"])
    task = task_of(hub, "site-a")
    body = site_fingerprint(3).model_dump(mode="json")
    mutate(body)
    # json.dumps writes NaN as the bare token; the hub must say no, not fail
    r = post(hub, "site-a", task, None, raw=json.dumps(body).encode())
    assert r.status_code == 422, r.text
    assert f"fingerprint of task {task.id}" in r.json()["detail"]
    if expected != "n_cases":  # a model-level rule is reported at the body
        assert expected.split(".")[0] in r.json()["detail"]
    [refusal] = hub.get(f"/experiments/{exp['id']}/refusals")
    assert refusal["status"] == 422 and refusal["site"] == "site-a"
    failed = hub.wait_status(exp["id"], "failed")  # its only site's task ended with the refusal
    assert "no site computed its dataset fingerprint" in failed["error"] and "site-a" in failed["error"]


@pytest.mark.parametrize("raw", [b"", b"not json", b"[1, 2]", b'{"n_cases": "three"}', b"{" * 5000])
def test_garbage_bodies_are_client_errors(hub: Hub, raw: bytes):
    submit(hub, sites=["site-a"])
    r = post(hub, "site-a", task_of(hub, "site-a"), None, raw=raw)
    assert 400 <= r.status_code < 500 and r.json()["detail"], r.text


def test_an_oversized_fingerprint_is_413(hub: Hub):
    exp = submit(hub, sites=["site-a"])
    task = task_of(hub, "site-a")
    body = site_fingerprint(3).model_dump(mode="json")
    body["padding"] = "x" * (1024 * 1024)
    r = post(hub, "site-a", task, body)
    assert r.status_code == 413 and "exceeds" in r.json()["detail"]
    assert hub.experiment(exp["id"])["status"] in ("running", "failed")


def test_fingerprint_above_the_cases_the_site_reported_is_refused(hub: Hub):
    r = hub.client.put(
        hub.url("/sites/self/report"), json={"version": "1", "datasets": {"brains": 2}}, headers=hub.site("site-a")
    )
    assert r.status_code in (200, 204), r.text
    exp = submit(hub, sites=["site-a"])
    r = post(hub, "site-a", task_of(hub, "site-a"), site_fingerprint(3))
    assert r.status_code == 422 and "the 2 cases site 'site-a' reported" in r.json()["detail"]
    hub.wait_status(exp["id"], "failed")


def test_second_post_and_wrong_kind_and_wrong_site_are_refused(hub: Hub):
    exp = submit(hub)
    ta, tb = task_of(hub, "site-a"), task_of(hub, "site-b")
    r = hub.client.post(
        hub.url(f"/tasks/{ta.id}/evaluation"), json={"n_samples": 3, "metrics": {}}, headers=hub.site("site-a")
    )
    assert r.status_code == 409 and "POST /tasks/{id}/fingerprint" in r.json()["detail"]
    assert post(hub, "site-b", ta, site_fingerprint(3)).status_code == 403  # site-a's task
    assert post(hub, "site-a", ta, site_fingerprint(3)).status_code == 204
    again = post(hub, "site-a", ta, site_fingerprint(4))
    assert again.status_code == 409 and "already has an accepted result" in again.json()["detail"]
    assert post(hub, "site-b", tb, site_fingerprint(2)).status_code == 204
    hub.wait_status(exp["id"], "completed")  # the merge happens in the orchestrator, after the posts
    merged = hub.client.get(hub.url(f"/experiments/{exp['id']}/fingerprint"), headers=hub.admin)
    assert merged.status_code == 200 and merged.json()["n_cases"] == 5  # the first post counted, once


def test_a_fingerprint_for_an_evaluation_task_is_refused(hub: Hub):
    base = {k: v for k, v in spec().items() if k not in ("rounds", "evaluation")}
    hub.submit({**base, "mode": "evaluate", "sites": ["site-a"]}, make_weights(0))
    task = hub.next_task("site-a")
    assert task is not None and task.kind == TaskKind.EVALUATE
    r = post(hub, "site-a", task, site_fingerprint(3))
    assert r.status_code == 409 and "POST /tasks/{id}/evaluation" in r.json()["detail"]


def test_mismatched_channels_fail_the_experiment_naming_the_sites(hub: Hub):
    exp = submit(hub)
    ta, tb = task_of(hub, "site-a"), task_of(hub, "site-b")
    assert post(hub, "site-a", ta, site_fingerprint(3)).status_code == 204
    assert post(hub, "site-b", tb, site_fingerprint(3, channels=("T1", "FLAIR"))).status_code == 204
    failed = hub.wait_status(exp["id"], "failed")
    assert "cannot be merged" in failed["error"] and "site-a" in failed["error"] and "site-b" in failed["error"]
    assert "FLAIR" in failed["error"]
    r = hub.client.get(hub.url(f"/experiments/{exp['id']}/fingerprint"), headers=hub.admin)
    assert r.status_code == 409 and "cannot be merged" in r.json()["detail"]


def test_one_site_refusing_still_completes_with_its_reason_visible(hub: Hub):
    exp = submit(hub, sites=["site-a", "site-b", "site-c"])
    ta, tb, tc = task_of(hub, "site-a"), task_of(hub, "site-b"), task_of(hub, "site-c")
    fail(hub, "site-a", ta, "dataset 'brains' has 3 cases, policy min_cohort is 5")
    assert post(hub, "site-b", tb, site_fingerprint(6)).status_code == 204
    assert post(hub, "site-c", tc, site_fingerprint(7, seed=3)).status_code == 204
    done = hub.wait_status(exp["id"], "completed")
    assert done["site_notes"]["site-a"] == "refused: dataset 'brains' has 3 cases, policy min_cohort is 5"
    merged = hub.get(f"/experiments/{exp['id']}/fingerprint")
    assert merged["sites"] == ["site-b", "site-c"] and merged["n_cases"] == 13
    assert "min_cohort is 5" in merged["failures"]["site-a"]


def test_no_site_answering_fails_with_every_site_s_reason(hub: Hub):
    exp = submit(hub)
    ta, tb = task_of(hub, "site-a"), task_of(hub, "site-b")
    fail(hub, "site-a", ta, "dataset 'brains' has 3 cases, policy min_cohort is 5")
    fail(hub, "site-b", tb, "algorithm x computes no dataset fingerprint", kind="error")
    failed = hub.wait_status(exp["id"], "failed")
    assert "no site computed its dataset fingerprint" in failed["error"]
    assert "min_cohort is 5" in failed["error"] and "computes no dataset fingerprint" in failed["error"]


def test_unanswered_tasks_expire_at_their_deadline(hub: Hub):
    exp = submit(hub, round_timeout_s=30.0)
    ta = task_of(hub, "site-a")
    assert post(hub, "site-a", ta, site_fingerprint(4)).status_code == 204
    task_of(hub, "site-b")  # delivered, never answered
    hub.clock.advance(31)
    done = hub.wait_status(exp["id"], "completed")
    assert "expired" in hub.get(f"/experiments/{exp['id']}/fingerprint")["failures"]["site-b"]
    assert done["status"] == "completed"


def test_fingerprint_of_another_mode_is_409(hub: Hub):
    exp = hub.submit(spec(sites=["site-a"]), make_weights(0))
    r = hub.client.get(hub.url(f"/experiments/{exp['id']}/fingerprint"), headers=hub.admin)
    assert r.status_code == 409 and "train-mode experiment" in r.json()["detail"]


def test_fingerprint_mode_refuses_a_model_and_training_fields(hub: Hub):
    digest = hub.upload_blob(to_safetensors(make_weights(0)))
    r = hub.client.post(
        hub.url("/experiments"), json={"spec": fingerprint_spec(), "initial_weights": digest}, headers=hub.admin
    )
    assert r.status_code == 422 and "field 'initial_weights'" in r.json()["detail"], r.text
    empty = hub.upload_blob(EMPTY)
    r = hub.client.post(
        hub.url("/experiments"),
        json={"spec": fingerprint_spec(local_steps=5), "initial_weights": empty},
        headers=hub.admin,
    )
    assert r.status_code == 422 and "field 'local_steps'" in r.json()["detail"] and "fingerprint" in r.json()["detail"]
