"""Tasks confined end to end: the runner, a real bundle, the site policy's sandbox, the real kernel.

Each hostile algorithm fails with a reason that names what it tried and never the site's
paths; the violation also comes back on its own (``sandbox_violation``) for the audit log;
and the same runner then runs a well-behaved task. Every test runs both ways a task's
process starts: forked from the zygote, and spawned (where the worker forks once more so
that the sandbox is applied before any thread runs).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from laulima.algorithms.bundle import pack
from laulima.core.protocol import TaskPublic
from laulima.errors import AlgorithmError, ConfigurationError
from laulima.site.policy import SitePolicy, parse_policy
from laulima.site.runner import TaskRunner, child_environment
from laulima.site.sandbox import KernelSupport, SandboxPolicy, probe_kernel, sandbox_for
from laulima.site.taskdir import RunResult
from laulima.site.worker import WEIGHTS_FILE
from tests.site.conftest import HELPERS, unpacked

KERNEL = probe_kernel() if sys.platform.startswith("linux") else KernelSupport(0, False, False)
pytestmark = [
    pytest.mark.skipif(not hasattr(os, "fork"), reason="tasks are confined in a forked process"),
    pytest.mark.skipif(
        KERNEL.landlock_abi < 1 or not KERNEL.network_namespace or not KERNEL.socket_filter,
        reason="this kernel cannot enforce the whole sandbox (Landlock, network namespaces, seccomp)",
    ),
]

OUTSIDE_FILES = "sandbox: the algorithm tried to open a file outside its dataset and task folder"
WRITE_OUTSIDE = "sandbox: the algorithm tried to write outside its task folder"
NO_NETWORK = "sandbox: the algorithm tried to open a network connection; it has no network"
SECRETS = {
    "LAULIMA_TOKEN": "hub-token-5ca1ab1e",
    "LAULIMA_SITE_TOKEN": "site-token-0ddba11",
    "HOSPITAL_DB_PASSWORD": "hunter2-hunter2",
    "S3_SECRET_ACCESS_KEY": "s3-secret-f00d",
    "SOME_SETTING_OF_THE_AGENT": "/srv/laulima/home",
}


@dataclass
class Site:
    root: Path
    home: Path
    key: Path
    dataset: Path
    other_dataset: Path
    bundle: Path


@pytest.fixture
def site(tmp_path: Path) -> Site:
    """A site home (a private key, task folders, the bundle cache) and two datasets beside it."""
    home = tmp_path / "home"
    (home / "tls").mkdir(parents=True)
    key = home / "tls" / "site.key"
    key.write_text("-----BEGIN PRIVATE KEY-----\nsecret\n")
    datasets = tmp_path / "datasets"
    for name, cases in (("brain", 2), ("heart", 1)):
        (datasets / name).mkdir(parents=True)
        for i in range(cases):
            (datasets / name / f"case_{i:03d}.txt").write_text(f"{name} case {i}\n")
    bundle = unpacked(pack(HELPERS / "site_test_confined.py", "site_test_confined:Behaves"), home / "bundles")
    return Site(tmp_path, home, key, datasets / "brain", datasets / "heart", bundle)


@pytest.fixture
def agent_secrets(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The agent's environment holds its tokens (set before the runner starts anything)."""
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    # The memory limit counts address space, and a task starts with what the zygote mapped:
    # OpenBLAS's per-thread stacks and buffers grow with the machine's cores. Two threads
    # keep that small on any machine (the variable passes to the task, as a site's would).
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")
    return SECRETS


@pytest.fixture(params=["spawn", "zygote"])
def runner(request: pytest.FixtureRequest, agent_secrets: dict[str, str]) -> Iterator[TaskRunner]:
    runner = TaskRunner(zygote=request.param == "zygote", kill_grace_s=0.3)
    runner.warm()
    yield runner
    runner.close()


Run = Callable[..., RunResult]


