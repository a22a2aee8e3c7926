"""HubClient against httpx.MockTransport (retries, error translation, streaming checks) and, for
bounded downloads, against a real HTTP server."""

from __future__ import annotations

import hashlib
import http.server
import json
import logging
import stat
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest

from laulima import __version__
from laulima.core.protocol import EvaluationResult, FailureKind, Header, MetaKey, SiteReport, TaskFailure
from laulima.core.weights import to_safetensors
from laulima.errors import Conflict, DataError, Forbidden, NotFound, PayloadTooLarge, ProtocolError, TransportError
from laulima.site.client import HubClient

HUB = "http://hub.test"


def client_for(handler, **kw) -> HubClient:
    http = httpx.Client(transport=httpx.MockTransport(handler))
    return HubClient(HUB, "tok", client=http, backoff_base_s=0.001, backoff_max_s=0.01, **kw)


def error(status: int, detail: str, **context) -> httpx.Response:
    return httpx.Response(status, json={"error": "x", "detail": detail, "context": context})


def task_json(task) -> dict:
    return task.model_dump(mode="json")


def test_next_task_retries_connect_errors_then_succeeds(make_task):
    task = make_task()
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) < 3:
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(200, json=task_json(task))

    got = client_for(handler).next_task(5)
    assert got == task
    assert len(calls) == 3
    req = calls[-1]
    assert req.url.path == "/api/v1/tasks/next" and req.url.params["wait"] == "5"
    assert req.headers["Authorization"] == "Bearer tok"


def test_next_task_none_on_204_and_retries_503():
    statuses = iter([503, 502, 204])
    got = client_for(lambda r: httpx.Response(next(statuses))).next_task(0.5)
    assert got is None


def test_next_task_gives_up_when_stopped():
    client = client_for(lambda r: httpx.Response(503))
    client.stop.set()
    with pytest.raises(TransportError, match="unreachable after 1 tries"):
        client.next_task(1)


_STATUS = [(403, Forbidden), (404, NotFound), (409, Conflict), (413, PayloadTooLarge), (422, ProtocolError)]


@pytest.mark.parametrize(("status", "exc"), _STATUS)
def test_4xx_become_laulima_errors_with_the_hubs_detail(status, exc):
    client = client_for(lambda r: error(status, f"the hub says {status}", round=3))
    with pytest.raises(exc) as info:
        client.send_failure("t-9", TaskFailure(reason="x"))
    assert f"the hub says {status}" in str(info.value)
    assert "t-9" in str(info.value)
    assert info.value.context["status"] == status and info.value.context["round"] == 3


def test_401_names_the_token():
    with pytest.raises(Forbidden, match="token") as info:
        client_for(lambda r: error(401, "bad token")).next_task(1)
    assert info.value.context["status"] == 401


def test_non_json_error_page_still_gives_a_message():
    with pytest.raises(NotFound, match="no such thing"):
        client_for(lambda r: httpx.Response(404, text="no such thing")).send_failure("t", TaskFailure(reason="x"))


def test_download_streams_and_checks_sha256(tmp_path: Path):
    blob = b"x" * (3 << 20) + b"tail"
    digest = hashlib.sha256(blob).hexdigest()
    handler = lambda r: httpx.Response(200, content=blob, headers={Header.CONTENT_SHA256: digest})  # noqa: E731
    dest = tmp_path / "w.safetensors"
    assert client_for(handler).download_blob(digest, dest, len(blob)) == len(blob)
    assert dest.read_bytes() == blob
    assert list(tmp_path.iterdir()) == [dest]


def test_download_sha256_mismatch_removes_the_file(tmp_path: Path):
    digest = hashlib.sha256(b"expected").hexdigest()
    dest = tmp_path / "w.safetensors"
    with pytest.raises(DataError, match="sha256"):
        client_for(lambda r: httpx.Response(200, content=b"tampered")).download_blob(digest, dest)
    assert list(tmp_path.iterdir()) == []


def test_download_size_mismatch_is_refused(tmp_path: Path):
    digest = hashlib.sha256(b"abc").hexdigest()
    with pytest.raises(DataError, match="received 3 bytes"):
        client_for(lambda r: httpx.Response(200, content=b"abc")).download_blob(digest, tmp_path / "w", 4)
    assert list(tmp_path.iterdir()) == []


def test_download_retries_a_broken_stream(tmp_path: Path):
    blob = b"payload"
    digest = hashlib.sha256(blob).hexdigest()
    calls = []

    class Broken(httpx.SyncByteStream):
        def __iter__(self):
            yield b"pay"
            raise httpx.ReadError("connection reset")

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        if len(calls) == 1:
            return httpx.Response(200, stream=Broken())
        return httpx.Response(200, content=blob)

    client_for(handler).download_blob(digest, tmp_path / "w", len(blob))
    assert (tmp_path / "w").read_bytes() == blob and len(calls) == 2


