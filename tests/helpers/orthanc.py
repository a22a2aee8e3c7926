"""A real Orthanc PACS with its DICOMweb plugin, started for the tests on a free loopback port.

The DICOMweb source is tested against a real server, not a mock, because the parts most
likely to go wrong (QIDO paging and filters, WADO-RS multipart, STOW-RS replies) are the
server's behaviour. Each server lives in its own temporary folder (storage, index, config,
log) and is gone when it stops. Orthanc has no bind-address option, so
``RemoteAccessAllowed: false`` is what keeps it to this machine; the DICOM (DIMSE) server
is disabled, and only the DICOMweb plugin is loaded.

A machine without Orthanc fails the tests that need it, with the command that installs it:
a skipped PACS test would let a broken DICOMweb source pass CI unnoticed.
"""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "ORTHANC_BINARY",
    "ORTHANC_DICOMWEB_PLUGIN",
    "OrthancServer",
    "OrthancUnavailable",
    "orthanc_server",
    "tls_proxy",
]

ORTHANC_BINARY = Path("/usr/sbin/Orthanc")  # Debian package `orthanc`
ORTHANC_DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")  # package `orthanc-dicomweb`
INSTALL_HINT = "run `apt-get install orthanc orthanc-dicomweb` (make test does it)"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


class OrthancUnavailable(RuntimeError):
    """Orthanc is not installed or would not start; the message says what to do."""


class OrthancServer:
    """One Orthanc process; ``url`` is its REST root, ``dicomweb_url`` its DICOMweb root."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = folder / "orthanc.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def source_url(self) -> str:
        """The Laulima dataset source naming this server (add ``?Key=value`` filters)."""
        return f"dicomweb+{self.dicomweb_url}"

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def _write_config(self) -> Path:
        config = {
            "Name": "laulima-test-pacs",
            "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "index"),
            "TemporaryDirectory": str(self.folder / "tmp"),
            "Plugins": [str(ORTHANC_DICOMWEB_PLUGIN)],  # this plugin only, no folder scanning
            "HttpServerEnabled": True,
            "HttpPort": self.port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": False,
            "OrthancExplorerEnabled": False,
            "WebDavEnabled": False,
            "ExecuteLuaEnabled": False,
            "SaveJobs": False,
            "HttpThreadsCount": 8,
            "ConcurrentJobs": 1,
            "StorageCompression": False,
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False, "Host": "127.0.0.1"},
        }
        for name in ("storage", "index", "tmp"):
            (self.folder / name).mkdir(exist_ok=True)
        path = self.folder / "orthanc.json"
        path.write_text(json.dumps(config, indent=2))
        return path

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/system", timeout=2) as response:  # noqa: S310 - loopback
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def start(self) -> None:
        """Start on a free port and wait until ``GET /system`` answers; a few tries if the port is taken."""
        missing = [str(p) for p in (ORTHANC_BINARY, ORTHANC_DICOMWEB_PLUGIN) if not p.exists()]
        if missing:
            raise OrthancUnavailable(f"Orthanc is not installed: {INSTALL_HINT}; missing {', '.join(missing)}")
        problem = ""
        for _attempt in range(3):
            self.port = _free_port()
            config = self._write_config()
            log = self.log_path.open("ab")
            try:
                self.process = subprocess.Popen(
                    [str(ORTHANC_BINARY), "--no-jobs", str(config)],
                    cwd=self.folder, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                )  # fmt: skip
            finally:
                log.close()
            deadline = time.monotonic() + START_TIMEOUT_S
            while time.monotonic() < deadline:
                if self._answers():
                    return
                if self.process.poll() is not None:
                    problem = f"Orthanc exited with status {self.process.returncode}"
                    break
                time.sleep(0.05)
            else:
                problem = f"Orthanc did not answer GET /system within {START_TIMEOUT_S:.0f} s"
            self.stop()
        raise OrthancUnavailable(f"{problem} (port {self.port}, config {self.folder / 'orthanc.json'}); "
                           f"its log ends with:\n{self.log_tail()}")  # fmt: skip

    def stop(self) -> None:
        """Terminate, then kill if it does not exit in time. Safe to call twice."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT_S)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def orthanc_server() -> Iterator[OrthancServer]:
    """A running Orthanc in a fresh temporary folder; stopped and removed on exit."""
    folder = Path(tempfile.mkdtemp(prefix="laulima-orthanc-"))
    server = OrthancServer(folder)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def tls_proxy(upstream_port: int, cert_file: Path, key_file: Path) -> Iterator[int]:
    """An https front for a loopback http server (as a hospital's reverse proxy would be); its port.

    Orthanc can serve https itself, but Debian bookworm's Orthanc 1.10.1 crashes (SIGSEGV)
    on the first TLS connection, so certificate checking is tested through this proxy.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert_file), str(key_file))
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stopping = threading.Event()

    def pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def serve(raw: socket.socket) -> None:
        try:
            client = context.wrap_socket(raw, server_side=True)
        except (OSError, ssl.SSLError):  # the client refused our certificate: what a test may want
            raw.close()
            return
        with client, socket.create_connection(("127.0.0.1", upstream_port)) as upstream:
            back = threading.Thread(target=pump, args=(upstream, client), daemon=True)
            back.start()
            pump(client, upstream)
            back.join(timeout=STOP_TIMEOUT_S)

    def accept() -> None:
        while not stopping.is_set():
            try:
                raw, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            raw.settimeout(None)
            threading.Thread(target=serve, args=(raw,), daemon=True).start()

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stopping.set()
        acceptor.join(timeout=STOP_TIMEOUT_S)
        listener.close()
