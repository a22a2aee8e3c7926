"""A real S3 server (moto in server mode) started for the tests on a free loopback port.

The S3 blob store is tested against a server process speaking HTTP, not an in-process mock
of boto3, because what matters (ranged GETs, multipart uploads, conditional writes, error
codes on the wire) is the conversation with a server. The server keeps everything in
memory and is gone when it stops; tests use distinct bucket names.

A machine without moto's server fails the tests that need it, with the command that
installs it: a skipped storage test would let a broken S3 store pass CI unnoticed.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["S3Unavailable", "s3_server"]

INSTALL_HINT = "pip install 'moto[server]' (make test installs it with the dev extra)"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


class S3Unavailable(RuntimeError):
    """moto's S3 server is not installed or would not start; the message says what to do."""


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/moto-api/data.json", timeout=2):  # noqa: S310 - loopback
            return True
    except urllib.error.HTTPError:
        return True  # it answered, even if not with 200
    except (urllib.error.URLError, OSError):
        return False


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def s3_server(*, authenticate: bool = False) -> Iterator[str]:
    """A running moto S3 server; yields its endpoint URL (``http://127.0.0.1:PORT``), stopped on exit.

    ``authenticate``: the server checks credentials as S3 does and knows none, so every
    request is refused (403): how a hub with a wrong key sees the world."""
    missing = [m for m in ("moto", "flask", "werkzeug", "boto3") if importlib.util.find_spec(m) is None]
    if missing:
        raise S3Unavailable(f"the S3 test server needs {', '.join(missing)}: {INSTALL_HINT}")
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0" if authenticate else "inf"}
    with tempfile.TemporaryDirectory(prefix="laulima-s3-") as folder:
        log_path = Path(folder) / "moto.log"
        problem = ""
        for _attempt in range(3):
            port = _free_port()
            url = f"http://127.0.0.1:{port}"
            with log_path.open("ab") as log:
                process = subprocess.Popen(
                    [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                    cwd=folder, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                )  # fmt: skip
            try:
                deadline = time.monotonic() + START_TIMEOUT_S
                while time.monotonic() < deadline:
                    if _answers(url):
                        yield url
                        return
                    if process.poll() is not None:
                        problem = f"moto.server exited with status {process.returncode}"
                        break
                    time.sleep(0.1)
                else:
                    problem = f"moto.server did not answer within {START_TIMEOUT_S:.0f} s"
            finally:
                _stop(process)
        tail = log_path.read_text(errors="replace")[-3000:] if log_path.exists() else "(no log)"
        raise S3Unavailable(f"{problem} (port {port}; {INSTALL_HINT}); its log ends with:\n{tail}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=STOP_TIMEOUT_S)
