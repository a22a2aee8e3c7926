"""Append-only, hash-chained JSON-lines logs: the machinery behind the site's and the hub's audit trails.

A hospital must be able to say afterwards what ran on its data and what left the building
(:mod:`laulima.site.audit`); a federation operator must be able to say who submitted,
shared and downloaded what (:mod:`laulima.hub.audit`). Both keep the same kind of record,
so there is one implementation of it, here; each caller brings its own event vocabulary
(a ``StrEnum``) and the command that verifies its log. Each event is one line::

    {"at":1714557603.25,"event":"sent","experiment":3,"fields":{...},"hash":"…","prev":"…","seq":42,"task":"t-9"}

``hash`` is the sha256 of the entry's canonical JSON without ``hash`` (sorted keys, no
spaces, ASCII only); ``prev`` is the previous line's ``hash`` (64 zeros for the first line),
and ``seq`` counts 1, 2, 3, ... So editing, removing, inserting or reordering a line breaks
the chain at that line, and ``HashChainLog.verify`` names the first line where it breaks.

The chain cannot show that whole lines were cut from the END. For that, every append also
writes the head (``seq`` and ``hash`` of the last entry) atomically to ``audit.head``
beside the log, and ``verify`` compares the log's end with it.

What this protects against, and what it does not:

* It detects accidental damage (an editor, a bad restore, a disk error, a crash mid-write)
  and partial tampering by someone who changes, deletes or reorders lines without
  recomputing everything after them and the head.
* It does NOT stop someone with write access to both files: they can rewrite the whole
  chain and the head consistently. Against that, export the head elsewhere (copy
  ``format_verify``'s head line into a ticket or send it to a log server); an exported head
  whose seq no longer carries that hash shows the rewrite.
* A head exactly one entry behind, whose hash is the last line's ``prev``, is accepted with
  a note: that is what a crash between the line's fsync and the head's rename leaves. So one
  well-formed line added at the very end by hand is not caught unless a head was exported.

Appends are serialised across threads and processes by an exclusive ``flock`` on the log;
the previous hash is read under that lock, the line is written with ``O_APPEND`` in a single
``write`` and fsynced before the head is replaced. An append refuses to continue a log whose
end disagrees with its head (lines cut from the end, the head deleted, a half-written last
line): it fails closed, so the evidence is not written over. ``reanchor`` is the admin's
explicit way out, and it is itself recorded in the log (as the vocabulary's ``head_reset``).

Only the standard library is used, and nothing of ``laulima.site`` or ``laulima.hub``: both
import this module, and neither may import the other.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from laulima.errors import DataError
from laulima.private_files import PRIVATE_FILE, private_dir, write_atomic

__all__ = [
    "AUDIT_FILE",
    "AUDIT_HEAD_FILE",
    "GENESIS",
    "HEAD_RESET",
    "AuditEntry",
    "FieldValue",
    "HashChainLog",
    "VerifyResult",
    "canonical_json",
    "format_entries",
    "format_verify",
    "reference",
]

AUDIT_FILE = "audit.jsonl"
AUDIT_HEAD_FILE = "audit.head"
GENESIS = "0" * 64
"""The ``prev`` of the first entry."""
HEAD_RESET = "head_reset"
"""The event ``reanchor`` appends; every vocabulary must have a member with this value."""

MAX_FIELDS = 32
MAX_KEY_CHARS = 64
MAX_TEXT_CHARS = 16_384
"""Longer strings (a traceback) keep their start and a marker; the log never refuses an event for it."""
MAX_LIST_ITEMS = 64
MAX_INT = 2**63 - 1
MAX_TASK_CHARS = 256
MAX_LINE_BYTES = 1 << 20
_TAIL_CHUNK = 8192

_KEY_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_HEX64_RE = re.compile(r"^[0-9a-f]{64}$")
_ENTRY_KEYS = frozenset({"seq", "at", "event", "task", "experiment", "fields", "prev", "hash"})

Scalar = str | int | float | bool | None
FieldValue = Scalar | list[Scalar]


def canonical_json(value: Any) -> bytes:
    """The one byte form every hash is taken over: sorted keys, no spaces, ASCII only."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def _entry_hash(body: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical_json({k: v for k, v in body.items() if k != "hash"})).hexdigest()


