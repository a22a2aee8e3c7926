"""A real PostgreSQL server for the tests: a throwaway cluster on a free loopback port.

``initdb`` makes the cluster in a temporary folder, ``postgres`` serves it on 127.0.0.1 (and
a Unix socket in the same folder), and everything is removed afterwards. PostgreSQL refuses
to run as root, so under root (CI) the server runs as the ``postgres`` user that Debian's
package creates. Durability is switched off (``fsync=off``): these databases live for one
test session, and the hub's own crash tests kill hub processes, never this server.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

__all__ = ["PostgresServer", "PostgresUnavailable", "postgres_server"]

INSTALL_HINT = "install Debian's `postgresql` package (`make test` does: apt-get install postgresql)"


class PostgresUnavailable(RuntimeError):
    """The server could not be started; the message names what is missing."""


@dataclass(frozen=True)
class PostgresServer:
    host: str
    port: int
    user: str
    bin_dir: Path

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{self.user}@{self.host}:{self.port}/{database}"

    def create_database(self, name: str, *, template: str | None = None) -> str:
        """A new database, empty or a copy of ``template``; returns its SQLAlchemy URL."""
        self._admin(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
        return self.url(name)

    def drop_database(self, name: str) -> None:
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(host=self.host, port=self.port, user=self.user, dbname="postgres", autocommit=True) as c:
            c.execute(sql)  # type: ignore[arg-type]  # names come from the tests, never from outside


def _bin_dir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("postgres")
    if on_path and shutil.which("initdb"):
        return Path(on_path).parent
    raise PostgresUnavailable(f"PostgreSQL's server programs (initdb, postgres) were not found; {INSTALL_HINT}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def postgres_server(timeout: float = 60.0) -> Iterator[PostgresServer]:
    """Start a cluster, yield it, stop it and remove its files."""
    try:
        import psycopg
    except ImportError as exc:
        raise PostgresUnavailable("the psycopg driver is missing: pip install 'laulima[postgres]'") from exc
    bin_dir = _bin_dir()
    as_user: list[str] = []
    owner: pwd.struct_passwd | None = None
    if os.geteuid() == 0:  # PostgreSQL will not run as root
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError as exc:
            raise PostgresUnavailable(
                f"running as root, and there is no `postgres` user to run the server as; {INSTALL_HINT}"
            ) from exc
        as_user = ["setpriv", f"--reuid={owner.pw_uid}", f"--regid={owner.pw_gid}", "--init-groups"]
    root = Path(tempfile.mkdtemp(prefix="laulima-pg-"))
    data = root / "data"
    if owner is not None:
        os.chown(root, owner.pw_uid, owner.pw_gid)
    user = "laulima"
    env = {**os.environ, "LC_ALL": "C", "TZ": "UTC"}
    init = subprocess.run(
        [*as_user, str(bin_dir / "initdb"), "-D", str(data), "-U", user, "--auth=trust", "-E", "UTF8", "--no-sync"],
        capture_output=True,
        text=True,
        env=env,
    )
    if init.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        raise PostgresUnavailable(f"initdb failed ({init.returncode}): {init.stderr.strip()[-2000:]}")
    port = _free_port()
    log = (root / "server.log").open("wb")
    if owner is not None:
        os.chown(root / "server.log", owner.pw_uid, owner.pw_gid)
    server = subprocess.Popen(
        [
            *as_user,
            str(bin_dir / "postgres"),
            "-D", str(data),
            "-h", "127.0.0.1",
            "-p", str(port),
            "-k", str(root),
            "-c", "fsync=off",
            "-c", "synchronous_commit=off",
            "-c", "full_page_writes=off",
            "-c", "max_connections=400",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )  # fmt: skip
    log.close()
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(host="127.0.0.1", port=port, user=user, dbname="postgres", connect_timeout=2):
                    break
            except psycopg.OperationalError as exc:
                if server.poll() is not None or time.monotonic() > deadline:
                    tail = (root / "server.log").read_text(errors="replace")[-2000:]
                    raise PostgresUnavailable(f"PostgreSQL did not start on 127.0.0.1:{port}: {exc}\n{tail}") from exc
                time.sleep(0.1)
        yield PostgresServer("127.0.0.1", port, user, bin_dir)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        shutil.rmtree(root, ignore_errors=True)
