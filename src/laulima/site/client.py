"""The site's side of the hub/site protocol over HTTP, with retries.

Network failures and 5xx answers are retried with exponential backoff and jitter; 4xx
answers are final for that request and become :mod:`laulima.errors` exceptions carrying
the hub's own explanation. Weights stream in both directions in MiB-sized chunks and are
sha256-checked, so a 100 MB model never sits in memory twice.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
from pydantic import ValidationError

from laulima import __version__
from laulima.core.fingerprint import SiteFingerprint
from laulima.core.protocol import (
    API_PREFIX,
    ErrorBody,
    EvaluationResult,
    Header,
    MetaKey,
    SiteReport,
    TaskFailure,
    TaskPublic,
    TaskWaiting,
    UploadAccepted,
)
from laulima.core.weights import parse_safetensors_header
from laulima.errors import (
    Conflict,
    DataError,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    ProtocolError,
    TransportError,
)
from laulima.private_files import open_private

__all__ = ["CHUNK_SIZE", "HubClient"]

log = logging.getLogger("laulima.site")
T = TypeVar("T")

CHUNK_SIZE = 4 << 20
"""Bytes per read/write when streaming weights: large enough that Python overhead vanishes."""

_STATUS_ERRORS: dict[int, type[ProtocolError]] = {
    401: Forbidden,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
}
_RETRY_STATUS = {408, 425, 429}
_CERT_ALERTS = [
    ("alert certificate revoked", "the certificate is revoked"),
    ("alert certificate expired", "the certificate has expired"),
    ("alert unknown ca", "the certificate is not signed by the federation CA"),
    ("alert bad certificate", "the certificate was not accepted"),
    ("alert certificate unknown", "the certificate was not accepted"),
    ("alert certificate required", "no certificate was presented"),
    ("alert decrypt error", "the certificate was not accepted"),
    ("alert access denied", "access denied"),
]
"""TLS alerts a hub sends when it refuses a client certificate (OpenSSL's wording)."""
"""4xx answers that mean "not now" rather than "no"; every 5xx is retried as well."""


class _Retry(Exception):
    """One attempt failed in a way worth repeating."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class HubClient:
    """One site's connection to its hub.

    ``client`` is injectable so tests can pass ``httpx.Client(transport=MockTransport(...))``.
    ``stop``, when set, interrupts backoff waits (the agent is shutting down).
    """

    def __init__(
        self,
        base_url: str,
        token: str | None,
        *,
        client: httpx.Client | None = None,
        backoff_max_s: float = 30.0,
        backoff_base_s: float = 0.5,
        attempts: int = 5,
        verify: Any = True,
        stop: threading.Event | None = None,
        chunk_size: int = CHUNK_SIZE,
        probe_verify: Any = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.backoff_max_s = backoff_max_s
        self.backoff_base_s = backoff_base_s
        self.attempts = attempts
        self.stop = stop or threading.Event()
        self.chunk_size = chunk_size
        self._owns_http = client is None
        self._http = client or httpx.Client(
            timeout=httpx.Timeout(60.0, connect=10.0), verify=verify, follow_redirects=False
        )
        self._headers = {"User-Agent": f"laulima-site/{__version__}", Header.VERSION.value: __version__}
        if token is not None:
            self._headers["Authorization"] = f"Bearer {token}"
        self.uses_certificate = token is None
        self._probe_verify = probe_verify
        """TLS settings without the client certificate: to tell a refused certificate from a
        hub that is merely restarting (see :meth:`_certificate_refused`)."""
        self.reports_supported = True
        """False once the hub answered 404/405 to :meth:`report` (a hub older than the report)."""

    # -- the protocol ------------------------------------------------------------------
    def next_task(self, wait: float, *, attempts: int | None = None) -> TaskPublic | None:
        """Long-poll for this site's next task; ``None`` if none came within ``wait`` s.

        Retries network failures until ``attempts`` (default: forever, until ``stop``).
        """

        def once() -> TaskPublic | None:
            response = self._send(
                "GET",
                "/tasks/next",
                what="polling for tasks",
                params={"wait": f"{wait:g}"},
                timeout=httpx.Timeout(wait + 10.0, connect=10.0),
            )
            if response.status_code == 204:
                return None
            try:
                return TaskPublic.model_validate_json(response.content)
            except ValidationError as exc:
                raise ProtocolError(
                    f"hub {self.base_url} sent a task this agent cannot read ({_first_error(exc)}); "
                    "hub and site may run different Laulima versions"
                ) from exc

        return self._retrying("polling for tasks", once, attempts)

    def download_blob(self, digest: str, dest: Path, expected_size: int | None = None) -> int:
        """Stream blob ``digest`` into ``dest`` (atomically, sha256-checked); return its size.

        With ``expected_size`` (the task's ``weights_size``) a body announced or arriving
        larger than that is refused at once: the disk never holds more than that many bytes of it.
        """
        dest = Path(dest)
        what = f"downloading blob {digest[:12]}"

        def too_large(received: str, done: str) -> DataError:
            return DataError(
                f"{what}: the hub {received}, more than the {expected_size} bytes the task announced; {done} "
                "— tell the federation operator if this repeats",
                digest=digest,
                expected_size=expected_size,
            )

        def once() -> int:
            tmp = dest.with_name(dest.name + ".part")
            try:
                with self._stream("GET", f"/blobs/{digest}", what=what) as response:
                    claimed = response.headers.get(Header.CONTENT_SHA256)
                    if claimed is not None and claimed.lower() != digest:
                        raise DataError(
                            f"{what}: the hub announced sha256 {claimed[:12]}… for it; "
                            "the hub's blob store may be damaged — tell the federation operator",
                            digest=digest,
                        )
                    announced = _content_length(response)
                    if expected_size is not None and announced is not None and announced > expected_size:
                        raise too_large(f"announced a body of {announced} bytes", "refused it before reading")
                    size, actual = _write_hashing(response.iter_bytes(), tmp, limit=expected_size)
                    if size < 0:
                        raise too_large("kept sending", "stopped reading and deleted the partial file")
            except httpx.TransportError as exc:
                tmp.unlink(missing_ok=True)
                raise self._transport_failure(exc, what) from exc
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            if expected_size is not None and size != expected_size:
                tmp.unlink(missing_ok=True)
                raise DataError(
                    f"{what}: received {size} bytes where the task announced {expected_size}; deleted "
                    "the file — tell the federation operator if this repeats",
                    digest=digest,
                )
            if actual != digest:
                tmp.unlink(missing_ok=True)
                raise DataError(
                    f"{what}: the received bytes have sha256 {actual[:12]}…, not the requested "
                    "digest; deleted the file — the hub's blob store may be damaged",
                    digest=digest,
                )
            os.replace(tmp, dest)
            return size

        return self._retrying(what, once, self.attempts)

    def upload_update(self, task: TaskPublic, path: Path, *, digest: str | None = None) -> UploadAccepted:
        """Stream the result file of a TRAIN task to the hub.

        A 409 whose ``accepted_digest`` equals ours means an earlier try arrived and only its
        answer was lost: that counts as success.
        """
        path = Path(path)
        digest = digest or _sha256_file(path, self.chunk_size)
        size = path.stat().st_size
        what = f"uploading the update of task {task.id}"
        headers = {
            "Content-Type": "application/octet-stream",
            "Content-Length": str(size),
            Header.UPLOAD_NONCE.value: task.upload_nonce,
            Header.CONTENT_SHA256.value: digest,
        }

        def once() -> UploadAccepted:
            try:
                response = self._send(
                    "PUT",
                    f"/tasks/{task.id}/update",
                    what=what,
                    content=_file_chunks(path, self.chunk_size),
                    headers=headers,
                    timeout=httpx.Timeout(300.0, connect=10.0),
                )
            except Conflict as exc:
                if exc.context.get("accepted_digest") == digest:
                    log.info("task %s: the hub already holds this update (an earlier answer was lost)", task.id)
                    return UploadAccepted(task_id=task.id, digest=digest, n_samples=_n_samples_of(path))
                raise
            return _parse(UploadAccepted, response, what)

        return self._retrying(what, once, self.attempts)

    def send_evaluation(self, task_id: str, result: EvaluationResult) -> None:
        self._post_json(
            f"/tasks/{task_id}/evaluation",
            result.model_dump(mode="json"),
            f"reporting the evaluation of task {task_id}",
        )

    def send_fingerprint(self, task_id: str, fingerprint: SiteFingerprint) -> None:
        """Report a FINGERPRINT task's result: the site's dataset fingerprint (JSON)."""
        self._post_json(
            f"/tasks/{task_id}/fingerprint",
            fingerprint.model_dump(mode="json"),
            f"reporting the dataset fingerprint of task {task_id}",
        )

    def send_failure(self, task_id: str, failure: TaskFailure) -> None:
        self._post_json(
            f"/tasks/{task_id}/failure", failure.model_dump(mode="json"), f"reporting the failure of task {task_id}"
        )

    def set_waiting(self, task_id: str, reason: str) -> None:
        """Tell the hub this task waits for the site administrator's approval, and why (the
        scientist sees it). The hub stops handing the task out; its round waits until the
        experiment's approval deadline. A task that is over raises ``Conflict`` or ``NotFound``,
        as :meth:`send_failure` does: drop it. ``reason`` is sent as one line of at most 500
        characters (the hub's bound), so a policy's long text never fails the request."""
        line = "".join(ch if ch.isprintable() else " " for ch in " ".join(reason.split()))[:500]
        body = TaskWaiting(reason=line or "waiting for the site administrator's approval").model_dump(mode="json")
        what = f"telling the hub that task {task_id} waits for approval"
        path = f"/tasks/{task_id}/waiting"
        self._retrying(what, lambda: self._send("PUT", path, what=what, json=body), self.attempts)

    def resume_task(self, task_id: str) -> TaskPublic | None:
        """The administrator approved: ask the hub to resume the task. Returns it with a fresh
        ``seconds_left`` (time it from now), or None when the hub says the task is over (409,
        404: its round closed, its experiment stopped, or the approval came too late)."""
        what = f"resuming task {task_id} after approval"

        def once() -> TaskPublic | None:
            try:
                response = self._send("POST", f"/tasks/{task_id}/resume", what=what)
            except (Conflict, NotFound) as exc:
                log.info("%s: the hub says the task is over (%s)", what, exc)
                return None
            return _parse(TaskPublic, response, what)

        return self._retrying(what, once, self.attempts)

    def call(
        self,
        method: str,
        path: str,
        *,
        what: str,
        json: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> httpx.Response:
        """One JSON request under the protocol's rules (retries on network failures and 5xx,
        errors mapped to Laulima's); for the smaller protocols built on this client
        (secure aggregation's phases)."""
        extra: dict[str, Any] = {}
        if timeout is not None:
            extra["timeout"] = httpx.Timeout(timeout, connect=10.0)

        def once() -> httpx.Response:
            return self._send(method, path, what=what, json=json, params=params, **extra)

        return self._retrying(what, once, self.attempts)

    def report(self, report: SiteReport) -> bool:
        """Tell the hub this agent's version and its datasets' case counts (one try).

        False, logged once, when the hub is older than the report (404/405); other refusals
        raise as usual, and so does a network failure (:class:`TransportError`): try later.
        """
        if not self.reports_supported:
            return False
        what = "reporting the site's version and datasets"
        try:
            self._retrying(
                what,
                lambda: self._send(
                    "PUT",
                    "/sites/self/report",
                    what=what,
                    json=report.model_dump(mode="json"),
                    timeout=httpx.Timeout(10.0, connect=10.0),
                ),
                1,
            )
        except ProtocolError as exc:
            if exc.context.get("status") not in (404, 405):
                raise
            self.reports_supported = False
            log.info("%s: the hub at %s does not take reports (an older hub); not sending them", what, self.base_url)
            return False
        return True

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> HubClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ----------------------------------------------------------------------
    def _post_json(self, path: str, body: dict[str, Any], what: str) -> None:
        self._retrying(what, lambda: self._send("POST", path, what=what, json=body), self.attempts)

    def _url(self, path: str) -> str:
        return f"{self.base_url}{API_PREFIX}{path}"

    def _send(
        self, method: str, path: str, *, what: str, headers: dict[str, str] | None = None, **kw: Any
    ) -> httpx.Response:
        try:
            response = self._http.request(method, self._url(path), headers={**self._headers, **(headers or {})}, **kw)
        except httpx.TransportError as exc:
            raise self._transport_failure(exc, what) from exc
        self._check(response, what)
        return response

    def _transport_failure(self, exc: httpx.TransportError, what: str) -> Exception:
        """A TLS refusal is final and says so; anything else is worth retrying.

        With TLS 1.3 a hub that refuses the site's certificate completes the handshake and
        then closes the connection, so the refusal arrives as a TLS alert on the first read.
        """
        text = f"{exc} {exc.__cause__ or ''} {exc.__context__ or ''}".lower()
        refused = next((reason for alert, reason in _CERT_ALERTS if alert in text), None)
        if refused is not None:
            return Forbidden(
                f"{what}: certificate refused by the hub at {self.base_url} ({refused}); "
                "ask the federation operator for a new enrolment bundle and install it with "
                "`laulima site init BUNDLE`",
                status=401,
                reason=refused,
            )
        if "certificate_verify_failed" in text or "certificate verify failed" in text:
            return Forbidden(
                f"{what}: the hub at {self.base_url} presented a certificate this site does not trust "
                f"({exc}); it is not signed by the federation CA of the site's bundle, or names another host",
                status=495,
                reason="hub certificate not trusted",
            )
        reason = f"{type(exc).__name__}: {exc}"
        if self.uses_certificate and isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError):
            if self._certificate_refused():
                return Forbidden(
                    f"{what}: certificate refused by the hub at {self.base_url}: it closes every connection "
                    "that presents this site's certificate but answers without one, so the certificate has "
                    "expired or is not signed by the federation's CA (the hub's log says which). Ask the "
                    "federation operator for a new enrolment bundle and install it with `laulima site init BUNDLE`",
                    status=401,
                    reason="certificate refused",
                )
            reason += " (if this repeats, the hub may have refused this site's certificate)"
        return _Retry(reason)

    def _certificate_refused(self) -> bool:
        """The hub dropped us: does it answer the same health check without our certificate?"""
        if self._probe_verify is None:
            return False
        try:
            with httpx.Client(verify=self._probe_verify, timeout=10.0) as probe:
                answered = probe.get(self._url("/health"), headers={Header.VERSION.value: __version__})
                return answered.status_code == 200 and not self._health_with_certificate()
        except httpx.HTTPError:
            return False

    def _health_with_certificate(self) -> bool:
        try:
            return self._http.get(self._url("/health"), headers=self._headers, timeout=10.0).status_code == 200
        except httpx.TransportError:
            return False

    def _stream(self, method: str, path: str, *, what: str) -> _Streamed:
        return _Streamed(self, self._http.stream(method, self._url(path), headers=self._headers), what)

    def _check(self, response: httpx.Response, what: str) -> None:
        status = response.status_code
        if status < 400:
            return
        try:
            body = ErrorBody.model_validate_json(response.read())
            detail, context = body.detail, dict(body.context)
        except (ValidationError, ValueError):  # not our error format: a proxy, a crash page
            detail, context = (response.text[:300].strip() or response.reason_phrase), {}
        if status >= 500 or status in _RETRY_STATUS:
            raise _Retry(f"hub answered {status}: {detail}", _retry_after(response))
        context = {k: v for k, v in context.items() if k not in ("message", "status")}
        if status == 401 or (status == 403 and context.get("reason") in ("revoked", "expired")):
            credential = "certificate" if self.uses_certificate else "token"
            hint = (
                "ask the federation operator for a new enrolment bundle and install it with `laulima site init BUNDLE`"
                if self.uses_certificate
                else "check LAULIMA_SITE_TOKEN or the site's token file, or ask the operator for a new token"
            )
            lead = f"the hub refused this site's {credential}"
            if self.uses_certificate:
                lead = "certificate refused by the hub"
            raise Forbidden(
                f"{what}: {lead} at {self.base_url} ({status}: {detail}); {hint}",
                **{**context, "status": 401},
            )
        cls = _STATUS_ERRORS.get(status, ProtocolError)
        raise cls(f"{what}: hub answered {status}: {detail}", status=status, **context)

    def _retrying(self, what: str, once: Callable[[], T], attempts: int | None) -> T:
        n = 0
        while True:
            n += 1
            try:
                return once()
            except _Retry as exc:
                if self.stop.is_set() or (attempts is not None and n >= attempts):
                    raise TransportError(
                        f"{what}: hub {self.base_url} unreachable after {n} tries ({exc.reason}); will retry later",
                        hub=self.base_url,
                    ) from exc
                delay = self._backoff(n, exc.retry_after)
                log.warning("%s: %s; retry %d in %.1f s", what, exc.reason, n, delay)
                if self.stop.wait(delay):
                    raise TransportError(f"{what}: stopped while waiting to retry", hub=self.base_url) from exc

    def _backoff(self, n: int, retry_after: float | None) -> float:
        """Exponential backoff with "equal jitter": half fixed, half random, capped."""
        ceiling = min(self.backoff_max_s, self.backoff_base_s * 2 ** min(n - 1, 30))
        delay = ceiling / 2 + random.uniform(0, ceiling / 2)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.backoff_max_s))
        return delay