@dataclass(frozen=True)
class AuditEntry:
    """One line of the log, as written."""

    seq: int
    at: float
    event: str
    """A value of the log's event vocabulary; a log written by a newer Laulima may hold others."""
    task: str | None
    experiment: int | None
    fields: dict[str, FieldValue]
    prev: str
    hash: str

    def as_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "at": self.at,
            "event": self.event,
            "task": self.task,
            "experiment": self.experiment,
            "fields": self.fields,
            "prev": self.prev,
            "hash": self.hash,
        }

    def line(self) -> bytes:
        """The bytes of this entry's line in the file, newline included."""
        return canonical_json(self.as_json()) + b"\n"


@dataclass(frozen=True)
class VerifyResult:
    """What ``HashChainLog.verify`` found. ``problem`` names the first bad line when there is one."""

    ok: bool
    entries: int
    """Lines checked and found good, from the top (all of them when ``ok``)."""
    line: int | None = None
    """1-based number of the first bad line; None when the problem is not one line (the head)."""
    problem: str | None = None
    last_seq: int = 0
    last_hash: str = GENESIS
    """The last good entry's seq and hash: the value to export elsewhere."""
    notes: tuple[str, ...] = field(default=())
    """Harmless findings, e.g. a head one entry behind after a crash between the two writes."""


def reference(entry: AuditEntry) -> str:
    """A short opaque reference to an entry, to send elsewhere in place of its details: ``audit#42``."""
    return f"audit#{entry.seq}"


# ----------------------------------------------------------------------------- the log


