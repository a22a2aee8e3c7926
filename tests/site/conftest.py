"""Fixtures for the site tests: tasks, weights on disk, and misbehaving algorithms."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from laulima.core.protocol import TaskKind, TaskPublic
from laulima.core.weights import sha256_hex, to_safetensors

HELPERS = Path(__file__).resolve().parent / "helper_pkg"
WEIGHTS = {"w": np.arange(4, dtype=np.float32), "b": np.ones(2, dtype=np.float32)}


@pytest.fixture
def helper_algorithms(monkeypatch: pytest.MonkeyPatch) -> str:
    """Put the helper algorithms on sys.path only; returns the module name."""
    monkeypatch.syspath_prepend(str(HELPERS))
    return "site_test_algorithms"


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
