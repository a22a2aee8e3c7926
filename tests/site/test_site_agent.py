"""The agent against an in-process fake hub (httpx.MockTransport) and real task workers."""

from __future__ import annotations

import json
import logging
import re
import stat
import threading
from pathlib import Path

import httpx
import pytest
from safetensors.numpy import load as st_load

from laulima import __version__
from laulima.algorithms.bundle import pack
from laulima.algorithms.tabular_data import write_tabular_site
from laulima.core.protocol import Header, MetaKey, TaskKind, TaskPublic
from laulima.core.weights import parse_safetensors_header
from laulima.errors import Forbidden
from laulima.site.agent import Agent
from laulima.site.catalog import Catalog
from laulima.site.client import HubClient
from laulima.site.settings import SiteSettings
from laulima.site.state import Phase, SiteState
from tests.site.conftest import HELPERS


class FakeHub:
    """Just enough of the hub: a task queue, one blob, and a record of what sites sent."""

    def __init__(self, blob: bytes) -> None:
        self.blob = blob
        self.bundles: dict[str, bytes] = {}
        """Algorithm bundles by digest (any other blob is the weights)."""
        self.tasks: list = []
        self.waiting: dict[str, str] = {}
        """Tasks a site said wait for its administrator, with the reason."""
        self.held: dict[str, TaskPublic] = {}
        """Tasks handed out (what a resume answers with, while not closed)."""
        self.uploads: dict[str, tuple[bytes, httpx.Headers]] = {}
        self.evaluations: dict[str, dict] = {}
        self.failures: dict[str, dict] = {}
        self.upload_response: httpx.Response | None = None
        self.poll_response: httpx.Response | None = None
        self.failure_response: httpx.Response | None = None
        self.report_response: httpx.Response | None = None
        self.reports: list[dict] = []
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path = request.url.path.removeprefix("/api/v1")
        if path == "/sites/self/report" and request.method == "PUT":
            if self.report_response is not None:
                return self.report_response
            self.reports.append(json.loads(request.read()))
            return httpx.Response(204)
        if path == "/tasks/next":
            if self.poll_response is not None:
                return self.poll_response
            if not self.tasks:
                return httpx.Response(204)
            task = self.tasks.pop(0)
            self.held[task.id] = task
            return httpx.Response(200, json=task.model_dump(mode="json"))
        if path.startswith("/blobs/"):
            return httpx.Response(200, content=self.bundles.get(path.rsplit("/", 1)[1], self.blob))
        m = re.fullmatch(r"/tasks/([^/]+)/(waiting|resume)", path)
        if m:
            task_id, what = m.groups()
            if what == "waiting":
                self.waiting[task_id] = json.loads(request.read())["reason"]
                return httpx.Response(204)
            self.waiting.pop(task_id, None)
            return httpx.Response(200, json=self.held[task_id].model_dump(mode="json"))
        m = re.fullmatch(r"/tasks/([^/]+)/(update|evaluation|failure)", path)
        assert m, f"unexpected request {request.method} {path}"
        task_id, what = m.groups()
        body = request.read()
        if what == "update":
            if self.upload_response is not None:
                return self.upload_response
            self.uploads[task_id] = (body, request.headers)
            n = parse_safetensors_header(body)[1][MetaKey.N_SAMPLES]
            return httpx.Response(
                200, json={"task_id": task_id, "digest": request.headers[Header.CONTENT_SHA256], "n_samples": int(n)}
            )
        if what == "failure" and self.failure_response is not None:
            return self.failure_response
        (self.evaluations if what == "evaluation" else self.failures)[task_id] = json.loads(body)
        return httpx.Response(200, json={})


class MustNotRun:
    def run(self, *args, **kwargs):
        raise AssertionError("the task must not be run again")

    def cancel(self) -> None:
        pass


@pytest.fixture
def hub(weights_blob: bytes) -> FakeHub:
    return FakeHub(weights_blob)


