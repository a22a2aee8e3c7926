"""Run one task's algorithm in a child process, under a time limit.

The child (:mod:`laulima.site.worker`) runs in its own process group, so a timeout or a
shutdown kills everything it started (data-loader workers included) and nothing else.
Failures come back as :class:`~laulima.errors.AlgorithmError` with a short reason fit for
the hub; the full output stays in the task folder (``stderr.log``, ``stdout.log``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from laulima.core.protocol import FailureKind, MetaKey, TaskKind, TaskPublic
from laulima.errors import AlgorithmError, DataError
from laulima.site._fs import write_atomic
from laulima.site.worker import (
    ERROR_FILE,
    PARENT_ENV,
    RESULT_FILE,
    RESULT_WEIGHTS_FILE,
    STDERR_LOG,
    STDOUT_LOG,
    TASK_FILE,
    WEIGHTS_FILE,
)

__all__ = [
    "TRAIN_KEYS",
    "RunResult",
    "TaskRunner",
    "child_pythonpath",
    "short_stderr_reason",
    "task_spec",
    "train_settings",
]

TRAIN_KEYS = ("local_epochs", "local_steps", "proximal_mu", "seed")
"""Keys of ``TaskPublic.config`` that become :class:`~laulima.TrainConfig` fields."""
_REASON_MAX = 1000


@dataclass(frozen=True)
class RunResult:
    """What a finished algorithm run produced."""

    kind: TaskKind
    n_samples: int
    metrics: dict[str, float]
    seconds: float
    weights_path: Path | None = None
    """result.safetensors (TRAIN only), with n_samples, metrics and task id in its metadata."""
    sha256: str | None = None
    size: int | None = None

    @classmethod
    def from_dir(cls, task_dir: Path, kind: TaskKind) -> RunResult:
        data = json.loads((task_dir / RESULT_FILE).read_text(encoding="utf-8"))
        train = kind == TaskKind.TRAIN
        return cls(
            kind=kind,
            n_samples=int(data["n_samples"]),
            metrics={str(k): float(v) for k, v in data["metrics"].items()},
            seconds=float(data.get("seconds", 0.0)),
            weights_path=task_dir / RESULT_WEIGHTS_FILE if train else None,
            sha256=data.get("sha256") if train else None,
            size=data.get("size") if train else None,
        )


def train_settings(config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a task's ``config`` into TrainConfig fields and the algorithm's ``params``.

    Accepts both layouts: algorithm parameters nested under ``params`` (or ``config``), or
    flat beside the training keys.
    """
    train = {k: config[k] for k in TRAIN_KEYS if k in config}
    nested = config.get("params", config.get("config"))
    if isinstance(nested, Mapping):
        params = dict(nested)
    else:
        params = {k: v for k, v in config.items() if k not in TRAIN_KEYS and k != "round"}
    return train, params


def task_spec(task: TaskPublic, *, site: str, dataset_path: Path) -> dict[str, Any]:
    """The ``task.json`` the worker reads."""
    train, params = train_settings(task.config)
    return {
        "task_id": task.id,
        "kind": task.kind.value,
        "algorithm": task.algorithm,
        "site": site,
        "dataset": task.dataset,
        "dataset_path": str(dataset_path),
        "params": params,
        "round": task.round,
        "local_epochs": int(train.get("local_epochs", 1)),
        "local_steps": int(train.get("local_steps", 0)),
        "proximal_mu": float(train.get("proximal_mu", 0.0)),
        "seed": int(train.get("seed", 0)),
        "meta_keys": {
            "n_samples": MetaKey.N_SAMPLES.value,
            "metrics": MetaKey.METRICS.value,
            "task": MetaKey.TASK.value,
        },
    }


