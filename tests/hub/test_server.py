"""The hub as a real process under uvicorn: streamed bodies over real sockets, and kill -9."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from laulima.core.protocol import API_PREFIX, Header, TaskPublic
from laulima.core.weights import to_safetensors

from .conftest import ADMIN_TOKEN, spec, update_bytes

SERVE = "from laulima.hub.server import serve; from laulima.hub.settings import HubSettings; serve(HubSettings())"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class HubProcess:
    def __init__(self, home: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}{API_PREFIX}"
        self.env = {
            **os.environ,
            "LAULIMA_HUB_HOME": str(home),
            "LAULIMA_HUB_PORT": str(self.port),
            "LAULIMA_HUB_ADMIN_TOKEN": ADMIN_TOKEN,
            "LAULIMA_HUB_ORCHESTRATOR_TICK_S": "0.05",
        }
        self.log = home.parent / "hub.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-c", SERVE], env=self.env, stdout=log, stderr=log)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.05)
        raise AssertionError(f"hub did not start:\n{self.log.read_text()[-3000:]}")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture()
def hub_process(tmp_path: Path) -> Iterator[HubProcess]:
    hub = HubProcess(tmp_path / "hub")
    hub.start()
    yield hub
    hub.stop()


def _weights(seed: int, n: int = 250_000) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"w": rng.standard_normal(n, dtype=np.float32), "b": rng.standard_normal(8, dtype=np.float32)}


def test_streamed_uploads_refusals_and_kill_9_over_real_http(hub_process: HubProcess):
    admin = httpx.Client(base_url=hub_process.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30)
    tokens = {n: admin.post("/sites", json={"name": n}).json()["token"] for n in ("site-a", "site-b")}
    site = {
        n: httpx.Client(base_url=hub_process.url, headers={"Authorization": f"Bearer {t}"}, timeout=30)
        for n, t in tokens.items()
    }
    for client in site.values():  # the agents connect: rounds select sites the hub has heard from
        assert client.get("/tasks/next", params={"wait": 0}).status_code == 204
    digest = admin.put("/blobs", content=to_safetensors(_weights(0))).json()["digest"]
    exp = admin.post("/experiments", json={"spec": spec(rounds=1), "initial_weights": digest}).json()
    ta = TaskPublic.model_validate(site["site-a"].get("/tasks/next", params={"wait": 5}).json())
    tb = TaskPublic.model_validate(site["site-b"].get("/tasks/next", params={"wait": 5}).json())
    body = update_bytes(_weights(1))

    def chunked(data: bytes, size: int = 1 << 20) -> Iterator[bytes]:
        for i in range(0, len(data), size):
            yield data[i : i + size]

    # refused before the body is read: the client still gets the answer, not a broken pipe
    r = site["site-a"].put(f"/tasks/{ta.id}/update", content=chunked(body), headers={Header.UPLOAD_NONCE: "bad"})
    assert r.status_code == 403
    r = site["site-a"].put(
        f"/tasks/{ta.id}/update", content=chunked(body), headers={Header.UPLOAD_NONCE: ta.upload_nonce}
    )
    assert r.status_code == 200, r.text
    accepted = r.json()["digest"]
    with site["site-a"].stream("GET", f"/blobs/{ta.weights_digest}") as download:
        assert download.headers[Header.CONTENT_SHA256] == ta.weights_digest
        assert sum(len(c) for c in download.iter_raw()) == ta.weights_size
    # too big, counted while streaming: refused, and site-b's part in the round ends there
    too_big = body + b"\0" * (2 << 20)
    r = site["site-b"].put(
        f"/tasks/{tb.id}/update", content=chunked(too_big), headers={Header.UPLOAD_NONCE: tb.upload_nonce}
    )
    assert r.status_code == 413
    r = site["site-b"].put(f"/tasks/{tb.id}/update", content=too_big, headers={Header.UPLOAD_NONCE: tb.upload_nonce})
    assert r.status_code == 409 and "the hub refused its result" in r.json()["detail"]

    hub_process.kill9()  # site-a's update is accepted and site-b's task ended: the checkpoint may be lost
    hub_process.start()
    again = site["site-a"].put(f"/tasks/{ta.id}/update", content=body, headers={Header.UPLOAD_NONCE: ta.upload_nonce})
    assert again.status_code == 409 and again.json()["context"]["accepted_digest"] == accepted
    deadline = time.monotonic() + 10
    while admin.get(f"/experiments/{exp['id']}").json()["status"] != "completed":
        assert time.monotonic() < deadline, admin.get(f"/experiments/{exp['id']}").json()
        time.sleep(0.05)
    assert [x["n_updates"] for x in admin.get(f"/experiments/{exp['id']}/rounds").json()] == [1]
    assert [x["status"] for x in admin.get(f"/experiments/{exp['id']}/refusals").json()] == [403, 413, 409, 409]