@pytest.fixture
def run(site: Site, make_task: Callable[..., TaskPublic], weights_blob: bytes) -> Run:
    """``run(runner, cls, **params)``: one task of ``site_test_confined:<cls>`` in a new task
    folder, confined as ``policy`` (default: the default site policy) says.

    ``dataset``: another dataset path; ``bundle`` and ``cls`` as an entry point: another
    algorithm; ``confine``: False for no sandbox, or a function of the task folder that
    gives the sandbox; ``time_limit_s``: the task's time limit."""
    count = 0

    def run_one(
        runner: TaskRunner,
        cls: str = "Behaves",
        *,
        policy: SitePolicy | None = None,
        dataset: Path | None = None,
        bundle: Path | None = None,
        confine: bool | Callable[[Path], SandboxPolicy] = True,
        time_limit_s: float = 60.0,
        **params: Any,
    ) -> RunResult:
        nonlocal count
        count += 1
        task_dir = site.home / "tasks" / f"t-{count}"
        task_dir.mkdir(parents=True)
        (task_dir / WEIGHTS_FILE).write_bytes(weights_blob)
        dataset = dataset or site.dataset
        bundle = bundle or site.bundle
        entry = cls if ":" in cls else f"site_test_confined:{cls}"
        task = make_task(id=f"t-{count}", algorithm=entry, config={"params": params}, time_limit_s=time_limit_s)
        sandbox = None
        if confine is True:
            sandbox = sandbox_for(policy or SitePolicy(), task_dir, dataset, bundle)
        elif callable(confine):
            sandbox = confine(task_dir)
        return runner.run(task, task_dir, site="site-a", dataset_path=dataset, bundle_dir=bundle, sandbox=sandbox)

    return run_one


def refused(run: Run, runner: TaskRunner, site: Site, **kwargs: Any) -> AlgorithmError:
    """Run a task that must fail; check that its reason leaks no path; then a good task must run."""
    with pytest.raises(AlgorithmError) as info:
        run(runner, "Tries", **kwargs)
    error = info.value
    assert error.context["kind"] == "error"
    assert str(site.root) not in str(error), "the reason for the hub names a path of the site"
    assert run(runner).n_samples == 2, "the runner must go on to run a well-behaved task"
    return error


def test_a_well_behaved_algorithm_trains_in_its_sandbox(runner: TaskRunner, run: Run, site: Site) -> None:
    result = run(runner)
    assert (result.n_samples, result.metrics["product"]) == (2, 120.0)
    assert result.metrics["bytes"] == sum(len(p.read_bytes()) for p in site.dataset.iterdir())
    task_dir = site.home / "tasks" / "t-1"
    assert (task_dir / "scratch" / "notes.txt").read_text().startswith("2 files")
    assert "sandbox: environment cleared" in (task_dir / "stderr.log").read_text(), "the sandbox was not applied"


@pytest.mark.parametrize(
    ("action", "target", "violation"),
    [
        ("read", "home/tls/site.key", OUTSIDE_FILES),
        ("read", "/etc/passwd", OUTSIDE_FILES),
        ("read", "datasets/heart/case_000.txt", OUTSIDE_FILES),
        ("write", "datasets/brain/case_000.txt", WRITE_OUTSIDE),
        ("write", "home/planted.py", OUTSIDE_FILES),
    ],
    ids=["site-key", "etc-passwd", "other-dataset", "own-dataset", "site-home"],
)
def test_files_outside_the_dataset_and_task_folder_are_out_of_reach(
    runner: TaskRunner, run: Run, site: Site, action: str, target: str, violation: str
) -> None:
    path = target if target.startswith("/") else str(site.root / target)
    before = Path(path).read_bytes() if Path(path).exists() else None
    error = refused(run, runner, site, action=action, target=path)
    assert str(error).startswith(f"{violation} (at site_test_confined.py:")
    assert error.context["sandbox_violation"] == violation
    after = Path(path).read_bytes() if Path(path).exists() else None
    assert after == before, f"{target} was changed"


def test_the_network_is_out_of_reach_even_the_sites_own_machine(runner: TaskRunner, run: Run, site: Site) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        error = refused(run, runner, site, action="connect", target=server.getsockname()[1])
        server.setblocking(False)
        with pytest.raises(BlockingIOError):
            server.accept()  # nothing ever connected
    assert str(error).startswith(NO_NETWORK)
    assert error.context["sandbox_violation"] == NO_NETWORK


