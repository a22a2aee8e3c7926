"""The task runner on real child processes: success, crash, timeout, output validation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors import safe_open

from laulima.core.protocol import MetaKey, TaskKind
from laulima.errors import AlgorithmError
from laulima.site.runner import TaskRunner, child_pythonpath, short_stderr_reason, train_settings
from laulima.site.worker import WEIGHTS_FILE


@pytest.fixture
def task_dir(tmp_path: Path, weights_blob: bytes) -> Path:
    d = tmp_path / "work" / "t-1"
    d.mkdir(parents=True)
    (d / WEIGHTS_FILE).write_bytes(weights_blob)
    return d


def run(task, task_dir: Path, runner: TaskRunner | None = None):
    return (runner or TaskRunner()).run(task, task_dir, site="site-a", dataset_path=task_dir.parent)


def test_train_success_writes_result_with_metadata(helper_algorithms, make_task, task_dir):
    result = run(make_task(), task_dir)
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


def test_evaluate_returns_metrics(helper_algorithms, make_task, task_dir):
    result = run(make_task(kind=TaskKind.EVALUATE), task_dir)
    assert result.kind == TaskKind.EVALUATE
    assert (result.n_samples, result.metrics) == (5, {"acc": 0.5, "mean_w": 1.5})
    assert result.weights_path is None


def test_crash_gives_short_reason_and_keeps_full_stderr(helper_algorithms, make_task, task_dir):
    with pytest.raises(AlgorithmError) as info:
        run(make_task(algorithm="site_test_algorithms:Crash"), task_dir)
    reason = str(info.value)
    assert reason.startswith("ValueError: boom at the site (at site_test_algorithms.py:")
    assert "Traceback" not in reason and "\n" not in reason
    assert info.value.context["kind"] == "error"
    stderr = (task_dir / "stderr.log").read_text()
    assert "Traceback (most recent call last)" in stderr and "boom at the site" in stderr
    assert (task_dir / "scratch" / "finalized").exists(), "finalize() must run after a crash"


def test_unknown_algorithm_is_reported(make_task, task_dir):
    with pytest.raises(AlgorithmError, match="no_such_module.*cannot be imported"):
        run(make_task(algorithm="no_such_module:Algo"), task_dir)


def test_timeout_kills_within_a_second_of_the_limit(helper_algorithms, make_task, task_dir):
    task = make_task(algorithm="site_test_algorithms:Sleeper", time_limit_s=1.0)
    started = time.monotonic()
    with pytest.raises(AlgorithmError) as info:
        run(task, task_dir)
    elapsed = time.monotonic() - started
    assert info.value.context["kind"] == "timeout"
    assert "timeout" in str(info.value) and "1.0 s" in str(info.value)
    assert 1.0 <= elapsed < 2.0


def test_timeout_kills_an_algorithm_that_ignores_sigterm(helper_algorithms, make_task, task_dir):
    task = make_task(algorithm="site_test_algorithms:Stubborn", time_limit_s=1.0)
    started = time.monotonic()
    with pytest.raises(AlgorithmError, match="timeout"):
        run(task, task_dir, TaskRunner(kill_grace_s=0.3))
    assert time.monotonic() - started < 2.0


def test_time_limit_is_the_smallest_of_task_deadline_and_site_cap(make_task):
    task = make_task(time_limit_s=100.0, deadline=time.time() + 50)
    assert 49 < TaskRunner().time_limit(task) <= 50
    assert TaskRunner(time_limit_cap_s=7).time_limit(task) == 7


def test_deadline_already_passed_is_a_timeout(helper_algorithms, make_task, task_dir):
    with pytest.raises(AlgorithmError) as info:
        run(make_task(deadline=time.time() - 1), task_dir)
    assert info.value.context["kind"] == "timeout"


@pytest.mark.parametrize(
    ("algorithm", "expected"),
    [
        ("MakesNaN", "tensor 'b' contains NaN values"),
        ("WrongShape", "tensor 'w' has shape [5], expected [4]"),
        ("ZeroSamples", "n_samples is 0; it must be an integer of at least 1"),
    ],
)
def test_invalid_update_is_refused_naming_the_problem(helper_algorithms, make_task, task_dir, algorithm, expected):
    with pytest.raises(AlgorithmError) as info:
        run(make_task(algorithm=f"site_test_algorithms:{algorithm}"), task_dir)
    assert expected in str(info.value)
    assert not (task_dir / "result.safetensors").exists()


def test_cancel_kills_the_worker(helper_algorithms, make_task, task_dir):
    import threading

    runner = TaskRunner()
    threading.Timer(0.5, runner.cancel).start()
    started = time.monotonic()
    with pytest.raises(AlgorithmError) as info:
        run(make_task(algorithm="site_test_algorithms:Sleeper"), task_dir, runner)
    assert info.value.context["kind"] == "cancelled"
    assert time.monotonic() - started < 2.0


def test_child_pythonpath_carries_sys_path_entries(helper_algorithms):
    entries = child_pythonpath("/extra/dir").split(os.pathsep)
    assert str(Path(__file__).resolve().parent / "helper_pkg") in entries
    assert entries[-1] == "/extra/dir"
    assert not any(e.endswith("site-packages") for e in entries)


def test_worker_imports_no_http_or_settings_stack():
    code = (
        "import sys, laulima.site.worker\n"
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


def test_prestarted_worker_runs_the_next_task(helper_algorithms, make_task, task_dir):
    runner = TaskRunner(prestart=True)
    try:
        runner.warm("site_test_algorithms")
        spare = runner._spare
        assert run(make_task(), task_dir, runner).n_samples == 3
        assert spare is not None and spare.returncode == 0, "the task should have gone to the spare worker"
        assert (task_dir / "stderr.log").exists()
        # a crash in a spare worker is reported like any other, with its output in the task's logs
        with pytest.raises(AlgorithmError, match="ValueError: boom at the site"):
            run(make_task(algorithm="site_test_algorithms:Crash"), task_dir, runner)
        assert "Traceback" in (task_dir / "stderr.log").read_text()
        # its replacement is waiting already, with the last algorithm's module imported
        assert runner._spare is not None and runner._spare.poll() is None
        started = time.monotonic()
        run(make_task(), task_dir, runner)
        assert time.monotonic() - started < 1.0
    finally:
        runner.close()
    assert runner._spare is None


def test_a_dead_spare_is_replaced_by_a_fresh_worker(helper_algorithms, make_task, task_dir):
    runner = TaskRunner(prestart=True)
    try:
        runner.warm()
        runner._spare.kill()
        runner._spare.wait()
        assert run(make_task(), task_dir, runner).n_samples == 3
    finally:
        runner.close()
