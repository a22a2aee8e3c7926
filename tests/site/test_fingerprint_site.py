"""Fingerprint tasks at the site: the policy's rules for them, the worker (no setup, a checked
result, finalize always), the experiment's cache folder (persistent, private, writable in
the sandbox, pruned after a week), and the agent's report to the hub."""

from __future__ import annotations

import json
import os
import stat
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from laulima.algorithms.bundle import pack
from laulima.core.fingerprint import SiteFingerprint
from laulima.core.protocol import TaskKind, TaskPublic
from laulima.core.weights import sha256_hex, to_safetensors
from laulima.errors import AlgorithmError, ConfigurationError, ProtocolError
from laulima.site.agent import CACHE_DIR, CACHE_MAX_AGE_S, prune_caches
from laulima.site.catalog import Catalog
from laulima.site.policy import JobFacts, SitePolicy, Verdict, decide, parse_policy
from laulima.site.runner import TaskRunner
from laulima.site.sandbox import KernelSupport, probe_kernel, sandbox_for
from laulima.site.state import Phase
from laulima.site.worker import RESULT_FILE, WEIGHTS_FILE
from tests.site.conftest import HELPERS, unpacked
from tests.site.test_site_agent import FakeHub, make_agent, write_policy

EMPTY = to_safetensors({})
MODULE = "site_test_fingerprint"
KERNEL = probe_kernel() if sys.platform.startswith("linux") else KernelSupport(0, False, False)
CONFINABLE = hasattr(os, "fork") and KERNEL.landlock_abi >= 1 and KERNEL.network_namespace and KERNEL.socket_filter


# -- policy ----------------------------------------------------------------------------
def job(kind: str = "fingerprint", **overrides: Any) -> JobFacts:
    fields: dict[str, Any] = {
        "experiment_id": 1,
        "experiment_name": "fp",
        "requester": "alice",
        "round": 1,
        "kind": kind,
        "entry_point": "laulima.algorithms.identity:Identity",
        "bundle_digest": None,
        "bundle_signer": None,
        "dataset": "brains",
        "n_cases": 10,
        "rounds": 1,
        "task_time_limit_s": 60.0,
    }
    return JobFacts(**{**fields, **overrides})


def test_a_fingerprint_job_of_an_admitted_algorithm_runs_under_auto():
    assert decide(SitePolicy(), job()).verdict is Verdict.RUN


def test_a_fingerprint_job_waits_for_the_administrator_under_manual_even_with_evaluation_auto():
    policy = parse_policy({"approval": "manual", "evaluation_auto": True})
    assert decide(policy, job("evaluate")).verdict is Verdict.RUN  # evaluations are exempt...
    decision = decide(policy, job())  # ...a fingerprint (case geometry, intensity quantiles) is not
    assert decision.verdict is Verdict.ASK and "approval = manual" in decision.why
    assert decide(policy, job(), approval=decide(SitePolicy(), job())).verdict is Verdict.RUN


def test_a_fingerprint_of_a_cohort_below_min_cohort_is_refused_with_the_numbers():
    decision = decide(parse_policy({"min_cohort": 5}), job(n_cases=3))
    assert decision.verdict is Verdict.REFUSE
    assert decision.why == "dataset 'brains' has 3 cases, policy min_cohort is 5"


def test_an_unknown_job_kind_is_malformed():
    with pytest.raises(ProtocolError, match="field 'kind'"):
        job("exfiltrate")


# -- the worker, through the runner ---------------------------------------------------------
@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    return unpacked(pack(HELPERS / f"{MODULE}.py", f"{MODULE}:Fingerprints"), tmp_path / "bundles")


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    for i, size in enumerate((10, 20, 40)):
        (data / f"case_{i}.bin").write_bytes(b"x" * size)
    return data


@pytest.fixture
def fingerprint_task(make_task: Callable[..., TaskPublic]) -> Callable[..., TaskPublic]:
    def make(cls: str = "Fingerprints", **overrides: Any) -> TaskPublic:
        fields = {
            "kind": TaskKind.FINGERPRINT,
            "round": 1,
            "algorithm": f"{MODULE}:{cls}",
            "config": {"round": 1, "seed": 0, "params": {}},
            "weights_digest": sha256_hex(EMPTY),
            "weights_size": len(EMPTY),
        }
        return make_task(**{**fields, **overrides})

    return make


def task_folder(root: Path, name: str) -> Path:
    folder = root / "tasks" / name
    folder.mkdir(parents=True)
    (folder / WEIGHTS_FILE).write_bytes(EMPTY)
    return folder


