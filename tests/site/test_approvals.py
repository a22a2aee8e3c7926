"""The approvals store: jobs waiting at the site, and the administrator's final decisions."""

from __future__ import annotations

import os
import sqlite3
import stat
import threading
from pathlib import Path
from typing import Any

import pytest

from laulima.errors import ConfigurationError
from laulima.site.approvals import APPROVALS_FILE, AlreadyDecided, ApprovalStore, UnknownJob
from laulima.site.policy import Decision, JobFacts, SitePolicy, Verdict, decide

DIGEST = "ab" * 32
T0 = 1_735_689_600.0  # 2025-01-01T00:00:00Z
MANIFEST = {"name": "my-unet", "version": "1.0", "entry_point": "my_algo:Model", "files": {"my_algo.py": "00" * 32}}


class Clock:
    """A clock the test moves by hand: times in the store are exact, no sleeping."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def job(**overrides: Any) -> JobFacts:
    fields: dict[str, Any] = {
        "experiment_id": 7,
        "experiment_name": "brats-2024",
        "requester": "alice",
        "round": 0,
        "kind": "train",
        "entry_point": "my_algo:Model",
        "bundle_digest": DIGEST,
        "bundle_signer": None,
        "dataset": "brain",
        "n_cases": 40,
        "rounds": 10,
        "task_time_limit_s": 600.0,
    }
    fields.update(overrides)
    return JobFacts(**fields)


@pytest.fixture
def store(tmp_path: Path) -> ApprovalStore:
    return ApprovalStore(tmp_path / "home", clock=Clock())


def test_a_requested_job_is_pending_with_everything_to_review(store: ApprovalStore) -> None:
    pending = store.request(job(), task_id="t-1", algorithm_name="my-unet", manifest=MANIFEST)
    assert pending.status == "pending" and pending.decision is None
    assert (pending.experiment_id, pending.experiment_name, pending.requester) == (7, "brats-2024", "alice")
    assert (pending.algorithm_name, pending.entry_point, pending.digest) == ("my-unet", "my_algo:Model", DIGEST)
    assert (pending.dataset, pending.rounds, pending.task_id, pending.scope) == ("brain", 10, "t-1", "experiment")
    assert pending.received_at == T0 + 1
    assert pending.manifest == MANIFEST
    assert store.pending() == [pending]
    assert store.get(pending.id) == pending
    assert store.decision_for(7) is None


def test_approval_is_found_and_the_job_leaves_the_pending_list(store: ApprovalStore) -> None:
    pending = store.request(job(), task_id="t-1")
    approved = store.approve(pending.id, by="carol", reason="reviewed the source")
    assert approved.status == "approved" and approved.decided_by == "carol"
    assert approved.reason == "reviewed the source"
    assert store.pending() == []
    decision = store.decision_for(7)
    assert decision == Decision.run("approved by carol at 2025-01-01T00:00:02Z")
    assert store.decision_for(7, 3) == decision  # an experiment-wide approval covers every round
    assert store.decision_for(8) is None


def test_the_recorded_approval_lets_decide_run_the_job(store: ApprovalStore) -> None:
    rules = SitePolicy.model_validate({"approval": "manual"})
    assert decide(rules, job(), approval=store.decision_for(7)).verdict is Verdict.ASK
    store.approve(store.request(job(), task_id="t-1").id, by="carol")
    decision = decide(rules, job(), approval=store.decision_for(7, job=job()))
    assert decision.verdict is Verdict.RUN and decision.why.startswith("approved by carol at ")


def test_rejection_needs_a_reason_and_refuses_with_it(store: ApprovalStore) -> None:
    pending = store.request(job(), task_id="t-1")
    for empty in ("", "   "):
        with pytest.raises(ConfigurationError, match="needs a reason"):
            store.reject(pending.id, by="carol", reason=empty)
    assert store.get(pending.id).status == "pending"
    rejected = store.reject(pending.id, by="carol", reason="too many\nrounds  for us")
    assert rejected.status == "rejected" and rejected.reason == "too many rounds for us"
    decision = store.decision_for(7, 0)
    assert decision == Decision.refuse("rejected by the site's administrator: too many rounds for us")
    assert decide(SitePolicy(), job(), approval=decision) == decision


@pytest.mark.parametrize("second", ["approve", "reject"])
def test_deciding_twice_is_an_error_naming_the_job(store: ApprovalStore, second: str) -> None:
    pending = store.request(job(), task_id="t-1")
    store.approve(pending.id, by="carol")
    with pytest.raises(AlreadyDecided, match=rf"cannot {second} job {pending.id} .*already approved by carol"):
        getattr(store, second)(pending.id, by="dave", reason="changed my mind")
    assert store.get(pending.id).decided_by == "carol"


def test_unknown_job_ids_are_named(store: ApprovalStore) -> None:
    with pytest.raises(UnknownJob, match="no job 41 .*`laulima site jobs`"):
        store.get(41)
    with pytest.raises(UnknownJob, match="cannot approve job 41: no such job"):
        store.approve(41, by="carol")
    for bad in ("abc", "-1", "²", True, "9" * 30):
        with pytest.raises(UnknownJob):
            store.get(bad)


def test_a_job_id_may_be_given_as_text(store: ApprovalStore) -> None:
    pending = store.request(job(), task_id="t-1")
    assert store.approve(f" {pending.id} ", by="carol").status == "approved"


def test_the_deciders_name_defaults_to_the_os_user(store: ApprovalStore) -> None:
    import getpass

    pending = store.request(job(), task_id="t-1")
    assert store.approve(pending.id).decided_by == getpass.getuser()


def test_a_bad_decider_name_or_reason_is_refused(store: ApprovalStore) -> None:
    pending = store.request(job(), task_id="t-1")
    with pytest.raises(ConfigurationError, match="name of who decides"):
        store.approve(pending.id, by="")
    with pytest.raises(ConfigurationError, match="at most 1000 characters"):
        store.reject(pending.id, by="carol", reason="x" * 1001)
    assert store.get(pending.id).status == "pending"


def test_request_is_idempotent_per_experiment(store: ApprovalStore) -> None:
    first = store.request(job(round=0), task_id="t-1")
    again = store.request(job(round=1), task_id="t-2")
    assert again == first and again.task_id == "t-1"
    assert len(store.pending()) == 1
    store.approve(first.id, by="carol")
    after = store.request(job(round=2), task_id="t-3")
    assert after.id == first.id and after.status == "approved"
    other = store.request(job(experiment_id=8), task_id="t-4")
    assert other.id != first.id


def test_request_is_idempotent_per_round_under_round_scope(store: ApprovalStore) -> None:
    r0 = store.request(job(round=0), task_id="t-1", scope="round")
    assert store.request(job(round=0, kind="evaluate"), task_id="t-2", scope="round") == r0
    r1 = store.request(job(round=1), task_id="t-3", scope="round")
    assert r1.id != r0.id and r1.round == 1 and r1.scope == "round"
    store.approve(r0.id, by="carol")
    round_0 = store.decision_for(7, 0)
    assert round_0 is not None and round_0.verdict is Verdict.RUN
    assert store.decision_for(7, 1) is None  # round 1 is still waiting
    assert store.decision_for(7) is None  # no decision covers the whole experiment
    assert [p.id for p in store.pending()] == [r1.id]


def test_a_rejection_of_the_experiment_wins_over_a_round_approval(store: ApprovalStore) -> None:
    round_job = store.request(job(round=2), task_id="t-1", scope="round")
    store.approve(round_job.id, by="carol")
    wide = store.request(job(round=3), task_id="t-2", scope="experiment")
    store.reject(wide.id, by="carol", reason="withdrawn")
    decision = store.decision_for(7, 2)
    assert decision is not None and decision.verdict is Verdict.REFUSE and "withdrawn" in decision.why


def test_an_approval_does_not_cover_another_algorithm_or_dataset(store: ApprovalStore) -> None:
    store.approve(store.request(job(), task_id="t-1").id, by="carol")
    same = store.decision_for(7, 0, job=job())
    assert same is not None and same.verdict is Verdict.RUN
    for changed in (job(bundle_digest="cd" * 32), job(entry_point="my_algo:Other"), job(dataset="chest")):
        decision = store.decision_for(7, 0, job=changed)
        assert decision is not None and decision.verdict is Verdict.REFUSE
        assert "another algorithm or dataset" in decision.why


def test_decisions_survive_reopening_the_store(tmp_path: Path) -> None:
    home = tmp_path / "home"
    first = ApprovalStore(home, clock=Clock())
    approved = first.request(job(), task_id="t-1", manifest=MANIFEST)
    first.approve(approved.id, by="carol", reason="ok")
    waiting = first.request(job(experiment_id=8), task_id="t-2")
    reopened = ApprovalStore(home)
    assert reopened.get(approved.id) == first.get(approved.id)
    assert reopened.get(approved.id).manifest == MANIFEST
    assert reopened.decision_for(7) == first.decision_for(7)
    assert [p.id for p in reopened.pending()] == [waiting.id]
    assert {j.id for j in reopened.jobs()} == {approved.id, waiting.id}


@pytest.mark.skipif(os.name != "posix", reason="file modes")
def test_the_store_is_private_to_the_sites_user(tmp_path: Path) -> None:
    home = tmp_path / "home"
    old_umask = os.umask(0o022)
    try:
        store = ApprovalStore(home)
        store.approve(store.request(job(), task_id="t-1").id, by="carol")
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE((home / APPROVALS_FILE).stat().st_mode) == 0o600
    (home / APPROVALS_FILE).chmod(0o644)
    ApprovalStore(home)  # reopening tightens a file someone loosened
    assert stat.S_IMODE((home / APPROVALS_FILE).stat().st_mode) == 0o600


def test_a_manifest_that_is_not_plain_json_is_refused(store: ApprovalStore) -> None:
    with pytest.raises(ConfigurationError, match="not plain JSON"):
        store.request(job(), task_id="t-1", manifest={"x": float("nan")})
    with pytest.raises(ConfigurationError, match="larger than 1024 KiB"):
        store.request(job(), task_id="t-1", manifest={"x": "y" * (1024 * 1024)})
    assert store.pending() == []  # nothing half-recorded


def test_a_damaged_store_names_the_file(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / APPROVALS_FILE).write_bytes(b"this is not a database" * 100)
    with pytest.raises(ConfigurationError, match=f"{home / APPROVALS_FILE}: the approvals store cannot be read"):
        ApprovalStore(home)


def test_a_store_from_a_newer_laulima_is_refused(tmp_path: Path) -> None:
    home = tmp_path / "home"
    ApprovalStore(home)
    with sqlite3.connect(home / APPROVALS_FILE) as db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(ConfigurationError, match="newer Laulima"):
        ApprovalStore(home)


def test_concurrent_approvals_decide_once(store: ApprovalStore) -> None:
    pending = store.request(job(), task_id="t-1")
    outcomes: list[str] = []
    lock = threading.Lock()

    def approve(name: str) -> None:
        try:
            store.approve(pending.id, by=name)
            result = "ok"
        except AlreadyDecided:
            result = "already"
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=approve, args=(f"admin{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["already"] * 3 + ["ok"]
