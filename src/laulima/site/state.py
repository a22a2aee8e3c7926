"""What an agent remembers across restarts: how far each recent task got.

A restarted agent uploads a result it already computed instead of training again, and
never runs a task it already reported. Stored as ``home/state.json``, rewritten atomically
at every phase change (a few hundred bytes per task; only the newest tasks are kept).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from laulima.private_files import private_dir, write_atomic

__all__ = ["STATE_FILE", "Phase", "SiteState", "TaskRecord"]

STATE_FILE = "state.json"
log = logging.getLogger("laulima.site")


class Phase(StrEnum):
    RECEIVED = "received"
    WAITING = "waiting"
    """The site's policy holds it for an administrator (``laulima site jobs``); the agent
    looks again at every poll and resumes it at the hub once it is approved or rejected."""
    DOWNLOADED = "downloaded"
    """The global weights are on disk, sha256-checked."""
    COMPUTED = "computed"
    """The algorithm finished; its result file waits to be reported."""
    REPORTED = "reported"
    """The hub acknowledged the result or the failure: nothing left to do."""
    GIVEN_UP = "given_up"
    """The hub refused the task or its result for good (closed round, not ours, ...)."""

    @property
    def final(self) -> bool:
        return self in (Phase.REPORTED, Phase.GIVEN_UP)


@dataclass(frozen=True)
class TaskRecord:
    task_id: str
    phase: Phase
    updated_at: float
    kind: str = ""
    result_path: str | None = None
    """result.safetensors (train) or result.json (evaluate) once computed."""
    result_digest: str | None = None
    failure_kind: str | None = None
    """Set when the computed result is a failure (error, timeout, rejected) to report."""
    note: str | None = None
    """Why the task was given up or failed, for the admin reading state.json."""
    task: dict[str, Any] | None = None
    """The task as the hub sent it, kept while it waits for approval (to check it again)."""
    closed_at_hub: bool = False
    """The hub was told this final task is over here (a failure report it accepted, or a 409:
    it had closed the task already); if it sends the task again, it is not told twice."""


class SiteState:
    """Per-task phases, persisted in ``home/state.json``; keeps the ``keep`` newest tasks."""

    def __init__(self, home: str | Path, *, keep: int = 200) -> None:
        self.path = Path(home) / STATE_FILE
        self.keep = keep
        self._tasks: dict[str, TaskRecord] = self._load()

    def get(self, task_id: str) -> TaskRecord | None:
        return self._tasks.get(task_id)

    def set(self, task_id: str, phase: Phase, **fields: Any) -> TaskRecord:
        """Record ``phase`` (and any of result_path, result_digest, kind, note); persist."""
        old = self._tasks.get(task_id)
        if old is None:
            record = TaskRecord(task_id, Phase(phase), time.time(), **fields)
        else:
            record = replace(old, phase=Phase(phase), updated_at=time.time(), **fields)
        self._tasks[task_id] = record
        self._save()
        return record

    def tasks(self) -> list[TaskRecord]:
        """All remembered tasks, oldest first."""
        return sorted(self._tasks.values(), key=lambda r: r.updated_at)

    def prune(self) -> list[str]:
        """Drop the oldest final records beyond ``keep``; return their ids (to clean up)."""
        final = [r for r in self.tasks() if r.phase.final]
        excess = len(self._tasks) - self.keep
        dropped = [r.task_id for r in final[: max(excess, 0)]]
        for task_id in dropped:
            del self._tasks[task_id]
        if dropped:
            self._save()
        return dropped

    def _load(self) -> dict[str, TaskRecord]:
        try:
            raw = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        try:
            data = json.loads(raw)
            records = {}
            for task_id, entry in data["tasks"].items():
                entry = dict(entry)
                entry["phase"] = Phase(entry["phase"])
                records[task_id] = TaskRecord(task_id=task_id, **entry)
            return records
        except (ValueError, KeyError, TypeError) as exc:
            # Losing the state costs at most a re-run; refusing to start would cost the site.
            backup = self.path.with_name(self.path.name + ".corrupt")
            self.path.replace(backup)
            log.warning("state file %s is damaged (%s); moved it to %s and starting afresh", self.path, exc, backup)
            return {}

    def _save(self) -> None:
        private_dir(self.path.parent)
        data = {
            "tasks": {
                r.task_id: {k: v for k, v in asdict(r).items() if k != "task_id" and v is not None}
                for r in self.tasks()
            }
        }
        write_atomic(self.path, json.dumps(data, indent=1))