@pytest.fixture
def make_task(make_task, hub: FakeHub, home: Path):
    """Tasks as the hub sends them: a helper algorithm travels as a bundle (served by the fake
    hub, its digest admitted by the site's policy); built-ins and other names go as they are."""
    admitted: list[str] = []

    def make(**overrides):
        algorithm = overrides.get("algorithm", "site_test_algorithms:Echo")
        if algorithm.startswith("site_test_algorithms:") and "bundle_digest" not in overrides:
            bundle = pack(HELPERS / "site_test_algorithms.py", algorithm)
            hub.bundles[bundle.digest] = bundle.data
            admitted.append(bundle.digest)
            write_policy(home, f"[algorithms]\ndigests = {json.dumps(sorted(set(admitted)))}\n")
            overrides = {"algorithm": algorithm, "bundle_digest": bundle.digest, "bundle_size": len(bundle.data)} | {
                k: v for k, v in overrides.items() if k != "algorithm"
            }
        return make_task(**overrides)

    return make


def write_policy(home: Path, text: str) -> None:
    home.mkdir(parents=True, exist_ok=True)
    path = home / "policy.toml"
    path.write_text(text)
    path.chmod(0o600)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    home = tmp_path / "site-a"
    data = tmp_path / "data"
    data.mkdir()
    Catalog(home, site="site-a").add("ds", data)
    return home


def make_agent(home: Path, hub: FakeHub, **kw) -> Agent:
    settings = SiteSettings(
        home=home, name="site-a", hub_url="http://127.0.0.1:9", token="tok", poll_wait_s=0.01, backoff_max_s=0.01
    )
    http = httpx.Client(transport=httpx.MockTransport(hub))
    client = HubClient(
        settings.hub_url, settings.token, client=http, backoff_base_s=0.001, backoff_max_s=0.01, attempts=2
    )
    return Agent(settings, client, Catalog(home, site="site-a"), SiteState(home), **kw)


def test_train_task_is_run_and_uploaded(helper_algorithms, make_task, hub, home):
    task = make_task()
    hub.tasks.append(task)
    agent = make_agent(home, hub)
    assert agent.step() is True
    body, headers = hub.uploads[task.id]
    assert headers[Header.UPLOAD_NONCE] == "nonce-1"
    assert st_load(body)["w"].tolist() == [1, 2, 3, 4]
    meta = parse_safetensors_header(body)[1]
    assert (meta[MetaKey.N_SAMPLES], meta[MetaKey.TASK], json.loads(meta[MetaKey.METRICS])) == (
        "3",
        task.id,
        {"m": 1.5},
    )
    assert agent.state.get(task.id).phase == Phase.REPORTED
    task_dir = agent.task_dir(task.id)
    assert not (task_dir / "weights.safetensors").exists() and not (task_dir / "result.safetensors").exists()
    assert (task_dir / "stderr.log").exists()
    assert agent.step() is False  # nothing more to do


def test_evaluation_task_reports_metrics(helper_algorithms, make_task, hub, home):
    hub.tasks.append(make_task(id="e-1", kind=TaskKind.EVALUATE))
    make_agent(home, hub).step()
    assert hub.evaluations == {"e-1": {"n_samples": 5, "metrics": {"acc": 0.5, "mean_w": 1.5}}}


def test_unregistered_dataset_is_rejected_with_the_fix(helper_algorithms, make_task, hub, home):
    hub.tasks.append(make_task(dataset="brains"))
    agent = make_agent(home, hub)
    agent.step()
    failure = hub.failures["t-1"]
    assert failure["kind"] == "rejected"
    assert "dataset 'brains' is not registered at site 'site-a'" in failure["reason"]
    assert "laulima site dataset add brains PATH" in failure["reason"]
    assert agent.state.get("t-1").phase == Phase.REPORTED


def test_crash_is_reported_as_a_short_failure(helper_algorithms, make_task, hub, home):
    hub.tasks.append(make_task(algorithm="site_test_algorithms:Crash"))
    agent = make_agent(home, hub)
    agent.step()
    failure = hub.failures["t-1"]
    assert failure["kind"] == "error"
    assert failure["reason"].startswith("ValueError: boom at the site")
    assert agent.step() is False  # the agent goes on


