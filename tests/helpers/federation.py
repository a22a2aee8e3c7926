"""Helpers for end-to-end tests against a LocalFederation."""

from __future__ import annotations

import time
from collections.abc import Callable

from laulima.core.protocol import ExperimentPublic
from laulima.sim import LocalFederation


def wait_for(condition: Callable[[], bool], timeout: float, what: str, poll_s: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def logs(fed: LocalFederation) -> str:
    parts = [f"--- hub ---\n{fed.hub.log_tail(40)}"]
    parts += [f"--- {name} ---\n{site.log_tail(20)}" for name, site in fed.sites.items()]
    return "\n".join(parts)


def assert_completed(exp: ExperimentPublic, fed: LocalFederation) -> None:
    assert exp.status == "completed", f"{exp.status}: {exp.error}\n{logs(fed)}"