class HashChainLog:
    """An audit trail under ``home`` (``audit.jsonl`` and ``audit.head``). Cheap to create;
    every call reads the files afresh, so several objects and processes may share the files.

    ``events`` is the vocabulary the log accepts: a ``StrEnum`` that must have a member whose
    value is ``"head_reset"`` (what ``reanchor`` records). ``verify_command`` is the command an
    administrator runs to check this log; error messages name it.
    """

    def __init__(self, home: str | Path, *, events: type[StrEnum], verify_command: str) -> None:
        if HEAD_RESET not in {member.value for member in events}:
            raise ValueError(f"audit vocabulary {events.__name__} has no {HEAD_RESET!r} event for reanchor")
        self.home = Path(home)
        self.path = self.home / AUDIT_FILE
        self.head_path = self.home / AUDIT_HEAD_FILE
        self.events = events
        self.verify_command = verify_command
        self._thread_lock = threading.Lock()

    # -- writing

    def append(
        self, event: StrEnum | str, *, task: str | None = None, experiment: int | None = None, **fields: Any
    ) -> AuditEntry:
        """Record one event; returns the entry as written (durable when this returns).

        Raises ``DataError`` when an argument cannot be recorded (unknown event, a field
        that is not a small scalar or list of them, a number out of range) or when the log's
        end disagrees with its head; nothing is written then.
        """
        kind = _check_event(event, self.events)
        body: dict[str, Any] = {
            "event": kind,
            "task": _check_task(task),
            "experiment": _check_experiment(experiment),
            "fields": _clean_fields(fields),
        }
        with self._locked() as fd:
            last_seq, last_hash = self._tail_under_lock()
            return self._write(fd, body, last_seq, last_hash)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[int]:
        """The log open for appending (created 0600, a loosened one tightened), under an exclusive
        lock against other threads and processes; closing it releases the lock."""
        with self._thread_lock:
            private_dir(self.home)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, PRIVATE_FILE)
            try:
                os.fchmod(fd, PRIVATE_FILE)
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield fd
            finally:
                os.close(fd)

    def check_writable(self, min_free_bytes: int = 4 * MAX_LINE_BYTES) -> None:
        """Raise ``DataError`` (or ``OSError``) when an append made now would fail.

        For a caller that must not act unless the action can be recorded: it checks, before
        acting, what ``append`` would refuse afterwards (a log whose end disagrees with its
        head, a file that cannot be opened for appending) and that the disk holding the log
        has ``min_free_bytes`` free. Nothing is written.
        """
        with self._locked() as fd:
            self._tail_under_lock()
            disk = os.fstatvfs(fd)
        free = disk.f_bavail * disk.f_frsize
        if free < min_free_bytes:
            raise DataError(
                f"{self.path}: only {free} bytes are free on its disk (at least {min_free_bytes} are kept for the "
                "audit trail); free some space"
            )

    def reanchor(self, reason: str) -> AuditEntry:
        """Accept the log's current end as its head, after an admin checked why they differed.

        For a head that was deleted, or a log that was restored from a backup on purpose.
        The chain itself must verify (this does not bless an edited line), and the reset is
        appended as a ``head_reset`` event naming the old head, so it stays visible.
        """
        reason = reason.strip()
        if not reason:
            raise DataError("reanchor needs a reason: say why the audit head may be reset (it is recorded)")
        with self._locked() as fd:
            scan = _scan(self.path.read_bytes())
            if scan.problem is not None:
                raise DataError(
                    f"{self.path}: cannot reanchor a damaged chain: {scan.problem}; "
                    "move the file aside and start a new log, keeping the old one as evidence"
                )
            old = _read_head(self.head_path)
            body = {
                "event": HEAD_RESET,
                "task": None,
                "experiment": None,
                "fields": _clean_fields(
                    {
                        "old_head_seq": old[0] if isinstance(old, tuple) else None,
                        "old_head_hash": old[1] if isinstance(old, tuple) else None,
                        "reason": reason,
                    }
                ),
            }
            return self._write(fd, body, scan.last_seq, scan.last_hash)

    def _write(self, fd: int, body: dict[str, Any], last_seq: int, last_hash: str) -> AuditEntry:
        body = {**body, "seq": last_seq + 1, "at": round(time.time(), 6), "prev": last_hash}
        body["hash"] = _entry_hash(body)
        entry = _entry_from_json(body)
        line = entry.line()
        if len(line) > MAX_LINE_BYTES:
            raise DataError(
                f"audit event {entry.event!r} is {len(line)} bytes, over the {MAX_LINE_BYTES}-byte limit of a line; "
                "record fewer or shorter fields"
            )
        written = os.write(fd, line)
        if written != len(line):  # a full disk; the partial line makes the next append refuse
            raise DataError(f"{self.path}: only {written} of {len(line)} bytes written (disk full?)")
        os.fsync(fd)
        write_atomic(self.head_path, canonical_json({"seq": entry.seq, "hash": entry.hash}), fsync=True)
        return entry

    def _tail_under_lock(self) -> tuple[int, str]:
        """The last entry's seq and hash, after checking the log's end against the head."""
        last = _last_line(self.path, self.verify_command)
        last_prev: str | None = None
        if last is None:
            last_seq, last_hash = 0, GENESIS
        elif not last.endswith(b"\n"):
            raise DataError(
                f"{self.path}: the last line is incomplete (a crash mid-write, or the file was truncated); "
                f"run `{self.verify_command}`, then move the file aside to start a new log"
            )
        else:
            try:
                tail = _entry_from_json(json.loads(last))
            except (ValueError, DataError) as exc:
                raise DataError(
                    f"{self.path}: the last line is not an audit entry ({exc}); run `{self.verify_command}`"
                ) from exc
            last_seq, last_hash, last_prev = tail.seq, tail.hash, tail.prev
        problem = _head_problem(_read_head(self.head_path), last_seq, last_hash, prev_of_last=last_prev)
        if problem is not None:
            raise DataError(
                f"{self.path}: {problem}; not appending over the evidence. Run `{self.verify_command}`; "
                "if the difference is understood, reanchor the log with a reason"
            )
        return last_seq, last_hash

    # -- reading

    def entries(self, experiment: int | None = None) -> list[AuditEntry]:
        """Every entry, oldest first; only one experiment's when ``experiment`` is given.

        Raises ``DataError`` naming the line when a line cannot be read (run ``verify``).
        """
        entries = []
        for number, raw in enumerate(self._read_locked()[0].split(b"\n"), start=1):
            if not raw:
                continue
            try:
                entry = _entry_from_json(json.loads(raw))
            except (ValueError, DataError) as exc:
                raise DataError(
                    f"{self.path}, line {number}: not a readable audit entry ({exc}); run `{self.verify_command}`"
                ) from exc
            if experiment is None or entry.experiment == experiment:
                entries.append(entry)
        return entries

    def verify(self) -> VerifyResult:
        """Check the whole chain and its head; the first problem found, or ok."""
        data, head = self._read_locked()
        scan = _scan(data)
        if scan.problem is not None:
            return VerifyResult(False, scan.good, scan.line, scan.problem, scan.last_seq, scan.last_hash)
        notes: tuple[str, ...] = ()
        problem = _head_problem(head, scan.last_seq, scan.last_hash, prev_of_last=scan.last_prev)
        if problem is not None:
            return VerifyResult(False, scan.good, None, problem, scan.last_seq, scan.last_hash)
        if isinstance(head, tuple) and head[0] == scan.last_seq - 1:
            notes = (f"{AUDIT_HEAD_FILE} is one entry behind (a crash between two writes); the next append fixes it",)
        return VerifyResult(True, scan.good, None, None, scan.last_seq, scan.last_hash, notes)

    def _read_locked(self) -> tuple[bytes, tuple[int, str] | str | None]:
        """The log's bytes and its head, read together under a shared lock (no append between)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return b"", _read_head(self.head_path)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            with os.fdopen(os.dup(fd), "rb") as fh:
                data = fh.read()
            return data, _read_head(self.head_path)
        finally:
            os.close(fd)


# ----------------------------------------------------------------------------- checks


@dataclass
class _Scan:
    good: int = 0
    last_seq: int = 0
    last_hash: str = GENESIS
    last_prev: str | None = None
    line: int | None = None
    problem: str | None = None


def _scan(data: bytes) -> _Scan:
    """Walk the chain from the top; stop at the first line that breaks it."""
    scan = _Scan()
    if not data:
        return scan
    raw_lines = data.split(b"\n")
    complete, partial = raw_lines[:-1], raw_lines[-1]
    parsed: list[AuditEntry | str] = []
    for raw in complete:
        try:
            parsed.append(_entry_from_json(json.loads(raw)) if raw else "an empty line")
        except (ValueError, DataError) as exc:
            parsed.append(f"not an audit entry ({exc})")
    hash_at: dict[str, int] = {GENESIS: 0}  # hash -> the number of the line that has it
    seq_at: dict[int, int] = {}
    for index, item in enumerate(parsed):
        number = index + 1
        if isinstance(item, str):
            return _fail(scan, number, f"{item} (edited or corrupted?)")
        if _entry_hash(item.as_json()) != item.hash:
            return _fail(scan, number, "its hash does not match its content (edited?)")
        expected = scan.last_seq + 1
        if item.seq != expected or item.prev != scan.last_hash:
            bad, problem = _diagnose(item, number, scan, parsed, hash_at, seq_at)
            if bad < number:  # lines before this one were inserted: the last good line is earlier
                good = parsed[bad - 2] if bad > 1 else None
                scan.last_seq = good.seq if isinstance(good, AuditEntry) else 0
                scan.last_hash = good.hash if isinstance(good, AuditEntry) else GENESIS
            return _fail(scan, bad, problem)
        scan.good, scan.last_seq, scan.last_hash, scan.last_prev = number, item.seq, item.hash, item.prev
        hash_at[item.hash] = number
        seq_at[item.seq] = number
    if partial:
        return _fail(scan, len(complete) + 1, "the last line is incomplete (truncated?)")
    return scan


def _diagnose(
    item: AuditEntry,
    number: int,
    scan: _Scan,
    parsed: Sequence[AuditEntry | str],
    hash_at: Mapping[str, int],
    seq_at: Mapping[int, int],
) -> tuple[int, str]:
    """Say in words why line ``number`` does not follow the line before it."""
    before = f"line {number - 1}'s hash" if number > 1 else "the start of the log"
    chained_onto = hash_at.get(item.prev)
    if chained_onto is not None and chained_onto < number - 1 and item.seq == _seq_of(parsed, chained_onto) + 1:
        # This line follows an earlier one directly: everything between was put in.
        first = chained_onto + 1
        return first, f"inserted: line {number} follows line {chained_onto} directly (a forged or copied line?)"
    expected = scan.last_seq + 1
    if item.seq > expected:
        later = [i + 1 for i, e in enumerate(parsed) if isinstance(e, AuditEntry) and e.seq == expected]
        if number == 1:
            return number, f"seq {item.seq} starts the log, not 1 (lines removed from the start?)"
        if later:
            moved = f"seq {expected} is at line {later[0]}"
            return number, f"seq {item.seq} follows {scan.last_seq}; {moved} (lines swapped?)"
        return number, f"seq {item.seq} follows {scan.last_seq} (a line was removed?)"
    if item.seq < expected:
        where = f"; seq {item.seq} is already line {seq_at[item.seq]}" if item.seq in seq_at else ""
        return number, f"seq {item.seq} follows {scan.last_seq}{where} (lines swapped, duplicated or inserted?)"
    return number, f"prev does not match {before} (lines swapped or inserted?)"


def _seq_of(parsed: Sequence[AuditEntry | str], number: int) -> int:
    if number == 0:
        return 0
    item = parsed[number - 1]
    return item.seq if isinstance(item, AuditEntry) else -1


def _fail(scan: _Scan, number: int, problem: str) -> _Scan:
    scan.good = min(scan.good, number - 1)
    scan.line, scan.problem = number, f"line {number}: {problem}"
    return scan


def _head_problem(
    head: tuple[int, str] | str | None, last_seq: int, last_hash: str, *, prev_of_last: str | None
) -> str | None:
    """Why the log's end disagrees with its head, or None. A head one entry behind is fine."""
    if head is None:
        if last_seq == 0:
            return None
        return (
            f"{AUDIT_HEAD_FILE} is missing but the log has {last_seq} entries: "
            "whether lines were cut from the end cannot be checked"
        )
    if isinstance(head, str):
        return head
    head_seq, head_hash = head
    if head_seq == last_seq and head_hash == last_hash:
        return None
    if head_seq == last_seq - 1 and head_hash == prev_of_last:
        return None  # the line was written and the process died before replacing the head
    if head_seq > last_seq:
        return (
            f"the log ends at seq {last_seq} but {AUDIT_HEAD_FILE} records seq {head_seq} (lines removed from the end?)"
        )
    if head_seq == last_seq:
        return f"the last entry's hash differs from the one {AUDIT_HEAD_FILE} records (the end was rewritten?)"
    return f"{AUDIT_HEAD_FILE} records seq {head_seq} but the log goes on to seq {last_seq} (lines added by hand?)"