def test_computed_task_is_uploaded_after_restart_without_retraining(helper_algorithms, make_task, hub, home):
    task = make_task()
    hub.tasks.append(task)
    hub.upload_response = httpx.Response(503)  # the hub is down when the result is ready
    make_agent(home, hub).step()
    record = SiteState(home).get(task.id)
    assert record.phase == Phase.COMPUTED and Path(record.result_path).exists()
    result_bytes = Path(record.result_path).read_bytes()

    hub.upload_response = None  # hub is back; the agent restarts; the hub re-delivers the task
    hub.tasks.append(task)
    restarted = make_agent(home, hub, runner=MustNotRun())
    restarted.step()
    assert hub.uploads[task.id][0] == result_bytes
    assert SiteState(home).get(task.id).phase == Phase.REPORTED


def test_reported_task_is_never_run_again_and_the_hub_is_told_once(helper_algorithms, make_task, hub, home):
    task = make_task()
    hub.tasks.append(task)
    make_agent(home, hub).step()
    hub.uploads.clear()
    hub.tasks.append(task)
    restarted = make_agent(home, hub, runner=MustNotRun())
    restarted.step()
    assert hub.uploads == {}
    assert hub.failures == {
        "t-1": {"kind": "error", "reason": "this site has already reported this task and will not run it again"}
    }
    hub.failures.clear()
    hub.tasks.append(task)  # a hub that ignores it still gets no second report
    restarted.step()
    assert hub.uploads == {} and hub.failures == {}


def test_hub_conflict_gives_the_task_up_and_the_agent_goes_on(helper_algorithms, make_task, hub, home):
    hub.tasks += [make_task(id="t-1"), make_task(id="t-2")]
    hub.upload_response = httpx.Response(
        409, json={"error": "conflict", "detail": "round 2 is closed", "context": {"round": 2}}
    )
    agent = make_agent(home, hub)
    agent.step()
    record = agent.state.get("t-1")
    assert record.phase == Phase.GIVEN_UP and "round 2 is closed" in record.note
    hub.upload_response = None
    agent.step()
    assert "t-2" in hub.uploads


def test_bad_weights_blob_is_reported_as_failure(helper_algorithms, make_task, hub, home):
    hub.blob = b"not what the digest says"
    hub.tasks.append(make_task())
    make_agent(home, hub).step()
    assert hub.failures["t-1"]["kind"] == "error"
    assert "downloading blob" in hub.failures["t-1"]["reason"]


def test_task_ids_cannot_escape_the_work_folder(home, hub):
    agent = make_agent(home, hub)
    assert agent.task_dir("../../etc").parent == agent.settings.work_dir
    assert agent.task_dir("t-1") == agent.settings.work_dir / "t-1"


def test_run_forever_stops_on_the_event(helper_algorithms, make_task, hub, home):
    hub.tasks += [make_task(id=f"t-{i}") for i in range(3)]
    agent = make_agent(home, hub)
    stop = threading.Event()
    thread = threading.Thread(target=agent.run_forever, args=(stop,))
    thread.start()
    try:
        deadline = threading.Event()
        for _ in range(100):
            if len(hub.uploads) == 3:
                break
            deadline.wait(0.05)
    finally:
        stop.set()
        thread.join(5)
    assert not thread.is_alive()
    assert sorted(hub.uploads) == ["t-0", "t-1", "t-2"]


def test_a_refused_token_stops_the_agent(home, hub):
    hub.poll_response = httpx.Response(401, json={"error": "unauthorized", "detail": "unknown token", "context": {}})
    with pytest.raises(Forbidden, match="token"):
        make_agent(home, hub).run_forever(threading.Event())