def test_allocating_past_the_sites_memory_limit_fails_with_that_reason(
    runner: TaskRunner, run: Run, site: Site
) -> None:
    error = refused(run, runner, site, policy=SitePolicy(max_memory_mb=512), action="allocate", target=2 << 30)
    violation = "sandbox: the algorithm exceeded its memory limit of 512 MiB"
    assert str(error).startswith(violation)
    assert error.context["sandbox_violation"] == violation
    assert run(runner, policy=SitePolicy(max_memory_mb=512)).n_samples == 2, "512 MiB must do for a small task"


def test_a_task_past_the_sites_cpu_limit_is_killed_with_that_reason(runner: TaskRunner, run: Run, site: Site) -> None:
    error = refused(run, runner, site, policy=SitePolicy(max_cpu_seconds=0.5), action="burn")
    violation = "sandbox: the algorithm used up its CPU time limit of 1 s"
    assert (str(error), error.context["sandbox_violation"]) == (violation, violation)
    assert error.context["exit_code"] == -signal.SIGXCPU


def test_a_confined_task_past_its_time_limit_is_stopped_with_its_processes(
    runner: TaskRunner, run: Run, site: Site, all_gone: Callable[..., bool]
) -> None:
    started = time.monotonic()
    with pytest.raises(AlgorithmError) as info:
        run(runner, "Tries", time_limit_s=0.5, action="sleep")
    assert info.value.context["kind"] == "timeout"
    assert time.monotonic() - started < 2.0
    pid, parent = map(int, (site.home / "tasks" / "t-1" / "scratch" / "pids.txt").read_text().split())
    zygote = runner._zygote.pid if runner._zygote is not None else None
    assert all_gone(pid) and (parent == zygote or all_gone(parent)), "a process of the task survived"
    assert run(runner).n_samples == 2


@pytest.mark.parametrize("confine", [True, False], ids=["sandboxed", "unconfined"])
def test_the_agents_tokens_never_reach_the_task(runner: TaskRunner, run: Run, site: Site, confine: bool) -> None:
    run(runner, "Tries", confine=confine, action="environment")
    seen = json.loads((site.home / "tasks" / "t-1" / "scratch" / "environment.json").read_text())
    everything = json.dumps(seen)
    for name, value in SECRETS.items():
        assert name not in seen["environ"] and value not in everything, f"{name} reached the task"
    if confine:
        assert seen["environ"]["HOME"] == str(site.home / "tasks" / "t-1")
    if runner._zygote is not None:  # every task is forked from it: its own environment must be clean too
        zygote_environ = Path(f"/proc/{runner._zygote.pid}/environ").read_bytes().decode("latin-1")
        assert not any(value in zygote_environ for value in SECRETS.values())


def test_a_sandbox_that_cannot_be_set_up_fails_the_task_before_its_algorithm_is_imported(
    runner: TaskRunner, run: Run, site: Site, tmp_path: Path
) -> None:
    source = tmp_path / "src" / "marks_import.py"
    source.parent.mkdir()
    source.write_text(
        "from pathlib import Path\n\n"
        "from laulima.algorithms.identity import Identity\n\n"
        "Path('imported.marker').write_text('imported')  # the worker's cwd: its task folder\n"
    )
    marks = unpacked(pack(source, "marks_import:Identity"), site.home / "bundles")

    def broken(task_dir: Path) -> SandboxPolicy:
        good = sandbox_for(SitePolicy(), task_dir, site.dataset, marks)
        return replace(good, readable=(site.root / "unmounted-disk", *good.readable))

    with pytest.raises(AlgorithmError) as info:
        run(runner, "marks_import:Identity", bundle=marks, confine=broken)
    assert str(info.value).startswith("sandbox: a path in the policy's readable list does not exist")
    assert str(site.root) not in str(info.value)
    assert not (site.home / "tasks" / "t-1" / "imported.marker").exists(), "imported without its sandbox"
    assert run(runner, "marks_import:Identity", bundle=marks).n_samples == 1
    assert (site.home / "tasks" / "t-2" / "imported.marker").exists(), "the bundle's import did not run"