def test_the_worker_computes_the_fingerprint_without_setup_and_finalizes(
    tmp_path: Path, bundle: Path, dataset: Path, fingerprint_task: Callable[..., TaskPublic]
):
    cache = tmp_path / "cache" / "experiment-1"
    cache.mkdir(parents=True)
    runner = TaskRunner()
    for n in (1, 2):  # the cache folder outlives the task folder
        task_dir = task_folder(tmp_path, f"t-{n}")
        result = runner.run(
            fingerprint_task(id=f"t-{n}"),
            task_dir,
            site="site-a",
            dataset_path=dataset,
            bundle_dir=bundle,
            cache_dir=cache,
        )
        assert result.kind == TaskKind.FINGERPRINT and result.n_samples == 3 and result.weights_path is None
        data = json.loads((task_dir / RESULT_FILE).read_text())
        fingerprint = SiteFingerprint.model_validate(data["fingerprint"])
        assert fingerprint.n_cases == 3 and fingerprint.channels[0].max == 40.0
        assert (task_dir / "finalized.txt").read_text() == "yes"
        assert (cache / "runs.txt").read_text() == str(n)


@pytest.mark.parametrize(
    ("cls", "reason"),
    [
        ("NoFingerprint", f"algorithm {MODULE}:NoFingerprint computes no dataset fingerprint"),
        ("Wrong", "fingerprint() returned dict; return a laulima.core.fingerprint.SiteFingerprint"),
    ],
)
def test_an_algorithm_without_a_fingerprint_fails_the_task_saying_so_and_still_finalizes(
    tmp_path: Path, dataset: Path, fingerprint_task: Callable[..., TaskPublic], cls: str, reason: str
):
    bundle = unpacked(pack(HELPERS / f"{MODULE}.py", f"{MODULE}:{cls}"), tmp_path / "bundles")
    task_dir = task_folder(tmp_path, "t-1")
    with pytest.raises(AlgorithmError) as info:
        TaskRunner().run(fingerprint_task(cls), task_dir, site="site-a", dataset_path=dataset, bundle_dir=bundle)
    assert reason in str(info.value)
    assert (task_dir / "finalized.txt").read_text() == "yes"


def test_a_cache_folder_the_sandbox_cannot_write_is_refused_before_anything_runs(
    tmp_path: Path, bundle: Path, dataset: Path, fingerprint_task: Callable[..., TaskPublic]
):
    cache = tmp_path / "cache" / "experiment-1"
    cache.mkdir(parents=True)
    task_dir = task_folder(tmp_path, "t-1")
    sandbox = sandbox_for(SitePolicy(), task_dir, dataset, bundle, gpu=False)  # no cache_dir given
    with pytest.raises(ConfigurationError, match="cache folder is not writable in the task's sandbox"):
        TaskRunner().run(
            fingerprint_task(),
            task_dir,
            site="site-a",
            dataset_path=dataset,
            bundle_dir=bundle,
            sandbox=sandbox,
            cache_dir=cache,
        )
    assert not (task_dir / RESULT_FILE).exists()
    with_cache = sandbox_for(SitePolicy(), task_dir, dataset, bundle, gpu=False, cache_dir=cache)
    assert Path(os.path.realpath(cache)) in with_cache.writable


@pytest.mark.skipif(not CONFINABLE, reason="this kernel cannot enforce the sandbox (Landlock, namespaces, seccomp)")
def test_in_the_sandbox_the_experiments_cache_is_writable_and_another_experiments_is_not(
    tmp_path: Path, dataset: Path, fingerprint_task: Callable[..., TaskPublic]
):
    bundle = unpacked(pack(HELPERS / f"{MODULE}.py", f"{MODULE}:WritesTo"), tmp_path / "bundles")
    cache, other = tmp_path / "cache" / "experiment-1", tmp_path / "cache" / "experiment-2"
    cache.mkdir(parents=True)
    other.mkdir()
    runner = TaskRunner()

    def run(name: str, target: Path) -> Any:
        task_dir = task_folder(tmp_path, name)
        task = fingerprint_task("WritesTo", id=name, config={"params": {"target": str(target)}})
        sandbox = sandbox_for(SitePolicy(), task_dir, dataset, bundle, gpu=False, cache_dir=cache)
        return runner.run(
            task, task_dir, site="site-a", dataset_path=dataset, bundle_dir=bundle, sandbox=sandbox, cache_dir=cache
        )

    assert run("t-1", cache / "preprocessed.txt").n_samples == 3
    assert (cache / "preprocessed.txt").read_text() == "written" and (cache / "runs.txt").read_text() == "1"
    with pytest.raises(AlgorithmError, match="^sandbox: the algorithm tried to ") as info:
        run("t-2", other / "stolen.txt")
    assert str(tmp_path) not in str(info.value)
    assert not (other / "stolen.txt").exists()


