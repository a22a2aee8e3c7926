"""Tasks forked from the agent's zygote: a fresh process each, nothing shared between two,
served on when a task times out, the zygote dies, a preload fails or the code changes.

Results, crashes, time-outs and cancels through the zygote are tested beside the
process-per-task path in test_site_runner.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from laulima.errors import AlgorithmError
from laulima.site.runner import TaskRunner
from laulima.site.taskdir import RunResult
from laulima.site.worker import WEIGHTS_FILE

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the zygote needs os.fork")


@pytest.fixture
def runner() -> Iterator[TaskRunner]:
    runner = TaskRunner(zygote=True, kill_grace_s=0.3)
    runner.warm()
    yield runner
    runner.close()


@pytest.fixture
def run_task(tmp_path: Path, weights_blob: bytes, make_task, helper_bundle: Path) -> Callable[..., RunResult]:
    """Run a task of ``algorithm`` (a class of the helper bundle, or an entry point) in a folder of its own;
    ``bundle``: the unpacked bundle it comes from (None: a built-in)."""
    count = 0

    def run(
        runner: TaskRunner, algorithm: str = "Counter", bundle: Path | None = helper_bundle, **overrides
    ) -> RunResult:
        nonlocal count
        count += 1
        task_dir = tmp_path / f"t-{count}"
        task_dir.mkdir()
        (task_dir / WEIGHTS_FILE).write_bytes(weights_blob)
        entry = algorithm if ":" in algorithm else f"site_test_algorithms:{algorithm}"
        task = make_task(id=f"t-{count}", algorithm=entry, **overrides)
        return runner.run(task, task_dir, site="site-a", dataset_path=tmp_path, bundle_dir=bundle)

    return run


def test_each_task_runs_in_a_fresh_fork_that_sees_nothing_of_the_last(runner, run_task):
    first = run_task(runner).metrics
    started = time.monotonic()
    second = run_task(runner).metrics
    seconds = time.monotonic() - started
    assert first["pid"] != second["pid"]
    assert first["ppid"] == second["ppid"] != os.getpid(), "both should come from the same zygote"
    assert first["calls"] == second["calls"] == 1, "a module global set by one task leaked into the next"
    assert first["draw"] != second["draw"], "numpy's global RNG must be reseeded in every task"
    assert seconds < 0.5, f"a task forked from a warm zygote took {seconds:.2f} s"


def test_the_zygote_outlives_a_task_killed_at_its_time_limit(runner, run_task):
    zygote = run_task(runner).metrics["ppid"]
    with pytest.raises(AlgorithmError, match="timeout"):
        run_task(runner, "Sleeper", time_limit_s=0.5)
    assert run_task(runner).metrics["ppid"] == zygote


def test_a_killed_zygote_is_replaced_and_no_task_is_lost(runner, run_task):
    zygote = int(run_task(runner).metrics["ppid"])
    os.kill(zygote, signal.SIGKILL)
    assert run_task(runner).n_samples == 1  # in a process of its own, while a new zygote starts
    replacement = run_task(runner).metrics["ppid"]
    assert replacement not in (zygote, os.getpid())
    assert run_task(runner).metrics["ppid"] == replacement


def test_a_module_that_fails_to_import_fails_its_task_not_the_zygote(runner, run_task):
    zygote = run_task(runner).metrics["ppid"]
    runner.warm("laulima.algorithms.no_such_module")
    with pytest.raises(AlgorithmError, match="no_such_module.*cannot be imported"):
        run_task(runner, "laulima.algorithms.no_such_module:Algo", bundle=None)
    assert "laulima.algorithms.no_such_module" in runner._no_preload
    assert run_task(runner).metrics["ppid"] == zygote


def test_the_zygote_exits_when_its_agent_dies(helper_algorithms, all_gone):
    agent = textwrap.dedent(
        """
        import os, sys
        from laulima.site.runner import TaskRunner
        runner = TaskRunner(zygote=True)
        runner.warm()
        print(runner._zygote.pid, flush=True)
        os._exit(0)  # like a SIGKILL: nothing is cleaned up
        """
    )
    out = subprocess.run([sys.executable, "-c", agent], capture_output=True, text=True, check=True, timeout=30)
    assert all_gone(int(out.stdout)), "the orphaned zygote is still running"


def test_a_new_bundle_runs_as_new_code_and_bundles_are_never_preloaded(run_task, tmp_path, monkeypatch):
    """A changed algorithm is a new bundle (a new digest, a new folder): each task imports its
    own bundle in its own process, so the zygote never holds an old version of it."""
    from laulima.algorithms.bundle import pack, unpack

    code = "VERSION = {}\n\nfrom laulima.algorithms.identity import Identity\n\n\nclass Versioned(Identity):\n" + (
        "    def train(self, weights, config):\n"
        "        update = super().train(weights, config)\n"
        "        update.metrics['version'] = VERSION\n"
        "        update.metrics['ppid'] = __import__('os').getppid()\n"
        "        return update\n"
    )
    module = tmp_path / "algo" / "changing_algo.py"
    module.parent.mkdir()
    monkeypatch.syspath_prepend(str(module.parent))  # importable by name too: the zygote must not use that
    bundles = []
    for version in (1, 2):
        module.write_text(code.format(version))
        packed = pack(module, "changing_algo:Versioned")
        bundles.append(unpack(packed.data, packed.digest, tmp_path / "bundles"))
    runner = TaskRunner(zygote=True)
    try:
        runner.warm("changing_algo")
        first = run_task(runner, "changing_algo:Versioned", bundle=bundles[0]).metrics
        second = run_task(runner, "changing_algo:Versioned", bundle=bundles[1]).metrics
        third = run_task(runner, "changing_algo:Versioned", bundle=bundles[0]).metrics
        assert (first["version"], second["version"], third["version"]) == (1, 2, 1)
        assert first["ppid"] == second["ppid"] == third["ppid"] != os.getpid(), "one zygote served all three"
    finally:
        runner.close()


def test_without_fork_every_task_gets_a_new_process(run_task, monkeypatch):
    monkeypatch.delattr(os, "fork")
    runner = TaskRunner(zygote=True)
    runner.warm()
    try:
        assert run_task(runner).metrics["ppid"] == os.getpid()
    finally:
        runner.close()