def test_the_sites_extra_folders_and_a_single_file_dataset(runner: TaskRunner, run: Run, site: Site) -> None:
    cache, shared = site.root / "model-cache", site.root / "shared-out"
    cache.mkdir()
    shared.mkdir()
    (cache / "weights.bin").write_bytes(b"pretrained")
    policy = parse_policy({"sandbox": {"readable": [str(cache)], "writable": [str(shared)]}})
    assert run(runner, "Tries", policy=policy, action="read", target=str(cache / "weights.bin")).n_samples == 2
    assert run(runner, "Tries", policy=policy, action="write", target=str(shared / "out.txt")).n_samples == 2
    assert (shared / "out.txt").read_text() == "tampered"
    error = refused(run, runner, site, policy=policy, action="write", target=str(cache / "weights.bin"))
    assert str(error).startswith(WRITE_OUTSIDE)
    # A dataset that is one file: that file only, not the folder it lies in.
    single = site.dataset / "case_000.txt"
    assert run(runner, dataset=single).n_samples == 1
    with pytest.raises(AlgorithmError, match=OUTSIDE_FILES):
        run(runner, "Tries", dataset=single, action="read", target=str(site.dataset / "case_001.txt"))


def test_the_sandbox_follows_the_site_policy(site: Site) -> None:
    cache = site.root / "cache"
    cache.mkdir()
    task_dir = site.home / "tasks" / "t-9"
    task_dir.mkdir(parents=True)
    policy = parse_policy(
        {
            "max_memory_mb": 512,
            "max_cpu_seconds": 2.2,
            "sandbox": {"network": True, "on_unsupported": "warn", "readable": [str(cache)], "writable": []},
        }
    )
    sandbox = sandbox_for(policy, task_dir, site.dataset, site.bundle, gpu=False)
    assert (sandbox.memory_bytes, sandbox.cpu_seconds) == (512 << 20, 3)
    assert (sandbox.network, sandbox.on_unsupported) == (True, "warn")
    assert sandbox.task_dir == task_dir.resolve() and sandbox.writable == ()
    assert {site.dataset, site.bundle, cache} <= set(sandbox.readable)
    assert site.other_dataset not in sandbox.readable and site.home not in sandbox.readable
    assert SandboxPolicy.from_json(json.loads(json.dumps(sandbox.to_json()))) == sandbox
    default = sandbox_for(SitePolicy(), task_dir, site.dataset, None, gpu=False)
    assert (default.memory_bytes, default.cpu_seconds, default.network) == (None, None, False)
    missing = parse_policy({"sandbox": {"writable": [str(site.root / "not-there")]}})
    with pytest.raises(ConfigurationError, match=r"\[sandbox\] writable entry 1 does not exist"):
        sandbox_for(missing, task_dir, site.dataset, site.bundle)


def test_a_sandbox_for_another_task_folder_is_refused(run: Run, site: Site, agent_secrets: dict[str, str]) -> None:
    other = site.home / "tasks" / "other"
    other.mkdir(parents=True)
    with pytest.raises(ConfigurationError, match="sandbox policy is for another task folder"):
        run(TaskRunner(), confine=lambda task_dir: sandbox_for(SitePolicy(), other, site.dataset, site.bundle))
    assert not (site.home / "tasks" / "t-1" / "task.json").exists(), "nothing may run"


def test_the_zygote_and_workers_start_with_an_allow_listed_environment() -> None:
    agent = {
        **SECRETS,
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "LC_TIME": "C",
        "HOME": "/root",
        "HTTPS_PROXY": "http://user:pass@proxy:3128",
        "OMP_NUM_THREADS": "3",
        "PYTHONHASHSEED": "7",
        "PYTHONPATH": "/opt/extra",
    }
    env = child_environment(agent)
    assert sorted(env) == [
        "LANG",
        "LAULIMA_WORKER_PARENT",
        "LC_TIME",
        "OMP_NUM_THREADS",
        "PATH",
        "PYTHONHASHSEED",
        "PYTHONPATH",
        "PYTHONUNBUFFERED",
    ]
    assert (env["OMP_NUM_THREADS"], env["PYTHONHASHSEED"], env["PYTHONUNBUFFERED"]) == ("3", "7", "1")
    assert env["LAULIMA_WORKER_PARENT"] == str(os.getpid()) and env["PYTHONPATH"].endswith("/opt/extra")