def test_an_agent_fault_is_reported_and_the_agent_goes_on(make_task, hub, home):
    class Broken:
        def run(self, *args, **kwargs):
            raise OSError(28, "No space left on device")

        def cancel(self) -> None:
            pass

    hub.tasks.append(make_task())
    agent = make_agent(home, hub, runner=Broken())
    agent.step()
    assert hub.failures["t-1"]["kind"] == "error"
    assert hub.failures["t-1"]["reason"].startswith("site agent error: OSError: [Errno 28] No space left on device")
    assert agent.state.get("t-1").phase == Phase.REPORTED


def test_a_task_without_time_left_is_failed_as_a_timeout_without_running(make_task, hub, home):
    hub.tasks.append(make_task(seconds_left=0.0))
    agent = make_agent(home, hub, runner=MustNotRun())
    agent.step()
    assert hub.failures["t-1"]["kind"] == "timeout"
    reason = hub.failures["t-1"]["reason"]
    assert reason.startswith("timeout: the task's deadline passed before this site could start it")
    assert not any(r.url.path.startswith("/api/v1/blobs/") for r in hub.requests)  # nothing downloaded either
    assert agent.state.get("t-1").phase == Phase.REPORTED


def test_a_refused_result_is_reported_as_failed_and_409_counts_as_closed(helper_algorithms, make_task, hub, home):
    hub.tasks.append(make_task())
    hub.upload_response = httpx.Response(
        422, json={"error": "invalid_update", "detail": "update norm 2.4 exceeds max_update_norm 1", "context": {}}
    )
    agent = make_agent(home, hub)
    agent.step()
    assert hub.failures["t-1"] == {
        "kind": "error",
        "reason": "the hub refused this site's result: 422: update norm 2.4 exceeds max_update_norm 1",
    }
    assert str(home) not in json.dumps(hub.failures)
    assert agent.state.get("t-1").phase == Phase.GIVEN_UP and agent.state.get("t-1").closed_at_hub

    hub.failures.clear()
    hub.tasks.append(make_task(id="t-2"))
    hub.failure_response = httpx.Response(409, json={"error": "conflict", "detail": "task is closed", "context": {}})
    agent.step()
    assert agent.state.get("t-2").phase == Phase.GIVEN_UP and agent.state.get("t-2").closed_at_hub
    hub.tasks.append(make_task(id="t-2"))  # closed at the hub: no further report, no sleep-and-retry loop
    n = len(hub.requests)
    agent.step()
    assert [r.url.path for r in hub.requests[n:]] == ["/api/v1/tasks/next"]


def test_every_request_of_the_agent_carries_its_version(helper_algorithms, make_task, hub, home):
    hub.tasks += [make_task(), make_task(id="e-1", kind=TaskKind.EVALUATE), make_task(id="t-3", dataset="brains")]
    agent = make_agent(home, hub)
    for _ in range(4):
        agent.step()
    paths = {r.url.path.removeprefix("/api/v1").split("/")[1] for r in hub.requests}
    assert paths == {"sites", "tasks", "blobs"}
    assert all(r.headers[Header.VERSION] == __version__ for r in hub.requests)


def test_the_catalog_is_reported_at_start_and_when_it_changes(tmp_path, hub, home):
    agent = make_agent(home, hub)
    agent.step()
    agent.step()
    assert hub.reports == [{"version": __version__, "datasets": {"ds": None}}]  # once, not every poll
    write_tabular_site(tmp_path / "tab", 0, 2, n_train=9, n_val=2)
    Catalog(home, site="site-a").add("tab", tmp_path / "tab")
    agent.report_interval_s = 0.0  # check at every poll
    agent.step()
    assert hub.reports[-1] == {"version": __version__, "datasets": {"ds": None, "tab": 9}}
    agent.step()
    assert len(hub.reports) == 2


def test_an_older_hub_without_reports_is_told_nothing_more(make_task, hub, home, caplog):
    hub.report_response = httpx.Response(404, json={"detail": "Not Found"})
    agent = make_agent(home, hub)
    agent.report_interval_s = 0.0
    with caplog.at_level(logging.INFO, logger="laulima.site"):
        agent.step()
        (home / "catalog.json").touch()
        agent.step()
    reports = [r for r in hub.requests if r.url.path.endswith("/report")]
    assert len(reports) == 1
    assert len([r for r in caplog.records if "does not take reports" in r.getMessage()]) == 1


