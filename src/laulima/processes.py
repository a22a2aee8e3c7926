"""Hub and site agents as real operating-system processes on loopback.

Used by ``laulima sim`` / ``laulima demo`` and by the integration tests, which kill and
restart these processes to prove that nothing is lost.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import httpx

from laulima.errors import TransportError

__all__ = ["HubProcess", "SiteProcess", "SiteUiProcess", "free_port", "log_tail"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def log_tail(path: Path, n: int = 30) -> str:
    """The last ``n`` lines of the log file at ``path``."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except FileNotFoundError:
        return "(no log)"


class _Process:
    """A child running ``python -m laulima.cli ...`` with its output in a log file."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str]) -> None:
        self.args = args
        self.log_path = log_path
        self.env = env
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "laulima.cli", *self.args],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        log.close()

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole process group: no clean-up code runs (crash tests)."""
        if self.popen is not None and self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if it does not exit in time."""
        if self.popen is None or self.popen.poll() is not None:
            return
        os.killpg(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def log_tail(self, n: int = 30) -> str:
        return log_tail(self.log_path, n)


class HubProcess(_Process):
    """``laulima hub`` on a loopback port; HTTPS with client certificates when ``ca_dir`` is set.

    ``settings``: further ``LAULIMA_HUB_*`` variables (e.g. the connection limits a simulation
    of many sites needs, :func:`laulima.sim.simulation_hub_settings`).
    """

    def __init__(
        self,
        home: Path,
        port: int,
        admin_token: str,
        host: str = "127.0.0.1",
        ca_dir: Path | None = None,
        *,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        self.home = home
        self.port = port
        self.host = host
        self.admin_token = admin_token
        self.ca_dir = ca_dir
        env = {**(settings or {}), "LAULIMA_HUB_ADMIN_TOKEN": admin_token}
        if ca_dir is not None:
            env["LAULIMA_HUB_CA_DIR"] = str(ca_dir)
        super().__init__(["hub", "--home", str(home), "--host", host, "--port", str(port)], home / "hub.log", env)

    @property
    def url(self) -> str:
        return f"{'https' if self.ca_dir else 'http'}://{self.host}:{self.port}"

    @property
    def ca_file(self) -> Path | None:
        return self.ca_dir / "ca.pem" if self.ca_dir else None

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        verify: object = ssl.create_default_context(cafile=str(self.ca_file)) if self.ca_file else True
        while time.monotonic() < deadline:
            if not self.alive:
                raise TransportError(f"hub process exited during start-up:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/api/v1/health", timeout=1.0, verify=verify).status_code == 200:  # type: ignore[arg-type]
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TransportError(f"hub did not answer on {self.url} within {timeout:.0f} s:\n{self.log_tail()}")


class SiteProcess(_Process):
    """``laulima site run`` for one configured site home."""

    def __init__(self, home: Path, name: str) -> None:
        self.home = home
        self.name = name
        super().__init__(["site", "run", "--home", str(home)], home / "agent.log", {})


class SiteUiProcess(_Process):
    """``laulima site ui`` (the site dashboard) for one site home, on a loopback port."""

    def __init__(self, home: Path, port: int) -> None:
        self.home = home
        self.port = port
        super().__init__(["site", "ui", "--home", str(home), "--port", str(port)], home / "ui.log", {})

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive:
                raise TransportError(f"site dashboard exited during start-up:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/login", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TransportError(f"site dashboard did not answer on {self.url} within {timeout:.0f} s:\n{self.log_tail()}")