def _update_file(tmp_path: Path, n_samples: int = 7) -> tuple[Path, str]:
    data = to_safetensors({"w": np.ones(3, dtype=np.float32)}, {MetaKey.N_SAMPLES: str(n_samples)})
    path = tmp_path / "result.safetensors"
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def test_upload_streams_the_file_with_its_headers(tmp_path: Path, make_task):
    path, digest = _update_file(tmp_path)
    task = make_task()
    seen = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen["body"] = request.read()
        seen["headers"] = request.headers
        seen["path"] = request.url.path
        return httpx.Response(200, json={"task_id": task.id, "digest": digest, "n_samples": 7})

    accepted = client_for(handler, chunk_size=16).upload_update(task, path)
    assert accepted.digest == digest
    assert seen["path"] == f"/api/v1/tasks/{task.id}/update"
    assert seen["body"] == path.read_bytes()
    h = seen["headers"]
    assert h[Header.UPLOAD_NONCE] == "nonce-1" and h[Header.CONTENT_SHA256] == digest
    assert h["Content-Length"] == str(path.stat().st_size) and "Transfer-Encoding" not in h
    assert h["Content-Type"] == "application/octet-stream"


def test_upload_retries_503_with_the_whole_body(tmp_path: Path, make_task):
    path, digest = _update_file(tmp_path)
    task = make_task()
    bodies = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(request.read())
        if len(bodies) == 1:
            return error(503, "busy")
        return httpx.Response(200, json={"task_id": task.id, "digest": digest, "n_samples": 7})

    client_for(handler).upload_update(task, path)
    assert bodies == [path.read_bytes()] * 2


def test_upload_is_bounded(tmp_path: Path, make_task):
    path, _ = _update_file(tmp_path)
    calls = []

    def handler(request):
        calls.append(1)
        return error(503, "down")

    with pytest.raises(TransportError, match="after 3 tries"):
        client_for(handler, attempts=3).upload_update(make_task(), path)
    assert len(calls) == 3


def test_upload_409_with_our_digest_is_success(tmp_path: Path, make_task):
    path, digest = _update_file(tmp_path, n_samples=7)
    handler = lambda r: error(409, "already have a result", accepted_digest=digest)  # noqa: E731
    accepted = client_for(handler).upload_update(make_task(), path)
    assert (accepted.task_id, accepted.digest, accepted.n_samples) == ("t-1", digest, 7)


def test_upload_409_with_another_digest_is_a_conflict(tmp_path: Path, make_task):
    path, _ = _update_file(tmp_path)
    handler = lambda r: error(409, "already have a result", accepted_digest="0" * 64)  # noqa: E731
    with pytest.raises(Conflict, match="already have a result"):
        client_for(handler).upload_update(make_task(), path)


def test_evaluation_and_failure_bodies():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.method, request.url.path, json.loads(request.read())))
        return httpx.Response(200, json={})

    client = client_for(handler)
    client.send_evaluation("t-2", EvaluationResult(n_samples=4, metrics={"acc": 0.9}))
    client.send_failure("t-3", TaskFailure(kind=FailureKind.TIMEOUT, reason="too slow"))
    assert seen == [
        ("POST", "/api/v1/tasks/t-2/evaluation", {"n_samples": 4, "metrics": {"acc": 0.9}}),
        ("POST", "/api/v1/tasks/t-3/failure", {"kind": "timeout", "reason": "too slow"}),
    ]


def test_backoff_grows_and_is_capped():
    client = HubClient(HUB, "t", backoff_base_s=1.0, backoff_max_s=30.0)
    assert 0.5 <= client._backoff(1, None) <= 1.0
    assert 4.0 <= client._backoff(4, None) <= 8.0
    assert 15.0 <= client._backoff(50, None) <= 30.0
    assert client._backoff(1, retry_after=10) == 10
    client.close()


class _Flood(http.server.BaseHTTPRequestHandler):
    """Answers one GET with the server's ``body`` bytes, or with ``total`` bytes of filler,
    announcing ``length`` (None: no Content-Length, the body ends when the connection does)."""

    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        srv = self.server
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        if srv.length is not None:  # type: ignore[attr-defined]
            self.send_header("Content-Length", str(srv.length))  # type: ignore[attr-defined]
        self.end_headers()
        body = srv.body  # type: ignore[attr-defined]
        chunks = [body] if body is not None else iter(lambda: b"x" * (1 << 16), None)
        try:
            for chunk in chunks:
                if srv.sent >= srv.total:  # type: ignore[attr-defined]
                    break
                self.wfile.write(chunk)
                srv.sent += len(chunk)  # type: ignore[attr-defined]
        except OSError:  # the client hung up: what the test wants to see
            srv.hung_up = True  # type: ignore[attr-defined]

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def flood_server():
    """``serve(length, total, body=None)``: a real HTTP server on loopback that answers one
    download; returns (url, server). The server thread ends after that one answer."""
    started: list[tuple[http.server.HTTPServer, threading.Thread]] = []

    def serve(length: int | None, total: int, body: bytes | None = None):
        server = http.server.HTTPServer(("127.0.0.1", 0), _Flood)
        server.length, server.total, server.body, server.sent, server.hung_up = length, total, body, 0, False  # type: ignore[attr-defined]
        thread = threading.Thread(target=server.handle_request, daemon=True)
        thread.start()
        server.done = thread  # type: ignore[attr-defined]
        started.append((server, thread))
        return f"http://127.0.0.1:{server.server_address[1]}", server

    yield serve
    for server, thread in started:
        thread.join(30)
        server.server_close()


