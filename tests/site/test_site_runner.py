"""The task runner on real child processes: success, crash, timeout, output validation.

The behaviour tests run twice: with a process started per task, and with tasks forked
from the zygote (:mod:`laulima.site.zygote`); both must give the same results. The helper
algorithms run as a site runs every non-built-in: from an unpacked bundle (``bundle_dir``).
Confinement (the sandbox) is tested in test_confinement.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from safetensors import safe_open

from laulima.core.protocol import MetaKey, TaskKind
from laulima.errors import AlgorithmError
from laulima.site.runner import TaskRunner, child_pythonpath
from laulima.site.taskdir import short_stderr_reason, train_settings
from laulima.site.worker import WEIGHTS_FILE


@pytest.fixture
def task_dir(tmp_path: Path, weights_blob: bytes) -> Path:
    d = tmp_path / "work" / "t-1"
    d.mkdir(parents=True)
    (d / WEIGHTS_FILE).write_bytes(weights_blob)
    return d


@pytest.fixture(params=["spawn", "zygote"])
def runner(request: pytest.FixtureRequest) -> Iterator[TaskRunner]:
    runner = TaskRunner(zygote=request.param == "zygote")
    runner.warm()
    yield runner
    runner.close()


def run(task, task_dir: Path, runner: TaskRunner | None = None, bundle_dir: Path | None = None):
    return (runner or TaskRunner()).run(
        task, task_dir, site="site-a", dataset_path=task_dir.parent, bundle_dir=bundle_dir
    )


def test_train_success_writes_result_with_metadata(runner, make_task, task_dir, helper_bundle):
    result = run(make_task(), task_dir, runner, helper_bundle)
    assert result.kind == TaskKind.TRAIN
    assert result.n_samples == 3
    assert result.metrics == {"m": 1.5}
    assert result.weights_path is not None and result.weights_path.exists()
    assert result.size == result.weights_path.stat().st_size
    with safe_open(str(result.weights_path), framework="numpy") as f:
        meta = f.metadata()
        assert f.get_tensor("w").tolist() == [1, 2, 3, 4]
    assert meta[MetaKey.N_SAMPLES] == "3"
    assert json.loads(meta[MetaKey.METRICS]) == {"m": 1.5}
    assert meta[MetaKey.TASK] == "t-1"
    # TrainConfig fields and params travelled; finalize ran
    assert (task_dir / "scratch" / "seen.txt").read_text() == "2 3 0.25 {'lr': 0.5}"
    assert (task_dir / "scratch" / "finalized").exists()


def test_everything_a_run_writes_is_owner_only(runner, make_task, task_dir, helper_bundle):
    old = os.umask(0o022)  # the usual umask: files would be world-readable unless made private
    try:
        run(make_task(), task_dir, runner, helper_bundle)
    finally:
        os.umask(old)
    written = [p for p in task_dir.rglob("*") if p.name != WEIGHTS_FILE]
    names = {p.name for p in written}
    assert {"task.json", "result.json", "result.safetensors", "stderr.log", "stdout.log", "scratch"} <= names
    assert "seen.txt" in names  # written by the algorithm itself, in its scratch folder
    assert [f"{p.name} {p.stat().st_mode & 0o777:o}" for p in written if p.stat().st_mode & 0o077] == []


def test_atexit_handlers_run_when_the_task_ends(runner, make_task, task_dir, helper_bundle):
    run(make_task(algorithm="site_test_algorithms:AtExit"), task_dir, runner, helper_bundle)
    assert (task_dir / "scratch" / "atexit.txt").read_text() == "ran"


def test_evaluate_returns_metrics(runner, make_task, task_dir, helper_bundle):
    result = run(make_task(kind=TaskKind.EVALUATE), task_dir, runner, helper_bundle)
    assert result.kind == TaskKind.EVALUATE
    assert (result.n_samples, result.metrics) == (5, {"acc": 0.5, "mean_w": 1.5})
    assert result.weights_path is None


def test_crash_gives_short_reason_and_keeps_full_stderr(runner, make_task, task_dir, helper_bundle):
    with pytest.raises(AlgorithmError) as info:
        run(make_task(algorithm="site_test_algorithms:Crash"), task_dir, runner, helper_bundle)
    reason = str(info.value)
    assert reason.startswith("ValueError: boom at the site (at site_test_algorithms.py:")
    assert "Traceback" not in reason and "\n" not in reason
    assert info.value.context["kind"] == "error"
    stderr = (task_dir / "stderr.log").read_text()
    assert "Traceback (most recent call last)" in stderr and "boom at the site" in stderr
    assert (task_dir / "scratch" / "finalized").exists(), "finalize() must run after a crash"


def test_an_entry_point_outside_its_bundle_is_refused(runner, make_task, task_dir, helper_bundle):
    for entry in ("no_such_module:Algo", "os:system", "laulima.algorithms.identity:Identity"):
        with pytest.raises(AlgorithmError, match="is not part of the algorithm's bundle") as info:
            run(make_task(algorithm=entry), task_dir, runner, helper_bundle)
        assert entry in str(info.value)


def test_without_a_bundle_only_a_built_in_runs_and_nothing_else_is_imported(
    runner, make_task, task_dir, tmp_path, monkeypatch
):
    """A module on sys.path (an installed package, a file next to the agent) is not what the
    site's policy admitted: it is refused before its import-time code could run."""
    marker = tmp_path / "imported"
    package = tmp_path / "on_path"
    package.mkdir()
    (package / "sneaky_algo.py").write_text(
        f"open({str(marker)!r}, 'w').write('imported')\nfrom laulima.algorithms.identity import Identity as Algo\n"
    )
    monkeypatch.syspath_prepend(str(package))  # importable by name in the runner and its children
    runner.warm("sneaky_algo")  # not preloaded either: the zygote imports built-ins only
    for entry in ("sneaky_algo:Algo", "os:system", "tests.helpers.algorithms:SlowCounter"):
        with pytest.raises(AlgorithmError) as info:
            run(make_task(algorithm=entry), task_dir, runner)
        assert str(info.value).startswith(f"algorithm {entry!r} cannot be imported: it is neither a built-in")
        assert info.value.context["kind"] == "error"
    assert not marker.exists(), "the module was imported"
    assert not (task_dir / "result.json").exists()
    assert run(make_task(algorithm="laulima.algorithms.identity:Identity"), task_dir, runner).n_samples == 1


