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
def runner(helper_algorithms: str) -> Iterator[TaskRunner]:
    runner = TaskRunner(zygote=True, kill_grace_s=0.3)
    runner.warm(helper_algorithms)
    yield runner
    runner.close()


@pytest.fixture
def run_task(tmp_path: Path, weights_blob: bytes, make_task) -> Callable[..., RunResult]:
    """Run a task of ``algorithm`` (a class of the helper module, or an entry point) in a folder of its own."""
    count = 0

    def run(runner: TaskRunner, algorithm: str = "Counter", **overrides) -> RunResult:
        nonlocal count
        count += 1
        task_dir = tmp_path / f"t-{count}"
        task_dir.mkdir()
        (task_dir / WEIGHTS_FILE).write_bytes(weights_blob)
        entry = algorithm if ":" in algorithm else f"site_test_algorithms:{algorithm}"
        task = make_task(id=f"t-{count}", algorithm=entry, **overrides)
        return runner.run(task, task_dir, site="site-a", dataset_path=tmp_path)

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
    runner.warm("no_such_module")
    with pytest.raises(AlgorithmError, match="no_such_module.*cannot be imported"):
        run_task(runner, "no_such_module:Algo")
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


def test_an_algorithm_changed_on_disk_runs_as_new_code(helper_algorithms, run_task, tmp_path, monkeypatch):
    code = "import site_test_algorithms as base\n\nVERSION = {}\n\n\nclass Versioned(base.Counter):\n" + (
        "    def train(self, weights, config):\n"
        "        update = super().train(weights, config)\n"
        "        update.metrics['version'] = VERSION\n"
        "        return update\n"
    )
    package = tmp_path / "algo"
    package.mkdir()
    module = package / "changing_algo.py"
    module.write_text(code.format(1))
    monkeypatch.syspath_prepend(str(package))
    runner = TaskRunner(zygote=True)
    try:
        runner.warm("changing_algo")
        first = run_task(runner, "changing_algo:Versioned").metrics
        module.write_text(code.format(2))
        os.utime(module, (time.time() + 10, time.time() + 10))  # the bytecode cache goes by seconds
        assert run_task(runner, "changing_algo:Versioned").metrics["version"] == 2
        third = run_task(runner, "changing_algo:Versioned").metrics
        assert (first["version"], third["version"]) == (1, 2)
        assert third["ppid"] not in (first["ppid"], os.getpid()), "a new zygote should have taken over"
    finally:
        runner.close()


def test_without_fork_every_task_gets_a_new_process(helper_algorithms, run_task, monkeypatch):
    monkeypatch.delattr(os, "fork")
    runner = TaskRunner(zygote=True)
    runner.warm(helper_algorithms)
    try:
        assert run_task(runner).metrics["ppid"] == os.getpid()
    finally:
        runner.close()