def _read_head(path: Path) -> tuple[int, str] | str | None:
    """(seq, hash); None when the file is missing; a sentence when it is unreadable."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(raw)
        seq, digest = data["seq"], data["hash"]
    except (ValueError, KeyError, TypeError):
        return f"{AUDIT_HEAD_FILE} is not readable (edited or corrupted?)"
    if not _is_int(seq) or not 0 < seq <= MAX_INT or not isinstance(digest, str) or not _HEX64_RE.match(digest):
        return f"{AUDIT_HEAD_FILE} does not hold a seq and a sha256 hash (edited or corrupted?)"
    return seq, digest


def _last_line(path: Path, verify_command: str) -> bytes | None:
    """The file's last line, with its newline if it has one; None for a missing or empty file."""
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        return None
    with fh:
        end = fh.seek(0, os.SEEK_END)
        if end == 0:
            return None
        tail = b""
        position = end
        while position > 0:
            step = min(_TAIL_CHUNK, position)
            position -= step
            fh.seek(position)
            tail = fh.read(step) + tail
            cut = tail.rfind(b"\n", 0, len(tail) - 1)
            if cut >= 0:
                return tail[cut + 1 :]
            if len(tail) > MAX_LINE_BYTES + 1:
                raise DataError(f"{path}: the last line is longer than {MAX_LINE_BYTES} bytes; run `{verify_command}`")
        return tail


