"""The task folder: the ``task.json`` the runner writes, and what it reads back.

A finished run leaves ``result.json`` (and ``result.safetensors`` for training), read as a
:class:`RunResult`; a failed one leaves ``error.json`` and ``stderr.log``, read as a short
reason fit for the hub.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from laulima.core.protocol import MetaKey, TaskKind, TaskPublic
from laulima.errors import DataError
from laulima.site.sandbox import SandboxPolicy, explain_exit
from laulima.site.worker import ERROR_FILE, RESULT_FILE, RESULT_WEIGHTS_FILE, STDERR_LOG

__all__ = [
    "TRAIN_KEYS",
    "Failure",
    "RunResult",
    "failure",
    "failure_reason",
    "short_stderr_reason",
    "task_spec",
    "train_settings",
]

TRAIN_KEYS = ("local_epochs", "local_steps", "proximal_mu", "seed", "progress")
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


def training_progress(value: Any) -> list[float]:
    """The task's ``progress`` window from the hub, checked: two finite fractions, start <= end
    (absent: the whole training, ``[0, 1]``). A malformed one fails the task, naming it."""
    if value is None:
        return [0.0, 1.0]
    if (
        not isinstance(value, list | tuple)
        or len(value) != 2
        or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
        or not 0.0 <= value[0] <= value[1] <= 1.0
    ):
        raise DataError(f"the task's progress {str(value)[:60]} is not two fractions 0 <= start <= end <= 1")
    return [float(value[0]), float(value[1])]


def task_spec(
    task: TaskPublic,
    *,
    site: str,
    dataset_path: Path,
    bundle_dir: Path | None = None,
    sandbox: SandboxPolicy | None = None,
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """The ``task.json`` the worker reads.

    ``bundle_dir``: the unpacked bundle the entry point is loaded from (None: a built-in).
    ``sandbox``: the policy the task's process confines itself to before it imports the
    algorithm (None: unconfined). ``cache_dir``: the experiment's persistent folder at this
    site (``SiteContext.cache_dir``; None: none).
    """
    train, params = train_settings(task.config)
    return {
        "task_id": task.id,
        "kind": task.kind.value,
        "algorithm": task.algorithm,
        "bundle_dir": str(bundle_dir) if bundle_dir is not None else None,
        "sandbox": sandbox.to_json() if sandbox is not None else None,
        "cache_dir": str(cache_dir) if cache_dir is not None else None,
        "site": site,
        "dataset": task.dataset,
        "dataset_path": str(dataset_path),
        "params": params,
        "round": task.round,
        "local_epochs": int(train.get("local_epochs", 1)),
        "local_steps": int(train.get("local_steps", 0)),
        "proximal_mu": float(train.get("proximal_mu", 0.0)),
        "seed": int(train.get("seed", 0)),
        "progress": training_progress(train.get("progress")),
        "meta_keys": {
            "n_samples": MetaKey.N_SAMPLES.value,
            "metrics": MetaKey.METRICS.value,
            "task": MetaKey.TASK.value,
        },
    }


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


@dataclass(frozen=True)
class Failure:
    """Why a run failed: ``reason`` for the hub; ``sandbox_violation``, when the sandbox
    stopped the algorithm, the short violation (for the site's audit log)."""

    reason: str
    sandbox_violation: str | None = None


def failure(task_dir: Path, returncode: int, sandbox: SandboxPolicy | None = None) -> Failure:
    """Why the run in ``task_dir`` failed: error.json (written by the worker, a violation
    already explained), else stderr.log; a kill by a limit of ``sandbox`` (SIGXCPU) is
    explained from the exit code, which is all such a process leaves."""
    if sandbox is not None and (violation := explain_exit(returncode, sandbox)):
        return Failure(violation[:_REASON_MAX], violation)
    violation = None
    try:
        data = json.loads((task_dir / ERROR_FILE).read_text(encoding="utf-8"))
        if isinstance(data.get("sandbox_violation"), str) and data["sandbox_violation"]:
            violation = data["sandbox_violation"]
    except (OSError, ValueError, AttributeError):
        pass
    return Failure(failure_reason(task_dir, returncode), violation)


def failure_reason(task_dir: Path, returncode: int) -> str:
    """Why the run in ``task_dir`` failed, from error.json, else stderr.log, and its exit code."""
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
