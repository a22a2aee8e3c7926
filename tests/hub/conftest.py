"""A real hub app in process (TestClient), with a clock the tests move, and helpers to play sites."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from laulima.core.protocol import API_PREFIX, Header, MetaKey, TaskPublic
from laulima.core.weights import Weights, to_safetensors
from laulima.hub.app import create_app
from laulima.hub.db import SessionFactory, make_engine, make_session_factory, migrate
from laulima.hub.settings import HubSettings
from tests.helpers.stored_blobs import StoredBlobs

ADMIN_TOKEN = "test-operator-token-0123456789"


class FakeClock:
    """Wall-clock time plus an offset the test controls: deadlines pass on demand."""

    def __init__(self) -> None:
        self.offset = 0.0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.offset += seconds


class SteppedClock:
    """A clock that stands still until the test moves ``now`` (leases, pins)."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture()
def hub_sessions(tmp_path: Path) -> Iterator[SessionFactory]:
    """A migrated hub database of the run's backend (PostgreSQL under --hub-backend=postgres-s3)."""
    engine = make_engine(os.environ.get("LAULIMA_HUB_DATABASE_URL") or f"sqlite:///{tmp_path / 'hub.db'}")
    migrate(engine)
    yield make_session_factory(engine)
    engine.dispose()


def make_weights(seed: int = 0) -> Weights:
    rng = np.random.default_rng(seed)
    return {
        "conv.weight": rng.standard_normal((4, 3, 3), dtype=np.float32),
        "conv.bias": rng.standard_normal(4, dtype=np.float32),
        "fc.weight": rng.standard_normal((2, 6), dtype=np.float32),
    }


def update_bytes(
    weights: Weights, n_samples: Any = 10, metrics: dict[str, Any] | None = None, **extra_meta: str
) -> bytes:
    meta: dict[str, str] = {}
    if n_samples is not None:
        meta[MetaKey.N_SAMPLES] = str(n_samples)
    meta[MetaKey.METRICS] = json.dumps(metrics if metrics is not None else {"loss": 0.5})
    meta.update(extra_meta)
    return to_safetensors(weights, meta)


def spec(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "exp",
        "algorithm": "laulima.algorithms.identity:Identity",
        "dataset": "brains",
        "sites": ["site-a", "site-b"],
        "rounds": 1,
        "min_sites": 1,
        "round_timeout_s": 60.0,
        "evaluation": {"every": 0, "final": False},
    }
    base.update(overrides)
    return base


@dataclass
class Hub:
    client: TestClient
    clock: FakeClock
    home: Path
    tokens: dict[str, str] = field(default_factory=dict)
    stopped: bool = False

    def stop(self) -> None:
        """Shut the app down as a process exit would (lifespan shutdown)."""
        if not self.stopped:
            self.stopped = True
            self.client.__exit__(None, None, None)

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {ADMIN_TOKEN}"}

    def site(self, name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[name]}"}

    @property
    def stored(self) -> StoredBlobs:
        """The hub's blob storage (folder or bucket), to inspect or damage behind its back."""
        return StoredBlobs(hub_settings(self.home))

    def url(self, path: str) -> str:
        return f"{API_PREFIX}{path}"

    def register(self, *names: str) -> None:
        for name in names:
            r = self.client.post(self.url("/sites"), json={"name": name}, headers=self.admin)
            assert r.status_code == 201, r.text
            self.tokens[name] = r.json()["token"]
            self.connect(name)

    def connect(self, name: str) -> None:
        """The site's agent says hello (an empty poll): rounds select only sites the hub has heard from."""
        r = self.client.get(self.url("/tasks/next"), params={"wait": 0}, headers=self.site(name))
        assert r.status_code == 204, r.text

    def person(self, name: str, role: str = "scientist") -> dict[str, str]:
        """Headers with a new API token of the person ``name``."""
        r = self.client.post(self.url("/tokens"), json={"name": name, "role": role}, headers=self.admin)
        assert r.status_code == 201, r.text
        return {"Authorization": f"Bearer {r.json()['token']}"}

    def upload_blob(self, data: bytes) -> str:
        r = self.client.put(self.url("/blobs"), content=data, headers=self.admin)
        assert r.status_code == 201, r.text
        return r.json()["digest"]

    def submit(self, spec_: dict[str, Any], weights: Weights) -> dict[str, Any]:
        digest = self.upload_blob(to_safetensors(weights))
        r = self.client.post(
            self.url("/experiments"), json={"spec": spec_, "initial_weights": digest}, headers=self.admin
        )
        assert r.status_code == 201, r.text
        return r.json()

    def experiment(self, exp_id: int) -> dict[str, Any]:
        r = self.client.get(self.url(f"/experiments/{exp_id}"), headers=self.admin)
        assert r.status_code == 200, r.text
        return r.json()

    def get(self, path: str) -> Any:
        r = self.client.get(self.url(path), headers=self.admin)
        assert r.status_code == 200, r.text
        return r.json()

    def next_task(self, site: str, wait: float = 5.0) -> TaskPublic | None:
        r = self.client.get(self.url("/tasks/next"), params={"wait": wait}, headers=self.site(site))
        if r.status_code == 204:
            return None
        assert r.status_code == 200, r.text
        return TaskPublic.model_validate(r.json())

    def download(self, site: str, digest: str) -> Weights:
        from laulima.core.weights import from_safetensors

        r = self.client.get(self.url(f"/blobs/{digest}"), headers=self.site(site))
        assert r.status_code == 200, r.text
        return from_safetensors(r.content)

    def upload(self, site: str, task: TaskPublic, body: bytes, nonce: str | None = None, **headers: str) -> Any:
        h = {**self.site(site), Header.UPLOAD_NONCE.value: nonce or task.upload_nonce, **headers}
        return self.client.put(self.url(f"/tasks/{task.id}/update"), content=body, headers=h)

    def wait_for(self, condition: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            time.sleep(0.02)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")

    def wait_status(self, exp_id: int, status: str, timeout: float = 10.0) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            exp = self.experiment(exp_id)
            return exp if exp["status"] == status else None

        return self.wait_for(check, f"experiment {exp_id} to become {status}", timeout)


def hub_settings(home: Path, **overrides: Any) -> HubSettings:
    values: dict[str, Any] = {
        "home": home,
        "admin_token": ADMIN_TOKEN,
        "orchestrator_tick_s": 0.05,
        "long_poll_max_s": 5.0,
        "requests_per_minute": 600_000.0,  # tests poll the API in tight loops; the limit has its own test
        "request_burst": 10_000,
    }
    values.update(overrides)
    return HubSettings(**values)


@pytest.fixture()
def make_hub(tmp_path: Path) -> Iterator[Callable[..., Hub]]:
    """Factory: start a hub app on ``tmp_path/hub`` (again, to test restarts)."""
    hubs: list[Hub] = []
    clock = FakeClock()

    def start(**overrides: Any) -> Hub:
        home = tmp_path / "hub"
        client = TestClient(create_app(hub_settings(home, **overrides), clock=clock))
        client.__enter__()
        hubs.append(Hub(client=client, clock=clock, home=home))
        return hubs[-1]

    yield start
    for h in hubs:
        h.stop()


@pytest.fixture()
def hub(make_hub: Callable[..., Hub]) -> Hub:
    h = make_hub()
    h.register("site-a", "site-b", "site-c")
    return h
