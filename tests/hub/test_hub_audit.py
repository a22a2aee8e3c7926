"""The hub's own audit record: who submitted, shared, downloaded and cancelled what, which operator
changed sites and tokens — chained, operator-only, and refusing to grant what it cannot record."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import pytest

from laulima.auditlog import AUDIT_FILE, AUDIT_HEAD_FILE, canonical_json
from laulima.cli import main
from laulima.core.weights import to_safetensors

from .conftest import Hub, make_weights, spec

BUILTIN = "laulima.algorithms.identity:Identity"


def builtin_spec(**overrides: Any) -> dict[str, Any]:
    return spec(algorithm=BUILTIN, **overrides)


def audit(hub: Hub, **params: Any) -> list[dict[str, Any]]:
    r = hub.client.get(hub.url("/audit"), params=params, headers=hub.admin)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def upload(hub: Hub, headers: dict[str, str], data: bytes) -> str:
    r = hub.client.put(hub.url("/blobs"), content=data, headers=headers)
    assert r.status_code == 201, r.text
    return r.json()["digest"]  # type: ignore[no-any-return]


def submit(hub: Hub, headers: dict[str, str], digest: str, **overrides: Any) -> Any:
    return hub.client.post(
        hub.url("/experiments"), json={"spec": builtin_spec(**overrides), "initial_weights": digest}, headers=headers
    )


def hub_audit_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: object) -> tuple:
    monkeypatch.setenv("COLUMNS", "250")
    monkeypatch.setattr(sys, "argv", ["laulima", "hub-audit", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_a_scientists_actions_are_recorded_with_who_did_them(hub: Hub):
    alice, bob = hub.person("alice"), hub.person("bob")
    weights = to_safetensors(make_weights())
    digest = upload(hub, alice, weights)
    r = submit(hub, alice, digest, rounds=3)
    assert r.status_code == 201, r.text
    exp = r.json()
    assert hub.client.post(hub.url(f"/experiments/{exp['id']}/shares"), json={"name": "bob"}, headers=alice).is_success
    model = hub.client.get(hub.url(f"/experiments/{exp['id']}/model"), headers=bob)
    assert model.status_code == 200, model.text
    assert hub.client.delete(hub.url(f"/experiments/{exp['id']}/shares/bob"), headers=alice).is_success
    assert hub.client.post(hub.url(f"/experiments/{exp['id']}/cancel"), headers=alice).is_success

    entries = audit(hub, experiment=exp["id"])
    assert [(e["event"], e["fields"]["actor"], e["fields"]["role"]) for e in entries] == [
        ("submitted", "alice", "scientist"),
        ("shared", "alice", "scientist"),
        ("downloaded", "bob", "scientist"),
        ("unshared", "alice", "scientist"),
        ("cancelled", "alice", "scientist"),
    ]
    submitted, shared, downloaded, _, cancelled = (e["fields"] for e in entries)
    assert submitted["initial_weights"] == digest and submitted["algorithm"] == BUILTIN
    assert submitted["rounds"] == 3 and submitted["sites"] == ["site-a", "site-b"] and submitted["bundle"] is None
    assert len(submitted["spec_sha256"]) == 64 and "config" not in submitted
    assert shared["with_person"] == "bob" and shared["owner"] == "alice"
    assert downloaded == {
        "actor": "bob",
        "role": "scientist",
        "what": "model",
        "digest": exp["global_digest"],
        "bytes": len(model.content),
        "round": 0,
    }
    assert cancelled["name"] == "exp"
    (uploaded,) = [e for e in audit(hub) if e["event"] == "uploaded"]
    assert uploaded["experiment"] is None
    assert uploaded["fields"] == {"actor": "alice", "role": "scientist", "digest": digest, "bytes": len(weights)}


def test_operator_actions_and_site_downloads_are_recorded_and_no_token_is(hub: Hub):
    created = hub.client.post(hub.url("/tokens"), json={"name": "carol", "role": "scientist"}, headers=hub.admin)
    token = created.json()
    assert hub.client.post(hub.url(f"/tokens/{token['id']}/revoke"), headers=hub.admin).is_success
    exp = hub.submit(builtin_spec(sites=["site-a"]), make_weights())
    task = hub.next_task("site-a")
    assert task is not None
    hub.download("site-a", task.weights_digest)
    assert hub.client.delete(hub.url("/sites/site-c"), headers=hub.admin).is_success

    events = [(e["event"], e["fields"]) for e in audit(hub)]
    assert [event for event, _ in events[:3]] == ["site_registered"] * 3  # the fixture's three sites
    assert {f["site"] for _, f in events[:3]} == {"site-a", "site-b", "site-c"}
    by_event = {event: f for event, f in events}
    assert by_event["token_created"] == {
        "actor": "admin",
        "role": "operator",
        "token_id": token["id"],
        "name": "carol",
        "token_role": "scientist",
    }
    assert by_event["token_revoked"]["token_id"] == token["id"]
    site_download = next(f for event, f in events if event == "downloaded" and f["role"] == "site")
    assert site_download["actor"] == "site-a" and site_download["digest"] == task.weights_digest
    assert by_event["site_removed"] == {"actor": "admin", "role": "operator", "site": "site-c"}
    assert any(e["experiment"] == exp["id"] and e["event"] == "submitted" for e in audit(hub))
    record = (hub.home / AUDIT_FILE).read_text()
    assert token["token"] not in record and hub.tokens["site-a"] not in record


def test_only_operators_read_the_record_and_limit_keeps_the_latest(hub: Hub):
    scientist = hub.person("alice")
    for headers, status in ((scientist, 403), (hub.site("site-a"), 403), ({}, 401)):
        for path in ("/audit", "/audit/verify"):
            assert hub.client.get(hub.url(path), headers=headers).status_code == status
    everything = audit(hub)
    assert [e["seq"] for e in audit(hub, limit=2)] == [e["seq"] for e in everything[-2:]]
    r = hub.client.get(hub.url("/audit"), params={"limit": 0}, headers=hub.admin)
    assert r.status_code == 422


def test_the_chain_verifies_and_an_edited_line_is_found(
    hub: Hub, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    hub.person("alice")
    r = hub.client.get(hub.url("/audit/verify"), headers=hub.admin)
    assert r.json()["ok"] and r.json()["entries"] == 4
    code, out, _ = hub_audit_cli(monkeypatch, capsys, "verify", "--home", hub.home)
    assert code == 0 and "audit log OK: 4 entries" in out
    code, out, _ = hub_audit_cli(monkeypatch, capsys, "show", "--home", hub.home, "--limit", "1")
    assert code == 0 and "token_created" in out and "actor=admin" in out and out.count("\n") == 1

    path = hub.home / AUDIT_FILE
    lines = path.read_bytes().splitlines(keepends=True)
    entry = json.loads(lines[1])
    entry["fields"]["actor"] = "mallory"
    lines[1] = canonical_json(entry) + b"\n"
    path.write_bytes(b"".join(lines))

    code, out, err = hub_audit_cli(monkeypatch, capsys, "verify", "--home", hub.home)
    assert code == 1 and "line 2: its hash does not match its content" in err
    found = hub.client.get(hub.url("/audit/verify"), headers=hub.admin).json()
    assert not found["ok"] and found["line"] == 2 and found["entries"] == 1


def test_granting_is_refused_while_the_record_cannot_be_written_and_taking_away_is_not(
    hub: Hub, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
):
    alice = hub.person("alice")
    digest = upload(hub, alice, to_safetensors(make_weights()))
    exp = submit(hub, alice, digest).json()
    (hub.home / AUDIT_HEAD_FILE).unlink()  # a bad restore: the end of the record can no longer be checked

    refused = submit(hub, alice, digest)
    assert refused.status_code == 503 and refused.json()["error"] == "audit_unavailable"
    assert "nothing was done" in refused.json()["detail"] and str(hub.home) not in refused.json()["detail"]
    assert refused.headers["retry-after"] == "60"
    assert len(hub.client.get(hub.url("/experiments"), headers=alice).json()) == 1
    for response in (
        hub.client.put(hub.url("/blobs"), content=b"x" * 10, headers=alice),
        hub.client.post(hub.url(f"/experiments/{exp['id']}/shares"), json={"name": "bob"}, headers=alice),
        hub.client.get(hub.url(f"/experiments/{exp['id']}/model"), headers=alice),
        hub.client.post(hub.url("/tokens"), json={"name": "carol", "role": "scientist"}, headers=hub.admin),
    ):
        assert response.status_code == 503, response.text

    with caplog.at_level(logging.CRITICAL, logger="laulima.hub.audit"):
        cancelled = hub.client.post(hub.url(f"/experiments/{exp['id']}/cancel"), headers=alice)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    lost = [r.getMessage() for r in caplog.records if "AUDIT RECORD NOT WRITTEN" in r.getMessage()]
    assert len(lost) == 1 and '"event": "cancelled"' in lost[0] and '"actor": "alice"' in lost[0]

    code, _, err = hub_audit_cli(monkeypatch, capsys, "verify", "--home", hub.home)
    assert code == 1 and "audit.head is missing" in err
    code, out, _ = hub_audit_cli(monkeypatch, capsys, "reanchor", "--home", hub.home, "--reason", "restore, ticket 7")
    assert code == 0 and "head reset" in out
    assert submit(hub, alice, digest).status_code == 201
    assert audit(hub)[-2]["event"] == "head_reset"


def test_the_record_can_live_apart_from_the_hub_home(make_hub, tmp_path: Path):
    hub = make_hub(audit_dir=tmp_path / "audit-volume")
    hub.person("alice")
    assert (tmp_path / "audit-volume" / AUDIT_FILE).is_file() and not (hub.home / AUDIT_FILE).exists()
    assert audit(hub)[0]["event"] == "token_created"


def test_each_log_takes_only_its_own_vocabulary(tmp_path: Path):
    from enum import StrEnum

    from laulima.auditlog import HashChainLog
    from laulima.errors import DataError
    from laulima.hub.audit import HubAuditLog

    with pytest.raises(DataError, match="unknown audit event 'approved'"):
        HubAuditLog(tmp_path).append("approved")  # a site's event is not the hub's

    class NoReset(StrEnum):
        DONE = "done"

    with pytest.raises(ValueError, match="no 'head_reset' event"):
        HashChainLog(tmp_path, events=NoReset, verify_command="x")
