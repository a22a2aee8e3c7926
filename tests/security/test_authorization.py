"""Roles, isolation between sites, replay, tampering and limits — on a real hub with mutual TLS."""

from __future__ import annotations

import socket
import ssl
import stat
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from sqlalchemy import select

from laulima.core.protocol import Header, TaskPublic
from laulima.core.weights import to_safetensors
from laulima.hub.db import Base, make_engine
from tests.helpers.stored_blobs import StoredBlobs

from .conftest import TLSHub, start_tls_hub


def _weights(seed: int, n: int = 300_000) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"w": rng.standard_normal(n, dtype=np.float32), "b": rng.standard_normal(8, dtype=np.float32)}


def _update(seed: int) -> bytes:
    return to_safetensors(_weights(seed), {"laulima.n_samples": "10", "laulima.metrics": "{}"})


SPEC: dict[str, Any] = {
    "name": "secure",
    "algorithm": "laulima.algorithms.identity:Identity",
    "dataset": "brains",
    "sites": ["site-a", "site-b"],
    "rounds": 1,
    "min_sites": 2,
    "round_timeout_s": 60.0,
    "evaluation": {"every": 0, "final": False},
}


class Federation:
    """A TLS hub with sites a and b enrolled, a scientist, and one running experiment."""

    def __init__(self, hub: TLSHub, n: int = 300_000) -> None:
        self.hub = hub
        self.op = hub.operator()
        for name in ("site-a", "site-b"):
            assert self.op.post("/sites", json={"name": name}).status_code == 201
        self.a, self.b = hub.site("site-a"), hub.site("site-b")
        for agent in (self.a, self.b):  # the agents connect: rounds select sites the hub has heard from
            assert agent.get("/tasks/next", params={"wait": 0}).status_code == 204
        created = self.op.post("/tokens", json={"name": "alice", "role": "scientist"})
        assert created.status_code == 201, created.text
        self.scientist = hub.client(token=created.json()["token"])
        self.initial = _weights(0, n)
        digest = self.scientist.put("/blobs", content=to_safetensors(self.initial)).json()["digest"]
        r = self.scientist.post("/experiments", json={"spec": SPEC, "initial_weights": digest})
        assert r.status_code == 201, r.text
        self.exp = r.json()
        self.ta = TaskPublic.model_validate(self.a.get("/tasks/next", params={"wait": 5}).json())
        self.tb = TaskPublic.model_validate(self.b.get("/tasks/next", params={"wait": 5}).json())

    def upload(self, client: httpx.Client, task: TaskPublic, body: bytes, nonce: str | None = None) -> httpx.Response:
        return client.put(
            f"/tasks/{task.id}/update", content=body, headers={Header.UPLOAD_NONCE: nonce or task.upload_nonce}
        )

    def experiment(self) -> dict[str, Any]:
        return self.scientist.get(f"/experiments/{self.exp['id']}").json()

    def wait_status(self, status: str, timeout: float = 15) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while (exp := self.experiment())["status"] != status:
            assert time.monotonic() < deadline, exp
            time.sleep(0.05)
        return exp


@pytest.fixture
def fed(tls_hub: TLSHub) -> Federation:
    return Federation(tls_hub)


def test_roles_site_certificates_submit_nothing_scientists_enroll_nothing(fed: Federation):
    spec_body = {"spec": SPEC, "initial_weights": fed.exp["global_digest"]}
    r = fed.a.post("/experiments", json=spec_body)
    assert r.status_code == 403 and "a site certificate cannot use it" in r.json()["detail"]
    assert fed.a.put("/blobs", content=b"x").status_code == 403
    assert fed.a.get("/experiments").status_code == 403
    r = fed.scientist.post("/sites", json={"name": "site-z"})
    assert r.status_code == 403 and "needs an operator token" in r.json()["detail"]
    assert fed.scientist.post("/tokens", json={"name": "mallory", "role": "operator"}).status_code == 403
    assert fed.scientist.get("/tasks/next").status_code == 403  # a person cannot act as a site
    bob = fed.hub.client(token=fed.op.post("/tokens", json={"name": "bob", "role": "scientist"}).json()["token"])
    assert bob.get("/experiments").json() == []  # another scientist: alice's experiment is not his
    assert bob.get(f"/experiments/{fed.exp['id']}").status_code == 404
    assert bob.post(f"/experiments/{fed.exp['id']}/cancel").status_code == 404
    assert bob.get(f"/blobs/{fed.exp['global_digest']}").status_code == 404
    assert fed.op.get(f"/experiments/{fed.exp['id']}").json()["owner"] == "alice"
    assert fed.op.post("/sites", json={"name": "site-z"}).status_code == 201
    assert fed.op.post("/experiments", json=spec_body).status_code == 201  # the operator may do everything
    r = fed.op.post("/tokens", json={"name": "bob", "role": "site"})
    assert r.status_code == 422  # people's roles only