def test_the_zygote_preloads_built_ins_only(make_task, task_dir, tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    package = tmp_path / "on_path"
    package.mkdir()
    (package / "sneaky_algo.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\n")
    monkeypatch.syspath_prepend(str(package))
    runner = TaskRunner(zygote=True)
    try:
        runner.warm("sneaky_algo")
        runner.warm("laulima.algorithms.identity")
        assert runner._zygote is not None
        runner._zygote._send(b"preload sneaky_algo")  # asked directly, the zygote refuses too
        runner._zygote._busy += 1
        result = run(make_task(algorithm="laulima.algorithms.identity:Identity"), task_dir, runner)
        assert result.n_samples == 1
        assert "sneaky_algo" in runner._no_preload
    finally:
        runner.close()
    assert not marker.exists(), "the zygote imported a module that is not a built-in"


def test_timeout_kills_the_algorithm_and_its_children_within_a_second(
    runner, make_task, task_dir, all_gone, helper_bundle
):
    task = make_task(algorithm="site_test_algorithms:SpawnsSleep", time_limit_s=1.0)
    started = time.monotonic()
    with pytest.raises(AlgorithmError) as info:
        run(task, task_dir, runner, helper_bundle)
    elapsed = time.monotonic() - started
    assert info.value.context["kind"] == "timeout"
    assert "timeout" in str(info.value) and "1.0 s" in str(info.value)
    assert 1.0 <= elapsed < 2.0
    assert all_gone(*map(int, (task_dir / "scratch" / "pids.txt").read_text().split())), "`sleep 60` survived"
    assert run(make_task(), task_dir, runner, helper_bundle).n_samples == 3, "the runner must serve the next task"


def test_timeout_kills_an_algorithm_that_ignores_sigterm(runner, make_task, task_dir, helper_bundle):
    task = make_task(algorithm="site_test_algorithms:Stubborn", time_limit_s=0.5)
    runner.kill_grace_s = 0.3
    started = time.monotonic()
    with pytest.raises(AlgorithmError, match="timeout"):
        run(task, task_dir, runner, helper_bundle)
    assert time.monotonic() - started < 1.5


def test_time_limit_is_the_smallest_of_time_left_task_limit_and_site_cap(make_task):
    task = make_task(time_limit_s=100.0, seconds_left=50.0)
    assert TaskRunner().time_limit(task) == 50
    assert TaskRunner(time_limit_cap_s=7).time_limit(task) == 7
    assert TaskRunner().time_limit(make_task(time_limit_s=30.0, seconds_left=50.0)) == 30
    received = time.monotonic() - 20  # the task arrived 20 s ago (its weights took that long)
    assert 29 < TaskRunner().time_limit(task, received_at=received) <= 30
    # A NaN or negative seconds_left never reaches the runner: TaskPublic refuses it when parsed.


def test_a_site_whose_clock_is_an_hour_ahead_still_runs_its_tasks(helper_bundle, make_task, task_dir, monkeypatch):
    """Only durations count: the hub's deadline by the hub's clock is never compared with ours."""
    task = make_task(deadline=time.time() + 60, seconds_left=60.0)
    ahead = time.time
    monkeypatch.setattr(time, "time", lambda: ahead() + 3600)
    result = TaskRunner().run(
        task,
        task_dir,
        site="site-a",
        dataset_path=task_dir.parent,
        received_at=time.monotonic(),
        bundle_dir=helper_bundle,
    )
    assert result.n_samples == 3


def test_no_time_left_is_a_timeout_and_nothing_runs(make_task, task_dir):
    for left in (0.0,):
        with pytest.raises(AlgorithmError, match="deadline passed before the algorithm could start") as info:
            run(make_task(seconds_left=left), task_dir)
        assert info.value.context["kind"] == "timeout"
        assert not (task_dir / "task.json").exists() and not (task_dir / "stderr.log").exists()
    with pytest.raises(AlgorithmError, match="timeout"):  # 60 s were left when it arrived, 61 s ago
        TaskRunner().run(
            make_task(seconds_left=60.0),
            task_dir,
            site="site-a",
            dataset_path=task_dir.parent,
            received_at=time.monotonic() - 61,
        )
    assert not (task_dir / "task.json").exists()


@pytest.mark.parametrize(
    ("algorithm", "expected"),
    [
        ("MakesNaN", "tensor 'b' contains NaN values"),
        ("WrongShape", "tensor 'w' has shape [5], expected [4]"),
        ("ZeroSamples", "n_samples is 0; it must be an integer of at least 1"),
    ],
)
def test_invalid_update_is_refused_naming_the_problem(runner, make_task, task_dir, algorithm, expected, helper_bundle):
    with pytest.raises(AlgorithmError) as info:
        run(make_task(algorithm=f"site_test_algorithms:{algorithm}"), task_dir, runner, helper_bundle)
    assert expected in str(info.value)
    assert not (task_dir / "result.safetensors").exists()


def test_cancel_kills_the_algorithm_and_its_children(runner, make_task, task_dir, all_gone, helper_bundle):
    import threading

    pids = task_dir / "scratch" / "pids.txt"

    def cancel_once_started() -> None:
        while not pids.exists():
            time.sleep(0.01)
        runner.cancel()

    threading.Thread(target=cancel_once_started, daemon=True).start()
    started = time.monotonic()
    with pytest.raises(AlgorithmError) as info:
        run(make_task(algorithm="site_test_algorithms:SpawnsSleep"), task_dir, runner, helper_bundle)
    assert info.value.context["kind"] == "cancelled"
    assert time.monotonic() - started < 2.0
    assert all_gone(*map(int, pids.read_text().split()))


def test_child_pythonpath_carries_sys_path_entries(helper_algorithms):
    entries = child_pythonpath("/extra/dir").split(os.pathsep)
    assert str(Path(__file__).resolve().parent / "helper_pkg") in entries
    assert entries[-1] == "/extra/dir"
    assert not any(e.endswith("site-packages") for e in entries)


def test_worker_imports_no_http_or_settings_stack():
    code = (
        "import sys, laulima.site.worker, laulima.site.zygote\n"
        "print(sorted(m for m in ('httpx', 'pydantic', 'fastapi', 'rich', 'pydantic_settings') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_short_stderr_reason_takes_the_exception_lines():
    stderr = (
        'some warning\nTraceback (most recent call last):\n  File "x.py", line 1, in <module>\n'
        "    f()\nRuntimeError: first line\n"
    )
    assert short_stderr_reason(stderr) == "RuntimeError: first line"
    assert short_stderr_reason("Killed\n") == "Killed"
    assert short_stderr_reason("") == ""


def test_train_settings_accepts_nested_and_flat_params():
    assert train_settings({"local_epochs": 2, "params": {"lr": 1}}) == ({"local_epochs": 2}, {"lr": 1})
    assert train_settings({"seed": 3, "lr": 1}) == ({"seed": 3}, {"lr": 1})