def test_an_open_home_is_made_owner_only_at_start(hub, home, caplog):
    (home / "work").mkdir()
    for folder in (home, home / "work"):
        folder.chmod(0o755)
    with caplog.at_level(logging.WARNING, logger="laulima.site"):
        make_agent(home, hub).step()
    assert stat.S_IMODE(home.stat().st_mode) == 0o700 and stat.S_IMODE((home / "work").stat().st_mode) == 0o700
    assert f"{home} was accessible to other users (mode 755); made it owner-only (700)" in caplog.text


# -- the site decides: policy, approvals, audit ------------------------------------------
def test_an_arbitrary_installed_module_is_refused_before_anything_is_imported(make_task, hub, home):
    import sys

    sys.modules.pop("antigravity", None)
    hub.tasks += [make_task(id="t-1", algorithm="antigravity:X"), make_task(id="t-2", algorithm="os:system")]
    agent = make_agent(home, hub)
    agent.step()
    agent.step()
    assert "antigravity" not in sys.modules  # its import opens a web browser
    for task_id in ("t-1", "t-2"):
        failure = hub.failures[task_id]
        assert failure["kind"] == "rejected" and "neither a built-in" in failure["reason"], failure
        assert not (agent.task_dir(task_id) / "task.json").exists(), "the task reached the worker"


def test_a_held_job_waits_for_the_administrator_then_runs_once_approved(make_task, hub, home):
    from laulima.site.approvals import ApprovalStore
    from laulima.site.audit import AuditLog

    task = make_task()  # admitted by digest, but every job waits under manual approval
    write_policy(home, 'approval = "manual"\n' + (home / "policy.toml").read_text())
    hub.tasks.append(task)
    agent = make_agent(home, hub)
    agent.step()
    assert task.id in hub.waiting and "job 1" in hub.waiting[task.id], hub.waiting
    assert hub.uploads == {} and hub.failures == {}
    assert agent.state.get(task.id).phase == Phase.WAITING
    agent.step()  # nothing decided yet: still nothing runs
    assert hub.uploads == {}

    (job,) = ApprovalStore(home).pending()
    assert (job.experiment_id, job.digest, job.task_id) == (1, task.bundle_digest, task.id)
    ApprovalStore(home).approve(job.id, by="dr-admin", reason="reviewed")
    agent.step()
    assert task.id in hub.uploads and task.id not in hub.waiting
    assert agent.state.get(task.id).phase == Phase.REPORTED
    events = [e.event for e in AuditLog(home).entries()]
    assert events[0] == "received" and events[-1] == "sent", events
    assert events.count("started") == 1 and events.index("decided") < events.index("started"), events
    assert AuditLog(home).verify().ok


def test_a_rejected_job_is_reported_with_the_administrators_reason_and_never_runs(make_task, hub, home):
    from laulima.site.approvals import ApprovalStore

    hub.tasks.append(make_task())
    write_policy(home, 'approval = "manual"\n' + (home / "policy.toml").read_text())
    agent = make_agent(home, hub)
    agent.step()
    (job,) = ApprovalStore(home).pending()
    ApprovalStore(home).reject(job.id, by="dr-admin", reason="not on our data")
    agent.step()
    failure = hub.failures["t-1"]
    assert failure["kind"] == "rejected" and "not on our data" in failure["reason"], failure
    assert hub.uploads == {} and not (agent.task_dir("t-1") / "task.json").exists()