def _everything_stored(database_url: str) -> str:
    """Every value of every table of the hub's database (SQLite or PostgreSQL), as text."""
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            return "\n".join(repr(row) for table in Base.metadata.sorted_tables for row in conn.execute(select(table)))
    finally:
        engine.dispose()


def test_tokens_are_stored_hashed_and_revocable(fed: Federation):
    token = fed.scientist.headers["Authorization"].split()[1]
    assert token not in _everything_stored(fed.hub.settings.database_url or "")
    listed = fed.op.get("/tokens").json()
    assert [t["name"] for t in listed] == ["alice"] and "token" not in listed[0]
    assert fed.op.post(f"/tokens/{listed[0]['id']}/revoke").status_code == 200
    assert fed.scientist.get("/experiments").status_code == 401


def test_a_site_sees_only_its_own_tasks_and_blobs(fed: Federation):
    assert fed.ta.id != fed.tb.id
    assert fed.a.get("/tasks/next").status_code == 200  # a delivered task comes again: its own
    assert fed.a.get("/tasks/next").json()["id"] == fed.ta.id
    other = fed.scientist.put("/blobs", content=to_safetensors(_weights(9))).json()["digest"]
    r = fed.a.get(f"/blobs/{other}")
    assert r.status_code == 403 and "site-a" in r.json()["detail"]
    assert fed.b.get(f"/blobs/{fed.tb.weights_digest}").status_code == 200
    accepted = fed.upload(fed.b, fed.tb, _update(2))
    assert accepted.status_code == 200, accepted.text
    assert fed.a.get(f"/blobs/{accepted.json()['digest']}").status_code == 403  # b's update


def test_a_site_cannot_upload_or_report_for_another_site(fed: Federation):
    r = fed.upload(fed.a, fed.tb, _update(1))  # b's task, even with b's nonce
    assert r.status_code == 403 and "assigned to site 'site-b'" in r.json()["detail"]
    assert fed.a.post(f"/tasks/{fed.tb.id}/failure", json={"reason": "x"}).status_code == 403
    assert fed.upload(fed.b, fed.tb, _update(2)).status_code == 200


def test_a_replayed_upload_is_refused(fed: Federation):
    body = _update(1)
    first = fed.upload(fed.a, fed.ta, body)
    assert first.status_code == 200
    again = fed.upload(fed.a, fed.ta, body)
    assert again.status_code == 409 and again.json()["context"]["accepted_digest"] == first.json()["digest"]
    other_task = fed.upload(fed.a, fed.tb, body, nonce=fed.ta.upload_nonce)  # captured, sent to another task
    assert other_task.status_code == 403
    refusals = fed.scientist.get(f"/experiments/{fed.exp['id']}/refusals").json()
    assert [x["status"] for x in refusals] == [409, 403]


def test_blobs_are_encrypted_at_rest_with_keys_outside_the_blob_folder(fed: Federation):
    home = fed.hub.settings.home
    plain = to_safetensors(fed.initial)
    blobs = StoredBlobs(fed.hub.settings)  # the hub's blob folder, or its bucket
    stored = blobs.read(fed.ta.weights_digest)
    assert stored[:8] == b"LLBLOB01" and plain[:64] not in stored and plain[-4096:] not in stored
    keys = sorted(p.name for p in (home / "keys").iterdir())
    assert keys == ["uploads.key"]
    assert not [name for name in blobs.names() if name.endswith(".key")]
    assert stat.S_IMODE((home / "keys").stat().st_mode) == 0o700
    assert stat.S_IMODE((home / "keys" / "uploads.key").stat().st_mode) == 0o600
    got = fed.a.get(f"/blobs/{fed.ta.weights_digest}")
    assert got.content == plain and got.headers[Header.CONTENT_SHA256] == fed.ta.weights_digest
    assert fed.upload(fed.a, fed.ta, _update(1)).status_code == 200
    assert fed.upload(fed.b, fed.tb, _update(2)).status_code == 200
    done = fed.wait_status("completed")
    assert sorted(p.name for p in (home / "keys").iterdir()) == [f"experiment-{fed.exp['id']}.key", "uploads.key"]
    model = fed.scientist.get(f"/experiments/{fed.exp['id']}/model")
    assert model.status_code == 200 and model.headers[Header.CONTENT_SHA256] == done["global_digest"]
    expected = (_weights(1)["w"] + _weights(2)["w"]) / 2
    from laulima.core.weights import from_safetensors

    np.testing.assert_allclose(from_safetensors(model.content)["w"], expected, rtol=1e-6)


