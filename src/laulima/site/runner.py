"""Run one task's algorithm in a process of its own, under a time limit.

That process (:mod:`laulima.site.worker`), forked from the agent's zygote or started
afresh, runs in its own process group, so a timeout or a shutdown kills everything it
started (data-loader workers included) and nothing else. Failures come back as
:class:`~laulima.errors.AlgorithmError` with a short reason fit for the hub; the full
output stays in the task folder (``stderr.log``, ``stdout.log``).

The runner decides what the task's process may do; that process enforces it on itself
(:mod:`laulima.site.worker`): it runs a built-in or the given bundle only, and confines
itself to the given sandbox before importing the algorithm. The zygote and each worker
start with a scrubbed environment: the agent's tokens and settings never reach them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from laulima.core.protocol import FailureKind, TaskKind, TaskPublic
from laulima.errors import AlgorithmError, ConfigurationError, DataError
from laulima.private_files import open_private, write_atomic
from laulima.site.sandbox import THREAD_VARIABLES, SandboxPolicy
from laulima.site.taskdir import RunResult, failure, task_spec
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
from laulima.site.zygote import Zygote, ZygoteGone, is_builtin_module

__all__ = ["TaskRunner", "child_environment", "child_pythonpath", "seconds_left"]

_ZYGOTE_STARTS = 3
"""Fork-server starts in a row that may die before serving a task, before giving up on it."""
_REAP_S = 5.0
"""How long the zygote may take to report a task it was told to kill."""
log = logging.getLogger("laulima.site")


class TaskRunner:
    """Runs each task in a fresh process of its own; :meth:`cancel` kills the running one.

    With ``zygote``, each task's process is forked from the agent's fork server
    (:mod:`laulima.site.zygote`), which has numpy, safetensors and the last built-in
    algorithm's module imported already: a task costs a fork, not an interpreter start-up
    and those imports. :meth:`warm` starts the zygote; each task ends with a
    :meth:`warm` that restarts it if it died. Without ``zygote``, without ``os.fork``, or
    while the zygote is unavailable, a task starts ``python -m laulima.site.worker DIR``.
    """

    def __init__(
        self, *, time_limit_cap_s: float | None = None, kill_grace_s: float = 0.5, zygote: bool = False
    ) -> None:
        self.time_limit_cap_s = time_limit_cap_s
        self.kill_grace_s = kill_grace_s
        self.use_zygote = zygote and hasattr(os, "fork")
        self._zygote: Zygote | None = None
        self._zygote_failures = 0
        self._no_preload: set[str] = set()
        self._group: int | None = None
        """Process group of the running task (its pid)."""
        self._cancelled = threading.Event()
        self._lock = threading.Lock()

    def time_limit(self, task: TaskPublic, *, received_at: float | None = None) -> float:
        """Seconds the run may take: the task's limit, what is left of the time to its deadline
        (see :func:`seconds_left`), the site's cap."""
        limits = [_finite(task.time_limit_s), seconds_left(task, received_at)]
        if self.time_limit_cap_s is not None:
            limits.append(self.time_limit_cap_s)
        return min(limits)

    def run(
        self,
        task: TaskPublic,
        task_dir: Path,
        *,
        site: str,
        dataset_path: Path,
        received_at: float | None = None,
        bundle_dir: Path | None = None,
        sandbox: SandboxPolicy | None = None,
        cache_dir: Path | None = None,
    ) -> RunResult:
        """Run ``task`` on the weights in ``task_dir/weights.safetensors``; raise AlgorithmError on failure.

        ``received_at`` is when the hub's answer carrying the task arrived, by ``time.monotonic()``
        (default: now); the run must end by then + ``task.seconds_left``.

        ``bundle_dir``: the unpacked bundle (:func:`laulima.algorithms.bundle.unpack`) that
        ``task.algorithm`` is loaded from; None: it must be a built-in, and anything else
        fails before it is imported. ``sandbox``: what the task's process is confined to
        (:func:`laulima.site.sandbox.sandbox_for`; its ``task_dir`` must be this one); None:
        unconfined. A failure the sandbox caused carries the violation in the error's
        ``sandbox_violation`` (for the audit log); its reason names the violation, not the path.
        ``cache_dir``: the experiment's persistent folder (``SiteContext.cache_dir``); it must
        exist, and be among the sandbox's writable folders (``sandbox_for(cache_dir=...)``).
        """
        task_dir = Path(task_dir).resolve()
        if not (task_dir / WEIGHTS_FILE).exists():
            raise DataError(
                f"task {task.id}: no weights at {task_dir / WEIGHTS_FILE}; download them first", task=task.id
            )
        if sandbox is not None and Path(os.path.realpath(sandbox.task_dir)) != task_dir:
            raise ConfigurationError(
                f"task {task.id}: the sandbox policy is for another task folder; build it for this one "
                "(laulima.site.sandbox.sandbox_for with this task's folder)",
                task=task.id,
                field="sandbox",
            )
        limit = self.time_limit(task, received_at=received_at)
        if limit <= 0:
            raise AlgorithmError(
                f"timeout: the task's deadline passed before the algorithm could start "
                f"(the hub allowed {_finite(task.seconds_left):.1f} s from its delivery)",
                kind=FailureKind.TIMEOUT.value,
                task=task.id,
            )
        for name in (RESULT_FILE, RESULT_WEIGHTS_FILE, ERROR_FILE, STDERR_LOG, STDOUT_LOG):
            (task_dir / name).unlink(missing_ok=True)
        if cache_dir is not None:
            cache_dir = Path(os.path.realpath(cache_dir))
            if sandbox is not None and cache_dir not in sandbox.writable:
                raise ConfigurationError(
                    f"task {task.id}: the experiment's cache folder is not writable in the task's sandbox; build "
                    "the sandbox with it (laulima.site.sandbox.sandbox_for(..., cache_dir=...))",
                    task=task.id,
                    field="sandbox",
                )
        spec = task_spec(
            task, site=site, dataset_path=dataset_path, bundle_dir=bundle_dir, sandbox=sandbox, cache_dir=cache_dir
        )
        # Sample-level DP-SGD happens inside the algorithm's training (TrainConfig.dp_sgd); the worker
        # refuses it for an algorithm that does not implement it.
        privacy = task.privacy if task.kind == TaskKind.TRAIN else None
        dp = privacy.dp_sgd if privacy is not None else None
        spec["dp_sgd"] = (
            None
            if privacy is None or dp is None
            else {"noise_multiplier": dp.noise_multiplier, "max_grad_norm": dp.max_grad_norm, "delta": privacy.delta}
        )
        write_atomic(task_dir / TASK_FILE, json.dumps(spec))
        started = time.monotonic()
        try:
            returncode = self._start_and_wait(task_dir, started + limit)
        except ZygoteGone as exc:
            raise AlgorithmError(
                f"the algorithm's process was lost: the agent's fork server died during the task ({exc})",
                kind=FailureKind.ERROR.value,
                task=task.id,
            ) from exc
        finally:
            if self.use_zygote:  # the next task is likely of the same algorithm; bundles are never preloaded
                self.warm(task.algorithm.partition(":")[0] if bundle_dir is None else None)
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
            why = failure(task_dir, returncode, sandbox)
            raise AlgorithmError(
                why.reason,
                kind=FailureKind.ERROR.value,
                task=task.id,
                exit_code=returncode,
                sandbox_violation=why.sandbox_violation,
            )
        return RunResult.from_dir(task_dir, task.kind)

    def warm(self, preload: str | None = None) -> None:
        """Start the zygote if it is not running, and have it import module ``preload``.

        Only a built-in algorithm's module (``laulima.algorithms.*``) is preloaded; any
        other name is ignored: code imported in the zygote runs unconfined, and every later
        task is forked from it. A zygote that died before it served a task is restarted at
        most twice in a row; after that, tasks start fresh interpreters.
        """
        if not self.use_zygote:
            return
        if preload and not is_builtin_module(preload):
            log.debug("not preloading %s: only built-in algorithms are preloaded", preload)
            preload = None
        with self._lock:
            if self._cancelled.is_set():
                return
            if self._zygote is not None and not self._zygote.alive:
                self._drop_zygote(self._zygote)
            if self._zygote is None:
                if self._zygote_failures >= _ZYGOTE_STARTS:
                    return
                try:
                    proc = self._popen(["--zygote"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
                except OSError as exc:
                    self._zygote_failures += 1
                    log.warning("cannot start the fork server (%s); starting a process per task", exc)
                    return
                self._zygote = Zygote(proc, self._no_preload)
            if preload:
                try:
                    self._zygote.preload(preload)
                except ZygoteGone:
                    self._drop_zygote(self._zygote)

    def cancel(self) -> None:
        """Kill the running task's processes and stop the zygote (idempotent; safe from a signal handler)."""
        self._cancelled.set()
        if self._group is not None:
            _kill_group(self._group, signal.SIGKILL)
        zygote = self._zygote
        if zygote is not None:
            zygote.terminate()

    def close(self) -> None:
        """Stop the zygote (the agent is done)."""
        with self._lock:
            if self._zygote is not None:
                self._drop_zygote(self._zygote)

    def _drop_zygote(self, zygote: Zygote) -> None:
        """Kill ``zygote`` and forget it (called with the lock held)."""
        zygote.close()
        if self._zygote is zygote:
            self._zygote = None
        self._zygote_failures = 0 if zygote.forks else self._zygote_failures + 1
        if self._zygote_failures == _ZYGOTE_STARTS:
            log.warning("the fork server keeps dying before its first task; starting a process per task")

    def _start_and_wait(self, task_dir: Path, deadline: float) -> int | None:
        """Exit code of the task's process, or None if it was killed (timeout or cancel)."""
        zygote = self._zygote
        if zygote is not None and zygote.alive and not self._cancelled.is_set():
            try:
                return self._wait_forked(zygote, task_dir, deadline)
            except ZygoteGone as exc:
                with self._lock:
                    self._drop_zygote(zygote)
                if self._cancelled.is_set():
                    return None
                if self._group is not None:  # it forked the task, then died: the task is lost
                    raise
                log.warning("the fork server failed (%s); starting the task in a new process", exc)
            finally:
                if self._group is not None:
                    _kill_group(self._group, signal.SIGKILL)  # whatever the task left running
                    self._group = None
        return self._wait_spawned(task_dir, deadline)

    def _wait_forked(self, zygote: Zygote, task_dir: Path, deadline: float) -> int | None:
        pid = zygote.fork(task_dir, deadline)
        if pid is None:  # still importing at the deadline
            with self._lock:
                self._drop_zygote(zygote)
            return None
        self._group = pid
        if self._cancelled.is_set():
            _kill_group(pid, signal.SIGKILL)
        returncode = zygote.wait(pid, deadline)
        if returncode is None:
            _kill_group(pid, signal.SIGTERM)
            if zygote.wait(pid, time.monotonic() + self.kill_grace_s) is None:
                _kill_group(pid, signal.SIGKILL)
                if zygote.wait(pid, time.monotonic() + _REAP_S) is None:  # wedged: replace it
                    with self._lock:
                        self._drop_zygote(zygote)
        return None if self._cancelled.is_set() else returncode

    def _wait_spawned(self, task_dir: Path, deadline: float) -> int | None:
        with self._lock:
            if self._cancelled.is_set():
                return None
            with (
                open(open_private(task_dir / STDERR_LOG), "wb") as err,
                open(open_private(task_dir / STDOUT_LOG), "wb") as out,
            ):
                proc = self._popen([str(task_dir)], stdin=subprocess.DEVNULL, stdout=out, stderr=err)
            self._group = proc.pid
        try:
            returncode: int | None = proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=self.kill_grace_s)
            except subprocess.TimeoutExpired:
                _kill_group(proc.pid, signal.SIGKILL)
                proc.wait()
            returncode = None
        finally:
            _kill_group(proc.pid, signal.SIGKILL)  # whatever the worker left running in its group
            self._group = None
        return None if self._cancelled.is_set() else returncode

    def _popen(self, args: list[str], **streams: Any) -> subprocess.Popen[bytes]:
        streams.setdefault("stderr", subprocess.DEVNULL)
        # umask 077: whatever the algorithm writes (scratch files, checkpoints) is the site's alone.
        return subprocess.Popen(
            [sys.executable, "-m", "laulima.site.worker", *args],
            env=child_environment(),
            start_new_session=True,
            umask=0o077,
            **streams,
        )


def seconds_left(task: TaskPublic, received_at: float | None = None) -> float:
    """Seconds until ``task``'s deadline: the hub's ``seconds_left`` less the time since the
    task arrived (``received_at``, by ``time.monotonic()``; None: it just arrived).

    A duration on this site's monotonic clock, never this site's wall clock against the
    hub's ``deadline``: a site whose clock is off by more than a round would fail every task.
    """
    left = _finite(task.seconds_left)
    if received_at is not None:
        left -= max(0.0, time.monotonic() - received_at)
    return left


def _finite(value: float) -> float:
    """A time from the hub; NaN and infinities (never sent by a sound hub) count as no time at all."""
    return value if math.isfinite(value) else 0.0


_PASSED_ON = frozenset({"PATH", "LANG", "PYTHONUNBUFFERED", *THREAD_VARIABLES})
"""What the zygote and workers inherit from the agent besides ``LC_*`` (THREAD_VARIABLES
includes PYTHONHASHSEED): what Python and the numeric libraries need, nothing secret."""


def child_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of the zygote and of each worker: an allow-list, not the agent's.

    The agent's environment holds its hub token (``LAULIMA_TOKEN``), proxy credentials and
    the site's paths; a child's environment can be read by the algorithm (``os.environ``,
    ``/proc/self/environ``), and the zygote's is inherited by every task forked from it.
    So only ``PATH``, the locale, the thread-count variables and ``PYTHONHASHSEED`` pass,
    plus ``PYTHONPATH`` (see :func:`child_pythonpath`), ``PYTHONUNBUFFERED`` and the
    agent's pid (``LAULIMA_WORKER_PARENT``).
    """
    source = os.environ if environ is None else environ
    env = {k: v for k, v in source.items() if k in _PASSED_ON or k.startswith("LC_")}
    env["PYTHONPATH"] = child_pythonpath(source.get("PYTHONPATH"))
    env[PARENT_ENV] = str(os.getpid())
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


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


def _kill_group(group: int, sig: int) -> None:
    try:
        os.killpg(group, sig)
    except (ProcessLookupError, PermissionError):
        pass