def test_what_the_hub_hears_of_a_failure_has_no_site_paths_and_points_to_the_audit_entry(make_task, hub, home):
    import shutil

    from laulima.site.audit import AuditLog

    shutil.rmtree(Catalog(home).get("ds"))  # gone: the catalog's error names where it was
    hub.tasks.append(make_task())
    agent = make_agent(home, hub)
    agent.step()
    reason = hub.failures["t-1"]["reason"]
    data = str(home.parent / "data")
    assert data not in reason and "'ds'" in reason and "audit#" in reason, reason
    failed = [e for e in AuditLog(home).entries() if e.event == "failed"]
    assert failed and data in str(failed[-1].fields["error"])  # the full text stays at the site


def test_a_cohort_below_the_policys_minimum_is_refused_at_once_with_the_numbers(make_task, hub, home):
    data = Catalog(home).get("ds")
    (data / "dataset.json").write_text(json.dumps({"numTraining": 3, "training": [{}, {}, {}]}))
    write_policy(home, "min_cohort = 10\n")
    hub.tasks.append(make_task(algorithm="laulima.algorithms.identity:Identity"))
    agent = make_agent(home, hub, runner=MustNotRun())
    agent.step()
    failure = hub.failures["t-1"]
    assert failure["kind"] == "rejected"
    assert failure["reason"].startswith("dataset 'ds' has 3 cases, policy min_cohort is 10"), failure


def test_a_bundle_whose_requirements_the_site_lacks_is_refused_naming_the_package(make_task, hub, home):
    bundle = pack(
        HELPERS / "site_test_algorithms.py",
        "site_test_algorithms:Echo",
        requirements=["numpy>=1", "laulima-no-such-package>=2"],
    )
    hub.bundles[bundle.digest] = bundle.data
    write_policy(home, f'[algorithms]\ndigests = ["{bundle.digest}"]\n')
    hub.tasks.append(make_task(bundle_digest=bundle.digest, bundle_size=len(bundle.data)))
    agent = make_agent(home, hub, runner=MustNotRun())
    agent.step()
    failure = hub.failures["t-1"]
    assert failure["kind"] == "rejected" and "laulima-no-such-package" in failure["reason"], failure


def test_a_damaged_audit_trail_stops_the_site_running_tasks_until_it_is_repaired(make_task, hub, home):
    from laulima.site.audit import AuditLog

    agent = make_agent(home, hub)
    hub.tasks.append(make_task(id="t-1"))
    agent.step()
    assert "t-1" in hub.uploads
    log_file = AuditLog(home).path
    log_file.write_bytes(log_file.read_bytes()[:-20])  # cut mid-line: the log disagrees with its head
    hub.tasks.append(make_task(id="t-2"))
    agent.step()
    assert "t-2" not in hub.uploads and "audit trail cannot be written" in hub.failures["t-2"]["reason"]

    log_file.write_bytes(log_file.read_bytes().rsplit(b"\n", 1)[0] + b"\n")  # drop the half line
    AuditLog(home).reanchor("cut by a test; checked")
    hub.tasks.append(make_task(id="t-3"))
    agent.step()
    assert "t-3" in hub.uploads


def test_a_cohort_the_site_cannot_fill_is_refused_at_once_naming_it(make_task, hub, home, tmp_path):
    from laulima.core.cohort import CohortFilter

    data = tmp_path / "tabular"
    data.mkdir()
    (data / "train.csv").write_text("x0,label\n0.1,0\n0.2,1\n0.3,0\n")
    Catalog(home).add("t1-table", data, tags=["t1"])
    hub.tasks += [
        make_task(id="t-1", algorithm="laulima.algorithms.identity:Identity", dataset="tag:flair"),
        make_task(
            id="t-2",
            algorithm="laulima.algorithms.identity:Identity",
            dataset="tag:t1",
            cohort=CohortFilter(min_cases=10),
        ),
    ]
    agent = make_agent(home, hub, runner=MustNotRun())
    agent.step()
    agent.step()
    assert hub.failures["t-1"]["kind"] == "rejected"
    assert "no dataset at this site carries the tag 'flair'" in hub.failures["t-1"]["reason"]
    assert hub.failures["t-2"]["reason"].startswith(
        "datasets tagged 't1' has 3 cases, the experiment's min_cases is 10"
    ), hub.failures["t-2"]