def test_a_tampered_blob_is_detected_on_download(fed: Federation):
    blobs = StoredBlobs(fed.hub.settings)
    blobs.flip(fed.ta.weights_digest, len(blobs.read(fed.ta.weights_digest)) // 2)
    r = fed.a.get(f"/blobs/{fed.ta.weights_digest}")
    assert r.status_code == 500 and r.json()["error"] == "blob_integrity"
    assert "failed authentication" in r.json()["detail"]


def test_a_tampered_update_is_detected_at_aggregation(fed: Federation):
    accepted = fed.upload(fed.a, fed.ta, _update(1)).json()["digest"]
    StoredBlobs(fed.hub.settings).flip(accepted, 100)
    assert fed.upload(fed.b, fed.tb, _update(2)).status_code == 200
    failed = fed.wait_status("failed")
    assert "BlobIntegrityError" in failed["error"] and "failed authentication" in failed["error"]


def test_upload_rate_limit_answers_429_to_the_flooder_only(tmp_path: Path):
    hub = start_tls_hub(tmp_path, site_uploads_per_minute=1, site_upload_burst=1)
    try:
        fed = Federation(hub)
        assert fed.upload(fed.a, fed.ta, _update(1), nonce="bad").status_code == 403  # spends a's only token
        flood = fed.upload(fed.a, fed.ta, _update(1))
        assert flood.status_code == 429 and int(flood.headers["Retry-After"]) >= 1
        assert fed.upload(fed.b, fed.tb, _update(2)).status_code == 200  # b is not starved
    finally:
        hub.stop()


def test_concurrent_transfers_per_site_are_capped(tmp_path: Path):
    hub = start_tls_hub(tmp_path, site_max_transfers=1)
    try:
        fed = Federation(hub, n=8_000_000)  # 32 MB: more than the socket buffers hold
        with fed.a.stream("GET", f"/blobs/{fed.ta.weights_digest}") as held:
            assert held.status_code == 200
            r = fed.hub.site("site-a").get(f"/blobs/{fed.ta.weights_digest}")
            assert r.status_code == 429 and r.headers["Retry-After"] == "1"
            assert fed.b.get(f"/blobs/{fed.tb.weights_digest}").status_code == 200
            held.read()
        assert fed.a.get(f"/blobs/{fed.ta.weights_digest}").status_code == 200  # slot released
    finally:
        hub.stop()


def _raw_tls(hub: TLSHub, site: str) -> ssl.SSLSocket:
    ctx = hub.context(hub.certs[site])
    sock = socket.create_connection(("127.0.0.1", hub.settings.port), timeout=10)
    return ctx.wrap_socket(sock, server_hostname="127.0.0.1")


def test_json_bodies_are_limited_and_a_stalled_body_times_out(tmp_path: Path):
    hub = start_tls_hub(tmp_path, max_json_bytes=1024, body_timeout_s=0.5)
    try:
        fed = Federation(hub)
        r = fed.a.post(f"/tasks/{fed.ta.id}/failure", json={"reason": "x" * 2000})
        assert r.status_code == 413
        tls = _raw_tls(hub, "site-a")
        tls.sendall(
            f"POST /api/v1/tasks/{fed.ta.id}/failure HTTP/1.1\r\nHost: hub\r\nContent-Type: application/json\r\n"
            'Content-Length: 100\r\n\r\n{"reason": '.encode()
        )
        answer = tls.recv(4096).decode(errors="replace")
        assert answer.startswith("HTTP/1.1 408"), answer
        tls.close()
        tls = _raw_tls(hub, "site-a")  # a stalled upload: aborted, and the task can still be answered
        tls.sendall(
            f"PUT /api/v1/tasks/{fed.ta.id}/update HTTP/1.1\r\nHost: hub\r\n{Header.UPLOAD_NONCE}: "
            f"{fed.ta.upload_nonce}\r\nContent-Length: 1000000\r\n\r\n".encode()
            + b"\0" * 1000
        )
        answer = tls.recv(4096).decode(errors="replace")
        assert answer.startswith("HTTP/1.1 408"), answer
        tls.close()
        assert fed.upload(fed.a, fed.ta, _update(1)).status_code == 200
    finally:
        hub.stop()