FLOOD = 64 << 20
"""What a flooding server would send if nobody stopped it: far beyond any socket buffers."""


def test_download_refuses_an_announced_body_larger_than_the_task_says(tmp_path: Path, flood_server):
    url, server = flood_server(length=10**12, total=FLOOD)
    digest = hashlib.sha256(b"x" * 1000).hexdigest()
    with HubClient(url, "tok", attempts=1) as client, pytest.raises(DataError) as info:
        client.download_blob(digest, tmp_path / "w.safetensors", 1000)
    message = str(info.value)
    assert f"downloading blob {digest[:12]}" in message
    assert "announced a body of 1000000000000 bytes, more than the 1000 bytes the task announced" in message
    assert list(tmp_path.iterdir()) == []


def test_download_stops_reading_once_more_than_expected_arrives(tmp_path: Path, flood_server):
    url, server = flood_server(length=None, total=FLOOD)
    digest = hashlib.sha256(b"x" * 1000).hexdigest()
    with HubClient(url, "tok", attempts=1) as client, pytest.raises(DataError) as info:
        client.download_blob(digest, tmp_path / "w.safetensors", 1000)
    assert f"downloading blob {digest[:12]}: the hub kept sending, more than the 1000 bytes" in str(info.value)
    assert list(tmp_path.iterdir()) == []  # the partial file is gone
    server.done.join(30)  # the server's one answer has ended
    assert server.hung_up and server.sent < FLOOD  # the client hung up long before the flood ended


def test_download_of_the_announced_size_from_a_real_server(tmp_path: Path, flood_server):
    blob = b"weights" * 1000
    url, _ = flood_server(length=len(blob), total=len(blob), body=blob)
    with HubClient(url, "tok", attempts=1) as client:
        assert client.download_blob(hashlib.sha256(blob).hexdigest(), tmp_path / "w", len(blob)) == len(blob)
    assert (tmp_path / "w").read_bytes() == blob
    assert stat.S_IMODE((tmp_path / "w").stat().st_mode) == 0o600


def test_every_request_carries_the_agent_version(tmp_path: Path, make_task):
    path, digest = _update_file(tmp_path)
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path.endswith("/update"):
            return httpx.Response(200, json={"task_id": "t-1", "digest": digest, "n_samples": 7})
        if request.url.path.startswith("/api/v1/blobs/"):
            return httpx.Response(200, content=b"abc")
        return httpx.Response(204)

    client = client_for(handler)
    client.next_task(0)
    client.download_blob(hashlib.sha256(b"abc").hexdigest(), tmp_path / "blob", 3)
    client.upload_update(make_task(), path)
    client.send_failure("t-1", TaskFailure(reason="x"))
    client.send_evaluation("t-1", EvaluationResult(n_samples=1, metrics={}))
    client.report(SiteReport(version=__version__, datasets={"ds": 3}))
    assert len(seen) == 6
    assert all(r.headers[Header.VERSION] == __version__ for r in seen)


def test_report_is_a_put_of_the_site_report():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.method, request.url.path, json.loads(request.read())))
        return httpx.Response(204)

    assert client_for(handler).report(SiteReport(version="1.2.3", datasets={"ds": 3, "misc": None})) is True
    assert seen == [("PUT", "/api/v1/sites/self/report", {"version": "1.2.3", "datasets": {"ds": 3, "misc": None}})]


@pytest.mark.parametrize("status", [404, 405])
def test_an_older_hub_without_reports_is_noted_once(status, caplog):
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(status, json={"detail": "Not Found"})

    client = client_for(handler)
    report = SiteReport(version="1.2.3", datasets={})
    with caplog.at_level(logging.INFO, logger="laulima.site"):
        assert client.report(report) is False
        assert client.report(report) is False
    assert len(calls) == 1
    assert len([r for r in caplog.records if "does not take reports" in r.getMessage()]) == 1


def test_other_refusals_of_a_report_are_errors():
    with pytest.raises(ProtocolError, match="422"):
        client_for(lambda r: error(422, "bad report")).report(SiteReport(version="1", datasets={}))
