"""The data scientist's and operator's client of the hub's REST API.

The CLI and the local simulation use it; site agents have their own client in
``laulima.site.client`` because a site speaks a different part of the protocol.
"""

from __future__ import annotations

import hashlib
import os
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from laulima.core.protocol import (
    API_PREFIX,
    BlobCreated,
    CrossSiteMatrix,
    ErrorBody,
    ExperimentCreate,
    ExperimentPublic,
    FingerprintPublic,
    Header,
    MetricRecord,
    RefusalRecord,
    Role,
    RoundPublic,
    ShareCreate,
    SiteCreate,
    SiteCreated,
    SitePublic,
    TokenCreate,
    TokenCreated,
    TokenPublic,
)
from laulima.errors import (
    ConfigurationError,
    Conflict,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    ProtocolError,
    TransportError,
)

__all__ = ["Client"]

_STATUS_ERRORS: dict[int, type[ProtocolError]] = {
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
}


CA_ENV = "LAULIMA_CA_FILE"
"""The federation CA certificate a person's client trusts for an https hub (``ca.pem``)."""


class Client:
    """Talks to one hub with one bearer token (operator or data scientist).

    An https hub's certificate is checked against ``ca_file`` (default: ``$LAULIMA_CA_FILE``,
    else the system's trust store); people need no certificate of their own.
    """

    def __init__(
        self,
        hub_url: str,
        token: str,
        *,
        client: httpx.Client | None = None,
        timeout: float = 60.0,
        ca_file: str | Path | None = None,
    ) -> None:
        self.hub_url = hub_url.rstrip("/")
        ca_file = ca_file or os.environ.get(CA_ENV) or None
        verify: Any = ssl.create_default_context(cafile=str(ca_file)) if ca_file else True
        self._http = client or httpx.Client(timeout=timeout, verify=verify)
        self._http.headers["Authorization"] = f"Bearer {token}"

    @property
    def token(self) -> str:
        """The bearer token this client sends (e.g. to sign a browser in to the dashboard)."""
        return str(self._http.headers["Authorization"]).removeprefix("Bearer ")

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- sites -----------------------------------------------------------------
    def register_site(self, name: str) -> SiteCreated:
        data = self._request("POST", "/sites", json=SiteCreate(name=name).model_dump())
        return SiteCreated.model_validate(data)

    def list_sites(self) -> list[SitePublic]:
        return [SitePublic.model_validate(x) for x in self._request("GET", "/sites")]

    def remove_site(self, name: str) -> SitePublic:
        return SitePublic.model_validate(self._request("DELETE", f"/sites/{name}"))

    # -- people's tokens (operator) --------------------------------------------
    def create_token(self, name: str, role: Role | str) -> TokenCreated:
        body = TokenCreate(name=name, role=Role(role)).model_dump(mode="json")  # type: ignore[arg-type]
        return TokenCreated.model_validate(self._request("POST", "/tokens", json=body))

    def list_tokens(self) -> list[TokenPublic]:
        return [TokenPublic.model_validate(x) for x in self._request("GET", "/tokens")]

    def revoke_token(self, token_id: int) -> TokenPublic:
        return TokenPublic.model_validate(self._request("POST", f"/tokens/{token_id}/revoke"))

    # -- blobs and experiments -------------------------------------------------
    def upload_blob(self, data: bytes) -> BlobCreated:
        """Upload weights; the announced sha256 lets the hub check the body and not count the same
        bytes twice against the upload quota."""
        digest = hashlib.sha256(data).hexdigest()
        headers = {"Content-Type": "application/octet-stream", Header.CONTENT_SHA256.value: digest}
        data_out = self._request("PUT", "/blobs", content=data, headers=headers)
        return BlobCreated.model_validate(data_out)

    def upload_bundle(self, data: bytes) -> BlobCreated:
        """Upload an algorithm bundle (``laulima.algorithms.bundle.pack``): a blob like weights,
        which a spec then names by the returned digest. The hub checks it when the experiment
        is submitted, not here."""
        return self.upload_blob(data)

    def submit(self, spec: dict[str, Any], initial_weights: bytes, bundle: bytes | None = None) -> ExperimentPublic:
        """Upload the initial weights (and the algorithm's ``bundle``, first), then submit ``spec``.

        With ``bundle`` the submitted spec's ``bundle`` is the uploaded digest (``spec`` itself is
        not changed); a spec that names another digest is refused before anything is sent."""
        spec = dict(spec)
        if bundle is not None:
            digest = hashlib.sha256(bundle).hexdigest()
            if spec.get("bundle") not in (None, digest):
                raise ConfigurationError(
                    f"field 'bundle': the spec names bundle {str(spec['bundle'])[:12]}… but the bundle given has "
                    f"sha256 {digest[:12]}…; drop the field or give its bundle",
                    field="bundle",
                )
            spec["bundle"] = self.upload_bundle(bundle).digest
        blob = self.upload_blob(initial_weights)
        body = ExperimentCreate(spec=spec, initial_weights=blob.digest).model_dump()
        return ExperimentPublic.model_validate(self._request("POST", "/experiments", json=body))

    def evaluate(self, spec: dict[str, Any], weights: bytes, bundle: bytes | None = None) -> ExperimentPublic:
        """Submit an evaluate-mode experiment: ``weights`` (safetensors bytes, e.g. a model trained
        elsewhere) are evaluated at the spec's sites (all, for ``sites = []``); nothing is trained.
        ``spec`` gets ``mode = "evaluate"``; a spec asking for another mode is refused here."""
        if spec.get("mode", "evaluate") != "evaluate":
            raise ConfigurationError(
                f"field 'mode': {spec['mode']!r}, but Client.evaluate submits an evaluation; drop the field or "
                "use Client.submit",
                field="mode",
            )
        return self.submit({**spec, "mode": "evaluate"}, weights, bundle)

    def cross_site(self, experiment_id: int) -> CrossSiteMatrix:
        """The experiment's evaluation after training as models x sites, pooled per model
        (``complete`` is False while tasks are still out)."""
        return CrossSiteMatrix.model_validate(self._request("GET", f"/experiments/{experiment_id}/cross-site"))

    def fingerprint(self, experiment_id: int) -> FingerprintPublic:
        """The merged dataset fingerprint of a completed fingerprint-mode experiment (nnU-Net's
        dataset_fingerprint.json and dataset.json, the sites in it, why any is missing).
        ``Conflict`` while it runs, once it failed, or for an experiment of another mode."""
        return FingerprintPublic.model_validate(self._request("GET", f"/experiments/{experiment_id}/fingerprint"))

    def experiments(self) -> list[ExperimentPublic]:
        return [ExperimentPublic.model_validate(x) for x in self._request("GET", "/experiments")]

    def experiment(self, experiment_id: int) -> ExperimentPublic:
        return ExperimentPublic.model_validate(self._request("GET", f"/experiments/{experiment_id}"))

    def cancel(self, experiment_id: int) -> ExperimentPublic:
        return ExperimentPublic.model_validate(self._request("POST", f"/experiments/{experiment_id}/cancel"))

    def share(self, experiment_id: int, name: str) -> ExperimentPublic:
        """Let the person ``name`` read the experiment (its owner or an operator may)."""
        body = ShareCreate(name=name).model_dump()
        return ExperimentPublic.model_validate(self._request("POST", f"/experiments/{experiment_id}/shares", json=body))

    def unshare(self, experiment_id: int, name: str) -> ExperimentPublic:
        path = f"/experiments/{experiment_id}/shares/{quote(name, safe='')}"
        return ExperimentPublic.model_validate(self._request("DELETE", path))

    def rounds(self, experiment_id: int) -> list[RoundPublic]:
        return [RoundPublic.model_validate(x) for x in self._request("GET", f"/experiments/{experiment_id}/rounds")]

    def metrics(self, experiment_id: int) -> list[MetricRecord]:
        data = self._request("GET", f"/experiments/{experiment_id}/metrics")
        return [MetricRecord.model_validate(_without_null_metrics(x)) for x in data]

    def refusals(self, experiment_id: int) -> list[RefusalRecord]:
        data = self._request("GET", f"/experiments/{experiment_id}/refusals")
        return [RefusalRecord.model_validate(x) for x in data]

    def download_model(self, experiment_id: int, dest: Path, *, model: str | None = None) -> Path:
        """Stream the newest global model (or ``model="local:<site>"``, a site's local-only model
        of the cross-site evaluation) into ``dest`` (safetensors)."""
        dest = Path(dest)
        tmp = dest.with_name(dest.name + ".part")
        path = f"/experiments/{experiment_id}/model" + (f"?model={quote(model, safe=':')}" if model else "")
        with self._stream("GET", path) as chunks, tmp.open("wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
        tmp.replace(dest)
        return dest

    # -- plumbing --------------------------------------------------------------
    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        url = f"{self.hub_url}{API_PREFIX}{path}"
        try:
            response = self._http.request(method, url, **kwargs)
        except httpx.TransportError as exc:
            raise _transport_error(self.hub_url, exc) from exc
        _raise_for_status(response)
        return response.json() if response.content else None

    def _stream(self, method: str, path: str) -> _StreamContext:
        return _StreamContext(self._http, method, f"{self.hub_url}{API_PREFIX}{path}")


class _StreamContext:
    def __init__(self, http: httpx.Client, method: str, url: str) -> None:
        self._cm = http.stream(method, url)

    def __enter__(self) -> Iterator[bytes]:
        try:
            response = self._cm.__enter__()
        except httpx.TransportError as exc:
            raise TransportError(f"hub unreachable: {exc}") from exc
        if response.status_code >= 400:
            response.read()
            _raise_for_status(response)
        return response.iter_bytes(1 << 20)

    def __exit__(self, *exc: Any) -> None:
        self._cm.__exit__(*exc)


def _without_null_metrics(record: Any) -> Any:
    """``record`` without metric values that are null. Hubs before metrics were checked stored
    NaN and Infinity, and serve them as null; dropping them keeps ``experiment status``, the
    simulation and the demo from failing on one old record."""
    if isinstance(record, dict) and isinstance(record.get("metrics"), dict):
        return {**record, "metrics": {k: v for k, v in record["metrics"].items() if v is not None}}
    return record


def _transport_error(hub_url: str, exc: httpx.TransportError) -> TransportError:
    text = str(exc)
    if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
        return TransportError(
            f"hub {hub_url}: its certificate is not trusted ({text}); point {CA_ENV} (or --ca) at the "
            "federation's ca.pem",
            hub=hub_url,
        )
    return TransportError(f"hub {hub_url} unreachable: {exc}", hub=hub_url)


def _raise_for_status(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        body = ErrorBody.model_validate(response.json())
        detail, context = body.detail, body.context
    except Exception:  # not our error format (proxy, crash page)
        detail, context = response.text[:500] or response.reason_phrase, {}
    if response.status_code == 401:
        raise Forbidden(f"hub refused the token: {detail}; check LAULIMA_TOKEN / --token", **context)
    if response.status_code >= 500:
        raise TransportError(f"hub error {response.status_code}: {detail}", **context)
    cls = _STATUS_ERRORS.get(response.status_code, ProtocolError)
    raise cls(detail, status=response.status_code, **context)