# ----------------------------------------------------------------------------- validation


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_event(event: StrEnum | str, events: type[StrEnum]) -> str:
    try:
        return str(events(event).value)
    except ValueError:
        known = ", ".join(e.value for e in events)
        raise DataError(f"unknown audit event {event!r}; use one of: {known}") from None


def _check_task(task: str | None) -> str | None:
    if task is None:
        return None
    if not isinstance(task, str) or not task or len(task) > MAX_TASK_CHARS or not task.isprintable():
        raise DataError(f"audit task id {task!r} must be printable text of 1 to {MAX_TASK_CHARS} characters")
    return task


def _check_experiment(experiment: int | None) -> int | None:
    if experiment is None:
        return None
    if not _is_int(experiment) or not 0 <= experiment <= MAX_INT:
        raise DataError(f"audit experiment {experiment!r} must be a whole number from 0 to {MAX_INT}")
    return experiment


def _clean_fields(fields: Mapping[str, Any]) -> dict[str, FieldValue]:
    if len(fields) > MAX_FIELDS:
        raise DataError(f"an audit entry takes at most {MAX_FIELDS} fields, not {len(fields)}")
    clean: dict[str, FieldValue] = {}
    for key, value in fields.items():
        if not isinstance(key, str) or len(key) > MAX_KEY_CHARS or not _KEY_RE.match(key):
            raise DataError(f"audit field name {key!r} must be lower-case letters, digits and _ (at most 64)")
        if isinstance(value, list | tuple):
            if len(value) > MAX_LIST_ITEMS:
                raise DataError(f"audit field {key!r} holds {len(value)} items; at most {MAX_LIST_ITEMS}")
            clean[key] = [_clean_scalar(key, item) for item in value]
        else:
            clean[key] = _clean_scalar(key, value)
    return clean


