"""Restart state: phases persist, old final tasks are pruned, damage is survivable."""

from __future__ import annotations

from pathlib import Path

from laulima.site.state import Phase, SiteState


def test_phases_persist_across_instances(tmp_path: Path):
    state = SiteState(tmp_path)
    state.set("t-1", Phase.RECEIVED, kind="train")
    state.set("t-1", Phase.COMPUTED, result_path="/x/result.safetensors", result_digest="ab")
    record = SiteState(tmp_path).get("t-1")
    assert record.phase == Phase.COMPUTED
    assert (record.kind, record.result_path, record.result_digest) == ("train", "/x/result.safetensors", "ab")
    assert SiteState(tmp_path).get("t-2") is None


def test_prune_keeps_recent_and_unfinished(tmp_path: Path):
    state = SiteState(tmp_path, keep=2)
    state.set("open", Phase.DOWNLOADED)
    for i in range(4):
        state.set(f"done-{i}", Phase.REPORTED)
    assert state.prune() == ["done-0", "done-1", "done-2"]
    assert {r.task_id for r in SiteState(tmp_path).tasks()} == {"open", "done-3"}


def test_damaged_state_file_is_set_aside(tmp_path: Path):
    (tmp_path / "state.json").write_text("{oops")
    state = SiteState(tmp_path)
    assert state.tasks() == []
    assert (tmp_path / "state.json.corrupt").exists()
    state.set("t", Phase.RECEIVED)
    assert SiteState(tmp_path).get("t").phase == Phase.RECEIVED