class TaskRunner:
    """Starts one worker process per task; :meth:`cancel` kills the running one.

    With ``prestart``, a spare worker is started ahead of time (after each task, and by
    :meth:`warm`) with numpy, safetensors and the last task's algorithm module already
    imported; the next task is handed to it, which takes the interpreter's start-up off
    the round's critical path. Each task still gets a fresh process of its own.
    """

    def __init__(
        self, *, time_limit_cap_s: float | None = None, kill_grace_s: float = 0.5, prestart: bool = False
    ) -> None:
        self.time_limit_cap_s = time_limit_cap_s
        self.kill_grace_s = kill_grace_s
        self.prestart = prestart
        self._proc: subprocess.Popen[bytes] | None = None
        self._spare: subprocess.Popen[bytes] | None = None
        self._cancelled = threading.Event()
        self._lock = threading.Lock()

    def time_limit(self, task: TaskPublic) -> float:
        """Seconds the run may take: the task's limit, the time to its deadline, the site's cap."""
        limits = [task.time_limit_s, task.deadline - time.time()]
        if self.time_limit_cap_s is not None:
            limits.append(self.time_limit_cap_s)
        return min(limits)

    def run(self, task: TaskPublic, task_dir: Path, *, site: str, dataset_path: Path) -> RunResult:
        """Run ``task`` on the weights in ``task_dir/weights.safetensors``; raise AlgorithmError on failure."""
        task_dir = Path(task_dir).resolve()
        if not (task_dir / WEIGHTS_FILE).exists():
            raise DataError(
                f"task {task.id}: no weights at {task_dir / WEIGHTS_FILE}; download them first", task=task.id
            )
        limit = self.time_limit(task)
        if limit <= 0:
            raise AlgorithmError(
                f"task {task.id}: its deadline passed before the algorithm could start",
                kind=FailureKind.TIMEOUT.value,
                task=task.id,
            )
        for name in (RESULT_FILE, RESULT_WEIGHTS_FILE, ERROR_FILE, STDERR_LOG, STDOUT_LOG):
            (task_dir / name).unlink(missing_ok=True)
        write_atomic(task_dir / TASK_FILE, json.dumps(task_spec(task, site=site, dataset_path=dataset_path)))
        started = time.monotonic()
        try:
            returncode = self._start_and_wait(task_dir, limit)
        finally:
            if self.prestart:
                self.warm(task.algorithm.partition(":")[0])
        elapsed = time.monotonic() - started
        if returncode is None:
            if self._cancelled.is_set():
                raise AlgorithmError(
                    f"task {task.id}: cancelled (the agent is stopping)", kind="cancelled", task=task.id
                )
            raise AlgorithmError(
                f"timeout: the algorithm ran past its time limit of {limit:.1f} s and was stopped",
                kind=FailureKind.TIMEOUT.value,
                task=task.id,
                seconds=round(elapsed, 3),
            )
        if returncode != 0 or not (task_dir / RESULT_FILE).exists():
            raise AlgorithmError(
                _failure_reason(task_dir, returncode), kind=FailureKind.ERROR.value, task=task.id, exit_code=returncode
            )
        return RunResult.from_dir(task_dir, task.kind)

    def warm(self, preload: str | None = None) -> None:
        """Start a spare worker now (if none is waiting), importing module ``preload`` too."""
        with self._lock:
            if self._cancelled.is_set() or (self._spare is not None and self._spare.poll() is None):
                return
            args = ["--wait"] + ([preload] if preload else [])
            self._spare = self._popen(args, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def cancel(self) -> None:
        """Kill the running worker and the spare, if any (idempotent; safe from a signal handler)."""
        self._cancelled.set()
        for proc in (self._proc, self._spare):
            if proc is not None and proc.poll() is None:
                _kill_group(proc, signal.SIGKILL)

    def close(self) -> None:
        """Dismiss the spare worker (the agent is done)."""
        with self._lock:
            spare, self._spare = self._spare, None
        if spare is not None:
            _dismiss(spare)

    def _start_and_wait(self, task_dir: Path, limit: float) -> int | None:
        """Exit code of the worker, or None if it was killed (timeout or cancel)."""
        with self._lock:
            if self._cancelled.is_set():
                return None
            proc = self._hand_to_spare(task_dir)
            if proc is None:
                with open(task_dir / STDERR_LOG, "wb") as err, open(task_dir / STDOUT_LOG, "wb") as out:
                    proc = self._popen([str(task_dir)], stdin=subprocess.DEVNULL, stdout=out, stderr=err)
            self._proc = proc
        try:
            returncode: int | None = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            _kill_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=self.kill_grace_s)
            except subprocess.TimeoutExpired:
                _kill_group(proc, signal.SIGKILL)
                proc.wait()
            returncode = None
        finally:
            _kill_group(proc, signal.SIGKILL)  # whatever the worker left running in its group
            self._proc = None
        return None if self._cancelled.is_set() else returncode

    def _hand_to_spare(self, task_dir: Path) -> subprocess.Popen[bytes] | None:
        spare, self._spare = self._spare, None
        if spare is None or spare.poll() is not None or spare.stdin is None:
            return None
        try:
            spare.stdin.write(f"{task_dir}\n".encode())
            spare.stdin.close()
        except OSError:  # it died in between: start a fresh one instead
            _dismiss(spare)
            return None
        return spare

    def _popen(self, args: list[str], **streams: Any) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        env["PYTHONPATH"] = child_pythonpath(env.get("PYTHONPATH"))
        env[PARENT_ENV] = str(os.getpid())
        env.setdefault("PYTHONUNBUFFERED", "1")
        return subprocess.Popen(
            [sys.executable, "-m", "laulima.site.worker", *args], env=env, start_new_session=True, **streams
        )


