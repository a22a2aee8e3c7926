"""The site's audit log: a hash chain that survives restarts and concurrent writers, and
whose verify names the first line that was edited, removed, inserted, swapped or cut."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from laulima.errors import DataError
from laulima.site.audit import (
    AUDIT_FILE,
    AUDIT_HEAD_FILE,
    GENESIS,
    AuditEvent,
    AuditLog,
    canonical_json,
    format_entries,
    format_verify,
    reference,
)


def _fill(home: Path, n: int = 5) -> AuditLog:
    log = AuditLog(home)
    for i in range(1, n + 1):
        log.append(AuditEvent.SENT, task=f"t-{i}", experiment=i % 2, bytes=100 * i, sha256="ab" * 32)
    return log


def _lines(home: Path) -> list[bytes]:
    return (home / AUDIT_FILE).read_bytes().splitlines(keepends=True)


def _write_lines(home: Path, lines: list[bytes]) -> None:
    (home / AUDIT_FILE).write_bytes(b"".join(lines))


def _sealed(entry: dict[str, Any]) -> bytes:
    """A line as a forger who knows the format would write it: hash recomputed."""
    body = {k: v for k, v in entry.items() if k != "hash"}
    body["hash"] = hashlib.sha256(canonical_json(body)).hexdigest()
    return canonical_json(body) + b"\n"


def _recompute_hashes(a: AuditLog) -> None:
    for entry in a.entries():
        body = entry.as_json()
        del body["hash"]
        assert hashlib.sha256(canonical_json(body)).hexdigest() == entry.hash


# ----------------------------------------------------------------------------- chaining


def test_clean_log_verifies(tmp_path: Path):
    log = _fill(tmp_path)
    result = log.verify()
    last = log.entries()[-1]
    assert result.ok and result.problem is None and result.line is None
    assert (result.entries, result.last_seq, result.last_hash) == (5, 5, last.hash)
    report = format_verify(result)
    assert report.startswith("audit log OK: 5 entries") and last.hash in report


def test_empty_home_verifies_and_has_no_entries(tmp_path: Path):
    log = AuditLog(tmp_path / "site")
    assert log.verify().ok and log.verify().entries == 0
    assert log.entries() == []


def test_chain_links_across_instances_and_a_restart(tmp_path: Path):
    first, second = AuditLog(tmp_path), AuditLog(tmp_path)
    a = first.append(AuditEvent.RECEIVED, task="t-1", experiment=3, kind="train", round=1)
    b = second.append("decided", task="t-1", experiment=3, decision="run", rule="auto")
    c = first.append(AuditEvent.STARTED, task="t-1", experiment=3, bundle="cd" * 32, dataset="brain", cases=12)
    assert [e.seq for e in (a, b, c)] == [1, 2, 3]
    assert (a.prev, b.prev, c.prev) == (GENESIS, a.hash, b.hash)
    del first, second  # the agent restarts: a fresh object reads the files
    restarted = AuditLog(tmp_path)
    assert restarted.entries() == [a, b, c]
    d = restarted.append(AuditEvent.FINISHED, task="t-1", experiment=3, n_samples=12)
    assert (d.seq, d.prev) == (4, c.hash)
    assert json.loads((tmp_path / AUDIT_HEAD_FILE).read_bytes()) == {"seq": 4, "hash": d.hash}
    _recompute_hashes(restarted)
    assert restarted.verify().ok


def test_each_line_is_canonical_json(tmp_path: Path):
    log = _fill(tmp_path, 2)
    for raw, entry in zip(_lines(tmp_path), log.entries(), strict=True):
        assert raw == canonical_json(json.loads(raw)) + b"\n" == entry.line()


def _append_many(home: str, worker: int, count: int) -> None:
    log = AuditLog(home)
    for n in range(count):
        log.append(AuditEvent.SENT, task=f"w{worker}-{n}", worker=worker, n=n)


def test_two_processes_appending_at_once_keep_one_chain(tmp_path: Path):
    count = 40
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_append_many, args=(str(tmp_path), w, count)) for w in range(2)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(120)  # a bound against a hang, not a timing assertion
        assert p.exitcode == 0
    entries = AuditLog(tmp_path).entries()
    assert [e.seq for e in entries] == list(range(1, 2 * count + 1))
    assert {(e.fields["worker"], e.fields["n"]) for e in entries} == {(w, n) for w in range(2) for n in range(count)}
    assert AuditLog(tmp_path).verify().ok


def test_threads_sharing_or_not_sharing_an_instance_keep_one_chain(tmp_path: Path):
    shared = AuditLog(tmp_path)
    logs = [shared, shared, AuditLog(tmp_path), AuditLog(tmp_path)]

    def run(log: AuditLog, worker: int) -> None:
        for n in range(15):
            log.append(AuditEvent.SENT, worker=worker, n=n)

    threads = [threading.Thread(target=run, args=(log, w)) for w, log in enumerate(logs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [e.seq for e in shared.entries()] == list(range(1, 61))
    assert shared.verify().ok


# ----------------------------------------------------------------------------- tampering


def _edit_field(home: Path) -> None:
    lines = _lines(home)
    entry = json.loads(lines[2])
    entry["fields"]["bytes"] = 1
    lines[2] = canonical_json(entry) + b"\n"
    _write_lines(home, lines)


def _delete_middle(home: Path) -> None:
    lines = _lines(home)
    del lines[2]
    _write_lines(home, lines)


def _swap(home: Path) -> None:
    lines = _lines(home)
    lines[1], lines[2] = lines[2], lines[1]
    _write_lines(home, lines)


def _swap_and_renumber(home: Path) -> None:
    """Swap lines 2 and 3, then fix their seq and hash (but not the chain after them)."""
    lines = _lines(home)
    second, third = json.loads(lines[1]), json.loads(lines[2])
    lines[1], lines[2] = _sealed({**third, "seq": 2}), _sealed({**second, "seq": 3})
    _write_lines(home, lines)


def _insert_forged(home: Path) -> None:
    lines = _lines(home)
    before = json.loads(lines[1])
    forged = {**before, "seq": before["seq"] + 1, "prev": before["hash"], "fields": {"bytes": 0}}
    lines.insert(2, _sealed(forged))
    _write_lines(home, lines)


def _rewrite_chain(home: Path, lines: list[dict[str, Any]]) -> None:
    out: list[bytes] = []
    prev = GENESIS
    for seq, entry in enumerate(lines, start=1):
        out.append(_sealed({**entry, "seq": seq, "prev": prev}))
        prev = json.loads(out[-1])["hash"]
    _write_lines(home, out)


def _edit_and_rewrite_the_rest(home: Path) -> None:
    lines = [json.loads(raw) for raw in _lines(home)]
    lines[2]["fields"]["bytes"] = 1
    _rewrite_chain(home, lines)


def _insert_and_rewrite_the_rest(home: Path) -> None:
    lines = [json.loads(raw) for raw in _lines(home)]
    lines.insert(2, {**lines[1], "fields": {"bytes": 0}})
    _rewrite_chain(home, lines)


def _truncate_mid_line(home: Path) -> None:
    data = (home / AUDIT_FILE).read_bytes()
    (home / AUDIT_FILE).write_bytes(data[:-20])


def _remove_last_line(home: Path) -> None:
    _write_lines(home, _lines(home)[:-1])


def _remove_first_line(home: Path) -> None:
    _write_lines(home, _lines(home)[1:])


def _delete_head(home: Path) -> None:
    (home / AUDIT_HEAD_FILE).unlink()


def _garble_line(home: Path) -> None:
    lines = _lines(home)
    lines[3] = b"{not json\n"
    _write_lines(home, lines)


@pytest.mark.parametrize(
    ("tamper", "line", "words"),
    [
        (_edit_field, 3, "line 3: its hash does not match its content (edited?)"),
        (_delete_middle, 3, "line 3: seq 4 follows 2 (a line was removed?)"),
        (_swap, 2, "line 2: seq 3 follows 1; seq 2 is at line 3 (lines swapped?)"),
        (_swap_and_renumber, 2, "line 2: prev does not match line 1's hash (lines swapped or inserted?)"),
        (_insert_forged, 3, "line 3: inserted: line 4 follows line 2 directly"),
        (_truncate_mid_line, 5, "line 5: the last line is incomplete (truncated?)"),
        (_remove_first_line, 1, "line 1: seq 2 starts the log, not 1"),
        (_garble_line, 4, "line 4: not an audit entry"),
        (_remove_last_line, None, "the log ends at seq 4 but audit.head records seq 5 (lines removed from the end?)"),
        (_edit_and_rewrite_the_rest, None, "the last entry's hash differs from the one audit.head records"),
        (_insert_and_rewrite_the_rest, None, "audit.head records seq 5 but the log goes on to seq 6"),
        (_delete_head, None, "audit.head is missing but the log has 5 entries"),
    ],
)
def test_verify_names_the_first_bad_line(tmp_path: Path, tamper: Callable[[Path], None], line: int | None, words: str):
    log = _fill(tmp_path)
    tamper(tmp_path)
    result = log.verify()
    assert not result.ok
    assert result.line == line
    assert result.problem is not None and result.problem.startswith(words), result.problem
    if line is not None:
        assert result.entries == line - 1
    assert format_verify(result).startswith(f"audit log DAMAGED: {result.problem}")


def test_append_refuses_to_write_over_a_cut_log_until_reanchored(tmp_path: Path):
    log = _fill(tmp_path)
    _remove_last_line(tmp_path)
    before = (tmp_path / AUDIT_FILE).read_bytes(), (tmp_path / AUDIT_HEAD_FILE).read_bytes()
    with pytest.raises(DataError, match="records seq 5 .*reanchor"):
        log.append(AuditEvent.RECEIVED, task="t-9")
    assert ((tmp_path / AUDIT_FILE).read_bytes(), (tmp_path / AUDIT_HEAD_FILE).read_bytes()) == before

    with pytest.raises(DataError, match="reason"):
        log.reanchor("  ")
    reset = log.reanchor("restored from last night's backup, ticket 1234")
    assert (reset.seq, reset.event) == (5, AuditEvent.HEAD_RESET)
    assert reset.fields["old_head_seq"] == 5 and "ticket 1234" in str(reset.fields["reason"])
    assert log.append(AuditEvent.RECEIVED, task="t-9").seq == 6
    assert log.verify().ok


def test_append_refuses_after_a_deleted_head_or_a_half_line(tmp_path: Path):
    log = _fill(tmp_path, 3)
    _delete_head(tmp_path)
    with pytest.raises(DataError, match="audit.head is missing"):
        log.append(AuditEvent.RECEIVED)
    log.reanchor("head removed by a cleanup script")
    _truncate_mid_line(tmp_path)
    with pytest.raises(DataError, match="last line is incomplete"):
        log.append(AuditEvent.RECEIVED)
    with pytest.raises(DataError, match="damaged chain"):
        log.reanchor("try anyway")


def test_reanchor_does_not_bless_an_edited_line(tmp_path: Path):
    log = _fill(tmp_path)
    _edit_field(tmp_path)
    with pytest.raises(DataError, match="line 3: its hash does not match"):
        log.reanchor("please")


def test_a_head_one_entry_behind_after_a_crash_is_accepted_and_repaired(tmp_path: Path):
    log = _fill(tmp_path, 3)
    second = log.entries()[1]
    (tmp_path / AUDIT_HEAD_FILE).write_bytes(canonical_json({"seq": 2, "hash": second.hash}))
    result = log.verify()
    assert result.ok and result.notes and "one entry behind" in result.notes[0]
    assert "note: " in format_verify(result)
    log.append(AuditEvent.RECEIVED)
    assert log.verify().ok and not log.verify().notes


# ----------------------------------------------------------------------------- reading, fields, files


def test_entries_filter_by_experiment(tmp_path: Path):
    log = _fill(tmp_path, 5)
    log.append(AuditEvent.RECEIVED)  # no experiment
    assert [e.seq for e in log.entries(experiment=1)] == [1, 3, 5]
    assert [e.seq for e in log.entries(experiment=0)] == [2, 4]
    assert [e.seq for e in log.entries(experiment=7)] == []
    assert len(log.entries()) == 6


def test_entries_name_an_unreadable_line(tmp_path: Path):
    log = _fill(tmp_path)
    _garble_line(tmp_path)
    with pytest.raises(DataError, match="line 4: not a readable audit entry"):
        log.entries()


def test_files_are_private_whatever_the_umask(tmp_path: Path):
    old = os.umask(0)
    try:
        _fill(tmp_path, 2)
    finally:
        os.umask(old)
    for name in (AUDIT_FILE, AUDIT_HEAD_FILE):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o600


def test_a_loosened_log_file_is_tightened_on_append(tmp_path: Path):
    log = _fill(tmp_path, 1)
    os.chmod(tmp_path / AUDIT_FILE, 0o644)
    log.append(AuditEvent.RECEIVED)
    assert stat.S_IMODE(os.stat(tmp_path / AUDIT_FILE).st_mode) == 0o600


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"event": "exploded"}, "unknown audit event 'exploded'"),
        ({"experiment": -1}, "audit experiment -1"),
        ({"experiment": True}, "audit experiment True"),
        ({"task": "t\n1"}, "audit task id"),
        ({"loss": float("nan")}, "'loss' = nan is not a finite number"),
        ({"bytes": 2**70}, "'bytes' = .* is out of range"),
        ({"blob": b"raw"}, "'blob' is a bytes"),
        ({"cases": list(range(65))}, "'cases' holds 65 items"),
        ({"Bad_Key": 1}, "field name 'Bad_Key'"),
    ],
)
def test_unrecordable_arguments_are_refused_and_nothing_is_written(tmp_path: Path, kwargs: dict[str, Any], words: str):
    log = _fill(tmp_path, 1)
    before = (tmp_path / AUDIT_FILE).read_bytes()
    event = kwargs.pop("event", AuditEvent.FAILED)
    with pytest.raises(DataError, match=words):
        log.append(event, **kwargs)
    assert (tmp_path / AUDIT_FILE).read_bytes() == before


def test_long_failure_text_is_kept_with_its_paths_but_capped(tmp_path: Path):
    log = AuditLog(tmp_path)
    text = "Traceback: /data/brain/case_0001.nii.gz is broken\n" + "x" * 40_000
    entry = log.append(AuditEvent.FAILED, task="t-1", error=text, reason_sent="dataset 'brain' is unreadable")
    stored = str(entry.fields["error"])
    assert stored.startswith("Traceback: /data/brain/case_0001.nii.gz") and "more characters not recorded" in stored
    assert len(stored) < 17_000
    assert log.entries() == [entry] and log.verify().ok


def test_reference_is_short_and_opaque(tmp_path: Path):
    entry = AuditLog(tmp_path).append(AuditEvent.FAILED, task="t-1", error=f"{tmp_path}/case_7.nii.gz: bad affine")
    assert reference(entry) == "audit#1"


def test_format_entries_gives_one_line_per_entry(tmp_path: Path):
    log = AuditLog(tmp_path)
    log.append(AuditEvent.APPROVED, task="t-1", experiment=3, by="dr.kealoha", reason="reviewed\nthe source")
    log.append(AuditEvent.SENT, experiment=3, bytes=2048, sha256="ab" * 32)
    first, second = format_entries(log.entries())
    assert first.startswith("#1  ") and "approved  experiment 3, task t-1" in first
    assert 'by=dr.kealoha reason="reviewed\\nthe source"' in first
    assert second.endswith(f"sent  experiment 3  bytes=2048 sha256={'ab' * 32}")
    assert format_entries([]) == []