# -- the cache folders at the agent -----------------------------------------------------------
def test_cache_folders_unused_for_a_week_are_pruned_and_fresh_ones_kept(tmp_path: Path):
    root = tmp_path / CACHE_DIR
    old, fresh = root / "experiment-1", root / "experiment-2"
    for folder in (old, fresh):
        (folder / "deep").mkdir(parents=True)
        (folder / "deep" / "case.npz").write_bytes(b"data")
        (root / f"{folder.name}.json").write_text("{}")
    (root / "experiment-9.json").write_text("{}")  # an owner file left without its folder
    (root / "unrelated").mkdir()
    week_ago = time.time() - CACHE_MAX_AGE_S - 60
    for path in (old, root / "experiment-1.json", root / "experiment-9.json", root / "unrelated"):
        os.utime(path, (week_ago, week_ago))
    assert prune_caches(root) == 1
    assert sorted(p.name for p in root.iterdir()) == ["experiment-2", "experiment-2.json", "unrelated"]
    assert prune_caches(tmp_path / "none") == 0


class FingerprintHub(FakeHub):
    """The fake hub, taking fingerprints too."""

    def __init__(self, blob: bytes) -> None:
        super().__init__(blob)
        self.fingerprints: dict[str, dict] = {}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path.removeprefix("/api/v1")
        if path.startswith("/tasks/") and path.endswith("/fingerprint"):
            self.requests.append(request)
            self.fingerprints[path.split("/")[2]] = json.loads(request.read())
            return httpx.Response(204)
        return super().__call__(request)


@pytest.fixture
def site_home(tmp_path: Path, dataset: Path) -> Path:
    home = tmp_path / "site-a"
    Catalog(home, site="site-a").add("ds", dataset)
    return home


def admitted(home: Path, hub: FakeHub, cls: str = "Fingerprints") -> dict[str, Any]:
    packed = pack(HELPERS / f"{MODULE}.py", f"{MODULE}:{cls}")
    hub.bundles[packed.digest] = packed.data
    write_policy(home, f'[algorithms]\ndigests = ["{packed.digest}"]\n')
    return {"bundle_digest": packed.digest, "bundle_size": len(packed.data)}


def test_the_agent_reports_the_fingerprint_with_an_audit_entry_and_keeps_the_cache(
    site_home: Path, fingerprint_task: Callable[..., TaskPublic], caplog: pytest.LogCaptureFixture
):
    hub = FingerprintHub(EMPTY)
    hub.tasks.append(fingerprint_task(id="f-1", **admitted(site_home, hub)))
    agent = make_agent(site_home, hub)
    caplog.set_level("INFO", logger="laulima.site")
    assert agent.step() is True
    sent = SiteFingerprint.model_validate(hub.fingerprints["f-1"])
    assert sent.n_cases == 3 and hub.failures == {}
    assert agent.state.get("f-1").phase == Phase.REPORTED
    cache = site_home / CACHE_DIR / "experiment-1"
    assert (cache / "runs.txt").read_text() == "1"
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700 and stat.S_IMODE(cache.parent.stat().st_mode) == 0o700
    [sent_entry] = [e for e in agent.audit.entries() if e.event == "sent"]
    body = sent.model_dump_json().encode()
    assert sent_entry.fields == {"what": "fingerprint", "bytes": len(body), "sha256": sha256_hex(body)}
    # no per-case values in the site's log: the cases' sizes (10, 20, 40 bytes) appear nowhere
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "fingerprinted" in logged and "(3 cases)" in logged and "40.0" not in logged


def test_the_cache_folder_of_another_experiment_with_the_same_id_is_emptied(
    site_home: Path, fingerprint_task: Callable[..., TaskPublic]
):
    hub = FingerprintHub(EMPTY)
    agent = make_agent(site_home, hub)
    first = agent.cache_dir(fingerprint_task(experiment_name="first"))
    (first / "cases.npz").write_bytes(b"first's data")
    assert agent.cache_dir(fingerprint_task(experiment_name="first")) == first
    assert (first / "cases.npz").exists()
    again = agent.cache_dir(fingerprint_task(experiment_name="second"))  # a hub that started afresh
    assert again == first and list(again.iterdir()) == []


def test_a_cohort_under_min_cohort_is_refused_before_the_algorithm_runs(
    site_home: Path, fingerprint_task: Callable[..., TaskPublic]
):
    hub = FingerprintHub(EMPTY)
    (Catalog(site_home).get("ds") / "dataset.json").write_text(json.dumps({"numTraining": 3, "training": [{}, {}, {}]}))
    extra = admitted(site_home, hub)
    write_policy(site_home, "min_cohort = 5\n" + (site_home / "policy.toml").read_text())
    hub.tasks.append(fingerprint_task(id="f-1", **extra))
    make_agent(site_home, hub).step()
    assert hub.fingerprints == {}
    failure = hub.failures["f-1"]
    assert failure["kind"] == "rejected"
    assert failure["reason"].startswith("dataset 'ds' has 3 cases, policy min_cohort is 5"), failure