def _clean_scalar(key: str, value: Any) -> Scalar:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, StrEnum):
        value = value.value
    if isinstance(value, str):
        if len(value) <= MAX_TEXT_CHARS:
            return value
        return value[:MAX_TEXT_CHARS] + f"... [{len(value) - MAX_TEXT_CHARS} more characters not recorded]"
    if isinstance(value, int):
        if abs(value) > MAX_INT:
            raise DataError(f"audit field {key!r} = {value} is out of range (|value| <= {MAX_INT})")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise DataError(f"audit field {key!r} = {value} is not a finite number")
        return value
    if isinstance(value, Path):
        return str(value)
    raise DataError(
        f"audit field {key!r} is a {type(value).__name__}; record text, a number, true/false, null or a list of those"
    )


def _entry_from_json(data: Any) -> AuditEntry:
    """An ``AuditEntry`` from a parsed line; ``DataError`` saying which part is wrong."""
    if not isinstance(data, dict):
        raise DataError("a line must be a JSON object")
    missing = sorted(_ENTRY_KEYS - data.keys())
    extra = sorted(data.keys() - _ENTRY_KEYS)
    if missing:
        raise DataError(f"missing keys {missing}")
    if extra:
        raise DataError(f"unexpected keys {extra}")
    seq, at, event, task, experiment = data["seq"], data["at"], data["event"], data["task"], data["experiment"]
    fields, prev, digest = data["fields"], data["prev"], data["hash"]
    if not _is_int(seq) or not 0 < seq <= MAX_INT:
        raise DataError("'seq' must be a positive whole number")
    if not isinstance(at, int | float) or isinstance(at, bool) or not math.isfinite(at):
        raise DataError("'at' must be a finite number")
    if not isinstance(event, str) or not event:
        raise DataError("'event' must be text")
    if task is not None and not isinstance(task, str):
        raise DataError("'task' must be text or null")
    if experiment is not None and not _is_int(experiment):
        raise DataError("'experiment' must be a whole number or null")
    if not isinstance(fields, dict):
        raise DataError("'fields' must be an object")
    for name, value in (("prev", prev), ("hash", digest)):
        if not isinstance(value, str) or not _HEX64_RE.match(value):
            raise DataError(f"{name!r} must be 64 lower-case hex digits")
    return AuditEntry(seq, at, event, task, experiment, fields, prev, digest)


# ----------------------------------------------------------------------------- rendering


def format_entries(entries: Iterable[AuditEntry]) -> list[str]:
    """One line per entry for ``laulima site audit show`` / ``laulima hub-audit show``: seq, UTC time,
    event, task, fields."""
    lines = []
    for entry in entries:
        when = datetime.fromtimestamp(entry.at, UTC).strftime("%Y-%m-%d %H:%M:%S")
        where = []
        if entry.experiment is not None:
            where.append(f"experiment {entry.experiment}")
        if entry.task is not None:
            where.append(f"task {entry.task}")
        details = " ".join(f"{key}={_show(value)}" for key, value in sorted(entry.fields.items()))
        parts = [f"#{entry.seq}", when, entry.event, ", ".join(where), details]
        lines.append("  ".join(part for part in parts if part))
    return lines


def _show(value: Any) -> str:
    if isinstance(value, str) and value and not any(c.isspace() or c in "\"'=" for c in value):
        return value
    return json.dumps(value, ensure_ascii=False)  # quoted, newlines escaped: one entry stays one line


def format_verify(result: VerifyResult) -> str:
    """The report of an audit ``verify`` command; its head line is what to export elsewhere."""
    head = f"head: seq {result.last_seq} sha256 {result.last_hash}"
    if result.ok:
        text = f"audit log OK: {result.entries} entries, chain intact\n{head}"
        return "\n".join([text, *(f"note: {note}" for note in result.notes)])
    return (
        f"audit log DAMAGED: {result.problem}\n"
        f"{result.entries} entries verified before the problem; last good {head}\n"
        "keep the file as evidence; move it aside to start a new log"
    )