def child_pythonpath(existing: str | None = None) -> str:
    """PYTHONPATH that lets the worker import what this process can (algorithm packages,
    test helpers, a source checkout), without repeating the interpreter's own folders."""
    own = {p for p in (sysconfig.get_paths().get(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")) if p}
    stdlib = sysconfig.get_paths().get("stdlib") or "\0"
    entries: list[str] = []
    for p in sys.path:
        path = os.path.abspath(p) if p else os.getcwd()
        if path in own or path.startswith(stdlib) or path.endswith(".zip") or not os.path.isdir(path):
            continue
        if path not in entries:
            entries.append(path)
    for p in (existing or "").split(os.pathsep):
        if p and p not in entries:
            entries.append(p)
    return os.pathsep.join(entries)


def short_stderr_reason(stderr: str) -> str:
    """The exception line(s) that end a traceback, or the last non-empty line."""
    lines = [line.rstrip() for line in stderr.splitlines()]
    start = None
    for i, line in enumerate(lines):
        if line.startswith("Traceback (most recent call last):"):
            start = i
    if start is not None:
        tail = [ln for ln in lines[start + 1 :] if ln and not ln.startswith((" ", "\t"))]
        if tail:
            return "\n".join(tail)[-_REASON_MAX:]
    meaningful = [ln for ln in lines if ln.strip()]
    return meaningful[-1][-_REASON_MAX:] if meaningful else ""


def _failure_reason(task_dir: Path, returncode: int) -> str:
    try:
        reason = str(json.loads((task_dir / ERROR_FILE).read_text(encoding="utf-8"))["reason"])
    except (OSError, ValueError, KeyError, TypeError):
        reason = ""
    if not reason:
        try:
            stderr = (task_dir / STDERR_LOG).read_text(encoding="utf-8", errors="replace")
        except OSError:
            stderr = ""
        reason = short_stderr_reason(stderr)
    if returncode < 0:
        name = _signal_name(-returncode)
        hint = " (out of memory?)" if -returncode == signal.SIGKILL else ""
        reason = f"the algorithm's process was killed by {name}{hint}" + (f": {reason}" if reason else "")
    elif not reason:
        reason = f"the algorithm's process exited with code {returncode} and no result"
    return reason[:_REASON_MAX]


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _dismiss(proc: subprocess.Popen[bytes]) -> None:
    _kill_group(proc, signal.SIGKILL)
    with contextlib.suppress(OSError):
        if proc.stdin is not None:
            proc.stdin.close()
    proc.wait()


def _kill_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
