"""Fixtures for the site tests: tasks, weights on disk, misbehaving algorithms, a real hub app."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from laulima.algorithms.bundle import PackedBundle, pack, unpack
from laulima.core.protocol import API_PREFIX, TaskKind, TaskPublic
from laulima.core.weights import sha256_hex, to_safetensors

HELPERS = Path(__file__).resolve().parent / "helper_pkg"
WEIGHTS = {"w": np.arange(4, dtype=np.float32), "b": np.ones(2, dtype=np.float32)}


@pytest.fixture
def helper_algorithms(monkeypatch: pytest.MonkeyPatch) -> str:
    """Put the helper algorithms on sys.path only; returns the module name.

    A site runs only built-ins and bundles, so this makes them importable by name, nothing
    more: tests that run them pass :func:`helper_bundle` as the task's ``bundle_dir``."""
    monkeypatch.syspath_prepend(str(HELPERS))
    return "site_test_algorithms"


def packed_helpers(module: str = "site_test_algorithms", entry: str = "Echo") -> PackedBundle:
    """``helper_pkg/<module>.py`` packed as a scientist would (any class of it runs from it)."""
    return pack(HELPERS / f"{module}.py", f"{module}:{entry}")


def unpacked(bundle: PackedBundle, cache: Path) -> Path:
    """The bundle unpacked into ``cache`` as the agent does: the ``bundle_dir`` of a task."""
    return unpack(bundle.data, bundle.digest, cache)


def admit_helpers(home: Path) -> str:
    """Write the site's ``policy.toml`` admitting the helper bundle by digest (the default policy
    admits built-ins only; anything else waits for an administrator); return the digest."""
    digest = packed_helpers().digest
    home.mkdir(parents=True, exist_ok=True)
    policy = home / "policy.toml"
    policy.write_text(f'[algorithms]\ndigests = ["{digest}"]\n')
    policy.chmod(0o600)
    return digest


@pytest.fixture(scope="session")
def helper_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The helper algorithms (``site_test_algorithms:*``) as an unpacked bundle: a task's ``bundle_dir``."""
    return unpacked(packed_helpers(), tmp_path_factory.mktemp("bundles"))


@pytest.fixture
def weights_blob() -> bytes:
    return to_safetensors(WEIGHTS)


@pytest.fixture
def make_task(weights_blob: bytes) -> Callable[..., TaskPublic]:
    def make(**overrides: Any) -> TaskPublic:
        fields: dict[str, Any] = {
            "id": "t-1",
            "experiment_id": 1,
            "experiment_name": "exp",
            "round": 2,
            "kind": TaskKind.TRAIN,
            "algorithm": "site_test_algorithms:Echo",
            "dataset": "ds",
            "config": {"local_epochs": 3, "proximal_mu": 0.25, "seed": 5, "params": {"lr": 0.5}},
            "weights_digest": sha256_hex(weights_blob),
            "weights_size": len(weights_blob),
            "deadline": time.time() + 600,
            "seconds_left": 600.0,
            "time_limit_s": 60.0,
            "upload_nonce": "nonce-1",
        }
        fields.update(overrides)
        return TaskPublic(**fields)

    return make


def _running(pid: int) -> bool:
    """Alive and not a zombie."""
    if Path("/proc/self/stat").exists():
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
        except OSError:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def all_gone() -> Callable[..., bool]:
    """``all_gone(*pids)``: True once none of those processes runs (waits up to 3 s)."""

    def check(*pids: int) -> bool:
        end = time.monotonic() + 3.0
        while any(_running(pid) for pid in pids):
            if time.monotonic() > end:
                return False
            time.sleep(0.02)
        return True

    return check


HUB_OPERATOR_TOKEN = "site-tests-operator-token-0123456789"


class RealHub:
    """The hub's own app in process (FastAPI TestClient, an ``httpx.Client``): agents talk to it
    through ``HubClient(client=hub.http)``; the tests play operator and scientist."""

    def __init__(self, home: Path) -> None:
        from fastapi.testclient import TestClient

        from laulima.hub.app import create_app
        from laulima.hub.settings import HubSettings

        settings = HubSettings(
            home=home,
            admin_token=HUB_OPERATOR_TOKEN,
            orchestrator_tick_s=0.05,
            long_poll_max_s=0.2,
            requests_per_minute=60_000,  # the tests poll the hub's state in a tight loop
            request_burst=10_000,
        )
        self.http = TestClient(create_app(settings))
        self.http.__enter__()
        self.admin = {"Authorization": f"Bearer {HUB_OPERATOR_TOKEN}"}

    def close(self) -> None:
        self.http.__exit__(None, None, None)

    def call(self, method: str, path: str, expect: int = 200, **kw: Any) -> Any:
        r = self.http.request(method, f"{API_PREFIX}{path}", headers=self.admin, **kw)
        assert r.status_code == expect, f"{method} {path}: {r.status_code} {r.text}"
        return r.json() if r.content else None

    def register(self, name: str) -> str:
        """A site in token mode; returns its token."""
        return self.call("POST", "/sites", 201, json={"name": name})["token"]

    def submit(self, name: str, weights: bytes, **spec: Any) -> int:
        """Submit a one-round experiment of the Echo algorithm on dataset ``ds``; its id.

        Echo comes as a scientist's bundle (:func:`packed_helpers`), uploaded as a blob and
        named by digest: sites run nothing else but built-ins."""
        digest = self.call("PUT", "/blobs", 201, content=weights)["digest"]
        bundle = packed_helpers()
        assert self.call("PUT", "/blobs", 201, content=bundle.data)["digest"] == bundle.digest
        body = {
            "name": name,
            "algorithm": "site_test_algorithms:Echo",
            "bundle": bundle.digest,
            "dataset": "ds",
            "sites": ["site-a"],
            "rounds": 1,
            "min_sites": 1,
            "round_timeout_s": 120.0,
            "evaluation": {"every": 0, "final": False},
            **spec,
        }
        return int(self.call("POST", "/experiments", 201, json={"spec": body, "initial_weights": digest})["id"])

    def wait_for(self, condition: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if value := condition():
                return value
            time.sleep(0.05)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture
def real_hub(tmp_path: Path) -> Iterator[RealHub]:
    hub = RealHub(tmp_path / "hub")
    yield hub
    hub.close()
