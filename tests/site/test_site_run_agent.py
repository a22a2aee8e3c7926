"""`run_agent` as a real process: SIGTERM ends it promptly, one agent per site home."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from laulima.site.settings import write_site_config

START = "from laulima.site.settings import SiteSettings; from laulima.site.agent import run_agent; "


@pytest.fixture
def silent_hub() -> Iterator[int]:
    """A port that accepts connections and never answers: every long poll hangs."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield s.getsockname()[1]


def start_agent(home: Path) -> subprocess.Popen[str]:
    code = START + f"run_agent(SiteSettings.load({str(home)!r}))"
    return subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)


def wait_for_log(home: Path, proc: subprocess.Popen[str], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if (home / "agent.lock").exists() and (home / "agent.lock").read_text().strip() == str(proc.pid):
            return
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    raise AssertionError("agent did not start")


def test_sigterm_during_a_long_poll_stops_the_agent_at_once(tmp_path: Path, silent_hub: int):
    write_site_config(tmp_path, "site-a", f"http://127.0.0.1:{silent_hub}", "tok", poll_wait_s=20)
    proc = start_agent(tmp_path)
    try:
        wait_for_log(tmp_path, proc)
        time.sleep(0.5)  # inside the long poll now
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(5) == 0
        assert time.monotonic() - started < 2.0
        assert "agent stopped" in proc.stderr.read()
    finally:
        proc.kill()


def test_sigterm_during_backoff_and_a_second_agent_is_refused(tmp_path: Path):
    with socket.socket() as s:  # a port nobody listens on: connection refused, backoff
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    write_site_config(tmp_path, "site-a", f"http://127.0.0.1:{port}", "tok")
    proc = start_agent(tmp_path)
    try:
        wait_for_log(tmp_path, proc)
        second = start_agent(tmp_path)
        assert second.wait(10) != 0
        assert "another agent is already running" in second.stderr.read()
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(5) == 0
    finally:
        proc.kill()