class _Streamed:
    """``with client._stream(...) as response``: status checked before the body is read."""

    def __init__(self, client: HubClient, cm: Any, what: str) -> None:
        self._client, self._cm, self._what = client, cm, what

    def __enter__(self) -> httpx.Response:
        response = self._cm.__enter__()
        try:
            self._client._check(response, self._what)
        except BaseException as exc:
            self._cm.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return response

    def __exit__(self, *exc: Any) -> None:
        self._cm.__exit__(*exc)


def _write_hashing(chunks: Iterator[bytes], dest: Path, *, limit: int | None = None) -> tuple[int, str]:
    """Write ``chunks`` to ``dest`` (0600) hashing them; size -1 as soon as more than ``limit``
    bytes arrive (the rest is not read, and the excess never written)."""
    h = hashlib.sha256()
    size = 0
    with open(open_private(dest), "wb") as fh:
        for chunk in chunks:
            size += len(chunk)
            if limit is not None and size > limit:
                return -1, ""
            h.update(chunk)
            fh.write(chunk)
    return size, h.hexdigest()


def _content_length(response: httpx.Response) -> int | None:
    """The body's announced size in bytes, where it is the size of what ``iter_bytes`` yields."""
    if response.headers.get("Content-Encoding", "identity").strip().lower() != "identity":
        return None  # the length of the compressed body; the decoded one is counted as it arrives
    try:
        return int(response.headers["Content-Length"])
    except (KeyError, ValueError):
        return None


def _file_chunks(path: Path, chunk_size: int) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_size):
            yield chunk


def _sha256_file(path: Path, chunk_size: int) -> str:
    h = hashlib.sha256()
    for chunk in _file_chunks(path, chunk_size):
        h.update(chunk)
    return h.hexdigest()


def _n_samples_of(path: Path) -> int:
    with open(path, "rb") as fh:
        head = fh.read(8)
        head += fh.read(int.from_bytes(head[:8], "little") if len(head) == 8 else 0)
    try:
        _, metadata, _ = parse_safetensors_header(head, where=str(path))
        return int(metadata.get(MetaKey.N_SAMPLES, 0))
    except (DataError, ValueError):
        return 0


def _parse(model: type[T], response: httpx.Response, what: str) -> T:
    try:
        return model.model_validate_json(response.content)  # type: ignore[attr-defined, no-any-return]
    except ValidationError as exc:
        raise ProtocolError(
            f"{what}: the hub's answer is not a valid {model.__name__} ({_first_error(exc)}); "
            "hub and site may run different Laulima versions"
        ) from exc


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return float(response.headers["Retry-After"])
    except (KeyError, ValueError):
        return None


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    return f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}"
